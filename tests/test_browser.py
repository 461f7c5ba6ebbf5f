"""End to end in a real browser: JupyterLab + Debian's Chromium driven by Playwright.

The test writes a notebook with ``%load_ext storch_nb`` and a
``%%storch --widget`` cell on the seed story, starts JupyterLab on 127.0.0.1
(free port, random token, isolated config dirs), opens the notebook in
headless Chromium, runs both cells with Shift+Enter, waits for the lab panel
and its histogram, shows parameter ``c`` (its gradient depends on the
estimator), switches the estimator dropdown (auto -> score) and asserts that
the plot changed: new PNG bytes (the ``Image`` widget's ``blob:`` URL is read
back in the page), a different-looking panel and a different table text. It
saves two screenshots:

- into ``$STORCH_SCREENSHOTS`` when set, else into pytest's tmp dir
  (``lab_before.png``, ``lab_after.png``, and ``lab_failure.png`` on failure);
- with ``STORCH_UPDATE_SCREENSHOT=1`` the first one is also copied to
  ``docs/img/lab.png`` (the README's picture).

Requirements: ``/usr/bin/chromium`` (``apt-get install -y chromium``; or
``$STORCH_CHROMIUM``) and the ``playwright`` Python package (``.[test]``); never
``playwright install``. Without them the test skips, except under ``CI=true``
where it fails: CI must run it (``.ci/run`` installs Chromium).

Run it alone: ``.venv/bin/python -m pytest tests/test_browser.py -v``.
"""

from __future__ import annotations

import base64
import os
import re
import shutil
import time
from pathlib import Path

import pytest
from browser_util import CHROMIUM_ARGS, ROOT, find_chromium, jupyter_lab, missing_requirements, write_notebook

SEED_STORY = """\
a = param(1.0)
b = param(2.0)
c = param(0.5)
d = a + b
e ~ Normal(c + b, 1)
f = d * e**2
cost f"""

SETUP_CELL = "%load_ext storch_nb\n%matplotlib inline"
WIDGET_CELL = "%%storch --widget --samples 100 --runs 200 --seed 0\n" + SEED_STORY

# generous limits: the whole test takes ~10-20 s on a 2-core CPU
PAGE_TIMEOUT_MS = 60_000
KERNEL_TIMEOUT_S = 60.0
WIDGET_TIMEOUT_S = 90.0
RENDER_GRACE_S = 15.0  # after the cell finished, for the widget views to render
REDRAW_TIMEOUT_S = 60.0


def _on_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


@pytest.fixture
def browser_requirements() -> str:
    """Path of Chromium; skip (fail under CI=true) when something is missing."""
    missing = missing_requirements()
    if missing:
        msg = "the browser test needs " + "; ".join(missing)
        if _on_ci():
            pytest.fail(msg + " (CI=true: this test must run in CI; .ci/run installs Chromium)", pytrace=False)
        pytest.skip(msg)
    return find_chromium()


@pytest.fixture
def shots_dir(tmp_path: Path) -> Path:
    env = os.environ.get("STORCH_SCREENSHOTS")
    out = Path(env) if env else tmp_path / "screenshots"
    out.mkdir(parents=True, exist_ok=True)
    return out


def _write_lab_settings(home: Path) -> None:
    """User settings for the throw-away lab: no news or update toasts in the screenshots."""
    notif = home / "settings" / "@jupyterlab" / "apputils-extension" / "notification.jupyterlab-settings"
    notif.parent.mkdir(parents=True, exist_ok=True)
    notif.write_text('{"fetchNews": "false", "checkForUpdates": false, "doNotDisturbMode": true}', encoding="utf-8")


