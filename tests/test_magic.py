"""The %%storch magic driven through a real IPython shell.

Numbers are checked against closed forms (seed story: dE/dc = 15, dE/db = 22.25,
dE/da = 7.25; Bernoulli toy: dE/dt = sigmoid'(0) * (1 - 2 * 0.45) = 0.025).
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from conftest import SEED_STORY
from IPython.core.error import UsageError
from IPython.core.interactiveshell import InteractiveShell
from IPython.utils.capture import capture_output
from traitlets.config import Config

from storch_nb.notebook import display as nbdisplay
from storch_nb.notebook import magic as nbmagic
from storch_nb.notebook import options as nboptions

SEED_TRUTH = {"a": 7.25, "b": 22.25, "c": 15.0}

BERNOULLI_STORY = """\
t = param(0.0)
b ~ Bernoulli(logits=t)
cost (b - 0.45)**2
"""
BERNOULLI_TRUTH = 0.25 * (1 - 2 * 0.45)  # sigmoid'(0) * (1 - 2 p0) = 0.025


# ---------------------------------------------------------------------------
# fixtures
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def shell():
    cfg = Config()
    cfg.HistoryAccessor.enabled = False
    # display() publishes through the singleton, so the shell must be it
    return InteractiveShell.instance(config=cfg)


@pytest.fixture
def ip(shell):
    pytest.importorskip("storch_nb.api", reason="the engine (storch_nb.api) is not there yet")
    shell.run_line_magic("load_ext", "storch_nb")
    yield shell
    shell.run_line_magic("unload_ext", "storch_nb")
    shell.config.pop("StorchMagics", None)  # %config writes into the shell's config
    for name in ("res", "r", "r1", "r2", "cmp", "w", "torch"):
        shell.user_ns.pop(name, None)


@pytest.fixture
def magics(ip):
    return ip.magics_manager.registry["StorchMagics"]


def storch(ip, line, cell):
    """Run %%storch and return (value, captured output)."""
    with capture_output() as cap:
        value = ip.run_cell_magic("storch", line, cell)
    return value, cap


def shown(cap):
    """The text/plain and text/html of the one displayed object."""
    assert len(cap.outputs) == 1, cap.outputs
    data = cap.outputs[0].data
    assert "text/plain" in data and "text/html" in data
    return data["text/plain"], data["text/html"]


def snapshot(ns):
    return dict(ns)


def assert_unchanged(ns, before):
    assert ns.keys() == before.keys()
    for key, value in before.items():
        assert ns[key] is value, key


# ---------------------------------------------------------------------------
# loading
# ---------------------------------------------------------------------------


def test_load_and_unload(shell):
    mm = shell.magics_manager
    nbmagic.load_ipython_extension(shell)
    try:
        assert "storch" in mm.magics["cell"]
        assert "storch" in mm.magics["line"]
        inst = mm.registry["StorchMagics"]
        assert inst in shell.configurables
        nbmagic.load_ipython_extension(shell)  # a second load changes nothing
        assert mm.registry["StorchMagics"] is inst
        assert shell.configurables.count(inst) == 1
    finally:
        nbmagic.unload_ipython_extension(shell)
    assert "storch" not in mm.magics["cell"]
    assert "storch" not in mm.magics["line"]
    assert "StorchMagics" not in mm.registry
    assert inst not in shell.configurables
    nbmagic.unload_ipython_extension(shell)  # unloading twice is harmless


def test_load_ext_through_package(ip):
    assert "storch" in ip.magics_manager.magics["cell"]
    ip.run_line_magic("reload_ext", "storch_nb")
    assert "storch" in ip.magics_manager.magics["cell"]
    assert sum(type(c).__name__ == "StorchMagics" for c in ip.configurables) == 1


def test_docs_name_every_option():
    doc = nbmagic.StorchMagics.storch_cell.__doc__
    module_doc = nbmagic.__doc__
    for opt in (
        "--samples",
        "-n",
        "--estimator",
        "-e",
        "--runs",
        "-r",
        "--seed",
        "--device",
        "--dtype",
        "--grad",
        "--out",
        "--exact",
        "--compare",
    ):
        assert opt in doc, opt
        assert opt in module_doc, opt
    assert "%%storch" in doc
    for opt in ("--samples", "--reset", "--seed"):
        assert opt in nbmagic.StorchMagics.storch_line.__doc__
    assert "%storch" in module_doc and "%config StorchMagics" in module_doc


# ---------------------------------------------------------------------------
# option splitting (no engine needed)
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("line", "words"),
    [
        ("-n 10 --seed 0", ["-n", "10", "--seed", "0"]),
        ("-e \"score(baseline='rloo')\"", ["-e", "score(baseline='rloo')"]),
        ("-e 'score(baseline=\"rloo\")'", ["-e", 'score(baseline="rloo")']),
        ("-e score(baseline='rloo', n=4) -n 5", ["-e", "score(baseline='rloo', n=4)", "-n", "5"]),
        ("--estimator=score(baseline='rloo')", ["--estimator", "score(baseline='rloo')"]),
        ("-e \"{'e': 'score', 'x': 'pathwise'}\"", ["-e", "{'e': 'score', 'x': 'pathwise'}"]),
        ("--compare pathwise,score(baseline='rloo', n=4)", ["--compare", "pathwise,score(baseline='rloo', n=4)"]),
        ("", []),
    ],
)
def test_split_options(line, words):
    assert nbmagic.split_options(line) == words


@pytest.mark.parametrize("line", ['-e "score(', "-e score(baseline='rloo'", "-e a)"])
def test_split_options_unbalanced(line):
    with pytest.raises(UsageError):
        nbmagic.split_options(line)


def test_compare_list_splits_at_top_level_commas():
    assert nboptions.option("compare").convert("pathwise, score(baseline='rloo', n=4) ,rloo") == [
        "pathwise",
        "score(baseline='rloo', n=4)",
        "rloo",
    ]


# ---------------------------------------------------------------------------
# display (fake results, no engine needed)
# ---------------------------------------------------------------------------


def fake_result(runs=1):
    if runs == 1:
        grads = {"a": torch.tensor(7.2512345), "v<x>": torch.tensor([1.0, -2.0, 3.5])}
    else:
        grads = {"a": torch.tensor([7.0, 7.5, 7.25, 7.25]), "v<x>": torch.tensor([[1.0, -2.0, 3.5]] * 4)}
    return SimpleNamespace(
        grads=grads,
        stderr={"a": torch.tensor(0.0812345), "v<x>": torch.tensor([0.1, 0.2, 0.3])},
        cost=39.06123,
        cost_stderr=0.5,
        params={"a": torch.tensor(1.0), "v<x>": torch.zeros(3)},
        estimators={"e": "score(baseline='rloo')"},
        samples=1000,
        runs=runs,
        device="cpu",
        seconds=0.00321,
        dtype=torch.float32,
        exact=False,
    )


def test_result_display_text_and_html():
    res = fake_result()
    exact = SimpleNamespace(grads={"a": torch.tensor(7.25), "v<x>": torch.tensor([1.0, -2, 3])}, cost=39.0625)
    text = nbdisplay.result_text(res, exact=exact)
    page = nbdisplay.result_html(res, exact=exact)
    for s in (
        "7.251",
        "0.08123",
        "39.06",
        "∂E/∂a",
        "∂E/∂v<x>[2]",
        "exact",
        "7.25",
        "1000 samples × 1 run",
        "cpu",
        "float32",
        "3.21 ms",
        "score(baseline='rloo')",
    ):
        assert s in text, s
    # HTML: the same numbers, names escaped
    for s in ("7.251", "0.08123", "39.06", "∂E/∂v&lt;x&gt;[2]", "score(baseline=&#x27;rloo&#x27;)"):
        assert s in page, s
    assert "<x>" not in page
    assert "std over runs" not in text


def test_result_display_runs():
    res = fake_result(runs=4)
    res.stderr = None
    text = nbdisplay.result_text(res)
    assert "std over runs" in text and "mean over 4 runs" in text
    g = torch.tensor([7.0, 7.5, 7.25, 7.25], dtype=torch.float64)
    assert nbdisplay.fmt(g.mean()) in text
    assert nbdisplay.fmt(g.std()) in text
    assert nbdisplay.fmt(g.std() / 2) in text  # se computed when the engine gave none


def test_result_display_grad_filter_and_many_entries():
    res = fake_result()
    res.grads["big"] = torch.arange(25.0)
    res.params["big"] = torch.zeros(5, 5)
    text = nbdisplay.result_text(res, grads=["big"])
    assert "∂E/∂a" not in text
    assert "∂E/∂big[1, 4]" in text and "∂E/∂big[2, 0]" not in text
    assert "15 more entries" in text
    with pytest.raises(KeyError):
        nbdisplay.result_text(res, grads=["zzz"])


def test_fmt():
    assert nbdisplay.fmt(22.25) == "22.25"
    assert nbdisplay.fmt(1.0) == "1"
    assert nbdisplay.fmt(3.14159265) == "3.142"
    assert nbdisplay.fmt(-0.0) == "0"
    assert nbdisplay.fmt(None) == ""
    assert nbdisplay.fmt(float("nan")) == "nan"
    assert nbdisplay.fmt(torch.tensor(2.5)) == "2.5"


def test_comparison_display():
    cmp = SimpleNamespace(
        table=[
            {
                "estimator": "pathwise",
                "param": "c",
                "mean": 15.01,
                "std": 0.5,
                "variance": 0.25,
                "bias": 0.01,
                "seconds": 0.002,
            },
            {
                "estimator": "score",
                "param": "c",
                "mean": 14.2,
                "std": 5.0,
                "variance": 25.0,
                "bias": None,
                "seconds": 0.003,
            },
        ],
        results={"pathwise": fake_result(runs=4)},
        reference=None,
    )
    text = nbdisplay.comparison_text(cmp)
    page = nbdisplay.comparison_html(cmp)
    for s in ("pathwise", "score", "variance", "15.01", "25", "bias", "—"):
        assert s in text and s in page, s


# ---------------------------------------------------------------------------
# the magic on the seed story
# ---------------------------------------------------------------------------


def test_seed_story_gradients(ip):
    value, cap = storch(ip, "--samples 1000 --seed 0 --out res", SEED_STORY)
    assert value is None
    res = ip.user_ns["res"]
    assert res.samples == 1000 and res.runs == 1
    assert res.estimators == {"e": "pathwise"}
    for name, truth in SEED_TRUTH.items():
        g = float(res.grads[name])
        se = float(res.stderr[name])
        assert se > 0
        assert abs(g - truth) < 4 * se, (name, g, truth, se)
    # E[f] = (a+b)((c+b)^2+1) = 21.75; sd of one draw of f is about 15.6, so 1000
    # samples give a standard error near 0.49 (the engine may not report it for runs=1)
    cost_se = res.cost_stderr if res.cost_stderr is not None else 0.5
    assert abs(res.cost - 3 * (2.5**2 + 1)) < 4 * cost_se
    text, page = shown(cap)
    for name in SEED_TRUTH:
        assert f"∂E/∂{name}" in text and f"∂E/∂{name}" in page
        assert nbdisplay.fmt(res.grads[name]) in text
        assert nbdisplay.fmt(res.grads[name]) in page
        assert nbdisplay.fmt(res.stderr[name]) in text
    assert "E[cost]" in text and nbdisplay.fmt(res.cost) in text
    assert "e: pathwise" in text and "1000 samples" in text and "cpu" in text
    assert "<table" in page


def test_seed_makes_cells_reproducible(ip):
    storch(ip, "-n 200 --seed 3 --out r1", SEED_STORY)
    storch(ip, "-n 200 --seed 3 --out r2", SEED_STORY)
    r1, r2 = ip.user_ns["r1"], ip.user_ns["r2"]
    assert r1 is not r2
    for name in SEED_TRUTH:
        assert torch.equal(r1.grads[name], r2.grads[name])


def test_each_execution_starts_from_fresh_estimator_state(ip, magics):
    line = "-n 50 --seed 1 -e \"score(baseline='moving_average')\" --out {}"
    storch(ip, line.format("r1"), SEED_STORY)
    story = magics._stories[SEED_STORY]
    storch(ip, line.format("r2"), SEED_STORY)
    assert magics._stories[SEED_STORY] is story  # parsed once, cached by text
    r1, r2 = ip.user_ns["r1"], ip.user_ns["r2"]
    for name in SEED_TRUTH:
        assert torch.equal(r1.grads[name], r2.grads[name])


def test_runs_show_mean_and_spread(ip):
    _, cap = storch(ip, "-n 100 -r 20 --seed 0 --out res", SEED_STORY)
    res = ip.user_ns["res"]
    assert res.runs == 20 and res.grads["c"].shape == (20,)
    text, page = shown(cap)
    g = res.grads["c"].double()
    assert "std over runs" in text and "std over runs" in page
    assert nbdisplay.fmt(g.mean()) in text
    assert nbdisplay.fmt(g.std()) in text
    assert abs(float(g.mean()) - 15.0) < 4 * float(g.std()) / math.sqrt(20)


def test_estimator_option_keeps_quotes(ip):
    for line in (
        "-n 2000 --seed 0 -e \"score(baseline='rloo')\" --out res",
        "-n 2000 --seed 0 -e score(baseline='rloo') --out res",
        '-n 2000 --seed 0 --estimator=score(baseline="rloo") --out res',
    ):
        storch(ip, line, SEED_STORY)
        res = ip.user_ns["res"]
        used = res.estimators["e"]
        assert "score" in used and "rloo" in used, (line, used)
        for name, truth in SEED_TRUTH.items():
            assert abs(float(res.grads[name]) - truth) < 5 * float(res.stderr[name])


def test_estimator_mapping(ip):
    storch(ip, "-n 100 --seed 0 -e \"{'e': 'score'}\" --out res", SEED_STORY)
    assert ip.user_ns["res"].estimators["e"].startswith("score")


def test_grad_shows_only_those(ip):
    _, cap = storch(ip, "-n 100 --seed 0 --grad c,b", SEED_STORY)
    text, page = shown(cap)
    assert "∂E/∂c" in text and "∂E/∂b" in text and "∂E/∂a" not in text
    assert "∂E/∂a" not in page


def test_namespace_parameter(ip):
    ip.user_ns["w"] = torch.tensor(1.5, requires_grad=True)
    storch(ip, "-n 2000 --seed 0 --out res", "x ~ Normal(w, 1)\ncost x**2\n")
    res = ip.user_ns["res"]
    assert abs(float(res.grads["w"]) - 3.0) < 4 * float(res.stderr["w"])


# ---------------------------------------------------------------------------
# defaults: %config and %storch
# ---------------------------------------------------------------------------


def test_config_changes_defaults(ip, magics):
    ip.run_line_magic("config", "StorchMagics.samples = 5")
    ip.run_line_magic("config", "StorchMagics.seed = 0")
    assert magics.samples == 5
    storch(ip, "--out r1", SEED_STORY)
    storch(ip, "--out r2", SEED_STORY)
    r1, r2 = ip.user_ns["r1"], ip.user_ns["r2"]
    assert r1.samples == 5
    assert torch.equal(r1.grads["c"], r2.grads["c"])  # the configured seed
    storch(ip, "-n 7 --seed none --out r1", SEED_STORY)  # options win over defaults
    assert ip.user_ns["r1"].samples == 7


def test_config_from_profile(shell):
    pytest.importorskip("storch_nb.api", reason="the engine (storch_nb.api) is not there yet")
    shell.config.StorchMagics.samples = 9
    try:
        shell.run_line_magic("load_ext", "storch_nb")
        assert shell.magics_manager.registry["StorchMagics"].samples == 9
    finally:
        shell.run_line_magic("unload_ext", "storch_nb")
        shell.config.pop("StorchMagics", None)


def test_line_magic_shows_and_sets_defaults(ip, magics):
    with capture_output() as cap:
        ip.run_line_magic("storch", "")
    assert "--samples 1000" in cap.stdout and "--estimator auto" in cap.stdout
    assert "--seed none" in cap.stdout and "--device cpu" in cap.stdout
    with capture_output() as cap:
        ip.run_line_magic("storch", "--samples 500 -r 3 --seed 2 --dtype double -e rloo")
    assert "--samples 500" in cap.stdout
    assert (magics.samples, magics.runs, magics.seed, magics.dtype, magics.estimator) == (500, 3, 2, "float64", "rloo")
    storch(ip, "--out res", SEED_STORY)
    res = ip.user_ns["res"]
    assert res.samples == 500 and res.runs == 3 and res.dtype == torch.float64
    with capture_output():
        ip.run_line_magic("storch", "--reset")
    assert magics.defaults() == {
        "samples": 1000,
        "estimator": "auto",
        "runs": 1,
        "seed": None,
        "device": "cpu",
        "dtype": "float32",
    }


@pytest.mark.parametrize(
    "line", ["--samples 0", "--runs -2", "--device tpu", "--dtype int8", "--bogus", "-n 10 extra", "--seed x"]
)
def test_line_magic_bad_values(ip, magics, line):
    before = magics.defaults()
    with pytest.raises(UsageError):
        ip.run_line_magic("storch", line)
    assert magics.defaults() == before


# ---------------------------------------------------------------------------
# errors leave the namespace alone
# ---------------------------------------------------------------------------

BAD_LINES = [
    "--samples -5 --out res",
    "--samples 0 --out res",
    "--samples many --out res",
    "-n 10 --runs 0 --out res",
    "-n 10 --device tpu --out res",
    "-n 10 --dtype int8 --out res",
    "-n 10 --seed -1 --out res",
    "-n 10 --bogus --out res",
    "-n 10 stray --out res",
    "-n 10 --out 1x",
    "-n 10 --out class",
    "-n 10 --grad zzz --out res",
    "-n 10 -e \"{'e': 3}\" --out res",
    '-n 10 -e "score( --out res',
]


@pytest.mark.parametrize("line", BAD_LINES)
def test_bad_options_are_usage_errors(ip, line):
    before = snapshot(ip.user_ns)
    with capture_output() as cap, pytest.raises(UsageError) as info:
        ip.run_cell_magic("storch", line, SEED_STORY)
    assert len(str(info.value)) < 200
    assert cap.outputs == []
    assert_unchanged(ip.user_ns, before)


def test_cuda_without_cuda_is_a_usage_error(ip):
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    before = snapshot(ip.user_ns)
    with pytest.raises(UsageError, match="CUDA"):
        ip.run_cell_magic("storch", "-n 10 --device cuda --out res", SEED_STORY)
    assert_unchanged(ip.user_ns, before)


def test_empty_cell_is_a_usage_error(ip):
    with pytest.raises(UsageError):
        ip.run_cell_magic("storch", "--out res", "\n  \n")
    assert "res" not in ip.user_ns


def test_unknown_name_is_a_story_error(ip):
    import storch_nb as sn

    cell = "a = param(1.0)\nb = param(2.0)\ne ~ Normal(a + zzz, 1)\ncost e * b\n"
    before = snapshot(ip.user_ns)
    with pytest.raises(sn.StoryError) as info:
        ip.run_cell_magic("storch", "-n 10 --seed 0 --out res", cell)
    err = info.value
    assert isinstance(err, sn.StoryNameError)
    assert err.line_offset == 1
    assert err.lineno == 3
    text = "\n".join(err._render_traceback_())
    assert "line 4" in text  # the %%storch line is line 1
    assert "e ~ Normal(a + zzz, 1)" in text and "^" in text
    assert_unchanged(ip.user_ns, before)


def test_syntax_error_is_a_story_error(ip):
    import storch_nb as sn

    cell = "a = param(1.0)\nb = = a\ncost b\n"
    before = snapshot(ip.user_ns)
    with pytest.raises(sn.StorySyntaxError) as info:
        ip.run_cell_magic("storch", "--out res", cell)
    text = "\n".join(info.value._render_traceback_())
    assert "line 3" in text and "^" in text
    assert_unchanged(ip.user_ns, before)


def test_story_error_shown_without_traceback(ip):
    cell = "%%storch -n 10 --out res\na = param(1.0)\ne ~ Normal(a + zzz, 1)\ncost e\n"
    with capture_output() as cap:
        result = ip.run_cell(cell)
    assert result.error_in_exec is not None
    out = cap.stdout + cap.stderr
    assert "StoryNameError" in out and "line 3" in out and "^" in out
    assert "Traceback" not in out
    assert "res" not in ip.user_ns


# ---------------------------------------------------------------------------
# --out, --exact, --compare
# ---------------------------------------------------------------------------


def test_out_stores_a_result(ip):
    import storch_nb as sn

    assert "res" not in ip.user_ns
    storch(ip, "-n 10 --seed 0 --out res", SEED_STORY)
    res = ip.user_ns["res"]
    assert type(res).__name__ == "Result"
    assert set(res.grads) == {"a", "b", "c"}
    assert not res.exact
    assert hasattr(sn, "Story")


def test_exact_bernoulli(ip):
    # auto is score + RLOO here; its standard error is taken over runs (a baseline
    # that looks at the other samples couples them, so one run's spread misleads)
    _, cap = storch(ip, "--samples 1000 --runs 20 --seed 0 --exact --out res", BERNOULLI_STORY)
    res = ip.user_ns["res"]
    assert res.grads["t"].shape == (20,)
    g, se = float(res.grads["t"].double().mean()), float(res.stderr["t"])
    assert se > 0
    assert abs(g - BERNOULLI_TRUTH) < 4 * se
    text, page = shown(cap)
    assert "exact" in text and "exact" in page
    assert "0.025" in text and "0.025" in page
    # exact cost: E[(b - 0.45)^2] at p = 1/2 = 0.5 * 0.45^2 + 0.5 * 0.55^2
    assert nbdisplay.fmt(0.5 * 0.45**2 + 0.5 * 0.55**2) in text
    assert "b: score" in text


def test_exact_on_a_continuous_story_is_a_note(ip):
    _, cap = storch(ip, "-n 100 --seed 0 --exact --out res", SEED_STORY)
    text, _ = shown(cap)
    assert "exact: not available" in text
    assert "res" in ip.user_ns


def test_compare(ip):
    _, cap = storch(ip, "-n 100 -r 50 --seed 0 --compare pathwise,score --out cmp", SEED_STORY)
    cmp = ip.user_ns["cmp"]
    rows = {(r["estimator"], r["param"]): r for r in cmp.table}
    assert {"pathwise", "score"} <= {e for e, _ in rows}
    assert rows[("pathwise", "c")]["variance"] < rows[("score", "c")]["variance"]
    text, page = shown(cap)
    for s in ("pathwise", "score", "variance", "bias"):
        assert s in text and s in page
    assert nbdisplay.fmt(rows[("pathwise", "c")]["mean"]) in text


def test_compare_with_exact_reference(ip):
    _, cap = storch(ip, "-n 100 -r 20 --seed 0 --compare score,rloo --exact", BERNOULLI_STORY)
    text, page = shown(cap)
    assert "rloo" in text and "0.025" in text and "0.025" in page


VECTOR_BERNOULLI = """\
t = param(torch.zeros(2))
b ~ Bernoulli(logits=t)
cost ((b - 0.45)**2).sum()
"""


def test_vector_parameter_rows(ip):
    ip.user_ns["torch"] = torch
    _, cap = storch(ip, "-n 1000 -r 20 --seed 0 --exact --out res", VECTOR_BERNOULLI)
    res = ip.user_ns["res"]
    assert res.grads["t"].shape == (20, 2)
    mean = res.grads["t"].double().mean(0)
    for i in range(2):
        assert abs(float(mean[i]) - BERNOULLI_TRUTH) < 4 * float(res.stderr["t"][i])
    text, page = shown(cap)
    assert "∂E/∂t[0]" in text and "∂E/∂t[1]" in text and "∂E/∂t[1]" in page
    assert text.count("0.025") >= 2


def test_compare_vector_parameter_with_grad_filter(ip):
    ip.user_ns["torch"] = torch
    _, cap = storch(ip, "-n 100 -r 10 --seed 0 --compare score,rloo --exact --grad t", VECTOR_BERNOULLI)
    text, _ = shown(cap)
    assert "t[0]" in text and "t[1]" in text
    assert text.count("0.025") >= 4  # the exact column, one per row


# ---------------------------------------------------------------------------
# pictures: --plot, --graph, --widget, --train (PNG and HTML through a real shell)
# ---------------------------------------------------------------------------

TOY_499 = """\
t = param(0.0)
b ~ Bernoulli(logits=t)
cost (b - 0.499)**2
"""


@pytest.fixture
def inline(ip):
    """The notebook's matplotlib backend (as `%matplotlib inline` selects it), put back afterwards."""
    matplotlib = pytest.importorskip("matplotlib")
    pytest.importorskip("matplotlib_inline")
    old = matplotlib.get_backend()
    matplotlib.use("module://matplotlib_inline.backend_inline")
    yield ip
    matplotlib.use(old)


