"""Imports point one way: core imports torch only; nothing imports the CLI; layers follow STYLE.md."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "logitsam"

# package -> logitsam packages it may import (besides itself)
ALLOWED = {
    "core": set(),
    "diagnostics": {"core"},
    "theory": {"core", "_atomic"},
    "data": set(),
    "models": set(),
    "report": {"_atomic"},
    "eval": {"core", "data", "models", "diagnostics", "_atomic"},
    "train": {"core", "data", "models", "diagnostics", "_memory", "_atomic"},
    "demo": {"compare", "eval", "models", "data", "_atomic"},
    "compare": {"report", "eval", "_atomic"},
    "study": {"compare", "report", "demo", "train", "_atomic"},
    "trl": {"core", "models", "train"},
    "bench": {"core", "_memory", "_atomic"},
    "simulate": {"core", "train"},  # a training step of the trainer's own parts, under FakeTensorMode
    "losses": {"core"},  # the old import path, re-exporting core.losses
    "_memory": set(),
    "_atomic": set(),
}


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level >= 1:  # relative: resolve against the file's package
                parts = path.relative_to(SRC).parts[:-1]
                base = parts[: len(parts) - (node.level - 1)]
                target = (*base, *(node.module.split(".") if node.module else ()))
                if target:
                    found.add(target[0])
            elif node.module and node.module.startswith("logitsam."):
                found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".")[1] for a in node.names if a.name.startswith("logitsam.")}
    return found


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_package_imports_follow_the_layering(package):
    root = SRC / package
    files = [root.with_suffix(".py")] if root.with_suffix(".py").exists() else sorted(root.rglob("*.py"))
    for f in files:
        bad = _imports(f) - ALLOWED[package] - {package}
        assert not bad, f"{f.relative_to(SRC)} imports {sorted(bad)}"


def test_every_module_sits_in_the_layering():
    """A new top-level module or package must be given its allowed imports above (cli.py and the package's
    own __init__ are the two ends of the graph)."""
    top = {p.stem for p in SRC.glob("*.py")} | {p.name for p in SRC.iterdir() if (p / "__init__.py").exists()}
    assert top - {"cli", "__init__"} == set(ALLOWED)


def test_nothing_imports_the_cli():
    for f in SRC.rglob("*.py"):
        if f.name != "cli.py":
            assert "cli" not in _imports(f), f


def test_core_does_not_load_transformers():
    code = "import sys, logitsam.core, logitsam.losses; print('transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
