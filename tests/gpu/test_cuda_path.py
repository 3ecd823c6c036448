"""The CUDA path: the focal loss, training (bf16 autocast), scoring, checkpoints and the product's
cycle on a GPU, each checked against the CPU.

Marked `gpu` and deselected by `make test` (pyproject's addopts): CI has no GPU. Run on a CUDA
machine with `pytest -m gpu tests/gpu` (benchmarks/gpu/run.sh does). Without CUDA these tests
fail rather than skip: a GPU run that silently fell back to the CPU would prove nothing.
"""

from pathlib import Path

import numpy as np
import pytest
import torch
from numpy.typing import NDArray

from services.config import Settings
from services.ml.checkpoint import load_checkpoint, save_checkpoint
from services.ml.losses import FocalLoss, sigmoid_focal_loss
from services.ml.nets import ModelSpec, spec_for_inputs
from services.ml.score import score
from services.ml.train import DeviceChoice, LossSpec, TrainConfig, TrainResult, train
from services.simulation.config import Arm, SimulationConfig
from services.simulation.data import Dataset
from services.simulation.run import run_simulation
from tests.conftest import Digits

pytestmark = [pytest.mark.gpu, pytest.mark.timeout(300)]


@pytest.fixture(scope="module", autouse=True)
def cuda_present() -> None:
    assert torch.cuda.is_available(), "the gpu tests need a CUDA device"


def _fit(
    digits: Digits, spec: ModelSpec, device: DeviceChoice, items: NDArray[np.float32]
) -> TrainResult:
    config = TrainConfig(max_epochs=40, patience=8, device=device)
    return train(
        items=items[:1000], labels=digits.labels[:1000], spec=spec, loss=LossSpec(), config=config
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_focal_loss_and_gradients_match_the_cpu(dtype: torch.dtype) -> None:
    generator = torch.Generator().manual_seed(0)
    logits = (torch.randn(4096, 10, generator=generator) * 4).to(dtype)
    targets = torch.randint(0, 10, (4096,), generator=generator)
    loss = FocalLoss(gamma=2.0, alpha="inverse_frequency", class_counts=[400] * 9 + [40])
    values, gradients = [], []
    for device in ("cpu", "cuda"):
        leaf = logits.detach().to(device).requires_grad_(True)
        value = loss.to(device)(leaf, targets.to(device))
        value.backward()
        assert leaf.grad is not None
        values.append(value.detach().float().cpu())
        gradients.append(leaf.grad.float().cpu())
    assert torch.allclose(values[0], values[1], rtol=1e-4, atol=1e-6)
    # bf16 gradients carry 8 bits of mantissa: compare at that precision.
    tolerance = 1e-5 if dtype == torch.float32 else 1e-2
    assert torch.allclose(gradients[0], gradients[1], rtol=tolerance, atol=tolerance)
    multi = torch.randn(2048, 20, generator=generator)
    multi_targets = (torch.rand(2048, 20, generator=generator) < 0.1).float()
    cpu = sigmoid_focal_loss(multi, multi_targets)
    gpu = sigmoid_focal_loss(multi.cuda(), multi_targets.cuda()).cpu()
    assert torch.allclose(cpu, gpu, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_training_on_cuda_with_bf16_learns_as_on_the_cpu(digits: Digits, kind: str) -> None:
    if kind == "mlp":
        spec, items = spec_for_inputs((64,), 10, hidden=(64,)), digits.features
    else:
        spec, items = spec_for_inputs((8, 8), 10), digits.images
    accuracy = {}
    devices: tuple[DeviceChoice, ...] = ("cpu", "cuda")
    for device in devices:
        result = _fit(digits, spec, device, items)
        assert result.device.startswith(device)
        assert result.autocast is (device == "cuda")  # "auto": bf16 on CUDA only
        assert next(result.model.parameters()).device.type == "cpu"
        probs = score(result.model, items[1000:], spec=spec, device=device).probs
        accuracy[device] = float(np.mean(probs.argmax(1) == digits.labels[1000:]))
    assert accuracy["cuda"] > 0.85, accuracy
    assert abs(accuracy["cuda"] - accuracy["cpu"]) < 0.05, accuracy


def test_bf16_scoring_agrees_with_float32_and_checkpoints_cross_devices(
    digits: Digits, tmp_path: Path
) -> None:
    spec = spec_for_inputs((8, 8), 10)
    result = _fit(digits, spec, "cuda", digits.images)
    pool = np.tile(digits.images, (20, 1, 1))  # ~36k items: many 4096-item batches
    exact = score(result.model, pool, spec=spec, device="cpu", autocast="off")
    half = score(result.model, pool, spec=spec, device="cuda", autocast="bf16")
    assert half.probs.shape == exact.probs.shape and half.embeddings.shape == exact.embeddings.shape
    assert np.allclose(half.probs.sum(1), 1.0, atol=1e-4)
    assert float(np.mean(half.probs.argmax(1) == exact.probs.argmax(1))) > 0.98
    assert float(np.abs(half.probs - exact.probs).max()) < 0.1
    save_checkpoint(
        tmp_path / "ckpt",
        model=result.model,
        spec=spec,
        labels=[str(c) for c in range(10)],
        loss=LossSpec(),
        temperature=result.temperature,
    )
    loaded = load_checkpoint(tmp_path / "ckpt")
    again = score(loaded.model, pool, spec=spec, device="cpu", autocast="off")
    assert np.array_equal(again.probs, exact.probs)


def test_the_products_cycle_runs_on_cuda(digits: Digits) -> None:
    data = Dataset(digits.features[:600], digits.labels[:600])
    config = SimulationConfig(
        arms=(Arm("default", "focal"),),
        seeds=1,
        rounds=3,
        batch=20,
        init=20,
        rare_class=3,
        workers=1,
        full_pool_reference=False,
    )
    (run,) = run_simulation(data, config, Settings(device="cuda")).runs
    assert [r.labels for r in run.rounds] == [20, 40, 60, 80]
    assert run.rounds[-1].macro_f1 > 0.5
