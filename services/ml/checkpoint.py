"""Checkpoints: weights in safetensors plus a JSON sidecar; nothing is ever unpickled.

A checkpoint is a directory holding
    model.safetensors   the state_dict (tensors only: loading cannot execute code)
    model.json          format version, architecture spec, label set, loss (focal) parameters,
                        temperature, free-form metadata, and the SHA-256 of model.safetensors
Loading refuses, with a CheckpointError, weights whose hash differs from the sidecar's, a
sidecar that does not parse, and weights that do not fit the sidecar's architecture.
"""

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from services.errors import CheckpointError
from services.ml.nets import Classifier, ModelSpec, build_model
from services.ml.train import LossSpec

FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
SIDECAR_FILE = "model.json"


@dataclass
class Checkpoint:
    """A loaded model (CPU, eval mode) and everything needed to use it the same way again."""

    model: Classifier
    spec: ModelSpec
    labels: list[str]
    loss: LossSpec
    temperature: float
    sha256: str
    metadata: dict[str, Any] = field(default_factory=dict)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _write_exclusive(path: Path, data: bytes) -> None:
    # Write beside, then link into place: a crash leaves no half-written file under the real
    # name, and an existing checkpoint is never overwritten (link fails with FileExistsError).
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    partial.write_bytes(data)
    try:
        os.link(partial, path)
    finally:
        partial.unlink()


def save_checkpoint(
    directory: Path,
    *,
    model: Classifier,
    spec: ModelSpec,
    labels: list[str],
    loss: LossSpec,
    temperature: float,
    metadata: dict[str, Any] | None = None,
) -> str:
    """Write a checkpoint into `directory` (created if needed); returns the weights' SHA-256.

    Refuses (FileExistsError) to overwrite an existing checkpoint: checkpoints are write-once.
    """
    if len(labels) != spec.n_classes:
        raise ValueError(f"{len(labels)} labels for a model of {spec.n_classes} classes")
    directory.mkdir(parents=True, exist_ok=True)
    weights_path, sidecar_path = directory / WEIGHTS_FILE, directory / SIDECAR_FILE
    if weights_path.exists() or sidecar_path.exists():
        raise FileExistsError(f"a checkpoint already exists in {directory}")
    state = {
        name: tensor.detach().cpu().contiguous() for name, tensor in model.state_dict().items()
    }
    staging = directory / f".{WEIGHTS_FILE}.{os.getpid()}.staging"
    save_file(state, str(staging))
    data = staging.read_bytes()
    staging.unlink()
    _write_exclusive(weights_path, data)
    sha256 = hashlib.sha256(data).hexdigest()
    sidecar = {
        "format_version": FORMAT_VERSION,
        "spec": spec.to_dict(),
        "labels": labels,
        "loss": loss.to_dict(),
        "temperature": temperature,
        "weights_sha256": sha256,
        "metadata": metadata or {},
    }
    _write_exclusive(sidecar_path, (json.dumps(sidecar, indent=2) + "\n").encode())
    return sha256


def load_checkpoint(directory: Path) -> Checkpoint:
    """Load and verify a checkpoint written by `save_checkpoint`."""
    weights_path, sidecar_path = directory / WEIGHTS_FILE, directory / SIDECAR_FILE
    for path in (weights_path, sidecar_path):
        if not path.is_file():
            raise CheckpointError(f"checkpoint file {path} is missing")
    try:
        sidecar = json.loads(sidecar_path.read_text())
        if sidecar.get("format_version") != FORMAT_VERSION:
            raise CheckpointError(
                f"checkpoint format {sidecar.get('format_version')!r} is not {FORMAT_VERSION}"
            )
        spec = ModelSpec.from_dict(sidecar["spec"])
        loss = LossSpec.from_dict(sidecar["loss"])
        labels = [str(label) for label in sidecar["labels"]]
        temperature = float(sidecar["temperature"])
        expected_sha = str(sidecar["weights_sha256"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as error:
        if isinstance(error, CheckpointError):
            raise
        raise CheckpointError(f"checkpoint sidecar {sidecar_path} is invalid: {error}") from error
    actual_sha = _sha256(weights_path)
    if actual_sha != expected_sha:
        raise CheckpointError(
            f"checkpoint weights {weights_path} have SHA-256 {actual_sha}, the sidecar says "
            f"{expected_sha}: the files do not belong together or were modified"
        )
    if len(labels) != spec.n_classes:
        raise CheckpointError(f"sidecar lists {len(labels)} labels for {spec.n_classes} classes")
    model = build_model(spec)
    try:
        model.load_state_dict(load_file(str(weights_path)), strict=True)
    except (RuntimeError, SafetensorError) as error:
        raise CheckpointError(
            f"checkpoint weights do not fit the sidecar's architecture: {error}"
        ) from error
    model.eval()
    return Checkpoint(
        model=model,
        spec=spec,
        labels=labels,
        loss=loss,
        temperature=temperature,
        sha256=actual_sha,
        metadata=dict(sidecar.get("metadata", {})),
    )
