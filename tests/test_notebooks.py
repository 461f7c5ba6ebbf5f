"""The tutorial notebooks: their shape, and a full nbval run against the stored outputs.

Every numbered notebook in notebooks/ (``NN_name.ipynb``, found by glob) gets the same
generic checks and its own nbval run, the same as
    python -m pytest --nbval notebooks/NN_name.ipynb --nbval-current-env \
        --nbval-sanitize-with notebooks/nbval_sanitize.cfg
(in a subprocess, so the notebook's kernel is a fresh one). When a display
format changes on purpose, regenerate the stored outputs with
    jupyter nbconvert --to notebook --execute --inplace \
        --ExecutePreprocessor.kernel_name=python3 notebooks/NN_name.ipynb
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
SANITIZE = NOTEBOOKS / "nbval_sanitize.cfg"
NOTEBOOK_FILES = sorted(NOTEBOOKS.glob("[0-9][0-9]_*.ipynb"))


def _cells(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)["cells"]


def _source(cell: dict) -> str:
    src = cell.get("source", "")
    return "".join(src) if isinstance(src, list) else src


def test_the_tutorial_exists():
    assert (NOTEBOOKS / "01_generative_stories.ipynb") in NOTEBOOK_FILES
    assert SANITIZE.is_file()


def test_every_notebook_is_validated():
    """A notebook whose name escapes the NN_name pattern would silently skip nbval."""
    found = sorted(p for p in NOTEBOOKS.rglob("*.ipynb") if ".ipynb_checkpoints" not in p.parts)
    assert found == NOTEBOOK_FILES, f"not numbered NN_name.ipynb: {sorted(set(found) - set(NOTEBOOK_FILES))}"


@pytest.mark.parametrize("path", NOTEBOOK_FILES, ids=lambda p: p.name)
def test_notebook_shape(path: Path):
    cells = _cells(path)
    code = [c for c in cells if c["cell_type"] == "code"]
    assert code, "a tutorial notebook needs code cells"
    assert "%load_ext storch_nb" in _source(code[0])
    assert "%matplotlib inline" in _source(code[0])
    for i, cell in enumerate(code):
        src = _source(cell)
        tags = cell.get("metadata", {}).get("tags", [])
        if "%%storch" in src:
            # a cell magic must be the very first line (a comment above it breaks it)
            assert src.startswith("%%storch"), f"code cell {i}: %%storch is not the first line"
            first = src.splitlines()[0]
            assert re.search(r"--seed[ =]\d+", first), f"code cell {i}: %%storch without --seed"
        # outputs are stored, so that nbval has something to compare
        assert cell.get("execution_count") is not None, f"code cell {i} was never executed"
        errors = [o for o in cell.get("outputs", []) if o.get("output_type") == "error"]
        if errors:
            assert "raises-exception" in tags, f"code cell {i}: an error without the raises-exception tag"
        if any(
            o.get("output_type") == "display_data" and "image/png" in o.get("data", {}) for o in cell.get("outputs", [])
        ):
            assert "nbval-ignore-output" in tags, f"code cell {i}: a plot needs the nbval-ignore-output tag"


@pytest.mark.parametrize("path", NOTEBOOK_FILES, ids=lambda p: p.name)
def test_notebook_reproduces_its_outputs(path: Path, tmp_path: Path):
    pytest.importorskip("nbval")
    pytest.importorskip("ipykernel")
    env = dict(os.environ)
    # the kernel runs in notebooks/: make the checkout importable even without an install
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env.pop("MPLBACKEND", None)  # an inherited Agg backend breaks %matplotlib inline
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        "--nbval",
        str(path),
        "--nbval-current-env",
        "--nbval-sanitize-with",
        str(SANITIZE),
        "-q",
        "-p",
        "no:cacheprovider",
        "--rootdir",
        str(tmp_path),
        "-o",
        "addopts=",
    ]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]
