"""Focal losses and the class-weighting / prior-bias helpers that go with them.

Softmax focal loss (Lin et al. 2017) for single-label classification with C classes:

    FL(x, y) = -alpha_y * (1 - p_y) ** gamma_y * log p_y,    p = softmax(x)

computed from `log_softmax` so that logits of magnitude 1e4 and bf16 inputs stay finite. With
gamma = 0 and no alpha it is exactly `F.cross_entropy`.

Alpha is a per-class weight vector (or a scheme computed from label counts), never the binary
`alpha * t + (1 - alpha) * (1 - t)` formula applied to class indices, which turns negative for
indices >= 2.
"""

from collections.abc import Sequence
from typing import Any, Literal, get_args

import torch
import torch.nn.functional as F  # noqa: N812 (the conventional name)
from torch import Tensor, nn

AlphaScheme = Literal["inverse_frequency", "effective_number"]
Reduction = Literal["none", "mean", "sum"]
PriorKind = Literal["softmax", "sigmoid"]

ALPHA_SCHEMES: tuple[str, ...] = get_args(AlphaScheme)
_REDUCTIONS: tuple[str, ...] = get_args(Reduction)


def class_weights(
    counts: Sequence[int] | Tensor, scheme: AlphaScheme, *, beta: float = 0.999
) -> Tensor:
    """Per-class weights from label counts, normalized to sum to the number of classes.

    counts: [C] labeled examples per class (a class with 0 is treated as 1, so it gets the
    largest weight rather than an infinite one).
    scheme: "inverse_frequency" (w_c proportional to 1 / n_c) or "effective_number"
    (Cui et al. 2019: w_c proportional to (1 - beta) / (1 - beta ** n_c); beta -> 1 approaches
    inverse frequency, beta = 0 gives equal weights).
    Returns: [C] float32, all > 0, summing to C.
    """
    n = torch.as_tensor(counts, dtype=torch.float64)
    if n.dim() != 1 or n.numel() == 0:
        raise ValueError(f"counts must be a non-empty 1-d sequence, got shape {tuple(n.shape)}")
    if bool((n < 0).any()) or not bool(torch.isfinite(n).all()):
        raise ValueError("counts must be finite and non-negative")
    n = n.clamp_min(1.0)
    if scheme == "inverse_frequency":
        weights = 1.0 / n
    elif scheme == "effective_number":
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"beta must be in [0, 1), got {beta}")
        weights = (1.0 - beta) / (1.0 - torch.pow(torch.tensor(beta, dtype=torch.float64), n))
    else:
        raise ValueError(f"unknown alpha scheme {scheme!r}; choose one of {ALPHA_SCHEMES}")
    return (weights * (n.numel() / weights.sum())).to(torch.float32)


def class_priors(counts: Sequence[int] | Tensor, *, smoothing: float = 1.0) -> Tensor:
    """Class prior probabilities from label counts with additive (Laplace) smoothing.

    counts: [C] labeled examples per class. Returns: [C] float32, all > 0 when smoothing > 0,
    summing to 1.
    """
    n = torch.as_tensor(counts, dtype=torch.float64)
    if n.dim() != 1 or n.numel() == 0 or bool((n < 0).any()):
        raise ValueError("counts must be a non-empty 1-d sequence of non-negative numbers")
    if smoothing < 0:
        raise ValueError(f"smoothing must be >= 0, got {smoothing}")
    smoothed = n + smoothing
    if float(smoothed.sum()) <= 0:
        raise ValueError("all counts are 0 and smoothing is 0: the priors are undefined")
    return (smoothed / smoothed.sum()).to(torch.float32)


