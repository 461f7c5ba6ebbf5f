"""The planner's record of which sites each site and cost depends on (what the
DiCE surrogate multiplies and which baselines apply), kept incrementally:
checked against a walk over the finished graph."""

from __future__ import annotations

import torch

import storch_nb as sn
from storch_nb.settings import EstimatorSpec


def _plan(text: str):
    return sn.Story(text)._runner.plan({}, EstimatorSpec(), False, False, torch.device("cpu"), torch.float32)


def _walk(plan, node: str) -> tuple[str, ...]:
    ups = plan.graph.ancestors(node)
    return tuple(n for n in plan.site_ops if n in ups)


def test_merges_branches_and_chains_in_story_order():
    plan = _plan(
        "t = param(0.5)\n"
        "a ~ Normal(t, 1)\n"
        "b ~ Normal(t, 1)\n"
        "u = a * 2\n"  # a deterministic node between sites
        "c ~ Normal(u + b, 1)\n"  # merges a and b
        "d ~ Normal(b, 1)\n"  # only b
        "e ~ Normal(c + d, 1)\n"  # merges {a, b, c} and {b, d}
        "cost e + a\n"
        "cost d\n"
    )
    ops = plan.site_ops
    assert ops["a"].ancestors == () and ops["b"].ancestors == ()
    assert ops["c"].ancestors == ("a", "b")
    assert ops["d"].ancestors == ("b",)
    assert ops["e"].ancestors == ("a", "b", "c", "d")
    assert [op.sites for op in plan.cost_ops] == [("a", "b", "c", "d", "e"), ("b", "d")]
    for name, op in ops.items():
        assert op.ancestors == _walk(plan, name)
    for op in plan.cost_ops:
        assert op.sites == _walk(plan, op.node)


def test_an_unrolled_chain():
    plan = _plan("mu = param(0.0)\nx = 0.0\nfor i in range(300):\n    x ~ Normal(x + mu, 1)\n    cost x**2\n")
    names = list(plan.site_ops)
    assert len(names) == 300
    for k, name in enumerate(names):
        assert plan.site_ops[name].ancestors == tuple(names[:k])
    for k, op in enumerate(plan.cost_ops):
        assert op.sites == tuple(names[: k + 1])
