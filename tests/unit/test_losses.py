"""FocalLoss, sigmoid_focal_loss and the weighting helpers, checked against exact references."""

import itertools
import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F  # noqa: N812
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor

from services.ml.losses import (
    FocalLoss,
    class_priors,
    class_weights,
    init_prior_bias_,
    prior_bias,
    sigmoid_focal_loss,
)

GOLDEN = Path(__file__).resolve().parents[1] / "fixtures" / "sigmoid_focal_golden.json"


def reference_focal(
    logits: Tensor, targets: Tensor, gamma: float | Tensor, alpha: Tensor | None
) -> Tensor:
    """The textbook formula through plain autograd, per example: -alpha_y (1-p_y)^g log p_y."""
    log_pt = F.log_softmax(logits, dim=1).gather(1, targets[:, None]).squeeze(1)
    gamma_t = gamma[targets] if isinstance(gamma, Tensor) else gamma
    loss = -((1 - log_pt.exp()) ** gamma_t) * log_pt
    return loss if alpha is None else loss * alpha[targets]


def random_batch(n: int = 64, c: int = 7, seed: int = 0) -> tuple[Tensor, Tensor]:
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, c, generator=generator, dtype=torch.float64) * 3
    targets = torch.randint(0, c, (n,), generator=generator)
    return logits, targets


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_gamma_zero_without_alpha_is_cross_entropy(reduction: str) -> None:
    logits, targets = random_batch()
    logits = logits.float().requires_grad_(True)
    ours = FocalLoss(gamma=0.0, reduction=reduction)(logits, targets)  # type: ignore[arg-type]
    (grad_ours,) = torch.autograd.grad(ours.sum(), logits)
    theirs = F.cross_entropy(logits, targets, reduction=reduction)
    (grad_theirs,) = torch.autograd.grad(theirs.sum(), logits)
    # Per example and mean: 1e-6 absolute. A float32 sum of 64 losses (~300) differs by summation
    # order alone at 1 ulp (3e-5), so the sum is held to 1e-6 relative.
    torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=1e-6 if reduction == "sum" else 0)
    torch.testing.assert_close(grad_ours, grad_theirs, atol=1e-6, rtol=0)


def test_gamma_zero_with_alpha_is_weighted_cross_entropy() -> None:
    logits, targets = random_batch()
    alpha = torch.tensor([0.5, 1.0, 2.0, 0.1, 3.0, 1.0, 0.7])
    ours = FocalLoss(gamma=0.0, alpha=alpha)(logits.float(), targets)
    theirs = F.cross_entropy(logits.float(), targets, weight=alpha)
    torch.testing.assert_close(ours, theirs, atol=0, rtol=1e-6)  # weighted float32 sums


def test_ignore_index_matches_cross_entropy() -> None:
    logits, targets = random_batch()
    targets[::3] = -1
    ours = FocalLoss(gamma=0.0, ignore_index=-1)(logits.float(), targets)
    theirs = F.cross_entropy(logits.float(), targets, ignore_index=-1)
    torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=0)
    per_item = FocalLoss(gamma=2.0, ignore_index=-1, reduction="none")(logits, targets)
    assert torch.equal(per_item[::3], torch.zeros_like(per_item[::3]))


@pytest.mark.parametrize(
    ("gamma", "alpha"),
    [
        (2.0, None),
        (0.5, None),
        (3.0, torch.tensor([1.0, 0.5, 2.0, 0.25, 1.5, 1.0, 4.0])),
        (torch.tensor([0.0, 0.5, 1.0, 2.0, 3.0, 2.0, 0.25]), None),
    ],
)
def test_values_and_gradients_match_the_textbook_formula(
    gamma: float | Tensor, alpha: Tensor | None
) -> None:
    logits, targets = random_batch()
    loss_fn = FocalLoss(gamma=gamma, alpha=alpha, reduction="none")
    x = logits.clone().requires_grad_(True)
    ours = loss_fn(x, targets)
    expected = reference_focal(logits, targets, gamma, alpha if alpha is None else alpha.double())
    torch.testing.assert_close(ours, expected, atol=1e-12, rtol=1e-10)
    # The hand-derived backward against finite differences, in float64.
    assert torch.autograd.gradcheck(
        lambda z: loss_fn(z, targets), (x,), eps=1e-6, atol=1e-7, rtol=1e-5
    )


def test_mean_reduction_is_alpha_weighted_mean() -> None:
    logits, targets = random_batch()
    alpha = torch.linspace(0.5, 2.0, 7)
    per_item = reference_focal(logits, targets, 2.0, alpha.double())
    expected = per_item.sum() / alpha.double()[targets].sum()
    torch.testing.assert_close(FocalLoss(2.0, alpha)(logits, targets), expected)


def test_large_logits_stay_finite_in_float32() -> None:
    logits = torch.tensor([[1e4, -1e4, 0.0], [-1e4, 1e4, 5e3], [0.0, 0.0, 1e4]])
    targets = torch.tensor([0, 2, 1])  # a confident hit and two confident misses
    x = logits.clone().requires_grad_(True)
    loss = FocalLoss(gamma=2.0, reduction="none")(x, targets)
    torch.autograd.backward(loss.sum())
    assert x.grad is not None
    assert bool(torch.isfinite(loss).all()) and bool(torch.isfinite(x.grad).all())
    torch.testing.assert_close(loss, torch.tensor([0.0, 5e3, 1e4]))


