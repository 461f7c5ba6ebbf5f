"""The documentation is executed and checked against the code.

Which code blocks run (README.md and docs/*.md):

* a block fenced ```` ```python ```` or ```` ```ipython ```` runs; any other fence
  (```` ```text ````, ```` ```output ````, ```` ```bash ````, a bare ```` ``` ````,
  or an info string with more words, such as ```` ```python notest ````) does not.
  ``ipython`` marks a notebook cell (``%load_ext``, ``%%storch``); ``python`` is
  plain Python that needs no IPython;
* the runnable blocks of one file run in order, in one namespace, like the cells
  of a notebook: each file gets a fresh IPython shell in its own subprocess (so
  ``%%storch`` cells really run, a registered estimator does not leak into other
  tests, and the figures use the Agg backend);
* a block fenced ```` ```output ```` right after a runnable block (blank lines
  between are allowed) is what that block prints and displays (text/plain).
  It is compared after masking durations (``14.7 ms``, ``2.04 s``), collapsing
  whitespace, and comparing numbers to a relative 2e-3 (float32 sums may differ
  in the last digit between CPUs). ```` ```text ```` blocks are illustrations and
  are not checked.

Besides: the README's option section is exactly what ``docs/readme_options.py``
generates from the option table (``storch_nb/notebook/options.py``), the table
holds exactly the options of the magic's parsers, every registered estimator is
in the README's estimator table, the CI test command is where ``.ci/run`` looks
for it, and local links resolve.

Run one file's blocks by hand: ``python tests/test_docs.py --run docs/lab.md``.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOC_FILES = [README, *sorted((ROOT / "docs").glob("*.md"))]
RUNNABLE = {"python", "ipython"}
BLOCK_TIMEOUT_S = 300  # one file, all its blocks

sys.path.insert(0, str(ROOT / "docs"))
import readme_options  # noqa: E402  (docs/readme_options.py)

# ---------------------------------------------------------------------------
# fenced blocks
# ---------------------------------------------------------------------------


@dataclass
class Block:
    info: str  # the fence's info string ("python", "output", "")
    code: str
    line: int  # 1-based line of the opening fence

    @property
    def runs(self) -> bool:
        return self.info in RUNNABLE


def fenced_blocks(text: str) -> list[Block]:
    """The fenced code blocks of a Markdown text, in order (``` fences at column 0)."""
    blocks: list[Block] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        m = re.match(r"^(`{3,})(.*)$", lines[i])
        if m:
            fence, info, start = m.group(1), m.group(2).strip(), i
            body = []
            i += 1
            while i < len(lines) and not (lines[i].startswith(fence) and not lines[i].strip("`").strip()):
                body.append(lines[i])
                i += 1
            blocks.append(Block(info, "\n".join(body) + "\n", start + 1))
        i += 1
    return blocks


RUNNABLE_FILES = [p for p in DOC_FILES if any(b.runs for b in fenced_blocks(p.read_text(encoding="utf-8")))]


def expected_outputs(text: str) -> dict[int, str]:
    """Line of a runnable block -> the ```output block that follows it."""
    blocks = fenced_blocks(text)
    lines = text.splitlines()
    out = {}
    for prev, nxt in zip(blocks, blocks[1:]):
        if not (prev.runs and nxt.info == "output"):
            continue
        closing = prev.line + prev.code.count("\n")  # 0-based index of prev's closing fence
        between = lines[closing + 1 : nxt.line - 1]
        if all(not s.strip() for s in between):
            out[prev.line] = nxt.code
    return out


# ---------------------------------------------------------------------------
# running one file's blocks (in a subprocess: python tests/test_docs.py --run FILE)
# ---------------------------------------------------------------------------


