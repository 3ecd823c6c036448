"""`focalloop bench demo-project`: how well `up`'s digits project learns on the product path.

The project's items are the PNG files `up` writes (the 8x8 digits upscaled to 32x32 so a person
can read them); the model trains on them decoded at the project's image size, as the pool does
it. Sizes run on the same seeds: the one people see (32) and the one the project trains on
(8, `DEMO_TRAIN_SIZE`). All ten classes, 20 initial labels, batches of 20, 300 labels, the default
configuration, the simulated annotator.
"""

import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from services.config import Settings
from services.datasets.decode import decode_image
from services.local import write_demo_images
from services.simulation.config import Arm, SimulationConfig
from services.simulation.data import Dataset
from services.simulation.run import run_simulation
from services.simulation.summary import mean_ci95

BUDGET, INIT, BATCH = 300, 20, 20


def demo_project_data(size: int) -> Dataset:
    """`up`'s digit images decoded at `size` pixels (as the pool stores them), in [0, 1]."""
    with tempfile.TemporaryDirectory(prefix="focalloop-demo-images-") as folder:
        _, truth = write_demo_images(Path(folder))
        pixels = [
            decode_image((Path(folder) / f"{item_id}.png").read_bytes(), size=size, channels=1)[0]
            for item_id in truth["item_id"].to_pylist()
        ]
    labels = np.array([int(label) for label in truth["label"].to_pylist()], dtype=np.int64)
    return Dataset(items=(np.stack(pixels) / 255.0).astype(np.float32), labels=labels)


def run_demo_project_bench(
    base: Settings, *, seeds: int, workers: int, sizes: tuple[int, ...]
) -> dict[str, Any]:
    """Macro-F1 (and the rarest test class's F1) at 300 labels per image size, over seeds."""
    config = SimulationConfig(
        arms=(Arm("default", "focal"),),
        seeds=seeds,
        rounds=(BUDGET - INIT) // BATCH,
        batch=BATCH,
        init=INIT,
        budget=BUDGET,
        workers=workers,
        full_pool_reference=False,
    )
    figures: dict[str, Any] = {}
    for size in sizes:
        result = run_simulation(demo_project_data(size), config, base)
        finals = [run.rounds[-1] for run in sorted(result.runs, key=lambda r: r.seed)]
        figures[f"{size}x{size}"] = {
            "labels": [record.labels for record in finals],
            "macro_f1_at_300": mean_ci95([record.macro_f1 for record in finals]),
            "per_seed": [record.macro_f1 for record in finals],
        }
    return figures
