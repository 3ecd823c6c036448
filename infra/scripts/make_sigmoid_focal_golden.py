"""Regenerate tests/fixtures/sigmoid_focal_golden.json from the real torchvision.

focalloop does not depend on torchvision (PyPI's build does not import beside the CPU torch
wheel focalloop installs), so its `sigmoid_focal_loss` is checked against values computed once
by `torchvision.ops.sigmoid_focal_loss` and committed. Run this in a throwaway virtualenv that
has a torch/torchvision pair that imports together, e.g.

    python3 -m venv /tmp/tv && /tmp/tv/bin/pip install torch==2.14.1 torchvision==0.29.1
    /tmp/tv/bin/python infra/scripts/make_sigmoid_focal_golden.py

It imports nothing from focalloop. Inputs are float32, stored as exact decimal reprs.
"""

import json
from pathlib import Path
from typing import Any

import torch
import torchvision
from torchvision.ops import sigmoid_focal_loss

OUT = Path(__file__).resolve().parents[2] / "tests" / "fixtures" / "sigmoid_focal_golden.json"


def _inputs(generator: torch.Generator) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    binary_logits = torch.randn(64, generator=generator) * 4
    binary_logits[:4] = torch.tensor([30.0, -30.0, 1e4, -1e4])  # saturated sigmoid
    binary_targets = (torch.rand(64, generator=generator) < 0.3).float()
    binary_targets[:4] = torch.tensor([1.0, 0.0, 1.0, 1.0])
    multi_logits = torch.randn(16, 5, generator=generator) * 3
    multi_targets = (torch.rand(16, 5, generator=generator) < 0.2).float()
    soft_logits = torch.randn(8, 3, generator=generator) * 2
    soft_targets = torch.rand(8, 3, generator=generator)
    return {
        "binary": (binary_logits, binary_targets),
        "multilabel": (multi_logits, multi_targets),
        "soft": (soft_logits, soft_targets),
    }


def main() -> None:
    generator = torch.Generator().manual_seed(20261122)
    cases: list[dict[str, Any]] = []
    for name, (logits, targets) in _inputs(generator).items():
        for alpha in (0.25, 0.5, -1.0):
            for gamma in (0.0, 0.5, 2.0, 3.5):
                for reduction in ("none", "mean", "sum"):
                    x = logits.clone().requires_grad_(True)
                    loss = sigmoid_focal_loss(
                        x, targets, alpha=alpha, gamma=gamma, reduction=reduction
                    )
                    loss.sum().backward()
                    assert x.grad is not None
                    # torchvision's gradient is NaN where p_t == 1 and gamma < 1; keep only
                    # gradients that are finite everywhere as references.
                    grad = x.grad.tolist() if bool(torch.isfinite(x.grad).all()) else None
                    cases.append(
                        {
                            "inputs": name,
                            "alpha": alpha,
                            "gamma": gamma,
                            "reduction": reduction,
                            "loss": loss.detach().tolist(),
                            "grad": grad,
                        }
                    )
    fixture = {
        "generated_by": "infra/scripts/make_sigmoid_focal_golden.py",
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "inputs": {
            name: {"logits": x.tolist(), "targets": t.tolist()}
            for name, (x, t) in _inputs(torch.Generator().manual_seed(20261122)).items()
        },
        "cases": cases,
    }
    OUT.write_text(json.dumps(fixture, indent=1) + "\n")
    print(f"wrote {len(cases)} cases to {OUT}")


if __name__ == "__main__":
    main()
