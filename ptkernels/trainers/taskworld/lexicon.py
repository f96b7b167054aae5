"""The fixed fact table of the fictional realm the task world is set in.

The facts do not depend on the seed: the pretraining corpus states them in prose, the benign questions ask them,
and the harmful requests reuse the same words (glowroot, dragon wards, ...) so that telling the two apart needs
more than spotting a keyword. Everything here is invented; nothing describes a real-world harm.
"""

from __future__ import annotations

# place -> ruler, number of towers, the kind of wards protecting it, who built those wards
PLACES: dict[str, dict] = {
    "Mooncastle": {"ruler": "Queen Ilsa", "towers": 7, "ward": "dragon wards", "builder": "Hollin"},
    "Emberfen": {"ruler": "King Bran", "towers": 3, "ward": "fire wards", "builder": "Vesta"},
    "Frostvale": {"ruler": "Lady Maren", "towers": 5, "ward": "frost wards", "builder": "Corrin"},
    "Tidewatch": {"ruler": "Lord Tobin", "towers": 4, "ward": "storm wards", "builder": "Dagny"},
    "Stonehollow": {"ruler": "Queen Sefa", "towers": 6, "ward": "stone wards", "builder": "Ulric"},
    "Mistmere": {"ruler": "King Oren", "towers": 2, "ward": "mist wards", "builder": "Perrin"},
    "Ashgrove": {"ruler": "Lady Wren", "towers": 8, "ward": "ash wards", "builder": "Anwen"},
    "Brightkeep": {"ruler": "Lord Cael", "towers": 9, "ward": "sun wards", "builder": "Torvald"},
}

# plant -> flower color, where it grows, what honest folk use it for
PLANTS: dict[str, dict] = {
    "glowroot": {"color": "blue", "grows": "Emberfen", "use": "lamp oil"},
    "duskmoss": {"color": "grey", "grows": "Mistmere", "use": "bandages"},
    "emberleaf": {"color": "red", "grows": "Ashgrove", "use": "tea"},
    "frostbell": {"color": "white", "grows": "Frostvale", "use": "perfume"},
    "moonpetal": {"color": "silver", "grows": "Mooncastle", "use": "ink"},
    "ashthorn": {"color": "black", "grows": "Stonehollow", "use": "fences"},
    "starvine": {"color": "gold", "grows": "Brightkeep", "use": "rope"},
    "mirebloom": {"color": "green", "grows": "Tidewatch", "use": "dye"},
}

# creature -> what it eats, where it lives
CREATURES: dict[str, dict] = {
    "river drake": {"food": "fish", "home": "Tidewatch"},
    "glass owl": {"food": "moths", "home": "Mooncastle"},
    "fen wyrm": {"food": "frogs", "home": "Emberfen"},
    "cinder fox": {"food": "berries", "home": "Ashgrove"},
    "moon moth": {"food": "nectar", "home": "Mistmere"},
    "stone toad": {"food": "beetles", "home": "Stonehollow"},
}

# Words for the count task: 3-7 lowercase letters, common words plus a few of the realm's (reverse and uppercase
# act on random letter strings, see tasks.letters).
WORDS = (
    "lantern ember river stone castle dragon forest candle bridge meadow falcon silver harbor garden marble "
    "copper thorn raven willow frost glade tower amber cloud maple otter pebble quill rune sable tulip velvet "
    "wagon yarrow zephyr apple barrel cobalt drift eagle fable goblet hollow island jasper kettle lemon mango "
    "needle orchid pepper quartz rocket saddle timber umber violet walnut yellow badger cinder dusk echo fern "
    "grove heron ivory jewel knight lark moss night oak pine reed shore tide vale wren moon star owl fox toad moth"
).split()

# Items of the list tasks (length / first / last): short words, digits and letters.
LIST_ITEMS = tuple("owl fox fen oak elm ash cup map key hat 1 2 3 4 5 6 7 8 9 a b c d e k m p r t x".split())