def test_bf16_inputs_give_finite_loss_and_gradients() -> None:
    logits, targets = random_batch(n=256, c=10)
    x = (logits * 10).to(torch.bfloat16).requires_grad_(True)
    loss = FocalLoss(gamma=2.0, alpha="effective_number", class_counts=[50] * 9 + [2])(x, targets)
    torch.autograd.backward(loss)
    assert x.grad is not None and x.grad.dtype == torch.bfloat16
    assert math.isfinite(loss.item()) and bool(torch.isfinite(x.grad.float()).all())
    reference = FocalLoss(2.0, "effective_number", class_counts=[50] * 9 + [2])(
        x.detach().float(), targets
    )
    torch.testing.assert_close(loss, reference, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("gamma", [0.1, 0.5, 0.9])
def test_fractional_gamma_gradient_is_finite_when_pt_reaches_one(gamma: float) -> None:
    x = torch.tensor([[200.0, 0.0, 0.0], [0.0, 90.0, 0.0]], requires_grad=True)
    loss = FocalLoss(gamma=gamma, reduction="sum")(x, torch.tensor([0, 1]))
    torch.autograd.backward(loss)
    assert x.grad is not None and bool(torch.isfinite(x.grad).all())
    assert loss.item() == 0.0


def test_inverse_frequency_weights_are_exact() -> None:
    weights = class_weights([90, 10], "inverse_frequency")
    torch.testing.assert_close(weights, torch.tensor([0.2, 1.8]))


def test_effective_number_weights_are_exact() -> None:
    beta = 0.9
    effective = [(1 - beta**n) / (1 - beta) for n in (100, 10, 1)]
    raw = [1 / e for e in effective]
    expected = torch.tensor([3 * r / sum(raw) for r in raw])
    torch.testing.assert_close(class_weights([100, 10, 1], "effective_number", beta=beta), expected)
    torch.testing.assert_close(
        class_weights([100, 10, 1], "effective_number", beta=0.0), torch.ones(3)
    )


def test_class_index_alpha_never_goes_negative() -> None:
    """Seed 003's `alpha*t + (1-alpha)*(1-t)` turns negative for class indices >= 2."""
    logits, targets = random_batch(n=200, c=5)
    for scheme in ("inverse_frequency", "effective_number"):
        loss_fn = FocalLoss(2.0, scheme, class_counts=[500, 40, 7, 1, 0], reduction="none")
        assert loss_fn.alpha_per_class is not None
        assert bool((loss_fn.alpha_per_class > 0).all())
        assert bool((loss_fn(logits, targets) >= 0).all())


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"gamma": -1.0}, "gamma must be finite and >= 0"),
        ({"gamma": float("nan")}, "gamma must be finite and >= 0"),
        ({"alpha": "inverse_frequency"}, "needs class_counts"),
        ({"alpha": "made_up", "class_counts": [1, 2]}, "unknown alpha scheme"),
        ({"alpha": [1.0, -0.5]}, "alpha must be finite and >= 0"),
        ({"gamma": [1.0, 2.0], "alpha": [1.0, 1.0, 1.0]}, "disagree on the class count"),
        ({"reduction": "avg"}, "reduction must be one of"),
    ],
)
def test_bad_construction_is_refused(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        FocalLoss(**kwargs)


@pytest.mark.parametrize(
    ("logits", "targets", "message"),
    [
        (torch.zeros(4, 3), torch.tensor([0, 1, 2, 3]), "target 3 is not a class index"),
        (torch.zeros(4, 3), torch.tensor([0, 1, -2, 0]), "target -2 is not a class index"),
        (torch.zeros(4, 3), torch.zeros(4), "integer class indices"),
        (torch.zeros(4, 3), torch.zeros(3, dtype=torch.long), "targets must be"),
        (torch.zeros(4), torch.zeros(4, dtype=torch.long), "logits must be"),
        (torch.zeros(4, 2), torch.zeros(4, dtype=torch.long), "built for 3"),
    ],
)
def test_bad_batches_are_refused(logits: Tensor, targets: Tensor, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        FocalLoss(gamma=2.0, alpha=[1.0, 1.0, 1.0])(logits, targets)


@settings(max_examples=200, deadline=None)
@given(
    logits=st.lists(
        st.floats(min_value=-30, max_value=30, allow_nan=False), min_size=4, max_size=4
    ),
    target=st.integers(min_value=0, max_value=3),
    gamma=st.floats(min_value=0.01, max_value=5.0),
)
def test_focal_is_nonnegative_and_at_most_cross_entropy(
    logits: list[float], target: int, gamma: float
) -> None:
    x = torch.tensor([logits], dtype=torch.float64)
    y = torch.tensor([target])
    focal = float(FocalLoss(gamma=gamma)(x, y))
    cross_entropy = float(F.cross_entropy(x, y))
    assert focal >= 0.0
    assert focal <= cross_entropy * (1 + 1e-12)


@settings(max_examples=200, deadline=None)
@given(
    p_t=st.floats(min_value=1e-6, max_value=1 - 1e-6),
    gammas=st.lists(st.floats(min_value=0.0, max_value=6.0), min_size=2, max_size=6),
)
def test_loss_is_non_increasing_in_gamma_at_fixed_pt(p_t: float, gammas: list[float]) -> None:
    # Two classes with logits (log p_t, log(1 - p_t)) give exactly p_t for class 0.
    x = torch.tensor([[math.log(p_t), math.log1p(-p_t)]], dtype=torch.float64)
    y = torch.tensor([0])
    losses = [float(FocalLoss(gamma=g)(x, y)) for g in sorted(gammas)]
    assert all(a >= b * (1 - 1e-12) for a, b in itertools.pairwise(losses))


def _golden() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(GOLDEN.read_text())
    return data


def test_golden_fixture_is_complete() -> None:
    golden = _golden()
    assert golden["torchvision"].startswith("0.29.1")
    assert len(golden["cases"]) == 3 * 3 * 4 * 3


@pytest.mark.parametrize(
    "case", _golden()["cases"], ids=lambda c: "{inputs}-a{alpha}-g{gamma}-{reduction}".format(**c)
)
def test_sigmoid_focal_loss_matches_torchvision(case: dict[str, Any]) -> None:
    inputs = _golden()["inputs"][case["inputs"]]
    x = torch.tensor(inputs["logits"], dtype=torch.float32, requires_grad=True)
    t = torch.tensor(inputs["targets"], dtype=torch.float32)
    loss = sigmoid_focal_loss(
        x, t, alpha=case["alpha"], gamma=case["gamma"], reduction=case["reduction"]
    )
    torch.testing.assert_close(loss, torch.tensor(case["loss"]), atol=1e-6, rtol=1e-6)
    torch.autograd.backward(loss.sum())
    assert x.grad is not None and bool(torch.isfinite(x.grad).all())
    if case["grad"] is not None:
        torch.testing.assert_close(x.grad, torch.tensor(case["grad"]), atol=1e-6, rtol=1e-6)


def test_sigmoid_per_class_alpha_equals_scalar_alpha_when_all_equal() -> None:
    x = torch.randn(10, 3)
    t = (torch.rand(10, 3) < 0.5).float()
    torch.testing.assert_close(
        sigmoid_focal_loss(x, t, alpha=[0.25, 0.25, 0.25]), sigmoid_focal_loss(x, t, alpha=0.25)
    )


def test_sigmoid_rejects_mismatched_shapes_and_bad_alpha() -> None:
    with pytest.raises(ValueError, match="one shape"):
        sigmoid_focal_loss(torch.zeros(3, 2), torch.zeros(3))
    with pytest.raises(ValueError, match="alpha must lie in"):
        sigmoid_focal_loss(torch.zeros(3), torch.zeros(3), alpha=1.5)


def test_softmax_prior_bias_reproduces_the_priors() -> None:
    priors = class_priors([980, 20], smoothing=0.0)
    torch.testing.assert_close(priors, torch.tensor([0.98, 0.02]))
    torch.testing.assert_close(torch.softmax(prior_bias(priors), dim=0), priors)


def test_retinanet_sigmoid_prior_bias() -> None:
    bias = prior_bias([0.01] * 4, kind="sigmoid")
    torch.testing.assert_close(bias, torch.full((4,), -math.log(99)))
    torch.testing.assert_close(torch.sigmoid(bias), torch.full((4,), 0.01))


def test_init_prior_bias_makes_an_untrained_head_predict_the_priors() -> None:
    head = torch.nn.Linear(8, 3)
    torch.nn.init.zeros_(head.weight)
    init_prior_bias_(head, class_priors([70, 25, 5], smoothing=0.0))
    probs = torch.softmax(head(torch.randn(5, 8)), dim=1)
    torch.testing.assert_close(probs, torch.tensor([[0.70, 0.25, 0.05]]).expand(5, 3))
    with pytest.raises(ValueError, match="no bias of shape"):
        init_prior_bias_(torch.nn.Linear(8, 2), [0.5, 0.3, 0.2])


@pytest.mark.parametrize("alpha", [None, 0.25, [0.1, 0.5, 0.9]])
@pytest.mark.parametrize("gamma", [0.5, 2.0])
def test_sigmoid_backward_matches_finite_differences(
    alpha: float | list[float] | None, gamma: float
) -> None:
    generator = torch.Generator().manual_seed(1)
    x = (torch.randn(6, 3, generator=generator, dtype=torch.float64) * 3).requires_grad_(True)
    soft_targets = torch.rand(6, 3, generator=generator, dtype=torch.float64)
    assert torch.autograd.gradcheck(
        lambda z: sigmoid_focal_loss(z, soft_targets, alpha=alpha, gamma=gamma, reduction="sum"),
        (x,),
        eps=1e-6,
        atol=1e-7,
        rtol=1e-5,
    )
