"""Which estimators fit which site of a story, decided without running it.

The lab offers, for each site, the estimators that fit the site's
distribution. That is decided from the distribution's class, as
``torch.distributions.register_kl`` dispatches on types: each estimator's
:meth:`~storch_nb.Estimator.fits_class` refuses the classes it cannot handle
(``pathwise`` a class without ``rsample``, ``arm`` anything but Bernoulli).

The class of a site ``x ~ Normal(m, 1)`` is its callee, resolved as the
planner resolves names (the namespace, then the story language's helpers)
when the callee reads no name the story defines. Where the class alone cannot
tell, the check falls back once to what is known before any run: a site
written as a namespace value (``x ~ prior``) is that distribution instance,
checked with :meth:`~storch_nb.Estimator.fits`. A site whose distribution is
computed by the story (``x ~ make(z)``) cannot be decided before it runs:
every candidate is listed for it, and a choice that does not fit is refused by
the engine when it runs (the lab shows that error in its panel).
"""

from __future__ import annotations

import ast
from collections.abc import Mapping, Sequence
from typing import Any

from torch.distributions import Distribution

from ..engine.helpers import BUILTINS, HELPERS
from ..errors import StoryError
from ..estimators import estimators as registered_estimators
from ..estimators import make_estimator
from ..story.statements import Site
from ..story.walk import defined_names, walk

__all__ = ["PREFERRED", "canonical", "fitting_estimators", "site_distributions", "site_targets"]

#: estimators listed first, in this order (the rest follow alphabetically)
PREFERRED = ("auto", "pathwise", "score", "rloo", "enumerate")

_UNKNOWN = object()


def site_targets(statements: Sequence[Any]) -> tuple[list[str], dict[str, str]]:
    """The site variables without ``using`` (in order) and those with it (-> text)."""
    free: list[str] = []
    fixed: dict[str, str] = {}
    for st in walk(statements):
        if isinstance(st, Site):
            if st.using:
                fixed.setdefault(st.target, st.using)
            elif st.target not in free:
                free.append(st.target)
    return [t for t in free if t not in fixed], fixed


def canonical(names: Sequence[str]) -> list[str]:
    """Registered names without aliases (and without ones that need options), ordered."""
    out = []
    for n in names:
        if n == "auto":
            out.append(n)
            continue
        try:
            est = make_estimator(n)
        except StoryError:  # an estimator that cannot be made without options is not offered
            continue
        if est is not None and est.name == n:
            out.append(n)
    first = [n for n in PREFERRED if n in out]
    return first + sorted(n for n in out if n not in first)


def _resolve(node: ast.expr, story_names: Mapping[str, int], namespace: Mapping[str, Any]) -> Any:
    """The value of a name or a dotted name (``D.Normal``) before the story runs:
    from the namespace, then the helpers; ``_UNKNOWN`` for anything else
    (a call, a subscript, a name the story defines)."""
    if isinstance(node, ast.Attribute):
        base = _resolve(node.value, story_names, namespace)
        return _UNKNOWN if base is _UNKNOWN else getattr(base, node.attr, _UNKNOWN)
    if not isinstance(node, ast.Name) or node.id in story_names:
        return _UNKNOWN
    for scope in (namespace, HELPERS, BUILTINS):
        if node.id in scope:
            return scope[node.id]
    return _UNKNOWN


def _site_distribution(st: Site, story_names: Mapping[str, int], namespace: Mapping[str, Any]) -> Any:
    """A site's distribution class (``x ~ Normal(...)``), or its instance (``x ~ prior``), or None."""
    value = _resolve(st.dist.node, story_names, namespace)
    if st.is_call:
        return value if isinstance(value, type) and issubclass(value, Distribution) else None
    return value if isinstance(value, Distribution) else None


def site_distributions(story: Any, namespace: Mapping[str, Any] | None = None) -> dict[str, list[Any]]:
    """Site variable (without ``using``) -> what is known of its distribution before
    the story runs, one entry per ``~`` statement drawing it (a loop's sites share
    the variable): the class, a distribution instance, or None (not known)."""
    statements = story.program.statements
    story_names = defined_names(statements)
    sites, _ = site_targets(statements)
    out: dict[str, list[Any]] = {s: [] for s in sites}
    for st in walk(statements):
        if isinstance(st, Site) and st.target in out:
            out[st.target].append(_site_distribution(st, story_names, namespace or {}))
    return out


def _fits(text: str, known: list[Any]) -> bool:
    """Whether the estimator ``text`` fits every known distribution of a site."""
    est = make_estimator(text)
    if est is None:  # auto
        return True
    for dist in known:
        if isinstance(dist, type) and est.fits_class(dist) is not None:
            return False
        if isinstance(dist, Distribution) and est.fits(dist) is not None:
            return False
    return True


def fitting_estimators(
    story: Any,
    namespace: Mapping[str, Any] | None = None,
    candidates: Sequence[str] | None = None,
    device: Any = "cpu",
    dtype: Any = None,
) -> dict[str, list[str]]:
    """Site variable -> the candidate estimators that fit it (default: every
    registered estimator, aliases left out), decided from each site's
    distribution class without running the story (see the module docstring).
    Sites with ``using`` are left out. ``device`` and ``dtype`` do not change
    what fits; they are accepted for the callers that pass a run's settings."""
    names = canonical(candidates if candidates is not None else registered_estimators())
    return {site: [n for n in names if _fits(n, known)] for site, known in site_distributions(story, namespace).items()}
