"""The estimator lab: an ipywidgets panel to see how gradient estimators behave.

::

    import storch_nb as sn
    lab = sn.lab(story, samples=100, runs=200)   # shows itself in a notebook
    lab.controls["estimator"].value = "score"    # re-runs and redraws now
    lab.result, lab.figure                       # the latest Result and Figure

(``%%storch --widget`` makes the same panel from a cell.)

The panel runs the story ``runs`` times with ``samples`` samples each and shows
the histogram of the ``runs`` gradient estimates of the selected parameter,
overlaid per estimator, with the exact gradient (``story.exact()``, where every
site has a finite support) or a high-sample reference as a vertical line; the
variance of the estimate against the number of samples (1, 3, 10, ... up to
the current count) on log-log axes with a 1/S slope; and a table of mean,
std, variance, bias and time per estimator and parameter.

Controls, by name in ``lab.controls``:

``"estimator"``
    Dropdown (description ``estimator``) of the estimators that fit every
    site of the story (``auto`` first), for the sites without ``using``.
``"estimator:SITE"``
    Only when the story has several sites (without ``using``): one dropdown
    per site (by the site's variable name; a loop's sites share one), listing
    the estimators that fit that site; ``default`` follows ``"estimator"``.
``"samples"``
    Samples per estimate, a log-scale slider from 1 to 100,000.
``"runs"``
    Independent repetitions (at least 2).
``"param"``
    Which parameter (entry) the plot shows; at first the first parameter
    upstream of a stochastic site.
``"compare"``
    Multi-select: more estimators to overlay and tabulate.

and the parts of the display: ``"progress"`` (a progress bar, shown while a
long update runs), ``"status"`` (what was run, or the error), ``"plot"`` (an
``Image`` with the PNG), ``"table"`` (HTML) and ``"output"`` (the box holding
plot and table). Any change of a control re-runs and redraws synchronously.
An error (an estimator that does not fit, ``rloo`` with one sample, ...) is
shown in the panel, ``lab.error`` holds its text, the plot is hidden, and the
panel stays usable: the next change runs again. ``lab.result`` and
``lab.figure`` keep the latest *successful* run. An error in the very first
run (a story that does not run at all) is raised instead, as by ``Story.run``.

Which estimators fit each site is decided from the site's distribution class
when the lab is made, without running the story (:mod:`.fitting`; every
registered estimator, aliases left out; ``estimators=[...]`` shows a given
list instead, unfiltered). Each run starts from fresh estimator state
(``story.reset_state()``); the story's parameters are left alone. ``seed``
(default 0) makes the panel deterministic: the same settings show the same
numbers. The runs come from :mod:`storch_nb.experiments`, the pictures from
:mod:`storch_nb.figures`.
"""

from __future__ import annotations

import html
import math
import time
from collections.abc import Mapping, Sequence
from typing import Any

import ipywidgets as widgets

from .. import experiments
from ..errors import StoryError
from ..estimators import estimators as registered_estimators
from ..figures.plots import gradient_figure
from ..figures.render import figure_png
from .display import comparison_html
from .fitting import PREFERRED, canonical, fitting_estimators, site_targets

__all__ = ["Lab", "LabPanel", "lab", "fitting_estimators", "FOLLOW", "PREFERRED"]

#: the per-site choice that follows the main ``estimator`` dropdown
FOLLOW = "default"
#: an update with more draws than this shows the progress bar
LONG_DRAWS = 500_000
#: the samples slider: 10**0 .. 10**5
SAMPLES_EXP = (0, 5)
#: entries per parameter in the lab's table
TABLE_ENTRIES = 10
_STYLE = {"description_width": "initial"}


def _initial_choice(estimator: str | Mapping[str, str] | None) -> tuple[str, dict[str, str]]:
    """The main dropdown's first value and the per-site ones, from ``estimator=``."""
    if isinstance(estimator, Mapping):
        return str(estimator.get("*", "auto")), {k: str(v) for k, v in estimator.items() if k != "*"}
    return ("auto" if estimator is None else str(estimator)), {}


