"""The pictures of storch_nb (matplotlib, rendered as PNG): the only package
that imports matplotlib. ``import storch_nb`` does not import it; the magic,
the lab and ``Story.draw`` import this package when a picture is asked for.

- :mod:`.render`: :class:`StorchFigure` (a ``Figure`` with ``_repr_png_``)
  and :func:`figure_png`.
- :mod:`.plots`: :func:`gradient_figure` (histograms of gradient estimates
  and the variance against the number of samples) and
  :func:`learning_curve_figure` (training runs).
- :mod:`.graph`: :func:`draw_graph`, the story's graph.
- :mod:`.survey`: :func:`survey_figure`, a table of single-sample gradient
  variances (cost x parameter x estimator) on a log scale, exact values marked.

The numbers behind the plots come from :mod:`storch_nb.experiments`.
"""

from .graph import draw_graph, layout
from .plots import gradient_figure, learning_curve_figure
from .render import COLORS, DPI, StorchFigure, figure_png
from .survey import survey_figure

__all__ = [
    "COLORS",
    "DPI",
    "StorchFigure",
    "draw_graph",
    "figure_png",
    "gradient_figure",
    "layout",
    "learning_curve_figure",
    "survey_figure",
]
