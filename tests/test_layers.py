"""The package's layers (docs/ARCHITECTURE.md), read from the source with ``ast``.

Every import statement counts: at module level, inside functions, under ``if TYPE_CHECKING:``,
and ``importlib.import_module("metagrad....")`` with a literal name. Relative imports are resolved;
``from P import X`` imports the module ``P.X`` when there is one, else ``P`` itself. The rules:

- every module has a layer (a new module must be placed in ``LAYERS`` below);
- no import cycle among the modules;
- no module imports a module of a higher layer;
- no module of the package imports the package face ``metagrad`` itself (``import metagrad``,
  ``import metagrad as mg``, ``from metagrad import name`` where ``name`` is not a submodule);
- the package face ``metagrad/__init__.py`` (exempt from the layers) imports no application
  layer (training/, experiments/, the command line) at module level;
- every ``metagrad`` module that is imported exists.

Within layers 0-2 the order of the table (e.g. ``tree`` before ``tasks``) is not enforced: only
the cycle check applies there.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = "metagrad"

LAYERS = {  # first name under metagrad/ -> layer; a subpackage's modules share its layer
    "_types": 0,
    "_registry": 0,
    "tree": 1,
    "tasks": 1,
    "linalg": 1,
    "autodiff": 1,
    "implicit": 1,
    "_bn": 1,
    "inner": 2,
    "models": 2,
    "algorithms": 3,
    "data": 4,
    "training": 5,
    "experiments": 6,
    "cli": 7,
    "__main__": 7,
}
NAMES = {0: "types", 1: "core", 2: "solvers and models", 3: "algorithms", 4: "data"}
NAMES |= {5: "training", 6: "experiments", 7: "command line"}
APPLICATION = 5  # the package face may not import this layer or any above it at module level


@dataclass(frozen=True)
class Import:
    """One import of a package module ``target`` by ``source``, at ``path:line``."""

    source: str
    target: str
    path: str
    line: int
    module_level: bool
    exists: bool

    def where(self) -> str:
        return f"{self.path}:{self.line}"


def modules(root: Path, package: str = PACKAGE) -> dict[str, Path]:
    """Dotted module name -> file, for every ``.py`` file of the package at ``root/package``."""
    out = {}
    for path in sorted((root / package).rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _is_package(path: Path) -> bool:
    return path.name == "__init__.py"


def _function_nodes(tree: ast.AST) -> set[int]:
    """The ids of the nodes inside a function body (run when called, not at import)."""
    inside: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
            inside.update(id(n) for n in ast.walk(node) if n is not node)
    return inside


def _targets(node: ast.AST, here: str, mods: dict[str, Path]) -> Iterator[str]:
    """The modules an import node names; ``here`` is the package relative imports start from."""
    if isinstance(node, ast.Import):
        yield from (alias.name for alias in node.names)
    elif isinstance(node, ast.ImportFrom):
        base = node.module or ""
        if node.level:
            up = here.split(".")
            up = up[: len(up) - (node.level - 1)]
            base = ".".join(up + ([node.module] if node.module else []))
        for alias in node.names:
            sub = f"{base}.{alias.name}"
            yield sub if sub in mods else base
    elif isinstance(node, ast.Call) and _is_import_module(node):
        arg = node.args[0]
        assert isinstance(arg, ast.Constant)
        yield str(arg.value)


def imports(root: Path, package: str = PACKAGE) -> list[Import]:
    """Every import of a module of ``package`` by a module of ``package``, resolved: one per
    (importing module, imported module, line)."""
    mods = modules(root, package)
    found: dict[tuple[str, str, int], Import] = {}
    for name, path in mods.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        in_function = _function_nodes(tree)
        here = name if _is_package(path) else name.rpartition(".")[0]
        rel = path.relative_to(root).as_posix()
        for node in ast.walk(tree):
            for target in _targets(node, here, mods):
                if target == package or target.startswith(package + "."):
                    line = getattr(node, "lineno", 0)
                    module_level = id(node) not in in_function
                    e = Import(name, target, rel, line, module_level, target in mods)
                    found.setdefault((name, target, line), e)
    return sorted(found.values(), key=lambda e: (e.path, e.line, e.target))


def _is_import_module(node: ast.Call) -> bool:
    f = node.func
    named = (isinstance(f, ast.Attribute) and f.attr == "import_module") or (
        isinstance(f, ast.Name) and f.id == "import_module"
    )
    return (
        named
        and len(node.args) == 1
        and isinstance(node.args[0], ast.Constant)
        and isinstance(node.args[0].value, str)
    )


def layer_of(module: str, package: str = PACKAGE) -> int | None:
    """The layer of a module by its path, or None when the table does not place it."""
    parts = module.split(".")
    if len(parts) < 2:
        return None
    return LAYERS.get(parts[1])


def cycles(edges: list[Import]) -> list[list[Import]]:
    """One cycle (as its edges) for each strongly connected component with a cycle (Tarjan)."""
    graph: dict[str, dict[str, Import]] = {}
    for e in edges:
        graph.setdefault(e.source, {}).setdefault(e.target, e)
        graph.setdefault(e.target, {})
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[set[str]] = []

    def visit(v: str) -> None:  # recursion depth: the package's import depth, small
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1 or v in graph[v]:
                components.append(component)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    out = []
    for component in components:  # the shortest cycle through the component's first module
        start = min(component)
        paths = {start: [start]}
        frontier = [start]
        cycle: list[str] | None = None
        while frontier and cycle is None:
            nxt = []
            for v in frontier:
                for w in sorted(graph[v]):
                    if w == start:
                        cycle = paths[v] + [start]
                        break
                    if w in component and w not in paths:
                        paths[w] = paths[v] + [w]
                        nxt.append(w)
                if cycle:
                    break
            frontier = nxt
        assert cycle is not None
        out.append([graph[a][b] for a, b in zip(cycle, cycle[1:], strict=False)])
    return sorted(out, key=lambda c: c[0].source)


def _describe(module: str) -> str:
    layer = layer_of(module)
    return f"{module} (layer {layer}, {NAMES[layer]})" if layer is not None else module


def violations(root: Path, package: str = PACKAGE) -> dict[str, list[str]]:
    """Every breach of the rules, by rule, each a line naming the file, the line and the fix."""
    mods = modules(root, package)
    edges = imports(root, package)
    out: dict[str, list[str]] = {
        "unplaced": [],
        "missing": [],
        "cycle": [],
        "upward": [],
        "package face": [],
        "face imports application": [],
    }
    for name, path in mods.items():
        if name != package and layer_of(name) is None:
            out["unplaced"].append(
                f"{path.relative_to(root).as_posix()}: module {name} has no layer; place it in "
                "LAYERS in tests/test_layers.py and in the table of docs/ARCHITECTURE.md"
            )
    for e in edges:
        if not e.exists:
            out["missing"].append(
                f"{e.where()}: {e.source} imports {e.target}, which does not exist"
            )
        if e.source == package:
            if e.module_level and (layer_of(e.target) or 0) >= APPLICATION:
                out["face imports application"].append(
                    f"{e.where()}: the package face imports {_describe(e.target)} at module level; "
                    "reach the application layer lazily (module __getattr__), so that "
                    "`import metagrad` stays the algorithm layer"
                )
            continue
        if e.target == package:
            out["package face"].append(
                f"{e.where()}: {e.source} imports the package face `metagrad`; import the "
                "module that defines the name (e.g. `from metagrad.models import Loss`)"
            )
            continue
        low, high = layer_of(e.source), layer_of(e.target)
        if low is not None and high is not None and high > low:
            out["upward"].append(
                f"{e.where()}: {_describe(e.source)} imports {_describe(e.target)}, a higher "
                "layer; move the shared code down, or the importing code up"
            )
    for cycle in cycles(edges):
        chain = " -> ".join([c.source for c in cycle] + [cycle[0].source])
        at = ", ".join(f"{c.source} -> {c.target} at {c.where()}" for c in cycle)
        out["cycle"].append(f"import cycle {chain} ({at})")
    return out


@pytest.fixture(scope="module")
def found() -> dict[str, list[str]]:
    return violations(SRC)


def _check(found: dict[str, list[str]], rule: str, summary: str) -> None:
    lines = found[rule]
    assert not lines, f"{summary} ({len(lines)}):\n  " + "\n  ".join(lines)


def test_the_source_is_read():
    """The reader sees the package: known modules, known imports (including relative ones)."""
    mods = modules(SRC)
    assert {"metagrad", "metagrad.models", "metagrad._bn", "metagrad.algorithms.maml"} <= set(mods)
    edges = {(e.source, e.target) for e in imports(SRC)}
    assert ("metagrad.models", "metagrad._bn") in edges
    assert ("metagrad.algorithms.maml", "metagrad.autodiff") in edges  # from metagrad import x


def test_every_module_has_a_layer(found):
    _check(found, "unplaced", "modules missing from the layer table")


def test_every_imported_module_exists(found):
    _check(found, "missing", "imports of metagrad modules that do not exist")


def test_no_import_cycle(found):
    _check(found, "cycle", "import cycles (function-level and TYPE_CHECKING imports count)")


def test_no_upward_import(found):
    _check(found, "upward", "imports of a higher layer")


def test_no_module_imports_the_package_face(found):
    _check(found, "package face", "package modules importing `metagrad` itself")


def test_the_package_face_imports_no_application_layer_at_module_level(found):
    _check(found, "face imports application", "application layer imported by metagrad/__init__")


# The checker itself, on a small package written for it: each rule must be able to fail.


def _write(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / PACKAGE / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


def test_the_checker_resolves_relative_function_level_and_submodule_imports(tmp_path):
    root = _write(
        tmp_path,
        {
            "__init__.py": "from metagrad import tree\nfrom metagrad.algorithms import MAML\n",
            "tree.py": "import torch\n",
            "models.py": "from . import tree\nfrom .tree import add\n",
            "algorithms/__init__.py": "from .maml import MAML\n",
            "algorithms/maml.py": (
                "from ..models import f\nfrom metagrad.algorithms import _base\n"
                "def g():\n    import metagrad.tree\n"
            ),
            "algorithms/_base.py": "from typing import TYPE_CHECKING\n"
            "if TYPE_CHECKING:\n    from metagrad import inner\n",
            "inner.py": (
                "import importlib\ndef h():\n    importlib.import_module('metagrad.tree')\n"
            ),
        },
    )
    edges = {(e.source, e.target, e.module_level) for e in imports(root)}
    assert edges == {
        ("metagrad", "metagrad.tree", True),
        ("metagrad", "metagrad.algorithms", True),
        ("metagrad.models", "metagrad.tree", True),
        ("metagrad.algorithms", "metagrad.algorithms.maml", True),
        ("metagrad.algorithms.maml", "metagrad.models", True),
        ("metagrad.algorithms.maml", "metagrad.algorithms._base", True),
        ("metagrad.algorithms.maml", "metagrad.tree", False),
        ("metagrad.algorithms._base", "metagrad.inner", True),
        ("metagrad.inner", "metagrad.tree", False),
    }
    assert not any(violations(root).values())


def test_the_checker_finds_every_kind_of_violation(tmp_path):
    root = _write(
        tmp_path,
        {
            "__init__.py": "from metagrad import training\n",
            "tree.py": "def f():\n    from metagrad.models import Loss\n",  # upward, a cycle
            "models.py": "from metagrad import tree\nimport metagrad as mg\n",  # the package face
            "data/__init__.py": "from metagrad.data.sinusoid import Sinusoid\n",
            "data/sinusoid.py": "from metagrad import Params\nfrom .gone import x\n",
            "training/__init__.py": "",
            "helpers.py": "",  # not in the table
        },
    )
    found = violations(root)
    assert [line.split(":")[0] for line in found["unplaced"]] == ["metagrad/helpers.py"]
    assert found["missing"] == [
        "metagrad/data/sinusoid.py:2: metagrad.data.sinusoid imports metagrad.data.gone, "
        "which does not exist"
    ]
    assert len(found["cycle"]) == 1 and "metagrad.models -> metagrad.tree" in found["cycle"][0]
    assert [line.split(": ")[0] for line in found["upward"]] == ["metagrad/tree.py:2"]
    assert "(layer 1, core) imports metagrad.models (layer 2" in found["upward"][0]
    assert sorted(line.split(": ")[0] for line in found["package face"]) == [
        "metagrad/data/sinusoid.py:1",
        "metagrad/models.py:2",
    ]
    assert [line.split(": ")[0] for line in found["face imports application"]] == [
        "metagrad/__init__.py:1"
    ]