def kinds(cap):
    """The MIME types of each displayed output, in order."""
    return [sorted(o.data) for o in cap.outputs]


def png_of(output):
    data = output.data["image/png"]
    if isinstance(data, str):
        import base64

        data = base64.b64decode(data)
    return data


def test_docs_name_the_picture_options():
    doc = nbmagic.StorchMagics.storch_cell.__doc__
    for opt in ("--plot", "--graph", "--widget", "--train", "--lr", "--optimizer"):
        assert opt in nbmagic.__doc__, opt
    assert "%%storch" in doc


def test_plot_shows_png_and_table(inline):
    _, cap = storch(inline, "-n 100 --seed 0 --plot --out cmp", SEED_STORY)
    assert kinds(cap) == [["image/png", "text/plain"], ["text/html", "text/plain"]]
    assert png_of(cap.outputs[0]).startswith(b"\x89PNG")
    text, page = cap.outputs[1].data["text/plain"], cap.outputs[1].data["text/html"]
    for s in ("mean", "std", "variance", "bias", "time", "reference"):
        assert s in text and s in page
    assert "100 samples × 100 runs" in text  # --plot without --runs: 100 runs
    cmp = inline.user_ns["cmp"]
    row = cmp.row("auto (pathwise)", "c")
    se = row["std"] / math.sqrt(100)
    assert abs(row["mean"] - SEED_TRUTH["c"]) < 4 * se
    assert "reference (100,000 samples, pathwise)" in text  # not enumerable: labelled so


