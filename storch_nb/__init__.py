"""storch_nb: a Jupyter-first laboratory for gradient estimation in stochastic
computation graphs.

Write a generative story, get gradient estimates of its expected cost::

    import storch_nb as sn
    story = sn.Story('''
    a = param(1.0)
    b = param(2.0)
    c = param(0.5)
    d = a + b
    e ~ Normal(c + b, 1)
    f = d * e**2
    cost f
    ''')
    res = story.run(samples=1000, estimator="score(baseline='rloo')", seed=0)
    res.grads["c"]

In a notebook: ``%load_ext storch_nb`` and a ``%%storch`` cell.
"""

from __future__ import annotations

from .api import Story
from .engine.result import Comparison, Result
from .errors import EstimatorError, StoryError, StoryNameError, StorySyntaxError
from .estimators import Estimator, estimators, register_estimator
from .graph import Graph, Node

__version__ = "0.1.0"

__all__ = [
    "Story",
    "Result",
    "Comparison",
    "StoryError",
    "StorySyntaxError",
    "StoryNameError",
    "EstimatorError",
    "Estimator",
    "estimators",
    "register_estimator",
    "Graph",
    "Node",
    "lab",
    "load_ipython_extension",
    "unload_ipython_extension",
]


def lab(story, namespace=None, samples: int = 100, runs: int = 200, **options):
    """The interactive estimator lab (ipywidgets): see :mod:`storch_nb.notebook.lab`.
    Imports ipywidgets and matplotlib on first use only."""
    from .notebook.lab import lab as _lab

    return _lab(story, namespace=namespace, samples=samples, runs=runs, **options)


def load_ipython_extension(ipython) -> None:
    """``%load_ext storch_nb``: register the ``%%storch`` magic."""
    from .notebook.magic import load_ipython_extension as _load

    _load(ipython)


def unload_ipython_extension(ipython) -> None:
    """``%unload_ext storch_nb``: remove the magics."""
    from .notebook.magic import unload_ipython_extension as _unload

    _unload(ipython)
