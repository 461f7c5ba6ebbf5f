"""Helpers for the end-to-end browser test: a throw-away JupyterLab server and
Debian's Chromium driven by Playwright.

Nothing here touches the user's Jupyter or IPython set-up: the server runs in a
temporary directory with its own config, data, runtime and IPython dirs, binds
127.0.0.1 on a free port with a random token, and is stopped (kernels included)
when the ``with`` block ends.

Recipe (../shared/NOTES.md): never run ``playwright install``; point Playwright
at ``/usr/bin/chromium`` (or ``$STORCH_CHROMIUM``).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


def find_chromium() -> str | None:
    """Path of a Chromium executable: $STORCH_CHROMIUM, /usr/bin/chromium, or on PATH."""
    env = os.environ.get("STORCH_CHROMIUM")
    if env:
        return env if os.access(env, os.X_OK) else None
    for cand in ("/usr/bin/chromium", shutil.which("chromium"), shutil.which("chromium-browser")):
        if cand and os.access(cand, os.X_OK):
            return cand
    return None


def missing_requirements() -> list[str]:
    """What the browser test needs and this machine lacks (empty when all is there)."""
    missing = []
    if find_chromium() is None:
        missing.append("Chromium (apt-get install -y chromium; or set STORCH_CHROMIUM)")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        missing.append("the Python package playwright (pip install -e '.[test]')")
    try:
        import jupyterlab  # noqa: F401
    except ImportError:
        missing.append("jupyterlab (pip install -e '.[test]')")
    try:
        import ipykernel  # noqa: F401
    except ImportError:
        missing.append("ipykernel (pip install -e '.[test]')")
    return missing


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_notebook(path: Path, cells: list[str]) -> None:
    """A notebook of code cells (no outputs), with the default python3 kernel."""
    nb = {
        "cells": [
            {
                "cell_type": "code",
                "execution_count": None,
                "id": f"cell-{i}",
                "metadata": {},
                "outputs": [],
                "source": src,
            }
            for i, src in enumerate(cells)
        ],
        "metadata": {
            "kernelspec": {"display_name": "Python 3 (ipykernel)", "language": "python", "name": "python3"},
            "language_info": {"name": "python"},
        },
        "nbformat": 4,
        "nbformat_minor": 5,
    }
    path.write_text(json.dumps(nb, indent=1), encoding="utf-8")


def _children_of(pid: int) -> list[int]:
    """All live descendants of ``pid`` (Linux /proc; empty elsewhere)."""
    parents: dict[int, list[int]] = {}
    with contextlib.suppress(OSError):
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/stat", encoding="ascii", errors="replace") as fh:
                    stat = fh.read()
            except OSError:
                continue
            # the command name is in parentheses and may hold spaces
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            parents.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    # a zombie counts as gone
    with contextlib.suppress(OSError):
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    return True


@dataclass
class LabServer:
    """A running JupyterLab: ``url(path)`` gives a page address with the token."""

    proc: subprocess.Popen
    port: int
    token: str
    root: Path
    log_path: Path
    kernels: set[int] = field(default_factory=set)

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def url(self, path: str = "lab") -> str:
        return f"{self.base}/{path.lstrip('/')}?token={self.token}"

    def api(self, path: str, method: str = "GET", timeout: float = 5.0):
        req = urllib.request.Request(
            f"{self.base}/api/{path.lstrip('/')}",
            method=method,
            headers={"Authorization": f"token {self.token}"},
            data=b"" if method == "POST" else None,
        )
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            body = resp.read()
        return json.loads(body) if body else None

    def log_tail(self, n: int = 4000) -> str:
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")[-n:]
        except OSError:
            return "(no server log)"

    def remember_kernels(self) -> None:
        """Note the server's descendants (kernels run in their own sessions, so
        killing the server's process group does not reach them)."""
        self.kernels.update(_children_of(self.proc.pid))


@contextlib.contextmanager
def jupyter_lab(root: Path, start_timeout: float = 60.0) -> Iterator[LabServer]:
    """Start JupyterLab on 127.0.0.1 serving ``root``; stop it, kernels included, on exit."""
    port, token = free_port(), secrets.token_hex(16)
    home = root / ".jupyter-home"
    env = dict(os.environ)
    for var, sub in (
        ("JUPYTER_CONFIG_DIR", "config"),
        ("JUPYTER_DATA_DIR", "data"),
        ("JUPYTER_RUNTIME_DIR", "runtime"),
        ("IPYTHONDIR", "ipython"),
        ("MPLCONFIGDIR", "mpl"),
    ):
        (home / sub).mkdir(parents=True, exist_ok=True)
        env[var] = str(home / sub)
    env.pop("JUPYTER_PATH", None)
    env.pop("JUPYTER_CONFIG_PATH", None)
    env.pop("MPLBACKEND", None)  # an inherited Agg backend breaks %matplotlib inline
    env["JUPYTER_PLATFORM_DIRS"] = "1"
    # the kernel must import this checkout even without an install
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env["PYTHONUNBUFFERED"] = "1"
    (home / "workspaces").mkdir(exist_ok=True)
    (home / "settings").mkdir(exist_ok=True)
    cmd = [
        sys.executable,
        "-m",
        "jupyterlab",
        "--no-browser",
        "--allow-root",
        "--ip=127.0.0.1",
        f"--port={port}",
        "--port-retries=0",
        f"--IdentityProvider.token={token}",
        f"--ServerApp.root_dir={root}",
        "--ServerApp.open_browser=False",
        "--ServerApp.disable_check_xsrf=False",
        "--LabApp.news_url=None",
        "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
        f"--LabApp.workspaces_dir={home / 'workspaces'}",
        f"--LabApp.user_settings_dir={home / 'settings'}",
        "--ServerApp.shutdown_no_activity_timeout=600",
        "--MappingKernelManager.cull_idle_timeout=0",
    ]
    log_path = root / "jupyter-server.log"
    log = open(log_path, "wb")  # noqa: SIM115 (closed below)
    proc = subprocess.Popen(
        cmd, cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
    )
    server = LabServer(proc=proc, port=port, token=token, root=root, log_path=log_path)
    try:
        deadline = time.monotonic() + start_timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"JupyterLab exited with {proc.returncode} on start:\n{server.log_tail()}")
            try:
                server.api("status", timeout=2.0)
                break
            except (urllib.error.URLError, ConnectionError, OSError):
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"JupyterLab did not answer within {start_timeout:.0f} s:\n{server.log_tail()}"
                    ) from None
                time.sleep(0.2)
        yield server
    finally:
        stop_server(server)
        log.close()


def stop_server(server: LabServer, grace: float = 5.0) -> None:
    """Ask the server to shut down (it stops its kernels), then kill its process
    group and any kernel still alive."""
    proc = server.proc
    server.remember_kernels()
    if proc.poll() is None:
        with contextlib.suppress(Exception):
            server.api("shutdown", method="POST", timeout=3.0)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=grace)
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=grace)
    # kernels run in sessions of their own: end each one we saw, by its id
    deadline = time.monotonic() + grace
    for pid in sorted(server.kernels):
        if _alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
    for pid in sorted(server.kernels):
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        if _alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