def _wait_for_idle_kernel(server, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            kernels = server.api("kernels")
        except OSError as err:  # pragma: no cover - a server hiccup
            last = err
            kernels = []
        if kernels and all(k.get("execution_state") == "idle" for k in kernels):
            server.remember_kernels()
            return
        last = kernels
        time.sleep(0.2)
    raise AssertionError(f"no idle kernel after {timeout:.0f} s (last: {last})\n{server.log_tail()}")


_PNG_JS = """async (els) => Promise.all(els.map(async (e) => {
    const src = e.getAttribute('src') || '';
    if (!e.offsetParent || !e.naturalWidth) return null;  // hidden, or not loaded yet
    if (src.startsWith('data:image/png;base64,')) return src.slice(22);
    if (!src.startsWith('blob:')) return null;
    try {  // ipywidgets' Image shows its PNG through a blob: URL
        const u = new Uint8Array(await (await fetch(src)).arrayBuffer());
        let s = '';
        for (let i = 0; i < u.length; i += 0x8000) s += String.fromCharCode.apply(null, u.subarray(i, i + 0x8000));
        return btoa(s);
    } catch (err) { return null; }  // revoked: a newer image replaced it
}))"""


def _pngs(cell) -> list[bytes]:
    """The bytes of every visible PNG image in a cell's outputs (inline ``data:``
    images and ipywidgets ``Image`` widgets alike)."""
    found = cell.locator(".jp-Cell-outputArea img").evaluate_all(_PNG_JS)
    out = []
    for b64 in found:
        if b64:
            data = base64.b64decode(b64)
            if data.startswith(b"\x89PNG"):
                out.append(data)
    return out


def _wait_for(pred, timeout: float, what: str, interval: float = 0.1):
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


def _cell_errors(cell) -> str:
    """Text of the cell's stderr and error outputs (JupyterLab renders both with the stderr MIME type)."""
    errs = cell.locator(".jp-OutputArea-output[data-mime-type='application/vnd.jupyter.stderr']")
    texts = errs.all_inner_texts() if errs.count() else []
    return "\n".join(texts)[-3000:]


def _cell_finished(cell) -> bool:
    """The cell's prompt shows an execution count (``[2]:``), not ``[*]:`` or ``[ ]:``."""
    prompt = cell.locator(".jp-InputPrompt").first.inner_text().strip()
    return any(ch.isdigit() for ch in prompt)


def _wait_for_widget(page, cell, dropdown, console: list[str]) -> None:
    """Wait for the estimator dropdown; fail early (with the cell's error text)
    when the cell finished without one."""
    deadline = time.monotonic() + WIDGET_TIMEOUT_S
    finished_at = None
    while dropdown.count() == 0 or not dropdown.first.is_visible():
        now = time.monotonic()
        if finished_at is None and _cell_finished(cell):
            finished_at = now
        if now > deadline or (finished_at is not None and now - finished_at > RENDER_GRACE_S):
            state = "finished" if finished_at is not None else "still running"
            raise AssertionError(
                f"no dropdown labelled 'estimator' in the %%storch --widget cell ({state} after "
                f"{WIDGET_TIMEOUT_S if finished_at is None else RENDER_GRACE_S:.0f} s of waiting)\n"
                f"cell stderr/errors:\n{_cell_errors(cell) or '(none)'}\nbrowser console errors: {console[-10:]}"
            )
        page.wait_for_timeout(100)


def _dropdown(page, cell, label: str):
    """The ``<select>`` of the ipywidgets Dropdown described as ``label`` in ``cell``."""
    text = re.compile(rf"^\s*{re.escape(label)}:?\s*$")
    return cell.locator(".widget-dropdown").filter(has=page.locator("label", has_text=text)).locator("select")


def _options(select) -> list[str]:
    return [o.strip() for o in select.locator("option").all_inner_texts()]


def _selected(select) -> str:
    return select.evaluate("s => s.selectedIndex >= 0 ? s.options[s.selectedIndex].text : ''").strip()


def _select_and_wait(page, cell, select, label: str) -> list[bytes]:
    """Pick ``label`` in ``select`` and wait for a PNG the cell did not show before."""
    old = _pngs(cell)
    select.select_option(label=label)
    new = _wait_for(lambda: [p for p in _pngs(cell) if p not in old], REDRAW_TIMEOUT_S, f"a new plot after {label!r}")
    page.wait_for_timeout(300)  # a redraw may replace the image more than once: settle
    return [p for p in _pngs(cell) if p not in old] or new


def _frame(page, cell) -> None:
    """Scroll so that ``cell`` (the story and its panel) starts at the top of the notebook view."""
    cell.evaluate("el => el.scrollIntoView({block: 'start'})")
    page.wait_for_timeout(300)


def run_widget_notebook(
    tmp_path: Path, chromium: str, shots: Path, cells: list[str], switch_to: str = "score", show_param: str = "c"
) -> dict:
    """Open a notebook of ``cells`` in JupyterLab, run every cell with Shift+Enter,
    wait for the estimator dropdown and a PNG in the last cell, switch the
    ``param`` dropdown to ``show_param`` when it offers it, then the estimator
    dropdown to ``switch_to`` (or another option), waiting for a new PNG each
    time. Returns timings, the options seen, the PNGs before and after the
    switch, and screenshots and text of the cell's outputs."""
    from playwright.sync_api import sync_playwright

    t0 = time.monotonic()
    times: dict[str, float] = {}
    workdir = tmp_path / "lab"
    workdir.mkdir()
    _write_lab_settings(workdir / ".jupyter-home")
    write_notebook(workdir / "storch_lab.ipynb", cells)

    with jupyter_lab(workdir) as server:
        times["server"] = time.monotonic() - t0
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS, headless=True)
            page = None
            try:
                page = browser.new_page(viewport={"width": 1280, "height": 1000}, device_scale_factor=1)
                page.set_default_timeout(PAGE_TIMEOUT_MS)
                console: list[str] = []
                page.on("console", lambda m: console.append(f"{m.type}: {m.text}") if m.type == "error" else None)
                page.goto(server.url("lab/tree/storch_lab.ipynb"), wait_until="domcontentloaded")
                nb_cells = page.locator(".jp-NotebookPanel:not(.lm-mod-hidden) .jp-Notebook .jp-Cell")
                nb_cells.nth(len(cells) - 1).wait_for(state="visible")
                times["page"] = time.monotonic() - t0
                _wait_for_idle_kernel(server, KERNEL_TIMEOUT_S)
                times["kernel"] = time.monotonic() - t0

                # a tidy screenshot: fold the file browser away (Accel+B, outside an editor)
                if page.locator("#jp-left-stack").is_visible():
                    page.keyboard.press("Control+b")

                # run each cell the way a person does: click into it, Shift+Enter
                nb_cells.nth(0).locator(".jp-InputArea-editor").click()
                for _ in cells:
                    page.keyboard.press("Shift+Enter")

                last = nb_cells.nth(len(cells) - 1)
                estimator = _dropdown(page, last, "estimator")
                _wait_for_widget(page, last, estimator, console)
                estimator = estimator.first
                _wait_for(lambda: _pngs(last), REDRAW_TIMEOUT_S, "the histogram PNG")
                times["widget"] = time.monotonic() - t0

                # show a parameter whose gradient depends on the estimator (c in the
                # seed story; a's estimates are the same under every estimator)
                param = _dropdown(page, last, "param")
                if show_param and param.count() and show_param in _options(param.first):
                    if _selected(param.first) != show_param:
                        _select_and_wait(page, last, param.first, show_param)
                times["param"] = time.monotonic() - t0

                _frame(page, last)
                page.screenshot(path=str(shots / "lab_before.png"))
                before = _pngs(last)
                before_el = last.locator(".jp-Cell-outputArea").screenshot()
                before_text = last.locator(".jp-Cell-outputArea").inner_text()

                options, current = _options(estimator), _selected(estimator)
                choice = next((o for o in options if o == switch_to and o != current), None)
                choice = choice or next((o for o in options if o.startswith(switch_to) and o != current), None)
                choice = choice or next((o for o in options if o != current), None)
                assert choice is not None, f"the estimator dropdown offers nothing to switch to: {options}"
                t_switch = time.monotonic()
                after = _select_and_wait(page, last, estimator, choice)
                times["switch"] = time.monotonic() - t_switch

                _frame(page, last)
                page.screenshot(path=str(shots / "lab_after.png"))
                after_el = last.locator(".jp-Cell-outputArea").screenshot()
                after_text = last.locator(".jp-Cell-outputArea").inner_text()
                errors = _cell_errors(last)
            except BaseException:
                if page is not None:
                    try:
                        page.screenshot(path=str(shots / "lab_failure.png"))
                    except Exception:  # pragma: no cover - the page may be gone
                        pass
                raise
            finally:
                browser.close()
        times["total_in_lab"] = time.monotonic() - t0
    times["total"] = time.monotonic() - t0
    return {
        "times": times,
        "options": options,
        "from": current,
        "to": choice,
        "before": before,
        "after": after,
        "before_el": before_el,
        "after_el": after_el,
        "before_text": before_text,
        "after_text": after_text,
        "errors": errors,
    }


