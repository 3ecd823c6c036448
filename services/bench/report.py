"""What every benchmark writes with `--json PATH`: its rows plus the environment it ran in."""

import json
import os
import platform
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch


def environment(device: torch.device) -> dict[str, Any]:
    """Facts that decide whether two benchmark runs are comparable."""
    import numpy
    import sklearn

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "scikit-learn": sklearn.__version__,
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }


def write_json(
    path: Path,
    *,
    benchmark: str,
    device: torch.device,
    rows: Sequence[dict[str, Any]],
    summary: dict[str, Any] | None = None,
    **extra: str,
) -> None:
    """Write `{benchmark, command, environment, rows, summary}` and any `extra` keys (where the
    run took data from); each ratio keeps its own key."""
    payload = {
        "benchmark": benchmark,
        "command": " ".join(["focalloop", *sys.argv[1:]]),
        "environment": environment(device),
        "rows": list(rows),
        "summary": summary or {},
        **extra,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2) + "\n")
