"""`focalloop bench simulation`: what one simulated arm x seed costs on the demo setting (digits,
digit 8 at 2%, 20 initial labels, batches of 20, up to 300 labels), run as the product runs it:
an embedded deployment (SQLite, local store), each cycle by the in-process runner.

Runs are sequential in this process with one torch thread (as `simulate` runs each job), so the
figures are a single core's. Per arm: the median wall time of a run (deployment included), and
the mean seconds per cycle in each stage: trigger (beat's trigger with the snapshot), train,
score_chunk, select, hand_off, ingest, and measure (scoring the test split, the simulation's own
cost). The first run of the process also pays for importing torch's compiler on its first
optimizer (about 1.5 s); the median hides it.
"""

import statistics
import time
from dataclasses import asdict, dataclass
from typing import Any

from services.config import Settings
from services.ml.train import torch_threads
from services.simulation.config import Arm, validate
from services.simulation.demo import demo_config, digits_with_rare_class
from services.simulation.run import run_seed

STAGES = ("trigger", "train", "score_chunk", "select", "hand_off", "ingest", "measure")


@dataclass(frozen=True)
class SimulationBenchRow:
    arm: str
    runs: int
    seconds_per_run: list[float]
    median_seconds_per_run: float
    cycles_per_run: float
    seconds_per_cycle: dict[str, float]  # stage -> mean seconds per cycle

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def run_simulation_bench(
    base: Settings, *, arms: tuple[Arm, ...], seeds: int
) -> list[SimulationBenchRow]:
    dataset = digits_with_rare_class()
    rows = []
    for arm in arms:
        config = demo_config(arms=(arm,), seeds=seeds, workers=1)
        minority = validate(dataset, config)
        walls: list[float] = []
        totals = dict.fromkeys(STAGES, 0.0)
        cycles = 0
        for seed in range(seeds):
            started = time.perf_counter()
            with torch_threads(1):
                run = run_seed(
                    dataset,
                    config,
                    arm,
                    seed,
                    minority,
                    base.model_copy(update={"torch_threads": 1}),
                )
            walls.append(time.perf_counter() - started)
            cycles += run.cycles
            for stage in STAGES:
                totals[stage] += run.seconds.get(stage, 0.0)
        rows.append(
            SimulationBenchRow(
                arm=arm.name,
                runs=seeds,
                seconds_per_run=walls,
                median_seconds_per_run=statistics.median(walls),
                cycles_per_run=cycles / seeds,
                seconds_per_cycle={stage: totals[stage] / max(cycles, 1) for stage in STAGES},
            )
        )
    return rows
