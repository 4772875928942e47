"""The package's imports go down the layers of ARCHITECTURE.md, and never in a circle."""

from __future__ import annotations

import ast
from pathlib import Path

import kvserve

ROOT = Path(kvserve.__file__).parent
# Higher imports lower; equal ranks in different packages do not import each other.
RANKS = {
    "kvserve.cli": 7,
    "kvserve.server": 6, "kvserve.bench": 6,
    "kvserve.engine": 5,
    "kvserve.runner": 4, "kvserve.cache": 4, "kvserve.structured": 4,
    "kvserve.step": 3,
    "kvserve.model": 2,
    "kvserve.config": 1, "kvserve.sampling_params": 1, "kvserve.faults": 1,
    "kvserve.units": 0,
    "kvserve": 0,  # the package itself: __version__, and a lazy LLM for `from kvserve import`
}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer(module: str) -> str:
    parts = module.split(".")
    for n in (2, 1):
        if ".".join(parts[:n]) in RANKS:
            return ".".join(parts[:n])
    raise AssertionError(f"{module} is in no layer: add it to RANKS and to ARCHITECTURE.md")


def imports(path: Path, modules: set[str]) -> set[str]:
    """Every kvserve module this file imports at run time (function-level imports too,
    ``if TYPE_CHECKING:`` blocks not)."""
    tree = ast.parse(path.read_text())
    type_only = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If)
                 and ast.unparse(node.test) == "TYPE_CHECKING" for n in ast.walk(node)}
    found = set()
    for node in ast.walk(tree):
        if id(node) in type_only:
            continue
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("kvserve")}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("kvserve"):
            for a in node.names:
                sub = f"{node.module}.{a.name}"
                found.add(sub if sub in modules else node.module)
    return found


def graph() -> dict[str, set[str]]:
    paths = {module_name(p): p for p in ROOT.rglob("*.py")}
    edges = {m: imports(p, set(paths)) - {m} for m, p in paths.items()}
    edges["kvserve"] = set()  # the facade's lazy LLM import is its whole purpose
    return edges


def test_no_layer_imports_one_above_it_or_a_sibling():
    wrong = []
    for module, targets in graph().items():
        here = layer(module)
        for target in targets:
            there = layer(target)
            if there != here and RANKS[there] >= RANKS[here]:
                wrong.append(f"{module} imports {target}")
    assert wrong == []


def test_no_import_cycles():
    edges = graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles = []

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for target in sorted(edges.get(module, ())):
            if state.get(target) == 1:
                cycles.append(" -> ".join(path[path.index(target):] + [target]))
            elif target not in state:
                visit(target, path + [target])
        state[module] = 2

    for module in sorted(edges):
        if module not in state:
            visit(module, [module])
    assert cycles == []


def test_the_cache_and_the_step_contract_import_no_torch():
    for path in [*(ROOT / "cache").glob("*.py"), ROOT / "step.py", ROOT / "config.py"]:
        tree = ast.parse(path.read_text())
        names = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        names |= {n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
        assert not {n for n in names if n.split(".")[0] in ("torch", "numpy")}, path
