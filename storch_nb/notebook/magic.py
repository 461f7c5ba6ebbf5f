"""``%%storch``: estimate the gradient of a story's expected cost in a notebook cell.

Load the extension with ``%load_ext storch_nb`` (or, for every session,
``c.InteractiveShellApp.extensions = ['storch_nb']`` in the IPython config).
Then a cell starting with ``%%storch`` holds a story::

    %%storch --samples 1000 --seed 0 --exact
    a = param(1.0)
    b = param(2.0)
    c = param(0.5)
    d = a + b
    e ~ Normal(c + b, 1)
    f = d * e**2
    cost f

The cell shows a compact table (HTML with a text/plain twin): the cost
estimate, and for each parameter its value, the gradient estimate with its
standard error, the exact gradient (with ``--exact``), the estimator used at
each site, and the samples, runs, device and time taken. Names the story does
not define come from the notebook namespace, which the story never changes
(except through ``--out``). Lines in error messages count the ``%%storch``
line as line 1.

Options of ``%%storch`` (those marked * default to the configured value, see
below):

What to estimate
  -n N, --samples N        Monte Carlo samples per estimate (*, 1000).
  -e EST, --estimator EST  Estimator for the sites without ``using`` (*, ``auto``):
                           the text ``using`` takes, e.g. ``score``, ``rloo``,
                           ``-e "score(baseline='rloo')"`` (quotes and brackets
                           are kept together), or a mapping from site name to
                           such text: ``-e "{'e': 'score', 'x': 'pathwise'}"``.
  -r R, --runs R           Independent repetitions of the whole estimate (*, 1);
                           with R > 1 the table shows the mean over runs, its
                           standard error and the standard deviation across runs.
  --seed S                 Seed making the cell reproducible (*, none: torch's
                           global generator); ``--seed none`` overrides a
                           configured seed.
  --device D               ``cpu``, ``cuda`` or ``auto`` (*, ``cpu``).
  --dtype T                ``float32`` or ``float64`` (*, ``float32``).

What to show and keep
  --grad NAMES             Show only these parameters (comma-separated: ``--grad b,c``).
  --out NAME               Store the ``Result`` (with ``--compare``: the comparison;
                           ``--widget``: the ``Lab``; ``--train``: the ``History``,
                           or a dict of them with ``--compare``) in the notebook
                           namespace as ``NAME``.
  --exact                  Also show the exact cost and gradients, by enumerating
                           the story (when every site has a finite support).
  --compare EST,EST,...    Run each estimator (``--runs`` times, 100 if neither
                           ``--runs`` nor a configured default above 1 is given)
                           and show their mean, std, variance and bias per
                           parameter instead of a single estimate.

Pictures (matplotlib PNGs; matplotlib is imported only when one is asked for)
  --plot                   Histograms of the gradient estimates over the runs
                           (``--runs``, 100 if not given), one per parameter,
                           with the exact gradient (or a high-sample reference,
                           labelled so) as a line, and the variance against the
                           number of samples on log-log axes with a 1/S slope;
                           then a table of mean, std, variance, bias and time.
                           With ``--compare``: the estimators overlaid.
  --graph                  Draw the story's graph (rectangles: deterministic,
                           ellipses: stochastic; parameters, inputs and costs
                           marked) above the cell's other output.
  --widget                 The interactive lab (ipywidgets): estimator dropdown,
                           samples (log scale), runs, parameter, comparison.
                           ``--samples``/``--runs``/``--estimator``/``--compare``
                           set its starting values (default 100 samples, 200 runs).
  --train STEPS            Optimise the story's parameters (and namespace tensors
                           with requires_grad and modules it uses) for STEPS steps
                           and plot the learning curve; with ``--compare``, one
                           curve per estimator, each from the same start (the
                           namespace is put back afterwards).
  --lr LR                  Learning rate for ``--train`` (0.05).
  --optimizer NAME         ``adam`` (default), ``sgd``, ``adamw``, ``rmsprop`` or
                           ``adagrad``, for ``--train``.

Defaults: the options marked * are traitlets of ``StorchMagics``, so
``%config StorchMagics.samples = 500`` (or ``c.StorchMagics.samples = 500`` in
a config file) changes them. The line magic does the same:

  %storch                         show the current defaults
  %storch --samples 500 --seed 0  set defaults (same options as above: -n -e -r
                                  --seed --device --dtype)
  %storch --reset                 back to the built-in defaults

A bad option value is a short ``UsageError``; an error in the story is a
``StoryError`` naming the line, with a caret under it.
"""