def prior_bias(priors: Sequence[float] | Tensor, *, kind: PriorKind = "softmax") -> Tensor:
    """Output-layer biases that make an untrained model predict `priors`.

    priors: [C] probabilities in (0, 1).
    kind "softmax": b_c = log pi_c, centered to mean 0 (softmax ignores a shared shift), so
        softmax(b) == priors; use with `class_priors(counts)`.
    kind "sigmoid": b_c = log(pi_c / (1 - pi_c)), so sigmoid(b_c) == pi_c; RetinaNet's
        initialization is `prior_bias([0.01] * C, kind="sigmoid")`.
    Returns: [C] float32.
    """
    pi = torch.as_tensor(priors, dtype=torch.float64)
    if pi.dim() != 1 or pi.numel() == 0:
        raise ValueError(f"priors must be a non-empty 1-d sequence, got shape {tuple(pi.shape)}")
    if not bool(torch.isfinite(pi).all()) or bool((pi <= 0).any()):
        raise ValueError("every prior must be finite and > 0")
    if kind == "softmax":
        logp = torch.log(pi / pi.sum())
        bias = logp - logp.mean()
    elif kind == "sigmoid":
        if bool((pi >= 1).any()):
            raise ValueError("sigmoid priors must lie strictly between 0 and 1")
        bias = torch.log(pi) - torch.log1p(-pi)
    else:
        raise ValueError(f"unknown prior kind {kind!r}")
    return bias.to(torch.float32)


def init_prior_bias_(
    layer: nn.Linear, priors: Sequence[float] | Tensor, *, kind: PriorKind = "softmax"
) -> None:
    """Set `layer.bias` in place from class priors (see `prior_bias`). The weights are kept."""
    bias = prior_bias(priors, kind=kind)
    if layer.bias is None or layer.bias.shape != bias.shape:
        raise ValueError(
            f"layer has no bias of shape {tuple(bias.shape)} (out_features={layer.out_features})"
        )
    with torch.no_grad():
        layer.bias.copy_(bias.to(layer.bias.dtype))


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    # bf16/fp16 logits lose too much precision in log_softmax and pow: compute in float32.
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


def _one_minus_pt_safe(one_minus_pt: Tensor) -> Tensor:
    # d/dq q**gamma = gamma * q**(gamma - 1) is infinite at q = 0 for gamma < 1 (and 0 * inf is
    # NaN in the chain rule). The true limit of the whole loss gradient is 0 there, so clamping q
    # to the smallest normal number keeps it finite while changing the loss by < 1e-38.
    return one_minus_pt.clamp_min(torch.finfo(one_minus_pt.dtype).tiny)


def _as_class_vector(value: Sequence[float] | Tensor, name: str) -> Tensor:
    vector = torch.as_tensor(value, dtype=torch.float32).detach().clone()
    if vector.dim() != 1 or vector.numel() == 0:
        raise ValueError(f"{name} must be a scalar or a 1-d per-class vector")
    if not bool(torch.isfinite(vector).all()) or bool((vector < 0).any()):
        raise ValueError(f"{name} must be finite and >= 0, got {vector.tolist()}")
    return vector


