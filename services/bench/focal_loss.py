"""`focalloop bench focal-loss`: forward+backward time of the focal losses vs their baselines.

Same logits for both sides. Rows: "focal" = FocalLoss(gamma=2) vs F.cross_entropy ("CE");
"focal+alpha" = FocalLoss(gamma=2, per-class alpha) vs F.cross_entropy(weight=alpha);
"sigmoid focal" = sigmoid_focal_loss(alpha=0.25, gamma=2) vs F.binary_cross_entropy_with_logits
("BCE") on multi-hot targets; "sigmoid focal compiled" = the same function under torch.compile
(an opt-in any user can apply; its one-off compile time is reported separately).
"""

import functools
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812
from torch import Tensor

from services.bench.timing import alternating_medians
from services.ml.losses import FocalLoss, sigmoid_focal_loss

LossFn = Callable[[Tensor, Tensor], Tensor]


@dataclass(frozen=True)
class LossBenchRow:
    """Median forward+backward milliseconds over `repeats` alternating runs; ratio = ours/base."""

    name: str
    baseline: str
    n: int
    classes: int
    ours_ms: float
    baseline_ms: float
    ratio: float
    repeats: int
    compile_seconds: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _forward_backward(loss_fn: LossFn, logits: Tensor, targets: Tensor) -> Callable[[], object]:
    def run() -> object:
        x = logits.detach().requires_grad_(True)
        torch.autograd.backward(loss_fn(x, targets))
        return x.grad

    return run


def run_focal_loss_bench(
    *,
    n: int = 65_536,
    classes: Sequence[int] = (10, 1_000),
    repeats: int = 7,
    warmup: int = 2,
    device: torch.device | None = None,
    compiled: bool = True,
    seed: int = 0,
) -> list[LossBenchRow]:
    """Rows for every (loss, C) pair; logits ~ N(0, 3^2), float32, on `device` (CPU default)."""
    target_device = device or torch.device("cpu")
    generator = torch.Generator().manual_seed(seed)
    rows: list[LossBenchRow] = []
    for n_classes in classes:
        logits = (torch.randn(n, n_classes, generator=generator) * 3).to(target_device)
        labels = torch.randint(0, n_classes, (n,), generator=generator).to(target_device)
        multi_hot = (torch.rand(n, n_classes, generator=generator) < 0.1).float()
        multi_hot = multi_hot.to(target_device)
        alpha = torch.linspace(0.2, 2.0, n_classes, device=target_device)

        def sigmoid_focal(x: Tensor, t: Tensor) -> Tensor:
            return sigmoid_focal_loss(x, t, alpha=0.25, gamma=2.0, reduction="mean")

        def bce(x: Tensor, t: Tensor) -> Tensor:
            return F.binary_cross_entropy_with_logits(x, t)

        cases: list[tuple[str, LossFn, str, LossFn, Tensor]] = [
            ("focal", FocalLoss(gamma=2.0), "CE", F.cross_entropy, labels),
            (
                "focal+alpha",
                FocalLoss(gamma=2.0, alpha=alpha),
                "CE+weight",
                functools.partial(F.cross_entropy, weight=alpha),
                labels,
            ),
            ("sigmoid focal", sigmoid_focal, "BCE", bce, multi_hot),
        ]
        compile_seconds: dict[str, float] = {}
        if compiled:
            compiled_fn: LossFn = torch.compile(sigmoid_focal, dynamic=False)
            started = time.perf_counter()
            _forward_backward(compiled_fn, logits, multi_hot)()
            compile_seconds["sigmoid focal compiled"] = time.perf_counter() - started
            cases.append(("sigmoid focal compiled", compiled_fn, "BCE", bce, multi_hot))
        for name, ours, baseline_name, baseline, targets in cases:
            ours_s, base_s = alternating_medians(
                _forward_backward(ours, logits, targets),
                _forward_backward(baseline, logits, targets),
                repeats=repeats,
                warmup=warmup,
                device=target_device,
            )
            rows.append(
                LossBenchRow(
                    name=name,
                    baseline=baseline_name,
                    n=n,
                    classes=n_classes,
                    ours_ms=ours_s * 1e3,
                    baseline_ms=base_s * 1e3,
                    ratio=ours_s / base_s,
                    repeats=repeats,
                    compile_seconds=compile_seconds.get(name),
                )
            )
    return rows
