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

The options are declared once, in :mod:`storch_nb.notebook.options`; this
docstring lists them from there.

"""

from __future__ import annotations

import argparse
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from IPython.core.error import UsageError
from IPython.core.magic import Magics, cell_magic, line_magic, magics_class
from traitlets import CaselessStrEnum, Dict, Int, TraitError, Unicode, Union, validate

from .. import settings
from ..errors import StoryError
from . import options
from .display import ComparisonView, ResultView
from .options import COMPARE_RUNS, TRAIN_LR, UNSEEDED, WIDGET_RUNS, WIDGET_SAMPLES, option, split_options

__doc__ = (__doc__ or "") + options.reference_text()

__all__ = ["StorchMagics", "load_ipython_extension", "split_options", "unload_ipython_extension"]

#: how many parsed stories the magic keeps (by cell text)
STORY_CACHE_SIZE = 32
#: the options whose defaults %storch and %config set
_DEFAULT_NAMES = tuple(o.dest for o in options.configurable())


def _check_device(device: str) -> None:
    """A UsageError now for a device this machine does not have (``cuda`` without CUDA)."""
    try:
        settings.as_device(device)
    except StoryError as err:
        raise UsageError(f"--device {device}: {err.message}; use --device cpu or auto") from None


def _check_cell(args: argparse.Namespace, cell: str) -> None:
    """Options that do not go together, and an empty cell."""
    if not cell or not cell.strip():
        raise UsageError("%%storch: the cell is empty; write a story below the %%storch line")
    if args.widget and args.train is not None:
        raise UsageError("%%storch: --widget and --train do not go together; use one of them")
    if args.train is None and (args.lr is not None or args.optimizer is not None):
        raise UsageError("%%storch: --lr and --optimizer are options of --train STEPS")
    if args.compile and (args.widget or args.plot or args.compare is not None):
        raise UsageError("%%storch: --compile works for a single estimate and --train (without --compare)")


def _matches(label: str, name: str) -> bool:
    """Whether ``--grad name`` picks the parameter entry ``label`` (``w`` picks ``w[0]``)."""
    return label == name or label.startswith(name + "[")


def _check_grad(args: argparse.Namespace, params: list[str]) -> None:
    if args.grad is not None:
        unknown = [g for g in args.grad if not any(_matches(p, g) for p in params)]
        if unknown:
            known = ", ".join(dict.fromkeys(params)) or "(none)"
            raise UsageError(f"--grad: no parameter named {', '.join(unknown)}; the parameters are {known}")


def _located(fn: Any, *a: Any, **kw: Any) -> Any:
    """Call ``fn``; a StoryError counts the %%storch line as line 1."""
    try:
        return fn(*a, **kw)
    except StoryError as err:
        err.line_offset = 1
        raise


@dataclass(frozen=True)
class _Settings:
    """What one cell runs with: the options given, else the configured defaults."""

    samples: int
    estimator: Any
    runs: int
    seed: int | None
    device: str
    dtype: str
    namespace: Any

    def common(self) -> dict[str, Any]:
        """The keywords every Story method of the cell takes."""
        return {"seed": self.seed, "namespace": self.namespace, "device": self.device, "dtype": self.dtype}


class Interrupted(KeyboardInterrupt):
    """A ``%%storch`` cell interrupted (Ctrl-C, "interrupt kernel"): shown as one line."""

    def __init__(self) -> None:
        super().__init__("the %%storch cell was interrupted; nothing was changed")

    def _render_traceback_(self) -> list[str]:
        return [f"KeyboardInterrupt: {self.args[0]}"]


@magics_class
class StorchMagics(Magics):
    """The ``%%storch`` cell magic and the ``%storch`` line magic (settings)."""

    samples = Int(option("samples").default, min=1, help=option("samples").trait_help()).tag(config=True)
    estimator = Union(
        [Unicode(), Dict(key_trait=Unicode(), value_trait=Unicode())],
        default_value=option("estimator").default,
        help=option("estimator").trait_help(),
    ).tag(config=True)
    runs = Int(option("runs").default, min=1, help=option("runs").trait_help()).tag(config=True)
    seed = Int(option("seed").default, allow_none=True, min=0, help=option("seed").trait_help()).tag(config=True)
    device = CaselessStrEnum(list(settings.DEVICES), default_value=option("device").default,
                             help=option("device").trait_help()).tag(config=True)
    dtype = Unicode(option("dtype").default, help=option("dtype").trait_help()).tag(config=True)

    @validate("dtype")
    def _valid_dtype(self, proposal: Any) -> str:
        try:
            return option("dtype").convert(str(proposal["value"]))
        except argparse.ArgumentTypeError as err:
            raise TraitError(str(err)) from None

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
        """The parsed ``Story`` for this cell text (a small LRU cache), reset."""
        story = self._stories.get(text)
        if story is None:
            from ..api import Story

            story = Story(text)
            self._stories[text] = story
            while len(self._stories) > STORY_CACHE_SIZE:
                self._stories.popitem(last=False)
        else:
            self._stories.move_to_end(text)
        story.reset()
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

    def _settings(self, args: argparse.Namespace) -> _Settings:
        given = {name: getattr(args, name) for name in _DEFAULT_NAMES}
        values = {name: getattr(self, name) if value is None else value for name, value in given.items()}
        if args.seed is UNSEEDED:
            values["seed"] = None
        return _Settings(namespace=self.shell.user_ns, **values)

    def _many_runs(self, args: argparse.Namespace) -> int:
        """Runs for --compare and --plot: --runs, else a configured default above 1, else COMPARE_RUNS."""
        if args.runs is not None:
            return args.runs
        return self.runs if self.runs > 1 else COMPARE_RUNS

    def _show(self, args: argparse.Namespace, story: Any, *shown: Any) -> None:
        """Display the graph (with --graph), then ``shown``."""
        from IPython.display import display

        if args.graph:
            display(story.draw())
        for obj in shown:
            display(obj)

    def _keep(self, args: argparse.Namespace, value: Any) -> None:
        """--out NAME: only now, after everything worked, touch the namespace."""
        if args.out is not None:
            self.shell.push({args.out: value})

    # -- %%storch -------------------------------------------------------------

    @cell_magic("storch")
    @options.cell_parser()
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
        run = self._settings(args)
        _check_device(run.device)
        _check_cell(args, cell)
        if args.widget:
            self._widget(args, cell, run)
        elif args.train is not None:
            self._train(args, cell, run)
        elif args.plot:
            self._plot(args, cell, run)
        else:
            self._estimate(args, cell, run)

    # -- the table modes --------------------------------------------------------

    def _estimate(self, args: argparse.Namespace, cell: str, run: _Settings) -> None:
        """One estimate (or, with ``--compare``, a comparison) and its table."""
        story = _located(self._story, cell)
        outcome, params = _located(self._outcome, story, args, run)
        exact, notes = None, []
        if args.exact and not (args.compare is not None and outcome.reference is not None):
            try:
                exact = story.exact(namespace=run.namespace)
            except StoryError as err:
                notes.append(f"exact: not available ({err.message})")
        _check_grad(args, params)
        if args.compile and outcome.compile_seconds is not None:
            notes.append(f"compiled: {outcome.compile_seconds:.2f} s spent compiling" if outcome.compile_seconds
                         else "compiled (reused)")
        self._keep(args, outcome)
        if args.compare is not None:
            self._show(args, story, ComparisonView(outcome, grads=args.grad, reference=exact, notes=notes))
        else:
            self._show(args, story, ResultView(outcome, exact=exact, grads=args.grad, notes=notes))

    def _outcome(self, story: Any, args: argparse.Namespace, run: _Settings) -> tuple[Any, list[str]]:
        """``story.compare`` (--compare) or ``story.run``, and the parameter labels it shows."""
        if args.compare is not None:
            outcome = story.compare(args.compare, samples=run.samples, runs=self._many_runs(args), **run.common())
            return outcome, [r.get("param") for r in outcome.table]
        outcome = story.run(samples=run.samples, estimator=run.estimator, runs=run.runs, stderr=True,
                            compile=args.compile, **run.common())
        return outcome, list(outcome.grads)

    # -- the picture modes ------------------------------------------------------

    def _widget(self, args: argparse.Namespace, cell: str, run: _Settings) -> None:
        """``--widget``: the estimator lab, displayed as its ipywidgets VBox."""
        from .lab import Lab

        story = _located(self._story, cell)
        # the lab is reproducible unless asked otherwise (--seed none): the same settings show the same plot
        lab_seed = None if args.seed is UNSEEDED else (0 if run.seed is None else run.seed)
        extra: dict[str, Any] = {}
        if args.compare is not None:
            extra["compare"] = args.compare
        if args.grad is not None:
            extra["param"] = args.grad[0]
        lab = _located(
            Lab, story, namespace=run.namespace, device=run.device, dtype=run.dtype, seed=lab_seed,
            estimator=run.estimator, samples=args.samples if args.samples is not None else WIDGET_SAMPLES,
            runs=args.runs if args.runs is not None else WIDGET_RUNS, **extra,
        )
        self._keep(args, lab)
        self._show(args, story, lab.widget)

    def _plot(self, args: argparse.Namespace, cell: str, run: _Settings) -> None:
        """``--plot`` (with or without ``--compare``): histograms, variance plot, table."""
        from .. import experiments
        from ..figures.plots import gradient_figure

        story = _located(self._story, cell)
        specs = args.compare if args.compare is not None else [run.estimator]
        results, curves, ref = _located(_plot_runs, story, specs, max(self._many_runs(args), 2), run)
        labels = list(experiments.entries(next(iter(results.values()))))
        _check_grad(args, labels)
        wanted = labels if args.grad is None else [lab for lab in labels if any(_matches(lab, g) for g in args.grad)]
        fig = gradient_figure(results, wanted, ref, curves)
        table = experiments.comparison(results, ref.result if ref is not None else None, max_entries=10)
        self._keep(args, table)
        view = ComparisonView(
            table,
            grads=args.grad,
            reference=ref.result if ref is not None else None,
            notes=[ref.label] if ref is not None and not ref.exact else [],
            reference_label="exact" if ref is None or ref.exact else "reference",
        )
        self._show(args, story, fig, view)

    def _train(self, args: argparse.Namespace, cell: str, run: _Settings) -> None:
        """``--train STEPS``: the learning curve (per estimator with ``--compare``) and a table."""
        from ..experiments import estimator_label
        from ..figures.plots import learning_curve_figure
        from .display import TrainingView

        story = _located(self._story, cell)
        common = {"steps": args.train, "lr": args.lr if args.lr is not None else TRAIN_LR,
                  "optimizer": args.optimizer or options.OPTIMIZERS[0], "samples": run.samples, **run.common()}
        if args.compare is not None:
            outcome: Any = _located(story.train_compare, args.compare, **common)
            histories = outcome
        else:
            outcome = _located(story.train, estimator=run.estimator, compile=args.compile, **common)
            histories = {estimator_label(run.estimator): outcome}
        self._keep(args, outcome)
        self._show(args, story, learning_curve_figure(histories), TrainingView(histories))

    # -- %storch --------------------------------------------------------------

    @line_magic("storch")
    @options.line_parser()
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
            if value is not None:
                new[name] = None if value is UNSEEDED else value
        old = self.defaults()
        try:
            for name, value in new.items():
                setattr(self, name, value)
        except TraitError as err:  # pragma: no cover - the option types check first
            for name, value in old.items():
                setattr(self, name, value)
            raise UsageError(str(err)) from None
        print(self._defaults_text())


def _plot_runs(story: Any, specs: list[Any], runs: int, run: _Settings) -> tuple[dict, dict, Any]:
    """The runs of ``--plot``: per estimator its chunked runs and variance curve, and the reference."""
    from .. import experiments

    run_seed = 0 if run.seed is None else run.seed
    ns, device, dtype = run.namespace, run.device, run.dtype
    results, curves = {}, {}
    for sp in specs:
        res = experiments.run_chunked(story, sp, run.samples, runs, run.seed, ns, device, dtype)
        label = experiments.estimator_label(sp, res)
        results[label] = res
        curves[label] = experiments.variance_curve(story, sp, run.samples, runs, run.seed, ns, device, dtype,
                                                   known=res)
    return results, curves, experiments.reference(story, ns, seed=run_seed, device=device, dtype=dtype)


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
