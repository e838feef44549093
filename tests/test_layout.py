"""The structure the README's Layout section describes, held where a test can hold it."""

import ast
import importlib
import subprocess
import sys
import warnings
from pathlib import Path

import pytest


def imported_modules(statement: str) -> set[str]:
    """Every module a fresh interpreter imports to run `statement` (from -X importtime)."""
    done = subprocess.run([sys.executable, "-X", "importtime", "-c", statement], capture_output=True, text=True,
                          check=True)
    return {line.rsplit("|", 1)[-1].strip() for line in done.stderr.splitlines() if line.startswith("import time:")}


@pytest.mark.parametrize("module", ["sfa_vivit.train", "sfa_vivit.tools.evaluate"])
def test_the_read_side_imports_no_write_side(module):
    """Training and evaluation read shards through data.manifest and data.reader: neither PyAV, the
    annotation parsers, prep, nor kfp comes with them."""
    modules = imported_modules(f"import {module}")
    assert "sfa_vivit.data.manifest" in modules
    forbidden = {"av", "sfa_vivit.data.prep.annotations", "sfa_vivit.data.prep", "sfa_vivit.data.prep.video",
                 "sfa_vivit.models.importers", "kfp"}
    assert not forbidden & modules, sorted(forbidden & modules)


SRC = Path(__file__).resolve().parents[1] / "src"
# The package's floors, lowest first: a module imports from its own folder and the floors below only
# (models and data stand side by side and do not import each other).
FLOORS = {"core": 0, "models": 1, "data": 1, "train": 2, "tools": 3, "kubeflow": 4, "cli": 5}


def _module(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, top_level_only: bool = False) -> set[str]:
    """The sfa_vivit modules `path` imports (`from a import b` counts as a.b when that is a module)."""
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    found = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("sfa_vivit")}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("sfa_vivit"):
            for a in node.names:
                sub = f"{node.module}.{a.name}"
                found.add(sub if (SRC / sub.replace(".", "/")).with_suffix(".py").exists()
                          or (SRC / sub.replace(".", "/")).is_dir() else node.module)
    return found


def _floor(module: str) -> tuple[str, int] | None:
    parts = module.split(".")
    if len(parts) < 2 or parts[1].startswith("_"):
        return None                                 # sfa_vivit itself (__version__) and its private helpers
    return parts[1], FLOORS[parts[1]]


def test_every_module_imports_its_own_floor_or_below():
    modules = {_module(p): p for p in (SRC / "sfa_vivit").rglob("*.py")}
    assert set(FLOORS) >= {_module(p).split(".")[1] for p in modules.values() if _floor(_module(p))}
    upward = []
    for name, path in modules.items():
        here = _floor(name)
        if here is None:
            continue
        for target in _imports(path):
            there = _floor(target)
            if there and there[0] != here[0] and there[1] >= here[1]:
                upward.append(f"{name} -> {target}")
    assert not upward, upward


def test_no_import_loops():
    modules = {_module(p): p for p in (SRC / "sfa_vivit").rglob("*.py")}
    graph = {name: {t for t in _imports(path, top_level_only=True) if t in modules and t != name}
             for name, path in modules.items()}
    state: dict[str, int] = {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for nxt in graph[node]:
            assert state.get(nxt) != 1, " -> ".join(trail + [node, nxt])
            if nxt not in state:
                visit(nxt, trail + [node])
        state[node] = 2

    for node in graph:
        if node not in state:
            visit(node, [])


def test_moved_names_keep_working_for_a_release_and_say_where_they_went():
    from sfa_vivit import _moved
    for old, new in _moved.MODULES.items():
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            sys.modules.pop(old, None)
            module = importlib.import_module(old)
        assert module is importlib.import_module(new), old
        assert any(new in str(w.message) and issubclass(w.category, DeprecationWarning) for w in caught), old
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        from sfa_vivit.train.config import make_optimizer
        from sfa_vivit.train.optim import make_optimizer as moved
    assert make_optimizer is moved and "sfa_vivit.train.optim.make_optimizer" in str(caught[0].message)
    with pytest.raises(AttributeError, match="has no attribute 'no_such_name'"):
        from sfa_vivit.train import config
        config.no_such_name  # noqa: B018
