"""Kept for ``Story.draw``: the graph drawing lives in :mod:`storch_nb.figures.graph`
(``from storch_nb.figures import draw_graph``). Importing this module imports matplotlib."""

from ..figures.graph import draw_graph

__all__ = ["draw_graph"]
