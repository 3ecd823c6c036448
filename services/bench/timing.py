"""Timing helpers shared by the benchmarks: alternating runs, medians, ratios."""

import statistics
import time
from collections.abc import Callable

import torch


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_once(work: Callable[[], object], device: torch.device) -> float:
    """Seconds for one call of `work`, with the device's queue drained before and after."""
    _synchronize(device)
    start = time.perf_counter()
    work()
    _synchronize(device)
    return time.perf_counter() - start


def alternating_medians(
    ours: Callable[[], object],
    baseline: Callable[[], object],
    *,
    repeats: int,
    warmup: int,
    device: torch.device,
) -> tuple[float, float]:
    """Median seconds of `ours` and `baseline`, run alternately (order flipped every repeat) so
    drift in clock speed or cache state hits both alike."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    for _ in range(warmup):
        ours()
        baseline()
    ours_times: list[float] = []
    baseline_times: list[float] = []
    for repeat in range(repeats):
        pair = [(ours, ours_times), (baseline, baseline_times)]
        for work, times in pair if repeat % 2 == 0 else reversed(pair):
            times.append(time_once(work, device))
    return statistics.median(ours_times), statistics.median(baseline_times)
