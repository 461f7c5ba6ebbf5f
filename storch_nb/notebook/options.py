"""The options of ``%%storch`` and ``%storch``, each declared once.

:data:`OPTIONS` holds every option of the cell magic: its flags, metavar,
converter (text -> value, checked with :mod:`storch_nb.settings` where the
API checks the same value), group, help text and, for the options whose
default is configurable (a traitlet of ``StorchMagics``, marked *), that
default. From this table come

- the argparse parsers of ``%%storch`` and of ``%storch`` (the configurable
  options and ``--reset``): :func:`cell_parser`, :func:`line_parser`;
- the help ``%%storch?`` shows (argparse's help of those parsers);
- the option reference in the magic module's docstring: :func:`reference_text`;
- the README's option table (``python docs/readme_options.py``).

Help texts are reStructuredText (````literal````); ``{default}`` marks where a
configurable option says its default.
"""

from __future__ import annotations

import argparse
import ast
import keyword
import re
import textwrap
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from IPython.core.magic_arguments import argument, argument_group, magic_arguments

from .. import settings
from ..errors import StoryError
from .words import split_options, split_top_level

__all__ = [
    "COMPARE_RUNS",
    "GROUPS",
    "LINE_FORMS",
    "OPTIMIZERS",
    "OPTIONS",
    "TRAIN_LR",
    "UNSEEDED",
    "WIDGET_RUNS",
    "WIDGET_SAMPLES",
    "Group",
    "Option",
    "cell_parser",
    "configurable",
    "line_parser",
    "option",
    "reference_text",
    "split_options",
]

#: runs per estimator for --compare and --plot when neither --runs nor a default above 1 is given
COMPARE_RUNS = 100
#: samples and runs of --widget when not given
WIDGET_SAMPLES = 100
WIDGET_RUNS = 200
#: learning rate of --train when not given
TRAIN_LR = 0.05
#: the optimizers --train offers (the first is the default)
OPTIMIZERS = ("adam", "sgd", "adamw", "rmsprop", "adagrad")
#: the dtypes the magic offers (settings.DTYPES names more, for the API)
DTYPES = ("float32", "float64")


class _Unseeded:
    """``--seed none``: use torch's global generator."""

    def __repr__(self) -> str:
        return "none"


#: the value of ``--seed none`` (None means: not given)
UNSEEDED = _Unseeded()


# ---------------------------------------------------------------------------
# converters: text -> value, or an argparse error
# ---------------------------------------------------------------------------


def _fail(text: str) -> argparse.ArgumentTypeError:
    return argparse.ArgumentTypeError(text)


def _count(name: str) -> Callable[[str], int]:
    """A positive integer (``settings.positive_int``)."""

    def convert(text: str) -> int:
        try:
            return settings.positive_int(name, int(text))
        except ValueError:
            raise _fail(f"{name} must be a positive integer, got {text!r}") from None
        except StoryError as err:
            raise _fail(err.message) from None

    convert.__name__ = name
    return convert


def _seed(text: str) -> Any:
    if text.strip().lower() == "none":
        return UNSEEDED
    try:
        value = settings.seed(int(text))
    except (ValueError, StoryError):
        value = None
    if value is None or value < 0:
        raise _fail(f"seed must be an integer from 0 to 2**64 - 1 or none, got {text!r}")
    return value


def _choice(what: str, choices: tuple[str, ...]) -> Callable[[str], str]:
    """One of ``choices`` (case-insensitive)."""

    def convert(text: str) -> str:
        value = text.strip().lower()
        if value not in choices:
            raise _fail(f"{what} must be one of {', '.join(choices)}, got {text!r}")
        return value

    convert.__name__ = what
    return convert


def _dtype(text: str) -> str:
    """``float32`` or ``float64`` under any name ``settings.dtype_name`` reads (``double``, ``torch.float64``)."""
    try:
        value = settings.dtype_name(text)
    except StoryError:
        value = None
    if value not in DTYPES:
        raise _fail(f"dtype must be float32 or float64, got {text!r}")
    return value


