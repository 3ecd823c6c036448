"""Which device each worker process uses, decided without touching CUDA: the pool forks after
this, and a CUDA context must never cross a fork.

On a GPU host a worker serving the gpu queue runs one process per visible GPU, process i pinned
to GPU i (its `CUDA_VISIBLE_DEVICES` is set in the child before torch first asks for CUDA, so
"cuda" there means its own GPU). On a CPU-only host the gpu queue's concurrency is a setting.
"""

import os
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass

from services.config import Settings, pin_visible_gpu, visible_gpu_setting
from services.errors import DeviceUnavailable


@dataclass(frozen=True)
class WorkerPlan:
    """concurrency: pool processes; gpus: process i uses gpus[i % len(gpus)] (empty: CPU)."""

    concurrency: int
    gpus: tuple[str, ...] = ()

    def gpu_of(self, index: int) -> str | None:
        """The GPU pool process `index` (0-based) is pinned to, or None on the CPU."""
        return self.gpus[index % len(self.gpus)] if self.gpus else None


def visible_gpus() -> list[str]:
    """GPUs this host lets us use, found without initializing CUDA: CUDA_VISIBLE_DEVICES when
    set (ids or UUIDs; empty or -1 = none), else one per line of `nvidia-smi -L`."""
    given = visible_gpu_setting()
    if given is not None:
        listed = [part.strip() for part in given.split(",") if part.strip()]
        return [] if listed[:1] == ["-1"] else listed
    if shutil.which("nvidia-smi") is None:
        return []
    try:
        listing = subprocess.run(
            ["nvidia-smi", "-L"], capture_output=True, text=True, timeout=10, check=True
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [str(i) for i, line in enumerate(listing.splitlines()) if line.startswith("GPU ")]


def plan_workers(
    *,
    queues: Sequence[str],
    concurrency: int | None,
    settings: Settings,
    gpus: Sequence[str],
    cpus: int,
) -> WorkerPlan:
    """The pool for a worker serving `queues` on a host with these visible `gpus` and `cpus`
    cores. `concurrency` (the command's option) wins where given."""
    if "gpu" not in queues or settings.device == "cpu" or not gpus:
        if "gpu" in queues and settings.device == "cuda":
            raise DeviceUnavailable(
                "FOCALLOOP_DEVICE=cuda but this host shows no GPU (nvidia-smi lists none, or "
                "CUDA_VISIBLE_DEVICES hides them all); set FOCALLOOP_DEVICE=cpu or auto"
            )
        default = settings.gpu_queue_concurrency if "gpu" in queues else None
        return WorkerPlan(concurrency=concurrency or default or cpus)
    # One process per GPU: a second process on the same GPU would fight for its memory.
    return WorkerPlan(concurrency=concurrency or len(gpus), gpus=tuple(gpus))


def pin(plan: WorkerPlan, index: int) -> None:
    """Pin this process (pool process `index`) to its GPU, if the plan gives it one. Must run
    before anything asks torch for CUDA in this process."""
    gpu = plan.gpu_of(index)
    if gpu is not None:
        pin_visible_gpu(gpu)


def host_cpus() -> int:
    return os.cpu_count() or 1