class FocalLoss(nn.Module):
    """Multiclass softmax focal loss.

    gamma: focusing strength >= 0, a float or a per-class vector [C] (gamma_y of the true class).
    alpha: None (no weighting), a per-class weight vector [C] (>= 0), or a scheme name
        ("inverse_frequency", "effective_number") computed from `class_counts` [C].
    beta: the effective-number hyperparameter (Cui et al. 2019), used by that scheme only.
    reduction: "none" -> [N]; "sum"; "mean" -> sum(alpha_y * FL) / sum(alpha_y) over examples
        whose target is not `ignore_index`, the same weighted mean as `F.cross_entropy(weight=)`,
        so gamma = 0 reproduces cross-entropy with or without alpha.
    ignore_index: targets with this value contribute nothing.

    forward(logits [N, C] any float dtype, targets [N] integer class indices) -> loss, float32
    (float64 for float64 logits). Targets outside [0, C) are refused with a ValueError (on CPU;
    on CUDA the gather's device-side check fires instead, to avoid a host sync per batch).
    """

    gamma_per_class: Tensor | None
    alpha_per_class: Tensor | None

    def __init__(
        self,
        gamma: float | Sequence[float] | Tensor = 2.0,
        alpha: Sequence[float] | Tensor | AlphaScheme | None = None,
        *,
        class_counts: Sequence[int] | Tensor | None = None,
        beta: float = 0.999,
        reduction: Reduction = "mean",
        ignore_index: int = -100,
    ) -> None:
        super().__init__()
        if reduction not in _REDUCTIONS:
            raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
        self.reduction: Reduction = reduction
        self.ignore_index = ignore_index

        if isinstance(gamma, int | float):
            if not (float(gamma) >= 0.0 and float(gamma) < float("inf")):
                raise ValueError(f"gamma must be finite and >= 0, got {gamma}")
            self.gamma = float(gamma)
            self.register_buffer("gamma_per_class", None)
        else:
            vector = _as_class_vector(gamma, "gamma")
            self.gamma = float("nan")
            self.register_buffer("gamma_per_class", vector)

        alpha_vector: Tensor | None
        if alpha is None:
            alpha_vector = None
        elif isinstance(alpha, str):
            if class_counts is None:
                raise ValueError(f"alpha={alpha!r} needs class_counts (labels per class)")
            alpha_vector = class_weights(class_counts, alpha, beta=beta)
        else:
            alpha_vector = _as_class_vector(alpha, "alpha")
        self.register_buffer("alpha_per_class", alpha_vector)

        sizes = {v.numel() for v in (self.gamma_per_class, alpha_vector) if v is not None}
        if len(sizes) > 1:
            raise ValueError(f"per-class gamma and alpha disagree on the class count: {sizes}")

    @property
    def n_classes(self) -> int | None:
        """C when a per-class gamma or alpha fixes it, else None (any C is accepted)."""
        for vector in (self.gamma_per_class, self.alpha_per_class):
            if vector is not None:
                return vector.numel()
        return None

    def forward(self, logits: Tensor, targets: Tensor) -> Tensor:
        if logits.dim() != 2:
            raise ValueError(f"logits must be [N, C], got shape {tuple(logits.shape)}")
        n_items, n_classes = logits.shape
        if targets.shape != (n_items,):
            raise ValueError(f"targets must be [N] = [{n_items}], got shape {tuple(targets.shape)}")
        if targets.dtype.is_floating_point or targets.dtype == torch.bool:
            raise ValueError(f"targets must be integer class indices, got {targets.dtype}")
        expected = self.n_classes
        if expected is not None and expected != n_classes:
            raise ValueError(f"logits have {n_classes} classes, the loss was built for {expected}")

        valid = targets != self.ignore_index
        safe_targets = targets.where(valid, 0).long()
        if not logits.is_cuda and n_items > 0:
            lowest, highest = torch.aminmax(safe_targets)
            if int(lowest) < 0 or int(highest) >= n_classes:
                bad = int(lowest) if int(lowest) < 0 else int(highest)
                raise ValueError(f"target {bad} is not a class index in [0, {n_classes})")

        compute_dtype = _compute_dtype(logits.dtype)
        gamma: float | Tensor = self.gamma
        if self.gamma_per_class is not None:
            gamma = self.gamma_per_class.to(compute_dtype)[safe_targets]
        weight: Tensor | None = None
        if self.alpha_per_class is not None:
            weight = self.alpha_per_class.to(compute_dtype)[safe_targets].where(valid, 0.0)
        elif logits.is_cuda or not bool(valid.all()):
            # On CUDA, asking whether anything is ignored would sync the host every batch.
            weight = valid.to(compute_dtype)
        else:
            weight = None  # the common case: nothing ignored, no weights, no extra pass

        loss: Tensor = _SoftmaxFocal.apply(  # type: ignore[no-untyped-call]
            logits, safe_targets, gamma, weight
        )
        if self.reduction == "none":
            return loss
        if self.reduction == "sum":
            return loss.sum()
        if weight is None:
            return loss.mean()
        return loss.sum() / weight.sum()