from __future__ import annotations

import argparse
import ast
import keyword
from collections import OrderedDict
from typing import Any

from IPython.core.error import UsageError
from IPython.core.magic import Magics, cell_magic, line_magic, magics_class
from IPython.core.magic_arguments import argument, argument_group, magic_arguments
from traitlets import CaselessStrEnum, Dict, Int, TraitError, Unicode, Union, validate

from ..errors import StoryError
from .display import ComparisonView, ResultView

__all__ = ["StorchMagics", "load_ipython_extension", "unload_ipython_extension"]

#: how many parsed stories the magic keeps (by cell text)
STORY_CACHE_SIZE = 32
#: runs per estimator for --compare when neither --runs nor a default above 1 is given
COMPARE_RUNS = 100
#: samples and runs of --widget when not given
WIDGET_SAMPLES = 100
WIDGET_RUNS = 200
#: learning rate of --train when not given
TRAIN_LR = 0.05
_OPTIMIZERS = ("adam", "sgd", "adamw", "rmsprop", "adagrad")

_DEVICES = ("cpu", "cuda", "auto")
_DTYPES = {
    "float32": "float32",
    "float": "float32",
    "single": "float32",
    "f32": "float32",
    "torch.float32": "float32",
    "float64": "float64",
    "double": "float64",
    "f64": "float64",
    "torch.float64": "float64",
}


class _Unseeded:
    """``--seed none``: use torch's global generator."""

    def __repr__(self) -> str:
        return "none"


_UNSEEDED = _Unseeded()


# ---------------------------------------------------------------------------
# splitting and checking option values
# ---------------------------------------------------------------------------


def _unquote(token: str) -> str:
    """Strip one pair of quotes that wraps the whole token (``"a b"`` -> ``a b``)."""
    if len(token) >= 2 and token[0] in "'\"" and token[-1] == token[0]:
        try:
            value = ast.literal_eval(token)
        except (ValueError, SyntaxError):
            return token
        if isinstance(value, str):
            return value
    return token


def split_options(line: str) -> list[str]:
    """Split an option line into words, keeping quotes and brackets together.

    Unlike a shell, quotes inside a word are kept (``score(baseline='rloo')``
    stays as it is), whitespace inside brackets does not split
    (``score(baseline='rloo', n=4)`` is one word), and a word wholly in quotes
    loses them (``"score(baseline='rloo')"``). ``--name=value`` becomes
    ``--name value``.
    """
    tokens: list[str] = []
    buf: list[str] = []
    depth = 0
    quote: str | None = None
    started = False
    i = 0
    while i < len(line):
        ch = line[i]
        if quote is not None:
            buf.append(ch)
            if ch == "\\" and i + 1 < len(line):
                buf.append(line[i + 1])
                i += 1
            elif ch == quote:
                quote = None
        elif ch in "'\"":
            quote = ch
            buf.append(ch)
            started = True
        elif ch in "([{":
            depth += 1
            buf.append(ch)
            started = True
        elif ch in ")]}":
            depth -= 1
            if depth < 0:
                raise UsageError(f"unbalanced {ch!r} in the options: {line.strip()}")
            buf.append(ch)
            started = True
        elif ch.isspace() and depth == 0:
            if started:
                tokens.append("".join(buf))
                buf, started = [], False
        else:
            buf.append(ch)
            started = True
        i += 1
    if quote is not None:
        raise UsageError(f"unclosed quote {quote} in the options: {line.strip()}")
    if depth > 0:
        raise UsageError(f"unclosed bracket in the options: {line.strip()}")
    if started:
        tokens.append("".join(buf))

    words: list[str] = []
    for tok in tokens:
        if tok.startswith("-") and "=" in tok and not tok.startswith(("'", '"')):
            key, value = tok.split("=", 1)
            if key.startswith("--") or len(key) == 2:
                words.extend([key, _unquote(value)])
                continue
        words.append(_unquote(tok))
    return words


