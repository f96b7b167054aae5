"""The trainers' import graph, read from the source: no import circles (lazy imports inside functions count), no
private ``_name`` imported from another file, and the kernels reached only through the public API
(``import ptkernels as ptk``, ``ptkernels.nn``, ``ptkernels.integrations``), never ``ptkernels.ops`` and the like."""

import ast
import os

import ptkernels

from ..test_architecture import find_cycles

PACKAGE = "ptkernels.trainers"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(ptkernels.__file__)))
TRAINERS = os.path.join(ROOT, *PACKAGE.split("."))
INTERNALS = ("ptkernels.ops", "ptkernels.kernels", "ptkernels.reference", "ptkernels._C")


def module_name(path: str) -> str:
    rel = os.path.relpath(path, ROOT)[:-len(".py")].split(os.sep)
    return ".".join(rel[:-1] if rel[-1] == "__init__" else rel)


def modules() -> dict[str, str]:
    found = {}
    for folder, _, files in os.walk(TRAINERS):
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(folder, f)
                found[module_name(path)] = path
    found["ptkernels.cli"] = os.path.join(ROOT, "ptkernels", "cli.py")
    return found


def imports(name: str, path: str, known: dict[str, str]):
    """(imported module, imported names) for every import statement of the file, relative ones resolved."""
    is_package = path.endswith("__init__.py")
    for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, []
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = name.split(".")
                parts = parts if is_package else parts[:-1]
                parts = parts[:len(parts) - (node.level - 1)]
                base = ".".join(parts + ([base] if base else []))
            names = [a.name for a in node.names]
            # `from package import module` imports the module
            submodules = [f"{base}.{n}" for n in names if f"{base}.{n}" in known]
            yield base, [n for n in names if f"{base}.{n}" not in known]
            for sub in submodules:
                yield sub, []


def graph() -> tuple[dict[str, set[str]], list[str]]:
    known = modules()
    edges, private = {}, []
    for name, path in known.items():
        edges[name] = set()
        for target, names in imports(name, path, known):
            if target in known and target != name:
                edges[name].add(target)
                private += [f"{name} imports {target}.{n}" for n in names if n.startswith("_") and n != "__version__"]
            assert not target.startswith(INTERNALS), f"{name} imports {target}: use the public API (ptkernels as ptk)"
    return edges, private


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The import circles among ``edges`` (the package-wide finder of tests/test_architecture.py)."""
    return find_cycles(edges, edges)


def test_the_graph_reader_sees_the_trainers():
    edges, _ = graph()
    assert "ptkernels.trainers.modeling" in edges["ptkernels.trainers.recipes.sft"]
    assert "ptkernels.trainers.rollout.sampling" in edges["ptkernels.trainers.rollout.kv_cache"]
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_circles_in_the_trainers():
    edges, _ = graph()
    assert cycles(edges) == []


def test_no_private_name_crosses_files():
    _, private = graph()
    assert private == []
