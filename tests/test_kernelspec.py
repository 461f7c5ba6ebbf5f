"""The opt-in kernelspec "Python 3 (storch_nb)", as a user gets it from the wheel.

The wheel ships ``jupyter-config/share/jupyter/kernels/storch_nb/kernel.json``
as shared data (``pyproject.toml``, hatch ``shared-data``), so ``pip install``
puts it in ``<prefix>/share/jupyter/kernels/storch_nb`` where Jupyter looks for
the kernels of the environment it runs in. This module

1. builds the wheel from the checkout (``pip wheel --no-deps``);
2. makes a fresh venv and installs the wheel into it with pip
   (``pip --python VENV_PYTHON install --no-deps --no-index WHEEL``): the
   package and the kernelspec come from the wheel, nothing from the checkout;
3. lets that venv see the *dependencies* (torch, IPython, ipykernel,
   jupyter_client, ...) of the venv running the tests through a ``.pth`` line
   naming this venv's site-packages, instead of installing them again (torch
   alone would take minutes). A plain path line adds the directory only; the
   ``.pth`` files inside it (the editable install of the checkout among them)
   are not processed, so ``import storch_nb`` finds the wheel's copy. The
   ``jupyter`` and ``jupyter-kernelspec`` commands are written into the venv's
   ``bin`` the way pip writes console scripts, because the dependencies'
   own scripts are not installed there;
4. runs ``jupyter kernelspec list`` from the venv, with the user's Jupyter
   directories isolated, and checks that "storch_nb" is listed with the
   display name "Python 3 (storch_nb)" from the venv's ``share/jupyter``;
5. starts a kernel from that spec (``jupyter_client.KernelManager``, run by
   the venv's python) and runs a ``%%storch`` cell in it.

``kernel.json`` starts the kernel with ``"python"``: jupyter_client replaces an
``argv[0]`` of ``python``/``python3``/``python3.X`` by ``sys.executable`` of the
process that launches the kernel (``KernelManager.format_kernel_cmd``), i.e.
the python of the environment whose ``share/jupyter`` the spec was found in.
ipykernel's own ``python3`` spec relies on the same rule; an absolute path
cannot be known when the wheel is built. Step 5 checks that the kernel really
runs on the venv's python.

Everything runs in subprocesses with a cleaned environment (no PYTHONPATH, an
isolated JUPYTER_DATA_DIR/JUPYTER_CONFIG_DIR/IPYTHONDIR, JUPYTER_PATH unset), so
neither the checkout nor the user's Jupyter set-up can leak in. About 20 s.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SPEC_DIR = ROOT / "jupyter-config" / "share" / "jupyter" / "kernels" / "storch_nb"
SPEC_FILE = SPEC_DIR / "kernel.json"
KERNEL_NAME = "storch_nb"
DISPLAY_NAME = "Python 3 (storch_nb)"

STORY_CELL = """\
%%storch --samples 10 --seed 0
t = param(0.0)
b ~ Bernoulli(logits=t)
cost (b - 0.45)**2
"""


# ------------------------------------------------------------------ no build
def test_kernel_json():
    spec = json.loads(SPEC_FILE.read_text(encoding="utf-8"))
    assert spec["display_name"] == DISPLAY_NAME
    assert spec["language"] == "python"
    argv = spec["argv"]
    # "python" is replaced by the launching Jupyter's sys.executable (see the module docstring)
    assert argv[0] == "python"
    assert argv[1:3] == ["-m", "ipykernel_launcher"]
    assert "{connection_file}" in argv
    assert "--ext=storch_nb" in argv
    # the spec directory holds only the spec (no ipython_kernel_config.json that
    # would overwrite a user's configuration)
    assert sorted(p.name for p in SPEC_DIR.iterdir()) == ["kernel.json"]


# --------------------------------------------------------------- the wheel
def _env(tmp: Path, venv: Path | None = None) -> dict[str, str]:
    """A clean environment: no PYTHONPATH, the user's Jupyter and IPython
    directories replaced by empty ones under ``tmp``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JUPYTER", "PYTHON", "VIRTUAL_ENV", "PIP_"))}
    env.pop("IPYTHONDIR", None)
    env.pop("MPLBACKEND", None)
    for name, sub in [("JUPYTER_DATA_DIR", "data"), ("JUPYTER_CONFIG_DIR", "config"),
                      ("JUPYTER_RUNTIME_DIR", "runtime"), ("IPYTHONDIR", "ipython")]:  # fmt: skip
        (tmp / "home" / sub).mkdir(parents=True, exist_ok=True)
        env[name] = str(tmp / "home" / sub)
    env["JUPYTER_PLATFORM_DIRS"] = "1"
    env["PYTHONNOUSERSITE"] = "1"
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    if venv is not None:
        env["VIRTUAL_ENV"] = str(venv)
        env["PATH"] = os.pathsep.join([str(venv / "bin"), "/usr/bin", "/bin"])
    return env