class LabPanel(widgets.VBox):
    """The lab's widget: an ``ipywidgets.VBox`` with a short text form (what
    a notebook stores as ``text/plain``: no PNG bytes, no model ids)."""

    def __init__(self, *args: Any, summary: str = "storch lab", **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.summary = summary

    def __repr__(self) -> str:
        return f"<{self.summary}>"


class Lab:
    """The estimator lab (see the module docstring). Make it with :func:`lab`.

    Attributes
    ----------
    controls : dict name -> widget (see the module docstring).
    widget : the panel (a ``LabPanel``, i.e. an ``ipywidgets.VBox``).
    result : the latest Result of the main estimator (runs > 1).
    results : label -> Result of every estimator shown (main first).
    figure : the latest matplotlib Figure.
    curves : label -> {samples: {entry: variance}} of the variance plot.
    reference : the :class:`~storch_nb.experiments.Reference` (or None).
    error : the text of the error of the last update, or None.
    seconds : wall time of the last update (runs, figure and PNG).
    updates : how many updates ran.
    """

    def __init__(
        self,
        story: Any,
        namespace: Mapping[str, Any] | None = None,
        samples: int = 100,
        runs: int = 200,
        estimator: str | Mapping[str, str] | None = None,
        compare: Sequence[str] = (),
        param: str | None = None,
        estimators: Sequence[str] | None = None,
        seed: int | None = 0,
        device: Any = "cpu",
        dtype: Any = None,
    ) -> None:
        self.story = story
        self.namespace = namespace
        self.seed = seed
        self.device = device
        self.dtype = dtype
        self.result = None
        self.results: dict[str, Any] = {}
        self.figure = None
        self.curves: dict[str, Any] = {}
        self.error: str | None = None
        self.exception: BaseException | None = None
        self.seconds = 0.0
        self.updates = 0
        self._reference: Any = None
        self._reference_done = False
        self._updating = False

        sites, self.fixed_sites = site_targets(story.program.statements)
        common = self._fitting(sites, estimators)
        main_value, site_values = _initial_choice(estimator)
        if main_value not in common:
            common = [main_value, *common]
        self.controls = self._controls(sites, common, main_value, site_values, samples, runs, param, compare)
        self.widget = LabPanel(self._rows())
        for name, w in self.controls.items():
            if name in ("estimator", "samples", "runs", "param", "compare") or name.startswith("estimator:"):
                w.observe(self._changed, names="value")
        self.update()
        if self.exception is not None:  # nothing to show yet: say so as an error, not a panel
            self.close()
            raise self.exception
        n_sites = len(self.result.estimators)
        self.widget.summary = f"storch lab: {n_sites} site{'s' if n_sites != 1 else ''}, " + (
            f"parameters {', '.join(self.result.grads)}" if self.result.grads else "no parameters"
        )

    def _fitting(self, sites: list[str], estimators: Sequence[str] | None) -> list[str]:
        """Fill ``self.fits`` (site -> the estimators its dropdown lists); return those
        that fit every site (the main dropdown's)."""
        if estimators is not None:
            names = [str(e) for e in estimators]
            self.fits = {s: list(names) for s in sites}
            return list(names)
        self.fits = fitting_estimators(self.story, self.namespace, device=self.device, dtype=self.dtype)
        return [n for n in canonical(registered_estimators()) if all(n in f for f in self.fits.values())]

    def _controls(self, sites: list[str], common: list[str], main_value: str, site_values: dict[str, str],
                  samples: int, runs: int, param: str | None, compare: Sequence[str] | str) -> dict[str, Any]:
        """The widgets by name (see the module docstring)."""
        c: dict[str, Any] = {}
        c["estimator"] = widgets.Dropdown(options=common, value=main_value, description="estimator", style=_STYLE)
        if len(sites) > 1:
            for s in sites:
                opts = [FOLLOW, *self.fits.get(s, [])]
                v = site_values.get(s, FOLLOW)
                if v not in opts:
                    opts.append(v)
                c[f"estimator:{s}"] = widgets.Dropdown(options=opts, value=v, description=f"site {s}", style=_STYLE)
        hi = max(SAMPLES_EXP[1], math.ceil(math.log10(max(int(samples), 1))))
        c["samples"] = widgets.FloatLogSlider(
            value=float(samples), base=10, min=SAMPLES_EXP[0], max=hi, step=0.1, description="samples",
            readout_format=".0f", continuous_update=False, style=_STYLE,
        )
        c["runs"] = widgets.BoundedIntText(value=max(2, int(runs)), min=2, max=1_000_000, description="runs",
                                           style=_STYLE, layout=widgets.Layout(width="150px"))
        c["param"] = widgets.Dropdown(options=[param] if param else [], value=param, description="param", style=_STYLE)
        compare = [compare] if isinstance(compare, str) else list(compare)
        cmp_options = list(common) + [e for e in compare if e not in common]
        c["compare"] = widgets.SelectMultiple(options=cmp_options, value=tuple(compare), description="compare",
                                              rows=min(6, max(2, len(cmp_options))), style=_STYLE)
        c["progress"] = widgets.IntProgress(value=0, min=0, max=1, description="running", bar_style="info",
                                            layout=widgets.Layout(visibility="hidden"))
        c["status"] = widgets.HTML(value="")
        c["plot"] = widgets.Image(format="png", layout=widgets.Layout(max_width="100%"))
        c["table"] = widgets.HTML(value="")
        c["output"] = widgets.VBox([c["plot"], c["table"]])
        return c

    def _rows(self) -> list[Any]:
        """The panel's rows: estimator dropdowns, sliders, comparison, notes, output."""
        c = self.controls
        site_row = [w for k, w in c.items() if k.startswith("estimator:")]
        rows = [widgets.HBox([c["estimator"], *site_row[:3]])]
        if len(site_row) > 3:
            rows.append(widgets.HBox(site_row[3:]))
        rows.append(widgets.HBox([c["samples"], c["runs"], c["param"]]))
        rows.append(c["compare"])
        if self.fixed_sites:
            fixed = "fixed by the story: " + ", ".join(f"{k} using {v}" for k, v in self.fixed_sites.items())
            rows.append(widgets.HTML(value="<small>" + html.escape(fixed) + "</small>"))
        return [*rows, c["progress"], c["status"], c["output"]]

    # ------------------------------------------------------------ notebook
    def _repr_mimebundle_(self, include: Any = None, exclude: Any = None) -> Any:
        return self.widget._repr_mimebundle_(include=include, exclude=exclude)

    def __repr__(self) -> str:
        return repr(self.widget)

    def close(self) -> None:
        """Close every widget of the panel."""
        self.widget.close()
        for w in self.controls.values():
            w.close()

    # ------------------------------------------------------------ settings
    def estimator_spec(self) -> str | dict[str, str]:
        """What the controls ask for: the main estimator's text, or a mapping
        ``{"*": main, site: text, ...}`` when a per-site dropdown is set."""
        main = self.controls["estimator"].value
        per = {k.split(":", 1)[1]: w.value for k, w in self.controls.items()
               if k.startswith("estimator:") and w.value != FOLLOW}
        if not per:
            return main
        return {"*": main, **per}

    @property
    def samples(self) -> int:
        return max(1, int(round(self.controls["samples"].value)))

    @property
    def runs(self) -> int:
        return max(2, int(self.controls["runs"].value))

    @property
    def reference(self) -> Any:
        """The reference gradient (exact, or high-sample), computed once."""
        if not self._reference_done:
            self._reference = experiments.reference(self.story, self.namespace, seed=self.seed, device=self.device,
                                                    dtype=self.dtype)
            self._reference_done = True
        return self._reference

    # -------------------------------------------------------------- update
    def _changed(self, change: Any) -> None:
        if not self._updating:
            self.update()

    def update(self) -> None:
        """Re-run every estimator shown and redraw (what any change of a control does)."""
        if self._updating:
            return
        self._updating = True
        t0 = time.perf_counter()
        c = self.controls
        progress = c["progress"]
        try:
            samples, runs = self.samples, self.runs
            results, curves, skipped = self._run(self._specs(), samples, runs)
            self._draw(results, curves)
            self.seconds = time.perf_counter() - t0
            what = " vs ".join(results)
            msg = f"{html.escape(what)} · {samples:,} samples × {runs:,} runs · {self.seconds * 1e3:.0f} ms"
            if skipped:
                msg += "<br><span style='color:#b35806'>not shown: " + html.escape("; ".join(skipped)) + "</span>"
            c["status"].value = f"<span style='color:#555;font-size:90%'>{msg}</span>"
        except Exception as exc:  # shown in the panel; the panel stays usable
            self.exception = exc
            self.error = exc.render() if isinstance(exc, StoryError) else f"{type(exc).__name__}: {exc}"
            self.seconds = time.perf_counter() - t0
            c["output"].layout.display = "none"
            c["status"].value = (
                "<pre style='color:#b2182b;background:#fdecea;padding:6px;margin:2px 0;white-space:pre-wrap'>"
                + html.escape(self.error) + "</pre>"
            )
        finally:
            progress.value = progress.max
            progress.layout.visibility = "hidden"
            self.updates += 1
            self._updating = False

    def _specs(self) -> list[Any]:
        """The estimator choices shown: the main one, then those to compare."""
        spec = self.estimator_spec()
        specs: list[Any] = [spec]
        for e in self.controls["compare"].value:
            if e != spec and e not in specs:
                specs.append(e)
        return specs

    def _run(self, specs: list[Any], samples: int, runs: int) -> tuple[dict[str, Any], dict[str, Any], list[str]]:
        """Per estimator choice its runs and variance curve (label -> ...), and the
        choices left out with their errors (an error of the main one is raised)."""
        progress = self.controls["progress"]
        per_spec = experiments.n_chunks(samples, runs) + len(experiments.sample_grid(samples)) - 1
        progress.max = max(1, per_spec * len(specs))
        progress.value = 0
        if samples * runs * len(specs) * 2 >= LONG_DRAWS:
            progress.layout.visibility = "visible"

        def tick() -> None:
            progress.value = min(progress.max, progress.value + 1)

        where = (self.namespace, self.device, self.dtype)
        results: dict[str, Any] = {}
        curves: dict[str, Any] = {}
        skipped: list[str] = []
        for i, sp in enumerate(specs):
            try:
                res = experiments.run_chunked(self.story, sp, samples, runs, self.seed, *where, tick=tick)
            except StoryError as err:
                if i == 0:
                    raise
                skipped.append(f"{sp}: {err.message}")
                continue
            label = experiments.estimator_label(sp, res)
            results[label] = res
            curves[label] = experiments.variance_curve(self.story, sp, samples, runs, self.seed, *where, known=res,
                                                       tick=tick)
        return results, curves, skipped

    def _draw(self, results: dict[str, Any], curves: dict[str, Any]) -> None:
        """The figure and the table of ``results``; the lab's latest state."""
        c = self.controls
        ref = self.reference
        main = next(iter(results.values()))
        labels = list(experiments.entries(main))
        self._set_params(labels)
        chosen = c["param"].value
        fig = gradient_figure(results, [chosen] if chosen else labels[:1], ref, curves)
        png = figure_png(fig)
        table = experiments.comparison(results, ref.result if ref is not None else None, max_entries=TABLE_ENTRIES)
        notes = [ref.label] if ref is not None and not ref.exact else []
        c["table"].value = comparison_html(table, reference=ref.result if ref is not None else None, notes=notes,
                                           reference_label="exact" if ref is None or ref.exact else "reference")
        c["plot"].value = png
        c["output"].layout.display = None
        self.result, self.results, self.curves, self.figure = main, results, curves, fig
        self.error, self.exception = None, None

    def _first_choice(self, labels: list[str]) -> str | None:
        """The entry shown first: the first parameter upstream of a stochastic
        site (its gradient is what the estimators disagree on), else the first."""
        try:
            graph = self.story.graph
            upstream: set[str] = set()
            for node in graph.of_kind("stochastic"):
                upstream |= graph.ancestors(node.name)
        except StoryError:  # the graph is a nicety here
            upstream = set()
        for label in labels:
            if label.split("[", 1)[0].split(".", 1)[0] in upstream:
                return label
        return labels[0] if labels else None

    def _set_params(self, labels: list[str]) -> None:
        w = self.controls["param"]
        if list(w.options) != labels:
            keep = w.value if w.value in labels else self._first_choice(labels)
            w.options = labels
            w.value = keep
        elif w.value is None and labels:
            w.value = self._first_choice(labels)


def lab(
    story: Any,
    namespace: Mapping[str, Any] | None = None,
    samples: int = 100,
    runs: int = 200,
    **options: Any,
) -> Lab:
    """Make the estimator lab for ``story`` (see :mod:`storch_nb.notebook.lab`).

    ``options``: ``estimator`` (initial choice: text, or a mapping site -> text),
    ``compare`` (estimators to overlay), ``param`` (the entry to show),
    ``estimators`` (list these instead of the fitting ones), ``seed`` (default 0;
    None: torch's global generator), ``device``, ``dtype``.
    """
    if isinstance(story, str):
        from ..api import Story

        story = Story(story)
    return Lab(story, namespace=namespace, samples=samples, runs=runs, **options)