class _SoftmaxFocal(torch.autograd.Function):
    """Per-example softmax focal loss with a hand-derived backward.

    Autograd through the elementwise chain costs a dozen extra passes over [N]; the analytic
    gradient needs one pass over [N, C], like cross-entropy's own backward. With p = p_y,
    q = 1 - p, l = log p and w the example weight, L = -w q**g l and

        dL/dl = -w q**g (1 + g p r),   r = -l / q  (-> 1 as q -> 0, so finite for any g >= 0)
        dL/dx = dL/dl * (onehot(y) - softmax(x))
    """

    @staticmethod
    def forward(
        ctx: Any,
        logits: Tensor,
        targets: Tensor,
        gamma: float | Tensor,
        weight: Tensor | None,
    ) -> Tensor:
        log_probs = F.log_softmax(logits.to(_compute_dtype(logits.dtype)), dim=1)
        log_pt = log_probs.gather(1, targets.unsqueeze(1)).squeeze(1)
        one_minus_pt = -torch.expm1(log_pt)
        modulation = _one_minus_pt_safe(one_minus_pt).pow(gamma)
        loss = modulation * log_pt
        loss = loss.neg_() if weight is None else loss.mul_(weight).neg_()
        # save_for_backward takes None for an absent weight (torch documents it).
        ctx.save_for_backward(log_probs, targets, log_pt, one_minus_pt, modulation, weight)
        ctx.gamma = gamma
        ctx.input_dtype = logits.dtype
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad_loss: Tensor) -> tuple[Tensor, None, None, None]:
        log_probs, targets, log_pt, one_minus_pt, modulation, weight = ctx.saved_tensors
        gamma: float | Tensor = ctx.gamma
        # dL/dl, then scaled by the incoming gradient: one value per example, [N].
        d_log_pt = grad_loss.to(log_pt.dtype) * modulation
        if not (isinstance(gamma, float) and gamma == 0.0):
            safe_q = _one_minus_pt_safe(one_minus_pt)
            ratio = torch.where(one_minus_pt > 0, -log_pt / safe_q, 1.0)
            d_log_pt = d_log_pt * (1 + gamma * torch.exp(log_pt) * ratio)
        if weight is not None:
            d_log_pt = d_log_pt * weight
        d_log_pt = d_log_pt.neg_().unsqueeze(1)
        grad_logits = torch.exp(log_probs).mul_(d_log_pt.neg())
        grad_logits.scatter_add_(1, targets.unsqueeze(1), d_log_pt)
        return grad_logits.to(ctx.input_dtype), None, None, None