def _split_top_level(text: str) -> list[str]:
    """Split at commas outside brackets and quotes."""
    parts, buf, depth, quote = [], [], 0, None
    for ch in text:
        if quote is not None:
            buf.append(ch)
            if ch == quote:
                quote = None
        elif ch in "'\"":
            quote = ch
            buf.append(ch)
        elif ch in "([{":
            depth += 1
            buf.append(ch)
        elif ch in ")]}":
            depth -= 1
            buf.append(ch)
        elif ch == "," and depth == 0:
            parts.append("".join(buf).strip())
            buf = []
        else:
            buf.append(ch)
    parts.append("".join(buf).strip())
    return [p for p in parts if p]


def _positive_int(what: str):
    def convert(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{what} must be a positive integer, got {text!r}") from None
        if value < 1:
            raise argparse.ArgumentTypeError(f"{what} must be a positive integer, got {value}")
        if value > 2**53:
            raise argparse.ArgumentTypeError(f"{what} must be at most 2**53, got {value}")
        return value

    convert.__name__ = what
    return convert


_samples_type = _positive_int("samples")
_runs_type = _positive_int("runs")


def _seed_type(text: str) -> Any:
    if text.strip().lower() == "none":
        return _UNSEEDED
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"seed must be a non-negative integer or none, got {text!r}") from None
    if not 0 <= value < 2**64:
        raise argparse.ArgumentTypeError(f"seed must be an integer from 0 to 2**64 - 1, got {value}")
    return value


def _choice_type(what: str, choices: tuple[str, ...]):
    """An argparse type accepting one of ``choices`` (case-insensitive)."""

    def parse(text: str) -> str:
        value = text.strip().lower()
        if value not in choices:
            raise argparse.ArgumentTypeError(f"{what} must be one of {', '.join(choices)}, got {text!r}")
        return value

    return parse


_device_type = _choice_type("device", _DEVICES)


def _dtype_type(text: str) -> str:
    value = _DTYPES.get(text.strip().lower())
    if value is None:
        raise argparse.ArgumentTypeError(f"dtype must be float32 or float64, got {text!r}")
    return value


def _estimator_type(text: str) -> Any:
    value = text.strip()
    if not value:
        raise argparse.ArgumentTypeError("estimator must not be empty")
    if value.startswith("{"):
        try:
            mapping = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            mapping = None
        if not isinstance(mapping, dict) or not all(
            isinstance(k, str) and isinstance(v, str) and v.strip() for k, v in mapping.items()
        ):
            raise argparse.ArgumentTypeError(
                f"an estimator mapping must look like {{'site': 'estimator', ...}}, got {text!r}"
            )
        return {k: v.strip() for k, v in mapping.items()}
    return value