def run_file_blocks(path: Path) -> list[dict]:
    """Run the runnable blocks of ``path`` in order in a fresh IPython shell; return
    per block its line, its text/plain output and its error (or None)."""
    import traceback

    os.environ.setdefault("MPLBACKEND", "Agg")
    from IPython.core.interactiveshell import InteractiveShell
    from IPython.utils.capture import capture_output
    from traitlets.config import Config

    config = Config()
    config.HistoryManager.enabled = False  # write nothing into ~/.ipython
    shell = InteractiveShell.instance(config=config)
    results = []
    for block in fenced_blocks(path.read_text(encoding="utf-8")):
        if not block.runs:
            continue
        with capture_output() as cap:
            res = shell.run_cell(block.code, store_history=False)
        err = res.error_before_exec or res.error_in_exec
        error = None
        if err is not None:
            if hasattr(err, "_render_traceback_"):
                error = "\n".join(err._render_traceback_())
            else:
                error = "".join(traceback.format_exception(type(err), err, err.__traceback__))
        shown = [o.data.get("text/plain", "") for o in cap.outputs]
        output = cap.stdout + "".join(s + "\n" for s in shown if s)
        results.append({"line": block.line, "info": block.info, "output": output, "error": error})
        if error is not None:
            break  # later blocks depend on this one
    return results


# ---------------------------------------------------------------------------
# comparing outputs
# ---------------------------------------------------------------------------

_DURATION = re.compile(r"\d+(?:\.\d+)?(?:e[-+]?\d+)?\s?(?:ms|µs|us|s)\b")  # "14.7 ms", "1e+03 ms"
_NUMBER = re.compile(r"[-+]?(?:\d+\.\d*|\.\d+|\d+)(?:[eE][-+]?\d+)?")


def _tokens(text: str) -> tuple[list[str], list[float]]:
    text = _DURATION.sub("<time>", text)
    numbers = [float(x) for x in _NUMBER.findall(text)]
    words = " ".join(_NUMBER.sub("#", text).split()).split(" ")
    return words, numbers


def outputs_match(got: str, want: str, rel: float = 2e-3, abs_: float = 1e-6) -> bool:
    gw, gn = _tokens(got)
    ww, wn = _tokens(want)
    if gw != ww or len(gn) != len(wn):
        return False
    return all(math.isclose(a, b, rel_tol=rel, abs_tol=abs_) for a, b in zip(gn, wn))


