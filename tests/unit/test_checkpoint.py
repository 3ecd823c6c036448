import json
from pathlib import Path

import pytest
import torch

from services.errors import CheckpointError
from services.ml.checkpoint import SIDECAR_FILE, WEIGHTS_FILE, load_checkpoint, save_checkpoint
from services.ml.nets import ModelSpec, build_model
from services.ml.train import LossSpec

SPEC = ModelSpec(kind="mlp", input_shape=(6,), n_classes=3, hidden=(8,))
LOSS = LossSpec(gamma=1.5, alpha="effective_number")


def write(directory: Path) -> torch.nn.Module:
    model = build_model(SPEC, seed=1)
    save_checkpoint(
        directory,
        model=model,
        spec=SPEC,
        labels=["ok", "scratch", "dent"],
        loss=LOSS,
        temperature=1.7,
        metadata={"dataset_version": 4},
    )
    return model


def test_round_trip_restores_identical_outputs(tmp_path: Path) -> None:
    model = write(tmp_path)
    loaded = load_checkpoint(tmp_path)
    x = torch.randn(4, 6)
    model.eval()
    assert torch.equal(loaded.model(x), model(x))
    assert loaded.spec == SPEC and loaded.loss == LOSS and loaded.temperature == 1.7
    assert loaded.labels == ["ok", "scratch", "dent"]
    assert loaded.metadata == {"dataset_version": 4}
    assert json.loads((tmp_path / SIDECAR_FILE).read_text())["weights_sha256"] == loaded.sha256


def test_checkpoints_are_write_once(tmp_path: Path) -> None:
    write(tmp_path)
    before = (tmp_path / WEIGHTS_FILE).read_bytes()
    with pytest.raises(FileExistsError):
        write(tmp_path)
    assert (tmp_path / WEIGHTS_FILE).read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [SIDECAR_FILE, WEIGHTS_FILE]


def test_modified_weights_are_refused(tmp_path: Path) -> None:
    write(tmp_path)
    weights = bytearray((tmp_path / WEIGHTS_FILE).read_bytes())
    weights[-1] ^= 0xFF
    (tmp_path / WEIGHTS_FILE).write_bytes(bytes(weights))
    with pytest.raises(CheckpointError, match="SHA-256"):
        load_checkpoint(tmp_path)


def test_sidecar_describing_another_architecture_is_refused(tmp_path: Path) -> None:
    write(tmp_path)
    sidecar = json.loads((tmp_path / SIDECAR_FILE).read_text())
    sidecar["spec"]["hidden"] = [16]
    (tmp_path / SIDECAR_FILE).write_text(json.dumps(sidecar))
    with pytest.raises(CheckpointError, match="do not fit the sidecar's architecture"):
        load_checkpoint(tmp_path)


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda s: s.pop("spec"), "sidecar .* is invalid"),
        (lambda s: s.update(format_version=99), "format 99"),
        (lambda s: s.update(labels=["a", "b"]), "2 labels for 3 classes"),
        (lambda s: s["spec"].update(kind="rnn"), "unknown model kind"),
    ],
)
def test_broken_sidecars_are_refused(tmp_path: Path, mutate: object, message: str) -> None:
    write(tmp_path)
    sidecar = json.loads((tmp_path / SIDECAR_FILE).read_text())
    mutate(sidecar)  # type: ignore[operator]
    (tmp_path / SIDECAR_FILE).write_text(json.dumps(sidecar))
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(tmp_path)


def test_missing_files_and_bad_json_are_refused(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="missing"):
        load_checkpoint(tmp_path)
    write(tmp_path)
    (tmp_path / SIDECAR_FILE).write_text("{not json")
    with pytest.raises(CheckpointError, match="invalid"):
        load_checkpoint(tmp_path)


def test_label_count_must_match_on_save(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="2 labels for a model of 3 classes"):
        save_checkpoint(
            tmp_path,
            model=build_model(SPEC),
            spec=SPEC,
            labels=["a", "b"],
            loss=LOSS,
            temperature=1.0,
        )
    assert not any(tmp_path.iterdir())