def _estimator(text: str) -> Any:
    """Estimator text, or a mapping ``{'site': 'text', ...}`` (the engine reads the texts)."""
    value = text.strip()
    if not value:
        raise _fail("estimator must not be empty")
    if not value.startswith("{"):
        return value
    try:
        mapping = ast.literal_eval(value)
    except (ValueError, SyntaxError):
        mapping = None
    if not isinstance(mapping, dict) or not all(
        isinstance(k, str) and isinstance(v, str) and v.strip() for k, v in mapping.items()
    ):
        raise _fail(f"an estimator mapping must look like {{'site': 'estimator', ...}}, got {text!r}")
    return {k: v.strip() for k, v in mapping.items()}


def _names(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise _fail("give one or more parameter names, e.g. --grad b,c")
    return names


def _out(text: str) -> str:
    name = text.strip()
    if not name.isidentifier() or keyword.iskeyword(name):
        raise _fail(f"--out needs a Python variable name, got {text!r}")
    return name


def _compare(text: str) -> list[str]:
    ests = split_top_level(text)
    if not ests:
        raise _fail("give the estimators to compare, e.g. --compare pathwise,score")
    return ests


def _lr(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0 < value < float("inf"):
        raise _fail(f"lr must be a positive number, got {text!r}")
    return value


# ---------------------------------------------------------------------------
# the table
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Group:
    """A group of options: its title, and what the docs add to it."""

    title: str
    note: str = ""

    @property
    def doc_title(self) -> str:
        return f"{self.title} ({self.note})" if self.note else self.title


@dataclass(frozen=True)
class Option:
    """One option of ``%%storch`` (see the module docstring)."""

    flags: tuple[str, ...]  # ("-n", "--samples")
    group: Group
    help: str  # reStructuredText; "{default}" where a configurable option says its default
    metavar: str | None = None  # None: a flag without a value
    convert: Callable[[str], Any] | None = None
    #: configurable options: the built-in default (the traitlet's), how the docs say it,
    #: and a one-line summary (the traitlet's help, %storch's help)
    default: Any = None
    default_text: str = ""
    summary: str = ""

    @property
    def dest(self) -> str:
        """The name of the value: ``samples`` for ``-n/--samples``."""
        return self.flags[-1].lstrip("-")

    @property
    def configurable(self) -> bool:
        return bool(self.summary)

    def usage(self) -> list[str]:
        """``["-n N", "--samples N"]``."""
        return [f"{f} {self.metavar}" if self.metavar else f for f in self.flags]

    def doc(self) -> str:
        """The help as the docs show it (reST), the default marked ``(*, ...)``."""
        return self.help.replace("{default}", f"(*, {self.default_text})")

    def argparse_help(self) -> str:
        """The help as ``%%storch?`` shows it."""
        default = f"(default: StorchMagics.{self.dest}, {self.default_text.replace('``', '')})"
        return _plain(self.help.replace("{default}", default))

    def decorator(self, help_text: str) -> argument:
        """IPython's ``@argument(...)`` for this option, with ``help_text``."""
        if self.metavar is None:
            return argument(*self.flags, action="store_true", help=help_text)
        return argument(*self.flags, type=self.convert, default=None, metavar=self.metavar, help=help_text)

    def trait_help(self) -> str:
        """The help of the traitlet (``%config StorchMagics``)."""
        return f"{self.summary[:1].upper()}{self.summary[1:]} ({'/'.join(reversed(self.flags))})."

    def line_help(self) -> str:
        """The help of the option in ``%storch``."""
        return _plain(f"Default {self.summary}.")


def _plain(text: str) -> str:
    """reST literals as single backquotes; ``%`` escaped for argparse."""
    return re.sub(r"``(.+?)``", r"`\1`", text).replace("%", "%%")


ESTIMATE = Group("What to estimate")
SHOW = Group("What to show and keep")
PICTURES = Group("Pictures", "matplotlib PNGs; matplotlib is imported only when one is asked for")
GROUPS = (ESTIMATE, SHOW, PICTURES)


def _or(words: tuple[str, ...]) -> str:
    return ", ".join(words[:-1]) + " or " + words[-1]


OPTIONS: tuple[Option, ...] = (
    Option(("-n", "--samples"), ESTIMATE, "Monte Carlo samples per estimate {default}.", "N", _count("samples"),
           1000, "1000", "Monte Carlo samples per estimate"),
    Option(("-e", "--estimator"), ESTIMATE,
           "Estimator for the sites without ``using`` {default}: the text ``using`` takes, e.g. ``score``, "
           "``rloo``, ``-e \"score(baseline='rloo')\"`` (quotes and brackets are kept together), or a mapping "
           "from site name to such text: ``-e \"{'e': 'score', 'x': 'pathwise'}\"``.",
           "EST", _estimator, "auto", "``auto``", "estimator for the sites without `using` (text or {site: text})"),
    Option(("-r", "--runs"), ESTIMATE,
           "Independent repetitions of the whole estimate {default}; with R > 1 the table shows the mean over "
           "runs, its standard error and the standard deviation across runs.",
           "R", _count("runs"), 1, "1", "number of independent runs"),
    Option(("--seed",), ESTIMATE,
           "Seed making the cell reproducible {default}; ``--seed none`` overrides a configured seed.",
           "S", _seed, None, "none: torch's global generator", "seed (none: torch's global generator)"),
    Option(("--device",), ESTIMATE, f"{_or(tuple(f'``{d}``' for d in settings.DEVICES))} {{default}}.",
           "D", _choice("device", settings.DEVICES), "cpu", "``cpu``", "device: cpu, cuda or auto"),
    Option(("--dtype",), ESTIMATE, f"{_or(tuple(f'``{d}``' for d in DTYPES))} {{default}}.",
           "T", _dtype, "float32", "``float32``", "dtype: float32 or float64"),
    Option(("--compile",), ESTIMATE,
           "Compile the planned story (sampling, costs, surrogate and gradient) with torch's Inductor, once per "
           "setting, and reuse it: the same numbers as without for the same seed; the table notes the seconds "
           "spent compiling (``compile_seconds`` of the result or history). Works for a single estimate and ``--train``; where no compiler is available it "
           "warns once and runs eagerly."),
    Option(("--grad",), SHOW, "Show only these parameters (comma-separated: ``--grad b,c``).", "NAMES", _names),
    Option(("--out",), SHOW,
           "Store the ``Result`` (with ``--compare``: the comparison; ``--widget``: the ``Lab``; ``--train``: "
           "the ``History``, or a dict of them with ``--compare``) in the notebook namespace as ``NAME``.",
           "NAME", _out),
    Option(("--exact",), SHOW,
           "Also show the exact cost and gradients, by enumerating the story (when every site has a finite "
           "support)."),
    Option(("--compare",), SHOW,
           f"Run each estimator (``--runs`` times, {COMPARE_RUNS} if neither ``--runs`` nor a configured default "
           "above 1 is given) and show their mean, std, variance and bias per parameter instead of a single "
           "estimate.", "EST,EST,...", _compare),
    Option(("--plot",), PICTURES,
           f"Histograms of the gradient estimates over the runs (``--runs``, {COMPARE_RUNS} if not given), one per "
           "parameter, with the exact gradient (or a high-sample reference, labelled so) as a line, and the "
           "variance against the number of samples on log-log axes with a 1/S slope; then a table of mean, std, "
           "variance, bias and time. With ``--compare``: the estimators overlaid."),
    Option(("--graph",), PICTURES,
           "Draw the story's graph (rectangles: deterministic, ellipses: stochastic; parameters, inputs and "
           "costs marked) above the cell's other output."),
    Option(("--widget",), PICTURES,
           "The interactive lab (ipywidgets): estimator dropdown, samples (log scale), runs, parameter, "
           "comparison. ``--samples``/``--runs``/``--estimator``/``--compare`` set its starting values "
           f"(default {WIDGET_SAMPLES} samples, {WIDGET_RUNS} runs)."),
    Option(("--train",), PICTURES,
           "Optimise the story's parameters (and namespace tensors with requires_grad and modules it uses) for "
           "STEPS steps and plot the learning curve; with ``--compare``, one curve per estimator, each from the "
           "same start (the namespace is put back afterwards).", "STEPS", _count("steps")),
    Option(("--lr",), PICTURES, f"Learning rate for ``--train`` ({TRAIN_LR}).", "LR", _lr),
    Option(("--optimizer",), PICTURES,
           f"``{OPTIMIZERS[0]}`` (default), {_or(tuple(f'``{o}``' for o in OPTIMIZERS[1:]))}, for ``--train``.",
           "NAME", _choice("optimizer", OPTIMIZERS)),
)

_BY_NAME = {o.dest: o for o in OPTIONS}


def option(name: str) -> Option:
    """The option whose value is called ``name`` (``"samples"``)."""
    return _BY_NAME[name]


def configurable() -> list[Option]:
    """The options whose defaults ``%storch`` and ``%config StorchMagics`` set."""
    return [o for o in OPTIONS if o.configurable]


_RESET_HELP = "Restore the built-in defaults (before applying the other options)."

#: the forms of the line magic, as the docs show them
LINE_FORMS: tuple[tuple[str, str], ...] = (
    ("%storch", "show the current defaults"),
    ("%storch --samples 500 --seed 0",
     f"set defaults (same options as above: {' '.join(o.flags[0] for o in OPTIONS if o.configurable)})"),
    ("%storch --reset", "back to the built-in defaults"),
)


# ---------------------------------------------------------------------------
# the parsers
# ---------------------------------------------------------------------------


def _with_parser(name: str, decorators: list[Any]) -> Callable[[Any], Any]:
    """A decorator making IPython's argparse parser of a magic (``func.parser``,
    help as ``func.__doc__``) from ``decorators`` in source order."""

    def deco(func: Any) -> Any:
        for d in reversed(decorators):
            func = d(func)
        return magic_arguments(name)(func)

    return deco


def cell_parser() -> Callable[[Any], Any]:
    """The parser of ``%%storch``: every option, by group."""
    decorators: list[Any] = []
    for group in GROUPS:
        decorators.append(argument_group(group.title))
        decorators += [o.decorator(o.argparse_help()) for o in OPTIONS if o.group is group]
    return _with_parser("%storch", decorators)


def line_parser() -> Callable[[Any], Any]:
    """The parser of ``%storch``: the configurable options and ``--reset``."""
    decorators = [o.decorator(o.line_help()) for o in configurable()]
    decorators.append(argument("--reset", action="store_true", help=_RESET_HELP))
    return _with_parser("storch", decorators)


# ---------------------------------------------------------------------------
# the reference text (the magic module's docstring)
# ---------------------------------------------------------------------------


def _entry(usage: str, text: str, column: int) -> list[str]:
    head = f"  {usage}".ljust(column)
    if len(head) > column:
        head += " "
    return textwrap.wrap(text, 84, initial_indent=head, subsequent_indent=" " * column, break_on_hyphens=False,
                         break_long_words=False)


def reference_text() -> str:
    """Every option of ``%%storch`` and the forms of ``%storch``, as plain text (reST)."""
    lines = ["Options of ``%%storch`` (those marked * default to the configured value, see", "below):", ""]
    for group in GROUPS:
        lines.append(group.doc_title)
        for o in OPTIONS:
            if o.group is group:
                lines += _entry(", ".join(o.usage()), o.doc(), 27)
        lines.append("")
    lines += ["Defaults: the options marked * are traitlets of ``StorchMagics``, so",
              "``%config StorchMagics.samples = 500`` (or ``c.StorchMagics.samples = 500`` in",
              "a config file) changes them. The line magic does the same:", ""]
    for usage, text in LINE_FORMS:
        lines += _entry(usage, text, 34)
    lines += ["", "A bad option value is a short ``UsageError``; an error in the story is a",
              "``StoryError`` naming the line, with a caret under it.", ""]
    return "\n".join(lines)