# ---------------------------------------------------------------------------
# the tests
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def executed():
    """Start every file's subprocess at once (they overlap on a multi-core machine)."""
    env = dict(os.environ, MPLBACKEND="Agg", PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    procs = {
        path: subprocess.Popen(
            [sys.executable, __file__, "--run", str(path)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=ROOT,
            env=env,
        )
        for path in RUNNABLE_FILES
    }
    yield procs
    for proc in procs.values():
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def _results(executed, path: Path) -> list[dict]:
    proc = executed[path]
    try:
        stdout, stderr = proc.communicate(timeout=BLOCK_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        stdout, stderr = proc.communicate()
        raise AssertionError(f"the blocks of {path.name} ran over {BLOCK_TIMEOUT_S} s") from None
    marker = "\n@@DOC-BLOCKS@@\n"
    if proc.returncode != 0 or marker not in stdout:
        raise AssertionError(f"running the blocks of {path.name} failed:\n{stdout[-4000:]}\n{stderr[-4000:]}")
    return json.loads(stdout.split(marker, 1)[1])


@pytest.mark.parametrize("path", RUNNABLE_FILES, ids=[p.relative_to(ROOT).as_posix() for p in RUNNABLE_FILES])
def test_code_blocks_run(executed, path):
    """Every ```python / ```ipython block runs without error, and prints what the
    ```output block after it shows."""
    results = _results(executed, path)
    name = path.relative_to(ROOT).as_posix()
    failed = [r for r in results if r["error"] is not None]
    assert not failed, f"{name}, block at line {failed[0]['line']}:\n{failed[0]['error']}"
    runnable = [b for b in fenced_blocks(path.read_text(encoding="utf-8")) if b.runs]
    assert [r["line"] for r in results] == [b.line for b in runnable]
    got = {r["line"]: r["output"] for r in results}
    for line, want in expected_outputs(path.read_text(encoding="utf-8")).items():
        assert outputs_match(got[line], want), (
            f"{name}, block at line {line}: the output differs from the ```output block after it\n"
            f"--- shown in the docs:\n{want}--- printed now:\n{got[line]}"
        )


def test_block_rules():
    """Self-check of the block rules on a small text."""
    text = (
        "```python\nx = 1\nprint(x + 1)\n```\n\n```output\n2\n```\n"
        "```ipython\n%load_ext storch_nb\n```\n```text\nnot run\n```\n```python notest\nraise SystemExit\n```\n"
    )
    blocks = fenced_blocks(text)
    assert [b.info for b in blocks] == ["python", "output", "ipython", "text", "python notest"]
    assert [b.runs for b in blocks] == [True, False, True, False, False]
    assert expected_outputs(text) == {1: "2\n"}
    assert outputs_match("time 14.7 ms, cost = 22.3578\n", "time 3.1 ms,  cost = 22.3579")
    assert outputs_match("took 1e+03 ms or 2.404 s", "took 766 µs or 1 s")
    assert not outputs_match("cost = 22.3578", "cost = 22.5")
    assert not outputs_match("cost = 1", "loss = 1")


def test_every_doc_has_runnable_examples():
    """Each reference page of ours shows at least one executed example."""
    for name in ("story_language.md", "lab.md", "python_api.md"):
        blocks = fenced_blocks((ROOT / "docs" / name).read_text(encoding="utf-8"))
        assert sum(b.info == "python" for b in blocks) >= 3, name


# -- the README's option reference --------------------------------------------


def test_readme_option_section_is_generated():
    """README's section between the markers is what docs/readme_options.py writes now:
    after changing the option table (storch_nb/notebook/options.py), run `python docs/readme_options.py`."""
    text = README.read_text(encoding="utf-8")
    assert readme_options.readme_section(text) == readme_options.options_markdown(), (
        "README.md's %%storch option section is out of date: run python docs/readme_options.py"
    )


def test_option_table_lists_exactly_the_parsers_options():
    """The option table (the source of the README section) documents every option
    of %%storch with its metavar, and no option the parser lacks; the same for %storch."""
    documented = {}
    for _, options in readme_options.groups():
        for usages, text in options:
            assert text
            for usage in usages:
                opt, *meta = usage.split(maxsplit=1)
                documented[opt] = meta[0] if meta else None
    cell, line = readme_options.parser_options()
    assert documented == cell
    # the line magic: its forms name only options %storch accepts, and each of them
    # (by its short or its long form)
    forms = readme_options.line_forms()
    named = {w for usage, text in forms for w in re.findall(r"(?<!\S)--?[a-z]+\b", f"{usage} {text}")}
    accepted = {s for strings in line for s in strings}
    assert named <= accepted, f"the option table names %storch options it does not accept: {named - accepted}"
    unnamed = [strings for strings in line if not set(strings) & named]
    assert not unnamed, f"the option table does not name the %storch options {unnamed}"


def test_every_magic_option_is_in_the_readme():
    """Every option string of %%storch, and every option of %storch (short or long form),
    appears in the README's option section."""
    section = readme_options.readme_section(README.read_text(encoding="utf-8"))
    cell, line = readme_options.parser_options()
    for opt in sorted(cell):
        assert re.search(rf"`{re.escape(opt)}[` ]", section), f"{opt} is missing from README's option section"
    for strings in line:
        assert any(re.search(rf"(?<![\w-]){re.escape(s)}(?![\w-])", section) for s in strings), (
            f"%storch {'/'.join(strings)} is missing from README's option section"
        )


# -- the README's estimator table ---------------------------------------------


def _registered() -> dict[str, str]:
    """storch_nb.estimators() in a fresh interpreter (other tests register their own):
    name -> canonical name (itself, or what the alias stands for)."""
    code = (
        "import json, storch_nb\n"
        "from storch_nb.estimators import make_estimator\n"
        "out = {}\n"
        "for n in storch_nb.estimators():\n"
        "    e = make_estimator(n)\n"
        "    out[n] = n if e is None else e.name\n"
        "print(json.dumps(out))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _estimator_rows(text: str) -> dict[str, str]:
    """First-column names of the README table under '## Estimators' -> the row."""
    section = text.split("\n## Estimators\n", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for row in section.splitlines():
        if row.startswith("| `"):
            first = row.split("|")[1]
            for name in re.findall(r"`([a-z_]+)`", first):
                rows[name] = row
    return rows


def test_estimator_table_lists_every_registered_estimator():
    """One row per estimator of storch_nb.estimators() (aliases shown in the row of
    what they stand for), each with a description and a paper column."""
    registered = _registered()
    rows = _estimator_rows(README.read_text(encoding="utf-8"))
    canonical = sorted({c for c in registered.values()})
    missing = [n for n in canonical if n not in rows]
    assert not missing, f"README's estimator table lacks {missing}"
    for alias, target in registered.items():
        assert rows.get(alias) == rows[target], f"alias {alias} should sit in the row of {target}"
    unknown = sorted(set(rows) - set(registered))
    assert not unknown, f"README's estimator table lists unregistered {unknown}"
    for name in canonical:
        cells = [c.strip() for c in rows[name].strip().strip("|").split("|")]
        assert len(cells) == 3 and all(cells), rows[name]
    # one row per canonical estimator
    assert len({rows[n] for n in canonical}) == len(canonical)


# -- the rest of the README -----------------------------------------------------


def test_ci_finds_the_test_command():
    """.ci/run takes the first line starting with `python3 -m venv` after the marker."""
    text = README.read_text(encoding="utf-8")
    after = text.split("<!-- test-command -->\n", 1)[1]
    assert after.startswith("```bash\n")
    command = next(s for s in after.splitlines() if s.startswith("python3 -m venv"))
    assert command == (
        'python3 -m venv .venv && .venv/bin/pip install torch==2.13.0 && .venv/bin/pip install -e ".[test]" '
        "&& .venv/bin/python -m pytest"
    )


def _local_links(path: Path) -> list[str]:
    """Relative links of a Markdown file (not inside code blocks): ``docs/lab.md``,
    ``lab.md#controls-by-name``, ``#errors``."""
    text = path.read_text(encoding="utf-8")
    text = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
    links = re.findall(r"\]\(([^)\s]+)\)", text)
    return [s for s in links if not re.match(r"^[a-z]+:", s)]


def _anchors(path: Path) -> set[str]:
    """GitHub's anchors for the headings of a Markdown file."""
    text = re.sub(r"^```.*?^```", "", path.read_text(encoding="utf-8"), flags=re.S | re.M)
    out = set()
    for heading in re.findall(r"^#{1,6} +(.+?) *$", text, flags=re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")
        out.add(slug)
    return out


@pytest.mark.parametrize("path", DOC_FILES, ids=[p.relative_to(ROOT).as_posix() for p in DOC_FILES])
def test_local_links_resolve(path):
    """Relative links point at files that exist, and their #anchors at headings there."""
    broken = []
    for link in _local_links(path):
        file, _, anchor = link.partition("#")
        target = (path.parent / file).resolve() if file else path
        if not target.exists():
            broken.append(link)
        elif anchor and target.suffix == ".md" and anchor not in _anchors(target):
            broken.append(link)
    assert not broken, f"{path.name} has broken links: {broken}"


def test_every_notebook_is_linked_from_the_readme():
    text = README.read_text(encoding="utf-8")
    for nb in sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb")):
        assert f"](notebooks/{nb.name})" in text, f"README does not link {nb.name}"


def test_story_language_lists_every_helper():
    """docs/story_language.md names every math helper a story sees."""
    import torch.distributions as D

    from storch_nb.engine.helpers import HELPERS

    text = (ROOT / "docs" / "story_language.md").read_text(encoding="utf-8")
    names = [n for n, v in HELPERS.items() if not (isinstance(v, type) and issubclass(v, D.Distribution))]
    missing = [n for n in names if f"`{n}`" not in text]
    assert not missing, f"docs/story_language.md does not mention the helpers {missing}"


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--run":
        results = run_file_blocks(Path(sys.argv[2]).resolve())
        print("\n@@DOC-BLOCKS@@\n" + json.dumps(results))
    else:
        print(__doc__)
        raise SystemExit(2)
