"""Fitting learned control variates (RELAX, REBAR, LAX) on a pass's gradients.

The estimate ``g`` is unbiased for any value of a control variate's
parameters, so ``E[g]`` does not depend on them and the gradient of the proxy
``sum(g^2)`` with respect to them is that of the variance of ``g``. After a
pass, each estimator that learns one gets the proxy's gradients in its
parameters (``cv_prepare``, all of them read before any changes) and takes one
step (``cv_step``); the next pass uses the new values, so every estimate stays
unbiased.
"""

from __future__ import annotations

import torch

__all__ = ["learners", "fit_control_variates", "fit_on_pass"]


def learners(ex) -> list[tuple[str, object]]:
    """The (site, estimator) pairs of a pass whose estimator learns a control variate."""
    return [(node, est) for node, (_, est, _) in ex.sites.items() if est.trainable]


def fit_control_variates(state: dict, trainable, gs, retain: bool = False) -> list[torch.Tensor | None]:
    """One variance-minimising step for the control variates of ``trainable``
    (site, estimator) pairs, from the gradients ``gs`` (made with
    ``create_graph=True``). Returns the gradients, detached. ``retain`` keeps the
    graph for the caller's own backward pass (``Story.surrogate``)."""
    owners, cv_params = [], []
    for node, est in trainable:
        st = state.get((node, "estimator", est.text()), {})
        ps = est.cv_parameters(st)
        owners.append((est, st, len(ps)))
        cv_params += ps
    proxy = sum((g**2).sum() for g in gs if g is not None and g.requires_grad)
    if cv_params and isinstance(proxy, torch.Tensor) and proxy.requires_grad:
        # estimators that fit part of their control variate by least squares
        # differentiate these gradients once more (the proxy's Hessian)
        second = any(est.cv_second_order for est, _, k in owners if k)
        cv_grads = torch.autograd.grad(proxy, cv_params, allow_unused=True, create_graph=second,
                                       retain_graph=second or retain)
        i, prepared = 0, []
        for est, st, k in owners:  # every estimator reads the graph before any changes its parameters
            prepared.append(est.cv_prepare(st, list(cv_grads[i : i + k])))
            i += k
        for (est, st, _), prep in zip(owners, prepared):
            est.cv_step(st, prep)
    return [None if g is None else g.detach() for g in gs]


def fit_on_pass(state: dict, ex, inputs: list[torch.Tensor], total: torch.Tensor) -> None:
    """One fit on a surrogate's own gradients, leaving ``total`` differentiable for
    its caller (the estimate keeps the coefficients it was made with)."""
    trainable = learners(ex)
    if not trainable or not inputs or not total.requires_grad:
        return
    ex.guard.fitting = True  # the first-order-only parts let this one second differentiation through
    try:
        gs = torch.autograd.grad(total.sum(), inputs, allow_unused=True, create_graph=True, retain_graph=True)
        fit_control_variates(state, trainable, gs, retain=True)
    finally:
        ex.guard.fitting = False