def _names_type(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise argparse.ArgumentTypeError("give one or more parameter names, e.g. --grad b,c")
    return names


def _out_type(text: str) -> str:
    name = text.strip()
    if not name.isidentifier() or keyword.iskeyword(name):
        raise argparse.ArgumentTypeError(f"--out needs a Python variable name, got {text!r}")
    return name


def _compare_type(text: str) -> list[str]:
    ests = _split_top_level(text)
    if not ests:
        raise argparse.ArgumentTypeError("give the estimators to compare, e.g. --compare pathwise,score")
    return ests


_steps_type = _positive_int("steps")


def _lr_type(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"lr must be a positive number, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"lr must be a positive number, got {text!r}")
    return value


_optimizer_type = _choice_type("optimizer", _OPTIMIZERS)


def _check_device(device: str) -> None:
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise UsageError("device cuda: CUDA is not available here; use --device cpu or auto")


# ---------------------------------------------------------------------------
# the magics
# ---------------------------------------------------------------------------

_DEFAULT_NAMES = ("samples", "estimator", "runs", "seed", "device", "dtype")


class Interrupted(KeyboardInterrupt):
    """A ``%%storch`` cell interrupted (Ctrl-C, "interrupt kernel"): shown as one line."""

    def __init__(self) -> None:
        super().__init__("the %%storch cell was interrupted; nothing was changed")

    def _render_traceback_(self) -> list[str]:
        return [f"KeyboardInterrupt: {self.args[0]}"]


@magics_class
class StorchMagics(Magics):
    """The ``%%storch`` cell magic and the ``%storch`` line magic (settings)."""

    samples = Int(1000, min=1, help="Monte Carlo samples per estimate (--samples/-n).").tag(config=True)
    estimator = Union(
        [Unicode(), Dict(key_trait=Unicode(), value_trait=Unicode())],
        default_value="auto",
        help="Estimator for sites without `using` (--estimator/-e): text or {site: text}.",
    ).tag(config=True)
    runs = Int(1, min=1, help="Independent repetitions of the estimate (--runs/-r).").tag(config=True)
    seed = Int(None, allow_none=True, min=0, help="Seed (--seed); None: torch's global generator.").tag(config=True)
    device = CaselessStrEnum(list(_DEVICES), default_value="cpu", help="Device: cpu, cuda or auto (--device).").tag(
        config=True
    )
    dtype = Unicode("float32", help="Floating dtype: float32 or float64 (--dtype).").tag(config=True)

    @validate("dtype")
    def _valid_dtype(self, proposal: Any) -> str:
        value = _DTYPES.get(str(proposal["value"]).strip().lower())
        if value is None:
            raise TraitError(f"dtype must be float32 or float64, got {proposal['value']!r}")
        return value

    @validate("estimator")
    def _valid_estimator(self, proposal: Any) -> Any:
        value = proposal["value"]
        if isinstance(value, str) and not value.strip():
            raise TraitError("estimator must not be empty")
        return value

    def __init__(self, shell: Any = None, **kwargs: Any) -> None:
        super().__init__(shell=shell, **kwargs)
        self._stories: OrderedDict[str, Any] = OrderedDict()

    # -- helpers ------------------------------------------------------------

    def _story(self, text: str) -> Any:
        """The parsed ``Story`` for this cell text (a small LRU cache)."""
        story = self._stories.get(text)
        if story is None:
            from ..api import Story

            story = Story(text)
            self._stories[text] = story
            while len(self._stories) > STORY_CACHE_SIZE:
                self._stories.popitem(last=False)
        else:
            self._stories.move_to_end(text)
        return story

    def defaults(self) -> dict[str, Any]:
        """The current defaults, by option name."""
        return {name: getattr(self, name) for name in _DEFAULT_NAMES}

    def _defaults_text(self) -> str:
        d = self.defaults()
        est = d["estimator"]
        est_text = repr(est) if isinstance(est, dict) or " " in est else est
        seed = "none" if d["seed"] is None else d["seed"]
        return (
            f"%%storch defaults: --samples {d['samples']} --estimator {est_text} "
            f"--runs {d['runs']} --seed {seed} --device {d['device']} --dtype {d['dtype']}"
        )

    @staticmethod
    def _parse(magic: Any, line: str) -> argparse.Namespace:
        return magic.parser.parse_args(split_options(line))

    # -- %%storch -------------------------------------------------------------

    @magic_arguments("%storch")
    @argument_group("What to estimate")
    @argument(
        "-n",
        "--samples",
        type=_samples_type,
        default=None,
        metavar="N",
        help="Monte Carlo samples per estimate (default: StorchMagics.samples, 1000).",
    )
    @argument(
        "-e",
        "--estimator",
        type=_estimator_type,
        default=None,
        metavar="EST",
        help="Estimator for the sites without `using`: text as after `using` "
        "(e.g. score, rloo, \"score(baseline='rloo')\") or a mapping "
        "\"{'site': 'EST', ...}\" (default: StorchMagics.estimator, auto).",
    )
    @argument(
        "-r",
        "--runs",
        type=_runs_type,
        default=None,
        metavar="R",
        help="Independent repetitions of the estimate; with R > 1 the table shows the "
        "mean over runs and the std across runs (default: StorchMagics.runs, 1).",
    )
    @argument(
        "--seed",
        type=_seed_type,
        default=None,
        metavar="S",
        help="Seed for a reproducible cell, or none for torch's global generator (default: StorchMagics.seed, none).",
    )
    @argument(
        "--device",
        type=_device_type,
        default=None,
        metavar="D",
        help="cpu, cuda or auto (default: StorchMagics.device, cpu).",
    )
    @argument(
        "--dtype",
        type=_dtype_type,
        default=None,
        metavar="T",
        help="float32 or float64 (default: StorchMagics.dtype, float32).",
    )
    @argument_group("What to show and keep")
    @argument(
        "--grad",
        type=_names_type,
        default=None,
        metavar="NAMES",
        help="Show only these parameters (comma-separated, e.g. --grad b,c).",
    )
    @argument(
        "--out",
        type=_out_type,
        default=None,
        metavar="NAME",
        help="Store the Result (with --compare: the comparison) in the notebook namespace as NAME.",
    )
    @argument(
        "--exact",
        action="store_true",
        help="Also show the exact cost and gradients, by enumerating the story (when every site has a finite support).",
    )
    @argument(
        "--compare",
        type=_compare_type,
        default=None,
        metavar="EST,EST,...",
        help="Compare these estimators: run each --runs times (100 when neither --runs "
        "nor a configured default above 1 is given) and show mean, std, variance and "
        "bias per parameter instead of a single estimate.",
    )
    @argument_group("Pictures")
    @argument(
        "--plot",
        action="store_true",
        help="Histograms of the gradient estimates over the runs (100 if --runs is not given) with the exact "
        "gradient (or a high-sample reference) as a line, the variance against the number of samples "
        "(log-log, 1/S slope), and a table of mean, std, variance, bias and time; with --compare, overlaid.",
    )
    @argument("--graph", action="store_true", help="Draw the story's graph above the cell's other output.")
    @argument(
        "--widget",
        action="store_true",
        help="The interactive estimator lab (ipywidgets); --samples, --runs, --estimator and --compare "
        f"set its starting values (default {WIDGET_SAMPLES} samples, {WIDGET_RUNS} runs).",
    )
    @argument(
        "--train",
        type=_steps_type,
        default=None,
        metavar="STEPS",
        help="Optimise the story's parameters for STEPS steps and plot the learning curve "
        "(with --compare: one curve per estimator, each from the same start).",
    )
    @argument("--lr", type=_lr_type, default=None, metavar="LR", help=f"Learning rate for --train ({TRAIN_LR}).")
    @argument(
        "--optimizer",
        type=_optimizer_type,
        default=None,
        metavar="NAME",
        help=f"Optimizer for --train: {', '.join(_OPTIMIZERS)} (adam).",
    )
    @cell_magic("storch")
    def storch_cell(self, line: str, cell: str) -> None:
        """Estimate the gradient of the expected cost of the story in this cell.

        The cell body is a story (see storch_nb's documentation). The cell shows
        the cost estimate and, per parameter, its value and gradient estimate with
        its standard error. Defaults come from `%config StorchMagics.NAME = ...`
        or `%storch --NAME VALUE`. Lines in error messages count the %%storch
        line as line 1.
        """
        import torch

        # a cell that fails (or is interrupted) leaves torch's generator as it found it
        rng = torch.get_rng_state()
        try:
            return self._cell(line, cell)
        except KeyboardInterrupt:
            torch.set_rng_state(rng)
            # one line, not a traceback through the engine and torch (which IPython can take
            # seconds to format): the interrupted run changed nothing
            raise Interrupted() from None
        except BaseException:
            torch.set_rng_state(rng)
            raise

    def _cell(self, line: str, cell: str) -> None:
        args = self._parse(self.storch_cell, line)
        samples = args.samples if args.samples is not None else self.samples
        estimator = args.estimator if args.estimator is not None else self.estimator
        runs = args.runs if args.runs is not None else self.runs
        if args.seed is None:
            seed = self.seed
        elif args.seed is _UNSEEDED:
            seed = None
        else:
            seed = args.seed
        device = args.device if args.device is not None else self.device
        dtype = args.dtype if args.dtype is not None else self.dtype
        _check_device(device)
        if not cell or not cell.strip():
            raise UsageError("%%storch: the cell is empty; write a story below the %%storch line")

        if args.widget and args.train is not None:
            raise UsageError("%%storch: --widget and --train do not go together; use one of them")
        if args.train is None and (args.lr is not None or args.optimizer is not None):
            raise UsageError("%%storch: --lr and --optimizer are options of --train STEPS")

        ns = self.shell.user_ns
        if args.widget:
            self._widget(args, cell, ns, estimator, seed, device, dtype)
            return
        if args.train is not None:
            self._train(args, cell, ns, estimator, samples, seed, device, dtype)
            return
        if args.plot:
            self._plot(args, cell, ns, estimator, samples, seed, device, dtype)
            return

        notes: list[str] = []
        try:
            story = self._story(cell)
            story.reset()
            if args.compare is not None:
                if args.runs is None:
                    runs = self.runs if self.runs > 1 else COMPARE_RUNS
                outcome: Any = story.compare(
                    args.compare,
                    samples=samples,
                    runs=runs,
                    seed=seed,
                    namespace=ns,
                    device=device,
                    dtype=dtype,
                )
                params = [r.get("param") for r in outcome.table]
            else:
                outcome = story.run(
                    samples=samples,
                    estimator=estimator,
                    seed=seed,
                    device=device,
                    runs=runs,
                    namespace=ns,
                    dtype=dtype,
                    stderr=True,
                )
                params = list(outcome.grads)
            exact = None
            if args.exact and not (args.compare is not None and outcome.reference is not None):
                try:
                    exact = story.exact(namespace=ns)
                except StoryError as err:
                    notes.append(f"exact: not available ({err.message})")
        except StoryError as err:
            err.line_offset = 1  # the %%storch line is line 1 of the cell
            raise

        if args.grad is not None:
            unknown = [g for g in args.grad if not any(p == g or p.startswith(g + "[") for p in params)]
            if unknown:
                known = ", ".join(dict.fromkeys(params)) or "(none)"
                raise UsageError(f"--grad: no parameter named {', '.join(unknown)}; the parameters are {known}")

        # only now, after everything worked, touch the namespace
        if args.out is not None:
            self.shell.push({args.out: outcome})

        from IPython.display import display

        if args.graph:
            display(story.draw())
        if args.compare is not None:
            display(ComparisonView(outcome, grads=args.grad, reference=exact, notes=notes))
        else:
            display(ResultView(outcome, exact=exact, grads=args.grad, notes=notes))

    # -- the picture modes ------------------------------------------------------

    def _located(self, fn: Any, *a: Any, **kw: Any) -> Any:
        """Call ``fn``; a StoryError counts the %%storch line as line 1."""
        try:
            return fn(*a, **kw)
        except StoryError as err:
            err.line_offset = 1
            raise

    def _check_grad(self, args: argparse.Namespace, params: list[str]) -> None:
        if args.grad is not None:
            unknown = [g for g in args.grad if not any(p == g or p.startswith(g + "[") for p in params)]
            if unknown:
                known = ", ".join(dict.fromkeys(params)) or "(none)"
                raise UsageError(f"--grad: no parameter named {', '.join(unknown)}; the parameters are {known}")

    def _widget(self, args: argparse.Namespace, cell: str, ns: Any, estimator: Any, seed: Any, device: str,
                dtype: str) -> None:
        """``--widget``: the estimator lab, displayed as its ipywidgets VBox."""
        from IPython.display import display

        from .lab import Lab

        story = self._located(self._story, cell)
        story.reset()
        # the lab is reproducible unless asked otherwise (--seed none): the same settings show the same plot
        lab_seed = None if args.seed is _UNSEEDED else (0 if seed is None else seed)
        options: dict[str, Any] = {"device": device, "dtype": dtype, "seed": lab_seed, "estimator": estimator}
        if args.compare is not None:
            options["compare"] = args.compare
        if args.grad is not None:
            options["param"] = args.grad[0]
        lab = self._located(
            Lab,
            story,
            namespace=ns,
            samples=args.samples if args.samples is not None else WIDGET_SAMPLES,
            runs=args.runs if args.runs is not None else WIDGET_RUNS,
            **options,
        )
        if args.out is not None:
            self.shell.push({args.out: lab})
        if args.graph:
            display(story.draw())
        display(lab.widget)

    def _plot(self, args: argparse.Namespace, cell: str, ns: Any, estimator: Any, samples: int, seed: Any,
              device: str, dtype: str) -> None:
        """``--plot`` (with or without ``--compare``): histograms, variance plot, table."""
        from IPython.display import display

        from . import plots

        runs = args.runs if args.runs is not None else (self.runs if self.runs > 1 else COMPARE_RUNS)
        runs = max(runs, 2)
        story = self._located(self._story, cell)
        story.reset()
        specs = args.compare if args.compare is not None else [estimator]
        run_seed = 0 if seed is None else seed

        def work() -> tuple[dict, dict, Any]:
            results, curves = {}, {}
            for sp in specs:
                res = plots.run_chunked(story, sp, samples, runs, run_seed if seed is not None else None, ns,
                                        device, dtype)
                label = plots.estimator_label(sp, res)
                results[label] = res
                curves[label] = plots.variance_curve(story, sp, samples, runs, seed, ns, device, dtype, known=res)
            return results, curves, plots.reference(story, ns, seed=run_seed, device=device, dtype=dtype)

        results, curves, ref = self._located(work)
        first = next(iter(results.values()))
        labels = list(plots.entries(first))
        self._check_grad(args, labels)
        wanted = labels
        if args.grad is not None:
            wanted = [lab for lab in labels if any(lab == g or lab.startswith(g + "[") for g in args.grad)]
        fig = plots.gradient_figure(results, wanted, ref, curves)
        table = plots.summary(results, ref)
        if args.out is not None:
            self.shell.push({args.out: table})
        notes = [ref.label] if ref is not None and not ref.exact else []
        if args.graph:
            display(story.draw())
        display(fig)
        display(
            ComparisonView(
                table,
                grads=args.grad,
                reference=ref.result if ref is not None else None,
                notes=notes,
                reference_label="exact" if ref is None or ref.exact else "reference",
            )
        )

    def _train(self, args: argparse.Namespace, cell: str, ns: Any, estimator: Any, samples: int, seed: Any,
               device: str, dtype: str) -> None:
        """``--train STEPS``: the learning curve (per estimator with ``--compare``) and a table."""
        from IPython.display import display

        from ..engine.train import train, train_compare
        from . import plots
        from .display import TrainingView

        story = self._located(self._story, cell)
        story.reset()
        lr = args.lr if args.lr is not None else TRAIN_LR
        optimizer = args.optimizer or "adam"
        common = {"steps": args.train, "lr": lr, "optimizer": optimizer, "samples": samples, "seed": seed,
                  "namespace": ns, "device": device, "dtype": dtype}
        if args.compare is not None:
            outcome: Any = self._located(train_compare, story, args.compare, **common)
            histories = outcome
        else:
            outcome = self._located(train, story, estimator=estimator, **common)
            histories = {plots.estimator_label(estimator): outcome}
        if args.out is not None:
            self.shell.push({args.out: outcome})
        if args.graph:
            display(story.draw())
        display(plots.learning_curve_figure(histories))
        display(TrainingView(histories))

    # -- %storch --------------------------------------------------------------

    @magic_arguments("storch")
    @argument(
        "-n",
        "--samples",
        type=_samples_type,
        default=None,
        metavar="N",
        help="Default Monte Carlo samples per estimate.",
    )
    @argument(
        "-e",
        "--estimator",
        type=_estimator_type,
        default=None,
        metavar="EST",
        help="Default estimator for the sites without `using`.",
    )
    @argument("-r", "--runs", type=_runs_type, default=None, metavar="R", help="Default number of independent runs.")
    @argument(
        "--seed", type=_seed_type, default=None, metavar="S", help="Default seed (none: torch's global generator)."
    )
    @argument("--device", type=_device_type, default=None, metavar="D", help="Default device: cpu, cuda or auto.")
    @argument("--dtype", type=_dtype_type, default=None, metavar="T", help="Default dtype: float32 or float64.")
    @argument("--reset", action="store_true", help="Restore the built-in defaults (before applying the other options).")
    @line_magic("storch")
    def storch_line(self, line: str) -> None:
        """Show or set the defaults of %%storch.

        `%storch` alone prints the current defaults; `%storch --samples 500 --seed 0`
        sets them (the same as `%config StorchMagics.samples = 500`); `%storch --reset`
        restores the built-in defaults.
        """
        args = self._parse(self.storch_line, line)
        if args.device is not None:
            _check_device(args.device)
        new: dict[str, Any] = {}
        if args.reset:
            for name in _DEFAULT_NAMES:
                new[name] = self.trait_defaults(name)
        for name in _DEFAULT_NAMES:
            value = getattr(args, name)
            if value is None:
                continue
            new[name] = None if value is _UNSEEDED else value
        old = self.defaults()
        try:
            for name, value in new.items():
                setattr(self, name, value)
        except TraitError as err:  # pragma: no cover - the option types check first
            for name, value in old.items():
                setattr(self, name, value)
            raise UsageError(str(err)) from None
        print(self._defaults_text())


# ---------------------------------------------------------------------------
# extension entry points
# ---------------------------------------------------------------------------


def load_ipython_extension(ip: Any) -> None:
    """Register ``%%storch`` and ``%storch`` (``%load_ext storch_nb``)."""
    if "StorchMagics" in ip.magics_manager.registry:
        return
    ip.register_magics(StorchMagics(shell=ip))


def unload_ipython_extension(ip: Any) -> None:
    """Remove ``%%storch`` and ``%storch`` again (``%unload_ext storch_nb``)."""
    mm = ip.magics_manager
    instance = mm.registry.pop("StorchMagics", None)
    for kind in ("cell", "line"):
        func = mm.magics[kind].get("storch")
        if func is not None and (instance is None or getattr(func, "__self__", None) is instance):
            mm.magics[kind].pop("storch")
    if instance is not None:
        while instance in ip.configurables:
            ip.configurables.remove(instance)