def test_compare_plot_overlays_estimators(inline):
    _, cap = storch(inline, "-n 50 -r 40 --seed 0 --compare score,rloo,enumerate --plot --out cmp", BERNOULLI_STORY)
    assert kinds(cap) == [["image/png", "text/plain"], ["text/html", "text/plain"]]
    cmp = inline.user_ns["cmp"]
    assert list(cmp.results) == ["score", "rloo", "enumerate"]
    assert cmp.row("enumerate", "t")["variance"] == pytest.approx(0.0, abs=1e-12)
    assert cmp.row("enumerate", "t")["bias"] == pytest.approx(0.0, abs=1e-7)
    text = cap.outputs[1].data["text/plain"]
    assert "exact" in text and "0.025" in text


def test_graph_draws_above_the_table(inline):
    _, cap = storch(inline, "-n 100 --seed 0 --graph", SEED_STORY)
    assert kinds(cap) == [["image/png", "text/plain"], ["text/html", "text/plain"]]
    assert png_of(cap.outputs[0]).startswith(b"\x89PNG")
    assert "∂E/∂c" in cap.outputs[1].data["text/plain"]


def test_widget_shows_the_lab(inline):
    from storch_nb.notebook.lab import Lab

    _, cap = storch(inline, "--widget -n 50 -r 40 --seed 0 --compare score --out w", SEED_STORY)
    assert len(cap.outputs) == 1
    data = cap.outputs[0].data
    assert "application/vnd.jupyter.widget-view+json" in data
    assert data["text/plain"].startswith("<storch lab")
    lab = inline.user_ns["w"]
    assert isinstance(lab, Lab)
    assert data["application/vnd.jupyter.widget-view+json"]["model_id"] == lab.widget.model_id
    assert (lab.result.samples, lab.result.runs) == (50, 40)
    assert list(lab.results) == ["auto (pathwise)", "score"]
    assert lab.controls["estimator"].description == "estimator"
    lab.controls["estimator"].value = "score"
    assert lab.result.estimators == {"e": "score"} and lab.error is None
    lab.close()