def sigmoid_focal_loss(
    inputs: Tensor,
    targets: Tensor,
    alpha: float | Sequence[float] | Tensor | None = 0.25,
    gamma: float = 2.0,
    reduction: Reduction = "none",
) -> Tensor:
    """Sigmoid focal loss for binary and multi-label targets (RetinaNet's formulation).

    inputs: logits of any shape [...]; targets: same shape, values in [0, 1] (0/1 labels, soft
    targets allowed). Per element, with p = sigmoid(x) and p_t = p * t + (1 - p) * (1 - t):

        loss = alpha_t * (1 - p_t) ** gamma * BCE(x, t)
        alpha_t = alpha * t + (1 - alpha) * (1 - t)

    alpha: a float in [0, 1], a per-class vector broadcast along the last dimension, or None / a
    negative float for no weighting (torchvision's convention). Here alpha_t is correct because
    t is a binary target per element, not a class index.
    reduction: "none" (shape of inputs), "mean" over all elements, or "sum".
    Matches `torchvision.ops.sigmoid_focal_loss` to 1e-6 (tested on a golden fixture); unlike it,
    gradients stay finite for gamma in (0, 1) when p_t reaches 1. Eager, it costs 2-3x BCE on
    large tensors (unfused elementwise passes); under `torch.compile` it matches or beats BCE
    (BENCHMARKS.md).
    """
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    if inputs.shape != targets.shape:
        raise ValueError(
            f"inputs and targets must have one shape, got {tuple(inputs.shape)} "
            f"and {tuple(targets.shape)}"
        )
    if not (gamma >= 0.0 and gamma < float("inf")):
        raise ValueError(f"gamma must be finite and >= 0, got {gamma}")
    logits = inputs.to(_compute_dtype(inputs.dtype))
    target = targets.to(logits.dtype)

    alpha_t: Tensor | None = None
    if isinstance(alpha, Tensor | Sequence):
        alpha_c = torch.as_tensor(alpha, dtype=logits.dtype, device=logits.device)
        if bool(((alpha_c < 0) | (alpha_c > 1)).any()):
            raise ValueError("per-class alpha values must lie in [0, 1]")
        alpha_t = target * (2 * alpha_c - 1) + (1 - alpha_c)  # = alpha t + (1 - alpha)(1 - t)
    elif alpha is not None and alpha >= 0:
        if alpha > 1:
            raise ValueError(f"alpha must lie in [0, 1] (or be negative for none), got {alpha}")
        # alpha t + (1 - alpha)(1 - t), rearranged so it costs one new buffer, not four.
        alpha_t = target.mul(2 * alpha - 1).add_(1 - alpha)

    if gamma == 0.0:
        loss = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
        if alpha_t is not None:
            loss = loss * alpha_t
    else:
        loss = _SigmoidFocal.apply(logits, target, alpha_t, float(gamma))  # type: ignore[no-untyped-call]

    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    return loss


class _SigmoidFocal(torch.autograd.Function):
    """Elementwise sigmoid focal loss with a hand-derived backward and in-place arithmetic.

    On large tensors the cost is dominated by allocating (page-faulting) fresh [N, C] buffers,
    not by arithmetic: autograd through the plain formula allocates about 40 of them per
    forward+backward, this about 9. With p = sigmoid(x), s = 1 - 2t, q = 1 - p_t = p s + t,
    m = q**g and b = BCE(x, t):

        L = a m b,   dL/dx = a [m (p - t) + g q**(g - 1) s p (1 - p) b]

    where q**(g - 1) = m / q is evaluated at max(q, tiny), finite for every g >= 0.
    """

    @staticmethod
    def forward(
        ctx: Any, logits: Tensor, target: Tensor, alpha_t: Tensor | None, gamma: float
    ) -> Tensor:
        prob = torch.sigmoid(logits)
        sign = torch.mul(target, -2).add_(1)
        safe_q = torch.addcmul(target, prob, sign).clamp_min_(torch.finfo(logits.dtype).tiny)
        modulation = safe_q.pow(gamma)
        bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
        loss = bce * modulation
        if alpha_t is not None:
            loss.mul_(alpha_t)
        ctx.save_for_backward(prob, sign, safe_q, modulation, bce, target, alpha_t)
        ctx.gamma = gamma
        ctx.input_dtype = logits.dtype
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad_loss: Tensor) -> tuple[Tensor, None, None, None]:
        prob, sign, safe_q, modulation, bce, target, alpha_t = ctx.saved_tensors
        # g q^(g-1) s p (1 - p) b, built in one buffer: q^(g-1) = m / q.
        focus = torch.div(modulation, safe_q).mul_(ctx.gamma).mul_(bce).mul_(sign).mul_(prob)
        focus.addcmul_(focus, prob, value=-1.0)
        grad = torch.sub(prob, target).mul_(modulation).add_(focus)
        if alpha_t is not None:
            grad.mul_(alpha_t)
        grad.mul_(grad_loss)
        return grad.to(ctx.input_dtype), None, None, None
