"""The house rules (docs/architecture.md), checked on the source so that CI keeps them:

* layering: the language (``story/``), ``graph``, ``errors``, ``settings``, the
  estimators and the engine never import the API, the experiments, the figures
  or the notebook, not even lazily inside a function; the API never imports the
  notebook; ``experiments`` imports no matplotlib;
* size: no module over 450 lines, no function over 80 lines (its decorators
  aside), ``api.py`` at most 350 lines;
* complexity: ruff (with the project's config: McCabe complexity at most 15,
  C901) finds nothing in the package, the tests and the benchmarks.
"""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "storch_nb"
MODULES = sorted(PKG.rglob("*.py"))


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path) -> set[str]:
    """Every module ``path`` imports, anywhere in it (function bodies included), absolute."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = _module_name(path).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            out.add(mod)
            out.update(f"{mod}.{a.name}" for a in node.names)
    return out


def _layer(path: Path) -> str:
    rel = path.relative_to(PKG).parts
    return rel[0] if len(rel) > 1 else rel[0].removesuffix(".py")


LOWER = {"story", "graph", "errors", "settings", "estimators", "engine"}
UPPER = ("storch_nb.api", "storch_nb.notebook", "storch_nb.experiments", "storch_nb.figures")


@pytest.mark.parametrize("path", [p for p in MODULES if _layer(p) in LOWER], ids=lambda p: str(p.relative_to(PKG)))
def test_lower_layers_never_import_upper_ones(path: Path):
    bad = sorted(m for m in _imports(path) if m.startswith(UPPER))
    assert not bad, f"{path.relative_to(ROOT)} imports {bad}"


def test_the_api_never_imports_the_notebook():
    bad = sorted(m for m in _imports(PKG / "api.py") if m.startswith("storch_nb.notebook"))
    assert not bad, f"api.py imports {bad}"


def test_experiments_import_no_matplotlib():
    path = PKG / "experiments.py"
    assert path.exists()
    assert not [m for m in _imports(path) if m.startswith(("matplotlib", "ipywidgets"))]


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PKG)))
def test_modules_and_functions_are_small(path: Path):
    text = path.read_text(encoding="utf-8")
    lines = len(text.splitlines())
    limit = 350 if path.name == "api.py" and path.parent == PKG else 450
    assert lines <= limit, f"{path.relative_to(ROOT)} has {lines} lines (at most {limit})"
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            length = node.end_lineno - node.lineno + 1  # from the def line: decorators aside
            assert length <= 80, f"{path.relative_to(ROOT)}:{node.lineno} {node.name} has {length} lines (at most 80)"


def test_ruff_finds_nothing_complexity_included():
    ruff = shutil.which("ruff") or str(Path(sys.executable).with_name("ruff"))
    if not Path(ruff).exists():
        pytest.fail("ruff is not installed: it is in the [test] extra")
    proc = subprocess.run([ruff, "check", "storch_nb", "tests", "benchmarks", "docs"], cwd=ROOT,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
