import json

import numpy as np
import pytest
import torch

from services.ml.nets import MLP, ModelSpec, SmallCNN, build_model, spec_for_inputs
from services.ml.train import as_model_input


@pytest.mark.parametrize(
    ("spec", "batch_shape", "embedding_width"),
    [
        (ModelSpec(kind="mlp", input_shape=(64,), n_classes=10, hidden=(32, 16)), (5, 64), 16),
        (
            ModelSpec(kind="cnn", input_shape=(1, 8, 8), n_classes=10, embedding_dim=24),
            (5, 1, 8, 8),
            24,
        ),
        (
            ModelSpec(kind="cnn", input_shape=(3, 32, 32), n_classes=4, channels=(8, 16, 16)),
            (2, 3, 32, 32),
            128,
        ),
    ],
)
def test_models_give_logits_and_embeddings(
    spec: ModelSpec, batch_shape: tuple[int, ...], embedding_width: int
) -> None:
    model = build_model(spec, seed=0).eval()  # dropout off, so both paths agree
    x = torch.randn(*batch_shape)
    assert model(x).shape == (batch_shape[0], spec.n_classes)
    assert model.embed(x).shape == (batch_shape[0], embedding_width)
    torch.testing.assert_close(model.head(model.embed(x)), model(x))


def test_spec_round_trips_through_json() -> None:
    spec = ModelSpec(
        kind="cnn",
        input_shape=(3, 16, 16),
        n_classes=5,
        channels=(8, 8),
        embedding_dim=32,
        dropout=0.0,
    )
    assert ModelSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec


def test_seeded_build_is_reproducible_and_leaves_the_global_rng_alone() -> None:
    spec = ModelSpec(kind="mlp", input_shape=(8,), n_classes=3)
    rng_before = torch.random.get_rng_state()
    first, second = build_model(spec, seed=7), build_model(spec, seed=7)
    assert torch.equal(torch.random.get_rng_state(), rng_before)
    for a, b in zip(first.state_dict().values(), second.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    other = build_model(spec, seed=8)
    assert not torch.equal(other.head.weight, first.head.weight)


def test_default_spec_follows_the_item_shape() -> None:
    assert isinstance(build_model(spec_for_inputs((64,), 10)), MLP)
    # Small images train flattened while few are labeled; the CNN takes over from 150 labels.
    small = spec_for_inputs((8, 8), 10, labeled=149)
    assert (small.kind, small.input_shape) == ("mlp", (64,))
    assert spec_for_inputs((3, 16, 16), 4, labeled=20).input_shape == (768,)
    assert spec_for_inputs((8, 8), 10, labeled=150).input_shape == (1, 8, 8)
    assert spec_for_inputs((8, 8), 10).kind == "cnn"  # no count given
    large = spec_for_inputs((32, 32), 10, labeled=20)
    assert large.input_shape == (1, 32, 32)
    assert isinstance(build_model(large), SmallCNN)
    with pytest.raises(ValueError, match="items must be vectors"):
        spec_for_inputs((2, 3, 4, 5), 10)


def test_a_small_image_reaches_the_mlp_flattened() -> None:
    spec = spec_for_inputs((8, 8), 3, labeled=40, hidden=(16,))
    images = np.random.default_rng(0).random((5, 8, 8)).astype(np.float32)
    inputs = as_model_input(images, spec)
    assert inputs.shape == (5, 64)
    assert torch.equal(inputs[1], torch.from_numpy(images[1].reshape(-1)))
    assert build_model(spec, seed=0)(inputs).shape == (5, 3)
    with pytest.raises(ValueError, match="model expects"):
        as_model_input(np.zeros((5, 9, 9), np.float32), spec)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"kind": "transformer", "input_shape": [4], "n_classes": 2}, "unknown model kind"),
        ({"kind": "mlp", "input_shape": [1, 8, 8], "n_classes": 2}, "needs input_shape"),
        ({"kind": "mlp", "input_shape": [4], "n_classes": 1}, "n_classes must be >= 2"),
        ({"kind": "mlp", "input_shape": [4], "n_classes": 2, "hidden": []}, "widths"),
        ({"kind": "mlp", "input_shape": [4], "n_classes": 2, "dropout": 1.0}, "dropout"),
        ({"kind": "mlp", "input_shape": [4], "n_classes": 2, "pickle": "x"}, "unknown model spec"),
        ({"kind": "mlp"}, "invalid model spec"),
    ],
)
def test_invalid_specs_are_refused(data: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ModelSpec.from_dict(data)