def test_train_plots_the_learning_curve(inline):
    _, cap = storch(inline, "--train 60 --lr 0.1 --optimizer adam -n 20 --seed 0 -e rloo --out r", TOY_499)
    assert kinds(cap) == [["image/png", "text/plain"], ["text/html", "text/plain"]]
    hist = inline.user_ns["r"]
    assert len(hist.cost) == 60 and 1 / (1 + math.exp(-hist.params["t"].item())) < 0.1
    text = cap.outputs[1].data["text/plain"]
    assert "rloo" in text and "final cost" in text and "adam, lr 0.1" in text


def test_train_compare_overlays_curves(inline):
    _, cap = storch(inline, "--train 30 --lr 0.1 --optimizer sgd -n 10 --seed 0 --compare rloo,score --out r",
                    TOY_499)
    assert kinds(cap) == [["image/png", "text/plain"], ["text/html", "text/plain"]]
    hists = inline.user_ns["r"]
    assert list(hists) == ["rloo", "score"]
    assert all(h.optimizer == "sgd" and h.trace["t"][0] == 0.0 for h in hists.values())


@pytest.mark.parametrize(
    "line",
    ["--widget --train 10", "--lr 0.1", "--optimizer sgd", "--train 0", "--train 5 --lr -1", "--train 5 --optimizer x"],
)
def test_picture_option_errors(ip, line):
    with pytest.raises(UsageError):
        ip.run_cell_magic("storch", line, SEED_STORY)


