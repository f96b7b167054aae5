"""The package's import graph: no import circles, no upward edge between layers, no private name across files.

Every module of ``ptkernels`` is parsed with ``ast`` (nothing is imported or run); each ``import`` and
``from ... import`` statement, absolute or relative, at module level or inside a function (lazy imports
count: they run too), is an edge from the module to the module it names. ``from package import name`` is an
edge to ``package.name`` when that is a module, else to ``package`` (its ``__init__``). Importing
``a.b.c`` executes the parents' ``__init__`` too; those implicit edges are not counted (every import would
otherwise reach ``ptkernels/__init__``). Imports through ``importlib`` with a computed name are not seen.

Layers, bottom to top (a module belongs to the longest prefix listed in ``LAYERS``; a module no prefix
matches fails the test, so a new top-level module has to be placed on purpose):

    0  kernels         ``ptkernels.kernels`` (@triton.jit code only) and the native extension ``ptkernels._C``
    1  types           ``ptkernels.types``: the public output dataclasses, option names, ``compute_dtype``
    2  reference       ``ptkernels.reference``: the eager oracle (returns the public types)
    3  ops.core        ``ptkernels.ops.core``: checks, chunk loop, dispatch, GEMMs
    4  ops.backends    ``ptkernels.ops.backends``: torch / triton (launchers) / native (custom ops) row math
    5  ops             ``ptkernels.ops`` and its op-family files: checks, autograd Function, public function
    6  public          ``ptkernels`` (``__init__``, the public API) and ``ptkernels.nn``
    7  integrations    ``ptkernels.integrations`` (Hugging Face helpers)
    8  applications    ``ptkernels.trainers``, ``ptkernels.cli``, ``ptkernels.check``, ``ptkernels.__main__``

A module may import from its own layer (if that makes no circle) and from any layer below it, never from a
layer above. On top of that, the applications layer uses the public API only: it may import ``ptkernels``,
``ptkernels.nn``, ``ptkernels.types``, ``ptkernels.integrations`` and its own modules, never ops, kernels or
reference internals. And below the applications layer no module imports an underscore name from another
module (the extension ``_C`` is the one exception: it is a module).
"""

from __future__ import annotations

import ast
from pathlib import Path

import ptkernels

PACKAGE_DIR = Path(ptkernels.__file__).resolve().parent
EXTENSIONS = {"ptkernels._C"}  # compiled modules: no source to parse, at the bottom with the kernels

LAYERS = {
    "ptkernels.kernels": 0,
    "ptkernels._C": 0,
    "ptkernels.types": 1,
    "ptkernels.reference": 2,
    "ptkernels.ops.core": 3,
    "ptkernels.ops.backends": 4,
    "ptkernels.ops": 5,
    "ptkernels": 6,
    "ptkernels.nn": 6,
    "ptkernels.integrations": 7,
    "ptkernels.trainers": 8,
    "ptkernels.cli": 8,
    "ptkernels.check": 8,
    "ptkernels.__main__": 8,
}
LAYER_NAMES = ["kernels", "types", "reference", "ops.core", "ops.backends", "ops", "public", "integrations",
               "applications"]
APPLICATION_LAYER = 8
PUBLIC_API = ("ptkernels", "ptkernels.nn", "ptkernels.types", "ptkernels.integrations")


def discover() -> dict[str, tuple[Path, bool]]:
    """module name -> (source file, is a package)."""
    modules = {}
    for path in sorted(PACKAGE_DIR.rglob("*.py")):
        rel = path.relative_to(PACKAGE_DIR.parent).with_suffix("")
        parts = list(rel.parts)
        is_pkg = parts[-1] == "__init__"
        if is_pkg:
            parts = parts[:-1]
        modules[".".join(parts)] = (path, is_pkg)
    return modules


def _resolve_base(module: str, is_pkg: bool, level: int, target: str | None) -> str:
    if level == 0:
        return target or ""
    parts = module.split(".") if is_pkg else module.split(".")[:-1]
    parts = parts[: len(parts) - (level - 1)]
    return ".".join(parts + ([target] if target else []))