def _run(cmd: list[str], tmp: Path, env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=tmp, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{cmd!r} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return proc


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel built from the checkout (offline with the installed hatchling
    when there is one, else pip's isolated build fetches it)."""
    out = tmp_path_factory.mktemp("wheel")
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "--wheel-dir", str(out), str(ROOT)]
    if importlib.util.find_spec("hatchling") is not None:
        cmd.insert(4, "--no-build-isolation")
    _run(cmd, out, {**_env(out), "PATH": os.environ.get("PATH", os.defpath)}, timeout=300)
    wheels = sorted(out.glob("storch_nb-*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


def test_the_wheel_ships_the_kernelspec(wheel: Path):
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        shipped = [n for n in names if n.endswith("share/jupyter/kernels/storch_nb/kernel.json")]
        assert len(shipped) == 1, names
        assert ".data/data/" in shipped[0]  # shared data: installed under the environment's prefix
        assert json.loads(zf.read(shipped[0])) == json.loads(SPEC_FILE.read_text(encoding="utf-8"))
        assert not any(n.endswith("ipython_kernel_config.json") for n in names)


_CONSOLE_SCRIPT = """\
#!{python}
import sys
from {module} import {attr}
if __name__ == "__main__":
    sys.exit({call}())
"""


@pytest.fixture(scope="module")
def venv(wheel: Path, tmp_path_factory) -> Path:
    """A fresh venv with the wheel installed; the test venv's packages provide the dependencies."""
    pytest.importorskip("jupyter_client")
    pytest.importorskip("ipykernel")
    tmp = tmp_path_factory.mktemp("venv")
    root = tmp / "venv"
    env = {**_env(tmp), "PATH": os.environ.get("PATH", os.defpath)}
    _run([sys.executable, "-m", "venv", "--without-pip", str(root)], tmp, env)
    python = root / "bin" / "python"
    assert python.exists()
    # install the wheel first, while the venv sees nothing else (so pip installs it here)
    _run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index",
          "--quiet", str(wheel)], tmp, env)  # fmt: skip
    site = Path(_run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                     tmp, _env(tmp, root)).stdout.strip())  # fmt: skip
    assert site.is_relative_to(root)
    parent = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    (site / "_storch_nb_test_dependencies.pth").write_text("\n".join(sorted(parent)) + "\n", encoding="utf-8")
    for name, module, attr, call in [
        ("jupyter", "jupyter_core.command", "main", "main"),
        ("jupyter-kernelspec", "jupyter_client.kernelspecapp", "KernelSpecApp", "KernelSpecApp.launch_instance"),
    ]:
        script = root / "bin" / name
        script.write_text(_CONSOLE_SCRIPT.format(python=python, module=module, attr=attr, call=call), encoding="utf-8")
        script.chmod(0o755)
    return root


def test_the_venv_imports_the_wheel_not_the_checkout(venv: Path):
    tmp = venv.parent
    out = _run([str(venv / "bin" / "python"), "-c", "import storch_nb, torch; print(storch_nb.__file__)"],
               tmp, _env(tmp, venv)).stdout.strip()  # fmt: skip
    assert Path(out).is_relative_to(venv), out


