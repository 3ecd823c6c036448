"""The API's tuning schemas: starting a study (`POST /projects/{p}/tuning`) and its status."""

from typing import Literal

from pydantic import BaseModel, Field

from services.api.schemas import Strict
from services.tuning.space import GAMMA_RANGE, GRID_GAMMAS
from services.tuning.studies import StudyStatus


class TuningStart(Strict):
    """What `focalloop tune` takes on the command line, as a body (the same defaults)."""

    mode: Literal["grid", "search"] = Field(
        default="grid",
        description="grid: each of `gammas` x the alpha schemes (none, inverse_frequency, "
        "effective_number); search: Optuna TPE over gamma in [0, 5] and the schemes, "
        "cross-entropy first.",
    )
    trials: int = Field(default=30, ge=1, le=1000, description="Search trials (search only).")
    folds: int = Field(default=3, ge=2, le=20, description="Stratified folds per repeat.")
    repeats: int = Field(default=3, ge=1, le=20, description="Repeats of the k-fold split.")
    metric: str = Field(
        default="minority_f1",
        max_length=200,
        description="minority_f1 (the class with the fewest labels), macro_f1, recall:CLASS or "
        "f1:CLASS (a label name).",
    )
    gammas: list[float] = Field(
        default=list(GRID_GAMMAS),
        min_length=1,
        max_length=20,
        description=f"Grid gammas, each in [{GAMMA_RANGE[0]:g}, {GAMMA_RANGE[1]:g}] and given "
        "once; 0 (cross-entropy) is always added. Grid only.",
    )


class TuningStudyPublic(BaseModel):
    """A study: `done` of `total` trials ended (`failed` and `pruned` among them); state
    running, complete (results ready) or abandoned (its workers went away before the end)."""

    name: str
    project: str
    state: Literal["running", "complete", "abandoned"]
    mode: str
    metric: str
    dataset_version: int
    done: int
    total: int
    failed: int
    pruned: int
    started_at: str

    @classmethod
    def of(cls, status: StudyStatus) -> "TuningStudyPublic":
        return cls.model_validate(status.to_dict())
