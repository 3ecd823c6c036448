"""What a simulated run records: one row per cycle that trained a model (the model that ships
after it, measured on the seed's test split), and the run's outcome."""

from dataclasses import dataclass, field
from typing import Any

from services.simulation.config import Arm, SimulationConfig

METRICS = ("minority_f1", "minority_recall", "macro_f1", "ece")


@dataclass(frozen=True)
class RoundRecord:
    """After a cycle: labels spent so far (the dataset version it trained on: initial labels
    and every answer, evaluation items included), the current model's test metrics, the
    minority labels among them, its validation minority F1 (None without a split), and every
    class's test F1 [C] (for figures over several rare classes)."""

    labels: int
    minority_f1: float
    minority_recall: float
    macro_f1: float
    ece: float
    minority_labels: int
    val_minority_f1: float | None
    per_class_f1: tuple[float, ...] = ()


@dataclass(frozen=True)
class SeedRun:
    """One arm on one seed. seconds: wall time per stage of the product's cycle, summed over
    the run (trigger = beat's trigger with the snapshot; measure = scoring the test split)."""

    arm: Arm
    seed: int
    rounds: list[RoundRecord]
    stop_reason: str
    noisy_labels: int
    cycles: int = 0
    seconds: dict[str, float] = field(default_factory=dict)


@dataclass
class SimulationResult:
    """Every run of a simulation, the full-pool reference per seed, and the summary."""

    config: SimulationConfig
    minority_class: int
    n_classes: int
    runs: list[SeedRun]
    full_pool_f1: dict[int, float]
    summary: dict[str, Any] = field(default_factory=dict)