def test_estimator_switch_redraws_the_plot_in_a_real_browser(browser_requirements, shots_dir, tmp_path):
    out = run_widget_notebook(tmp_path, browser_requirements, shots_dir, [SETUP_CELL, WIDGET_CELL])

    assert "Error" not in out["errors"] and "Traceback" not in out["errors"], (
        f"the %%storch --widget cell shows an error:\n{out['errors']}"
    )
    assert len(out["options"]) >= 2, f"the estimator dropdown offers {out['options']}"
    # the plot changed: a new PNG with other bytes, and the panel looks different
    before, after = out["before"][0], out["after"][0]
    assert before != after, f"switching {out['from']!r} -> {out['to']!r} left the plot as it was"
    assert out["before_el"] != out["after_el"], "the panel looks the same after the switch"
    assert out["before_text"] != out["after_text"], "the panel's text (status, table) did not change"
    for name in ("lab_before.png", "lab_after.png"):
        assert (shots_dir / name).stat().st_size > 10_000, f"{name} looks empty"

    if os.environ.get("STORCH_UPDATE_SCREENSHOT", "").strip().lower() in ("1", "true", "yes"):
        dest = ROOT / "docs" / "img" / "lab.png"
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(shots_dir / "lab_before.png", dest)

    t = out["times"]
    print(
        f"\nbrowser test: server {t['server']:.1f} s, page {t['page']:.1f} s, kernel {t['kernel']:.1f} s, "
        f"widget {t['widget']:.1f} s, param {t['param']:.1f} s, switch {out['from']} -> {out['to']} {t['switch']:.2f} s, "
        f"total {t['total']:.1f} s; screenshots in {shots_dir}"
    )
    assert t["total"] < 120, f"the browser test took {t['total']:.0f} s"
