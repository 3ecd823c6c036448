"""Model artifacts: a trained model written to the project's store (safetensors weights and a
JSON sidecar, write-once), read back (verified once, then cached per process) and used to predict
with the process's device and thread settings.
"""

import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from numpy.typing import NDArray

from services.config import Settings
from services.datasets.store import DatasetStore, open_store, safe_key
from services.ml.checkpoint import SIDECAR_FILE, WEIGHTS_FILE, Checkpoint, load_checkpoint
from services.ml.checkpoint import save_checkpoint as save_checkpoint_dir
from services.ml.nets import Classifier, ModelSpec
from services.ml.score import ScoreOutput, score
from services.ml.train import TrainResult, torch_threads
from services.models import ModelVersion, Project


class _BoundedCache:
    """A small per-process cache of immutable objects (write-once checkpoints), so a worker
    scoring chunk after chunk loads its model once. Keyed by store URL and key; Settings stay
    out of the key (they are not hashable and do not change the bytes)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.entries: dict[tuple[str, str], Any] = {}
        self.lock = threading.Lock()

    def get(self, store_url: str, key: str, load: Callable[[], Any]) -> Any:
        with self.lock:
            if (store_url, key) in self.entries:
                return self.entries[(store_url, key)]
        value = load()
        with self.lock:
            if len(self.entries) >= self.size:
                self.entries.pop(next(iter(self.entries)))
            self.entries[(store_url, key)] = value
        return value


_MODELS = _BoundedCache(4)


def _model_prefix(project: Project, cycle_id: int, attempt: int) -> str:
    return safe_key(project.name, "models", f"c{cycle_id:08d}-a{attempt}")


def save_model(
    store: DatasetStore, project: Project, result: TrainResult, *, cycle_id: int, attempt: int
) -> str:
    """Write a trained model to the store (write-once); returns the folder's key."""
    prefix = _model_prefix(project, cycle_id, attempt)
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch) / "model"
        save_checkpoint_dir(
            folder,
            model=result.model,
            spec=result.spec,
            labels=list(project.labels),
            loss=result.loss,
            temperature=result.temperature,
            metadata={"cycle_id": cycle_id, "attempt": attempt},
        )
        for name in (WEIGHTS_FILE, SIDECAR_FILE):
            store.put_if_absent(f"{prefix}/{name}", (folder / name).read_bytes())
    return prefix


def _read_model(store_url: str, prefix: str, settings: Settings) -> Checkpoint:
    store = open_store(store_url, settings)
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch)
        for name in (WEIGHTS_FILE, SIDECAR_FILE):
            (folder / name).write_bytes(store.get(f"{prefix}/{name}"))
        return load_checkpoint(folder)


def model_files(project: Project, model: ModelVersion, settings: Settings) -> dict[str, bytes]:
    """A model version's checkpoint files (weights and sidecar) as stored, by file name."""
    store = open_store(project.store_url, settings)
    return {
        name: store.get(f"{model.artifact_uri}/{name}") for name in (WEIGHTS_FILE, SIDECAR_FILE)
    }


def load_model(project: Project, model: ModelVersion, settings: Settings) -> Checkpoint:
    """A model version's checkpoint (verified on first load, then cached per process)."""
    checkpoint: Checkpoint = _MODELS.get(
        project.store_url,
        model.artifact_uri,
        lambda: _read_model(project.store_url, model.artifact_uri, settings),
    )
    return checkpoint


class Scorer(Protocol):
    """A trained model as prediction needs it: a loaded `Checkpoint` or a fresh `TrainResult`."""

    @property
    def model(self) -> Classifier: ...

    @property
    def spec(self) -> ModelSpec: ...

    @property
    def temperature(self) -> float: ...


def predict(scorer: Scorer, items: NDArray[Any], settings: Settings) -> ScoreOutput:
    """Calibrated probabilities [n, C] and embeddings [n, D] of items [n, *item_shape], on the
    process's device (settings.device) with its torch threads."""
    with torch_threads(settings.torch_threads):
        return score(
            scorer.model,
            np.asarray(items, dtype=np.float32),
            spec=scorer.spec,
            temperature=scorer.temperature,
            device=settings.device,
        )


def model_version_name(project: Project, version: int) -> str:
    """How a model version is named outside focalloop (labeling tools' predictions)."""
    return f"{project.name}-m{version}"
