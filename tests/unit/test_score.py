import numpy as np
import torch

from services.ml.nets import build_model, spec_for_inputs
from services.ml.score import score


def test_scores_are_batch_invariant_and_temperature_scaled() -> None:
    spec = spec_for_inputs((12,), 4, hidden=(16,))
    model = build_model(spec, seed=3)
    model.train()
    items = np.random.default_rng(0).normal(size=(50, 12)).astype(np.float32)
    whole = score(model, items, spec=spec, temperature=2.0, batch_size=4096)
    pieces = score(model, items, spec=spec, temperature=2.0, batch_size=7)
    np.testing.assert_allclose(whole.probs, pieces.probs, atol=1e-6)
    np.testing.assert_allclose(whole.embeddings, pieces.embeddings, atol=1e-6)
    assert whole.probs.shape == (50, 4) and whole.embeddings.shape == (50, 16)
    np.testing.assert_allclose(whole.probs.sum(axis=1), 1.0, atol=1e-6)
    model.eval()
    with torch.no_grad():
        expected = torch.softmax(model(torch.from_numpy(items)) / 2.0, dim=1).numpy()
    np.testing.assert_allclose(whole.probs, expected, atol=1e-6)


def test_scoring_restores_the_models_mode() -> None:
    spec = spec_for_inputs((4,), 2, hidden=(8,))
    model = build_model(spec)
    model.train()
    score(model, np.zeros((3, 4), dtype=np.float32), spec=spec)
    assert model.training
