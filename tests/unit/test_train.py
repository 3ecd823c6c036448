import copy
from typing import Any

import numpy as np
import pytest
import torch
from numpy.typing import NDArray

from services.errors import NonFiniteLossError
from services.ml.losses import class_priors, prior_bias
from services.ml.nets import ModelSpec, spec_for_inputs
from services.ml.score import score
from services.ml.train import LossSpec, TrainConfig, TrainResult, train
from tests.conftest import Digits

FAST = TrainConfig(max_epochs=40, patience=8, threads=1)


def fit_digits(
    digits: Digits, config: TrainConfig = FAST, n: int = 600, loss: LossSpec | None = None
) -> TrainResult:
    return train(
        items=digits.features[:n],
        labels=digits.labels[:n],
        spec=spec_for_inputs((64,), 10, hidden=(64,)),
        loss=loss or LossSpec(),
        config=config,
    )


def test_mlp_learns_digits(digits: Digits) -> None:
    result = fit_digits(digits)
    probs = score(result.model, digits.features[1200:], spec=result.spec).probs
    accuracy = float(np.mean(probs.argmax(1) == digits.labels[1200:]))
    assert accuracy > 0.85
    assert result.train_loss[result.best_epoch] < result.train_loss[0]


def test_training_is_deterministic_under_a_seed(digits: Digits) -> None:
    first, second = fit_digits(digits), fit_digits(digits)
    assert first.train_loss == second.train_loss and first.val_loss == second.val_loss
    for a, b in zip(
        first.model.state_dict().values(), second.model.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b)
    third = fit_digits(digits, TrainConfig(max_epochs=40, patience=8, threads=1, seed=1))
    assert third.train_loss != first.train_loss


@pytest.mark.parametrize("criterion", ["error", "loss"])
def test_early_stopping_keeps_the_best_validation_epoch(digits: Digits, criterion: str) -> None:
    config = TrainConfig(max_epochs=300, patience=5, threads=1, early_stopping=criterion)  # type: ignore[arg-type]
    result = fit_digits(digits, config)
    assert len(result.val_loss) < 300 and len(result.val_error) == len(result.val_loss)
    if criterion == "loss":
        assert result.best_epoch == int(np.argmin(result.val_loss))
    else:
        keys = list(zip(result.val_error, result.val_loss, strict=True))
        assert result.best_epoch == min(range(len(keys)), key=keys.__getitem__)
    assert len(result.val_loss) == result.best_epoch + 1 + 5
    assert len(result.val_indices) == 120 and len(result.train_indices) == 480
    assert not set(result.val_indices.tolist()) & set(result.train_indices.tolist())
    assert result.ece_before is not None and result.ece_after is not None
    assert result.ece_after <= result.ece_before


def test_validation_split_is_stratified(digits: Digits) -> None:
    result = fit_digits(digits)
    val_counts = np.bincount(digits.labels[:600][result.val_indices], minlength=10)
    assert val_counts.min() >= 10 and val_counts.max() <= 14


def test_tiny_label_sets_train_without_a_validation_split(digits: Digits) -> None:
    result = fit_digits(digits, TrainConfig(max_epochs=7, threads=1), n=20)
    assert len(result.val_indices) == 0 and result.val_loss == []
    assert len(result.train_loss) == 7 and result.best_epoch == 6
    assert result.temperature == 1.0 and result.ece_before is None


def test_non_finite_loss_stops_training_and_leaves_the_start_model_alone(
    digits: Digits,
) -> None:
    start = fit_digits(digits, TrainConfig(max_epochs=2, threads=1)).model.state_dict()
    snapshot = copy.deepcopy(start)
    poisoned = digits.features[:600].copy()
    poisoned[3, 5] = np.nan
    with pytest.raises(NonFiniteLossError, match="non-finite") as caught:
        train(
            items=poisoned,
            labels=digits.labels[:600],
            spec=spec_for_inputs((64,), 10, hidden=(64,)),
            loss=LossSpec(),
            config=FAST,
            init_state=start,
        )
    assert caught.value.epoch == 0
    for name, tensor in start.items():
        assert torch.equal(tensor, snapshot[name])


def test_bf16_autocast_path_trains_on_the_cpu(digits: Digits) -> None:
    result = fit_digits(digits, TrainConfig(max_epochs=30, patience=8, threads=1, autocast="bf16"))
    assert result.autocast is True
    assert all(np.isfinite(result.train_loss))
    probs = score(result.model, digits.features[1200:], spec=result.spec, autocast="bf16").probs
    assert float(np.mean(probs.argmax(1) == digits.labels[1200:])) > 0.8


def test_prior_bias_initialization_uses_training_label_priors(digits: Digits) -> None:
    config = TrainConfig(max_epochs=1, val_fraction=0.0, learning_rate=1e-30, threads=1)
    result = fit_digits(digits, config, n=100, loss=LossSpec(prior_bias=True))
    expected = prior_bias(class_priors(result.class_counts))
    torch.testing.assert_close(result.model.head.bias.detach(), expected)


def test_threads_setting_is_restored(digits: Digits) -> None:
    before = torch.get_num_threads()
    fit_digits(digits, TrainConfig(max_epochs=1, threads=1), n=50)
    assert torch.get_num_threads() == before


def test_cnn_trains_on_images(digits: Digits) -> None:
    spec = ModelSpec(
        kind="cnn", input_shape=(1, 8, 8), n_classes=10, channels=(8, 16), embedding_dim=32
    )
    result = train(
        items=digits.images[:400],
        labels=digits.labels[:400],
        spec=spec,
        loss=LossSpec(alpha="effective_number"),
        config=TrainConfig(max_epochs=60, patience=10, learning_rate=1e-2, threads=1),
    )
    output = score(result.model, digits.images[1500:], spec=spec)
    assert output.embeddings.shape == (297, 32)
    assert float(np.mean(output.probs.argmax(1) == digits.labels[1500:])) > 0.7


@pytest.mark.parametrize(
    ("labels", "message"),
    [
        (np.full(50, 10), r"labels must lie in \[0, 10\)"),
        (np.zeros(50) + 0.5, "labels must be integers"),
        (np.zeros(49, dtype=np.int64), "need items"),
    ],
)
def test_bad_labels_are_refused(digits: Digits, labels: NDArray[Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        train(
            items=digits.features[:50],
            labels=labels,
            spec=spec_for_inputs((64,), 10),
            loss=LossSpec(),
            config=FAST,
        )


def test_wrong_item_shape_is_refused(digits: Digits) -> None:
    with pytest.raises(ValueError, match="model expects"):
        train(
            items=digits.images[:50],  # 8x8 = 64 pixels
            labels=digits.labels[:50],
            spec=spec_for_inputs((32,), 10),
            loss=LossSpec(),
            config=FAST,
        )


def test_loss_spec_round_trips_and_ce_means_gamma_zero() -> None:
    spec = LossSpec(kind="focal", gamma=(1.0, 2.0), alpha=(0.5, 2.0), prior_bias=True)
    assert LossSpec.from_dict(spec.to_dict()) == spec
    assert LossSpec(kind="ce", gamma=3.0).build([5, 5]).gamma == 0.0
    with pytest.raises(ValueError, match="unknown loss spec keys"):
        LossSpec.from_dict({"kind": "focal", "temperature": 2})
