"""`focalloop bench device`: training and scoring throughput of the product's own `train` and
`score` per device and precision, against the CPU in float32 measured in the same run.

Workloads (random data: speed does not depend on what the model learns):
    mlp   [n, 128] float32 features, MLP 128 -> 256 -> 256 -> 10 (the `bench score` model)
    cnn   [n, 3, 32, 32] float32 images, the default CNN (32, 64 channels, 128-d embedding)
Stages:
    train  `train()` for a fixed number of epochs (no validation split, no early stop,
           no calibration), batch 64 as the product trains; items/s = epochs x n / seconds
    score  `score()` over the pool in batches of 4,096; items/s = n / seconds
Each (workload, stage, device, precision) is the median of `repeats` timed runs after one
warm-up run (CUDA context, cuDNN autotuning and allocator growth are one-off costs).
"""

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray

from services.ml.nets import ModelSpec, build_model
from services.ml.score import score
from services.ml.train import AutocastChoice, DeviceChoice, LossSpec, TrainConfig, train

WORKLOADS: dict[str, ModelSpec] = {
    "mlp": ModelSpec(kind="mlp", input_shape=(128,), n_classes=10, hidden=(256, 256)),
    "cnn": ModelSpec(kind="cnn", input_shape=(3, 32, 32), n_classes=10),
}


@dataclass(frozen=True)
class DeviceBenchRow:
    """items_per_s: median over `repeats`; vs_cpu: items_per_s / the CPU float32 row's."""

    workload: str
    stage: str
    device: str
    precision: str
    items: int
    items_per_s: float
    vs_cpu: float
    repeats: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _median_seconds(work: Callable[[], object], repeats: int, device: str) -> float:
    """Median wall seconds of `work` after one warm-up call, the CUDA queue drained each time."""
    work()
    times = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        work()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _data(spec: ModelSpec, n: int) -> tuple[NDArray[np.float32], NDArray[np.int64]]:
    rng = np.random.default_rng(0)
    items = rng.standard_normal((n, *spec.input_shape), dtype=np.float32)
    return items, rng.integers(0, spec.n_classes, n)


def _train_seconds(
    spec: ModelSpec, n: int, epochs: int, device: str, precision: str, repeats: int
) -> float:
    items, labels = _data(spec, n)
    config = TrainConfig(
        max_epochs=epochs,
        patience=epochs + 1,
        val_fraction=0.0,
        calibrate=False,
        device=_device(device),
        autocast=_autocast(precision),
    )
    return _median_seconds(
        lambda: train(items=items, labels=labels, spec=spec, loss=LossSpec(), config=config),
        repeats,
        device,
    )


def _score_seconds(spec: ModelSpec, n: int, device: str, precision: str, repeats: int) -> float:
    items, _ = _data(spec, n)
    model = build_model(spec, seed=0)
    return _median_seconds(
        lambda: score(
            model, items, spec=spec, device=_device(device), autocast=_autocast(precision)
        ),
        repeats,
        device,
    )


def _device(name: str) -> DeviceChoice:
    return "cuda" if name == "cuda" else "cpu"


def _autocast(precision: str) -> AutocastChoice:
    return "bf16" if precision == "bf16" else "off"


def run_device_bench(
    *,
    devices: Sequence[str],
    train_items: int = 8_192,
    score_items: int = 65_536,
    epochs: int = 3,
    repeats: int = 3,
) -> list[DeviceBenchRow]:
    """Rows for every workload x stage x (device, precision), the CPU float32 row first.

    devices: "cpu" always runs (the baseline); "cuda" adds float32 and bf16 rows.
    """
    settings = [("cpu", "fp32")]
    if "cuda" in devices:
        settings += [("cuda", "fp32"), ("cuda", "bf16")]
    rows: list[DeviceBenchRow] = []
    for workload, spec in WORKLOADS.items():
        for stage in ("train", "score"):
            baseline: float | None = None
            for device, precision in settings:
                if stage == "train":
                    seconds = _train_seconds(spec, train_items, epochs, device, precision, repeats)
                    rate = epochs * train_items / seconds
                    items = train_items
                else:
                    seconds = _score_seconds(spec, score_items, device, precision, repeats)
                    rate = score_items / seconds
                    items = score_items
                baseline = baseline or rate
                rows.append(
                    DeviceBenchRow(
                        workload=workload,
                        stage=stage,
                        device=device,
                        precision=precision,
                        items=items,
                        items_per_s=rate,
                        vs_cpu=rate / baseline,
                        repeats=repeats,
                    )
                )
    return rows