def test_jupyter_kernelspec_list_shows_it(venv: Path):
    tmp = venv.parent
    env = _env(tmp, venv)
    listing = _run([str(venv / "bin" / "jupyter"), "kernelspec", "list"], tmp, env).stdout
    assert KERNEL_NAME in listing.split(), listing
    listed = _run([str(venv / "bin" / "jupyter"), "kernelspec", "list", "--json"], tmp, env).stdout
    specs = json.loads(listed)["kernelspecs"]
    assert KERNEL_NAME in specs, sorted(specs)
    found = specs[KERNEL_NAME]
    assert found["spec"]["display_name"] == DISPLAY_NAME
    assert "--ext=storch_nb" in found["spec"]["argv"]
    resource_dir = Path(found["resource_dir"]).resolve()
    assert resource_dir == (venv / "share" / "jupyter" / "kernels" / KERNEL_NAME).resolve(), resource_dir


_KERNEL_SCRIPT = """\
import json, sys
from jupyter_client.manager import KernelManager

CELLS = {cells}
km = KernelManager(kernel_name={name!r})
km.start_kernel(cwd={cwd!r})
out = {{"argv": km.format_kernel_cmd(), "cells": []}}
try:
    kc = km.client()
    kc.start_channels()
    kc.wait_for_ready(timeout=120)
    for code in CELLS:
        outputs = []

        def hook(msg):
            kind = msg["msg_type"]
            content = msg["content"]
            if kind == "stream":
                outputs.append({{"type": "stream", "text": content["text"]}})
            elif kind in ("display_data", "execute_result"):
                outputs.append({{"type": kind, "text": content["data"].get("text/plain", ""),
                                "mimes": sorted(content["data"])}})
            elif kind == "error":
                outputs.append({{"type": "error", "text": content["ename"] + ": " + content["evalue"]}})

        reply = kc.execute_interactive(code, timeout=120, output_hook=hook)
        out["cells"].append({{"status": reply["content"]["status"], "outputs": outputs}})
    kc.stop_channels()
finally:
    km.shutdown_kernel(now=True)
print(json.dumps(out))
"""


def test_a_kernel_from_the_spec_has_the_magic(venv: Path):
    tmp = venv.parent
    work = tmp / "work"
    work.mkdir(exist_ok=True)
    cells = [
        "import sys, storch_nb\n"
        "print(sys.executable)\n"
        "print(storch_nb.__file__)\n"
        "print(get_ipython().find_cell_magic('storch') is not None)",
        STORY_CELL,
    ]
    script = _KERNEL_SCRIPT.format(cells=repr(cells), name=KERNEL_NAME, cwd=str(work))
    proc = _run([str(venv / "bin" / "python"), "-c", script], work, _env(tmp, venv), timeout=240)
    result = json.loads(proc.stdout.strip().splitlines()[-1])

    # "python" in kernel.json became the venv's python
    assert Path(result["argv"][0]) == venv / "bin" / "python", result["argv"]
    assert "--ext=storch_nb" in result["argv"]

    first, story = result["cells"]
    assert first["status"] == "ok", first
    lines = "".join(o["text"] for o in first["outputs"] if o["type"] == "stream").split()
    assert Path(lines[0]) == venv / "bin" / "python", lines
    assert Path(lines[1]).is_relative_to(venv), lines  # the wheel's copy, not the checkout
    assert lines[2] == "True"  # the extension was loaded by the kernelspec (no %load_ext in the cells)

    assert story["status"] == "ok", story
    shown = [o for o in story["outputs"] if o["type"] == "display_data"]
    assert len(shown) == 1, story["outputs"]
    assert "text/html" in shown[0]["mimes"]
    text = shown[0]["text"]
    assert text.startswith("storch: 10 samples"), text
    assert "∂E/∂t" in text and "E[cost]" in text, text
    assert "estimators: b: score(baseline='rloo')" in text, text
    assert not [o for o in story["outputs"] if o["type"] == "error"], story["outputs"]
