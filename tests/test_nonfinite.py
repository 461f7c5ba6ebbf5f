"""NaN and infinite values are reported with the line that produced them."""

import pytest

import storch_nb as sn

CASES = [
    ("a = param(-1.0)\ne ~ Normal(0, 1)\nf = log(a) * e\ncost f", 3, "step `f`"),
    ("a = param(1.0)\ne ~ Normal(a, 1)\ncost log(e - e)", 3, "cost `cost`"),
    ("a = param(1.0)\nb ~ Poisson(a)\ncost 1/b", 3, "cost `cost`"),
    ("a = param(1.0)\nx ~ Normal(a, 1)\ny ~ Normal(log(x - x), 1)\ncost y", 3, "step"),
]


@pytest.mark.parametrize(("text", "lineno", "what"), CASES)
def test_nonfinite_values_name_their_line(text, lineno, what):
    with pytest.raises(sn.StoryError) as info:
        sn.Story(text).run(samples=16, seed=0)
    assert info.value.lineno == lineno
    assert "NaN or infinite" in info.value.message


def test_nonfinite_gradient_names_the_parameter():
    with pytest.raises(sn.StoryError) as info:
        sn.Story("a = param(0.0)\ne ~ Normal(a, 1)\ncost sqrt(a*a) + e").run(samples=16, seed=0)
    assert "gradient with respect to a" in info.value.message


def test_finite_story_is_not_flagged():
    res = sn.Story("a = param(1.0)\ne ~ Normal(a, 1)\ncost e**2").run(samples=16, seed=0)
    assert res.grads["a"].isfinite().all()


def test_fused_read_off_the_cpu_path():
    """``read_fused`` is what a GPU run uses (one read for the cost and the gradients'
    finiteness); it runs on any device, so it is checked here on the CPU."""
    import torch

    from storch_nb.engine.diagnose import read_fused

    cost = torch.tensor(2.5)
    fine = {"a": torch.tensor([1.0, -2.0]), "b": torch.tensor(3.0)}
    assert read_fused([cost, torch.tensor(0.5)], fine) == ([2.5, 0.5], True)
    for bad in (float("nan"), float("inf"), float("-inf")):
        vals, ok = read_fused([cost], {**fine, "c": torch.tensor([0.0, bad])})
        assert vals == [2.5] and not ok
    # finite entries whose sum overflows float32 are still finite (the exact check decides)
    big = torch.full((4,), 3e38)
    assert read_fused([cost], {"a": big}) == ([2.5], True)
    # inf and -inf in different gradients: their sum is NaN, flagged
    assert not read_fused([cost], {"a": torch.tensor(float("inf")), "b": torch.tensor(float("-inf"))})[1]