def test_story_error_in_plot_counts_the_magic_line(inline):
    with pytest.raises(nbmagic.StoryError) as info:
        storch(inline, "--plot -n 10 --seed 0 -e pathwise", BERNOULLI_STORY)
    assert "line 3" in str(info.value)  # the site is line 2 of the story, line 3 of the cell


def test_widget_story_error_is_raised(inline):
    with pytest.raises(nbmagic.StoryError) as info:
        storch(inline, "--widget -r 10 --seed 0", "c = param(0.5)\ne ~ Normal(c + nowhere, 1)\ncost e**2\n")
    assert "line 3" in str(info.value) and "nowhere" in str(info.value)


def test_compile_option(ip):
    """--compile: the same estimate as without for the same seed, a note of the compiling
    time (then of reuse), and a UsageError with the modes it does not serve."""
    cell = "a = param(1.0)\ne ~ Normal(a, 1)\ncost e**2\n"
    storch(ip, "--seed 0 -n 200 --out r1", cell)
    _, cap = storch(ip, "--seed 0 -n 200 --compile --out r2", cell)
    assert ip.user_ns["r2"].compile_seconds is not None and "spent compiling" in shown(cap)[0]
    _, cap = storch(ip, "--seed 0 -n 200 --compile --out res", cell)
    eager, again = ip.user_ns["r1"], ip.user_ns["res"]
    assert again.compile_seconds == 0.0 and "compiled (reused)" in shown(cap)[0]
    assert again.cost == pytest.approx(eager.cost, rel=1e-5)
    assert again.grads["a"].item() == pytest.approx(eager.grads["a"].item(), rel=1e-5)
    with pytest.raises(UsageError, match="--compile"):
        storch(ip, "--compile --compare score,pathwise", cell)