def imports_of(module: str, path: Path, is_pkg: bool, known: set[str]) -> list[tuple[str, str | None, int]]:
    """(imported module, imported name or None, line) for every import statement in the module's source."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                found.append((alias.name, None, node.lineno))
        elif isinstance(node, ast.ImportFrom):
            base = _resolve_base(module, is_pkg, node.level, node.module)
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                if sub in known or sub in EXTENSIONS:
                    found.append((sub, None, node.lineno))
                else:
                    found.append((base, alias.name, node.lineno))
    return [(m, name, line) for m, name, line in found if m == "ptkernels" or m.startswith("ptkernels.")]


def layer_of(module: str) -> int | None:
    parts = module.split(".")
    for i in range(len(parts), 0, -1):
        prefix = ".".join(parts[:i])
        if prefix in LAYERS:
            return LAYERS[prefix]
    return None


def build_graph():
    modules = discover()
    known = set(modules)
    edges: dict[str, list[tuple[str, str | None, int]]] = {}
    for name, (path, is_pkg) in modules.items():
        edges[name] = imports_of(name, path, is_pkg, known)
    return modules, edges


def find_cycles(nodes, adjacency) -> list[list[str]]:
    """Strongly connected components with more than one module (or a module importing itself), Tarjan."""
    index, low, on_stack, stack, out = {}, {}, set(), [], []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in adjacency.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1 or v in adjacency.get(v, ()):
                out.append(sorted(comp))

    for v in sorted(nodes):
        if v not in index:
            visit(v)
    return out


def test_every_module_has_a_layer():
    modules, _ = build_graph()
    unplaced = sorted(m for m in modules if layer_of(m) is None)
    assert not unplaced, f"modules outside every layer (add them to LAYERS in {__name__}): {unplaced}"


def test_no_import_cycles():
    modules, edges = build_graph()
    adjacency = {m: sorted({t for t, _, _ in edges[m] if t in modules and t != m}) for m in modules}
    cycles = find_cycles(modules, adjacency)
    described = []
    for comp in cycles:
        members = set(comp)
        arrows = sorted({f"{m} -> {t} (line {line})" for m in comp for t, _, line in edges[m]
                         if t in members and t != m})
        described.append("\n    ".join(arrows))
    assert not cycles, "import circles:\n  " + "\n  ".join(described)


def test_no_upward_imports():
    modules, edges = build_graph()
    bad = []
    for m in sorted(modules):
        lm = layer_of(m)
        for target, _, line in edges[m]:
            lt = layer_of(target)
            if lm is not None and lt is not None and lt > lm:
                bad.append(f"{m} ({LAYER_NAMES[lm]}) imports {target} ({LAYER_NAMES[lt]}) at line {line}")
    assert not bad, "imports from a higher layer:\n  " + "\n  ".join(bad)


def test_applications_use_the_public_api():
    modules, edges = build_graph()
    bad = []
    for m in sorted(modules):
        if layer_of(m) != APPLICATION_LAYER:
            continue
        for target, _, line in edges[m]:
            if layer_of(target) == APPLICATION_LAYER or target in EXTENSIONS:
                continue
            public = target in PUBLIC_API or target.startswith("ptkernels.integrations.")
            if not public:
                bad.append(f"{m} imports {target} at line {line}")
    assert not bad, (f"application modules reach below the public API ({', '.join(PUBLIC_API)}):\n  "
                     + "\n  ".join(bad))


def test_no_private_names_across_modules():
    """Below the applications layer (the kernels, reference, ops, public API and integrations)."""
    modules, edges = build_graph()
    bad = [f"{m} imports {name} from {target} at line {line}" for m in sorted(modules)
           if layer_of(m) < APPLICATION_LAYER
           for target, name, line in edges[m]
           if name is not None and name.startswith("_") and not name.startswith("__") and target != m]
    assert not bad, "private names imported from another module:\n  " + "\n  ".join(bad)


def test_the_graph_sees_lazy_and_relative_imports():
    """The parser itself: a function-local relative import and a from-package-import-module are edges."""
    modules, edges = build_graph()
    targets = {t for t, _, _ in edges["ptkernels.ops.backends"]}
    assert {"ptkernels.ops.backends.triton", "ptkernels.ops.backends.native",
            "ptkernels.ops.backends.torch"} <= targets
    assert ("ptkernels.types", "compute_dtype") in {(t, n) for t, n, _ in edges["ptkernels.ops.linear_cross_entropy"]}
    assert layer_of("ptkernels.ops.core.gemm") == 3 and layer_of("ptkernels") == 6
    assert find_cycles({"a", "b", "c"}, {"a": ["b"], "b": ["c"], "c": ["a"]}) == [["a", "b", "c"]]
