"""The worker's device plan, on faked device lists: one process per visible GPU, each pinned to
its own; the CPU when told or when there is none; a clear refusal when CUDA is demanded and
absent; CUDA untouched while planning (the pool forks after it)."""

import os
import subprocess
import sys

import pytest

from services.config import Settings
from services.errors import DeviceUnavailable
from workers.devices import WorkerPlan, pin, plan_workers, visible_gpus


def _plan(queues: list[str], *, device: str, gpus: list[str], **options: object) -> WorkerPlan:
    settings = Settings(device=device, **options)  # type: ignore[arg-type]
    concurrency = options.get("concurrency")
    return plan_workers(
        queues=queues,
        concurrency=concurrency if isinstance(concurrency, int) else None,
        settings=settings,
        gpus=gpus,
        cpus=16,
    )


def test_a_gpu_worker_runs_one_process_per_visible_gpu_each_pinned() -> None:
    plan = _plan(["gpu", "io"], device="auto", gpus=["0", "1", "2", "3"])
    assert (plan.concurrency, plan.gpus) == (4, ("0", "1", "2", "3"))
    assert [plan.gpu_of(index) for index in range(6)] == ["0", "1", "2", "3", "0", "1"]
    assert _plan(["gpu"], device="cuda", gpus=["GPU-a"]).gpus == ("GPU-a",)


def test_the_cpu_when_told_or_when_no_gpu_is_visible() -> None:
    told = _plan(["gpu"], device="cpu", gpus=["0", "1"])
    assert (told.concurrency, told.gpus, told.gpu_of(0)) == (16, (), None)
    none = _plan(["gpu"], device="auto", gpus=[])
    assert (none.concurrency, none.gpus) == (16, ())
    assert _plan(["io"], device="auto", gpus=["0"]).gpus == ()  # io tasks need no GPU


def test_the_gpu_queue_concurrency_is_a_setting_on_cpu_hosts() -> None:
    assert _plan(["gpu", "io"], device="auto", gpus=[], gpu_queue_concurrency=3).concurrency == 3
    # It applies to the gpu queue only; an io worker still uses every core.
    assert _plan(["io"], device="auto", gpus=[], gpu_queue_concurrency=3).concurrency == 16


def test_cuda_demanded_on_a_host_without_a_gpu_is_refused_at_once() -> None:
    with pytest.raises(DeviceUnavailable, match="FOCALLOOP_DEVICE=cuda but this host shows no GPU"):
        _plan(["gpu"], device="cuda", gpus=[])


def test_visible_gpus_honour_cuda_visible_devices(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2, GPU-7f")
    assert visible_gpus() == ["2", "GPU-7f"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "-1")
    assert visible_gpus() == []
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert visible_gpus() == []


def test_pinning_sets_the_process_s_only_visible_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    pin(WorkerPlan(concurrency=2, gpus=("0", "1")), 1)
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "1"
    pin(WorkerPlan(concurrency=2), 1)  # a CPU plan changes nothing
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "1"


@pytest.mark.timeout(120)
def test_planning_a_gpu_worker_leaves_cuda_uninitialized() -> None:
    """What `focalloop worker` does before the pool forks, in a fresh interpreter."""
    script = (
        "import torch\n"
        "from services.config import Settings\n"
        "from workers.devices import plan_workers, visible_gpus\n"
        "plan = plan_workers(queues=['gpu'], concurrency=None, settings=Settings(),\n"
        "                    gpus=visible_gpus() or ['0', '1'], cpus=2)\n"
        "import workers.tasks\n"
        "workers.tasks.use_plan(plan, forks=True)\n"
        "print(plan.concurrency, torch.cuda.is_initialized())\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=100, check=True
    )
    assert out.stdout.split()[-1] == "False", out.stderr
