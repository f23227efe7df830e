"""Layering contract (docs/architecture.md): data flows one way, and nothing imports a module of a higher layer.

The import graph is read from the source with `ast`, so imports inside functions (lazy imports) and
`importlib.import_module("regretless....")` calls count too. A second test imports the model loader in a fresh
interpreter and checks that the trainer never comes with it.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "src" / "regretless"

# Lowest first. A module may import modules of its own layer or of lower ones, never of a higher one.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("config and rules", ("errors", "config", "lora.config", "recipe", "recipe_fit", "known_models", "stats",
                          "tracking", "progress")),
    ("model loading", ("assets", "models", "distributed")),
    ("LoRA engine", ("lora", "counts", "kernels")),
    ("data and RL pieces", ("data", "lm", "rl.envs", "rl.extract", "rl.sampling", "rl.loss", "rl.step",
                            "rl.evaluate", "rl.collapse")),
    ("trainer and run files", ("preflight", "runfiles", "train", "rl.loop")),
    ("built by training", ("pretrain", "prepare")),
    ("sweep", ("sweep",)),
    ("report", ("report",)),
    ("reproduce", ("reproduce",)),
    ("CLI", ("commands", "cli", "__main__")),
]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


MODULES = {module_name(p): p for p in ROOT.rglob("*.py")}


def layer_of(mod: str) -> int:
    best, rank = -1, None
    for i, (_, prefixes) in enumerate(LAYERS):
        for pre in prefixes:
            if (mod == pre or mod.startswith(pre + ".")) and len(pre) > best:
                best, rank = len(pre), i
    if rank is None:
        raise AssertionError(f"regretless.{mod} is in no layer of tests/test_architecture.py; add it")
    return rank


def imports_of(path: Path) -> set[str]:
    """regretless modules imported anywhere in `path` (module level or inside functions), without the prefix."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [f"{node.module}.{a.name}" for a in node.names]
            names = [n if n.removeprefix("regretless.") in MODULES else node.module for n in names]
        elif (isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "import_module"
              and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            names = [node.args[0].value]
        out |= {n.removeprefix("regretless.") for n in names if n.startswith("regretless.")}
    return {n for n in out if n}


GRAPH = {m: imports_of(p) for m, p in MODULES.items() if m}


def test_every_module_has_a_layer():
    for mod in GRAPH:
        layer_of(mod)


def test_no_import_reaches_a_higher_layer():
    bad = []
    for mod, deps in sorted(GRAPH.items()):
        for dep in sorted(deps):
            if layer_of(dep) > layer_of(mod):
                bad.append(f"{mod} ({LAYERS[layer_of(mod)][0]}) imports {dep} ({LAYERS[layer_of(dep)][0]})")
    assert not bad, "imports against the data flow:\n" + "\n".join(bad)


def _cycles() -> list[list[str]]:
    """Import cycles between modules (a package's __init__ re-exporting its own modules is not one)."""
    def edges(m: str) -> set[str]:
        return {d for d in GRAPH.get(m, ()) if d in GRAPH and m != d.rsplit(".", 1)[0] and d != m}

    found, state = [], {}

    def visit(m: str, stack: list[str]) -> None:
        state[m] = 1
        stack.append(m)
        for d in sorted(edges(m)):
            if state.get(d) == 1:
                found.append(stack[stack.index(d):] + [d])
            elif d not in state:
                visit(d, stack)
        stack.pop()
        state[m] = 2

    for m in sorted(GRAPH):
        if m not in state:
            visit(m, [])
    return found


def test_no_import_cycles():
    assert not _cycles(), "import cycles: " + "; ".join(" -> ".join(c) for c in _cycles())


def test_data_sources_and_builtin_do_not_import_each_other():
    assert "data.sources" not in GRAPH["data.builtin"]


@pytest.mark.parametrize("module", ["regretless.models", "regretless.assets"])
def test_loading_a_model_does_not_bring_the_trainer(module):
    code = (f"import sys, {module}; bad = [m for m in ('regretless.pretrain', 'regretless.train', "
            "'regretless.rl.loop', 'regretless.sweep') if m in sys.modules]; print(bad); sys.exit(1 if bad else 0)")
    res = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr


def test_unbuilt_tiny_base_is_an_error_from_the_loader_not_a_build(tmp_path, monkeypatch):
    from regretless import models
    from regretless.errors import UserError

    monkeypatch.setenv("REGRETLESS_CACHE", str(tmp_path))
    with pytest.raises(UserError, match="tiny-base: not built yet.*regretless assets prepare tiny-base"):
        models.resolve_model("tiny-base", quiet=True)
    assert not (tmp_path / "models" / "tiny-base").exists()
