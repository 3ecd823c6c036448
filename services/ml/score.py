"""Batched inference: calibrated class probabilities and penultimate-layer embeddings."""

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray

from services.ml.nets import Classifier, ModelSpec
from services.ml.train import AutocastChoice, DeviceChoice, as_model_input, resolve_device
from services.ml.train import use_autocast as autocast_enabled


@dataclass(frozen=True)
class ScoreOutput:
    """probs: [n, C] float32, rows sum to 1 (softmax(logits / temperature)).
    embeddings: [n, D] float32, the model's penultimate layer (D = spec's embedding width)."""

    probs: NDArray[np.float32]
    embeddings: NDArray[np.float32]


def score(
    model: Classifier,
    items: NDArray[Any],
    *,
    spec: ModelSpec,
    temperature: float = 1.0,
    batch_size: int = 4096,
    device: DeviceChoice = "auto",
    autocast: AutocastChoice = "auto",
) -> ScoreOutput:
    """Score `items` [n, *item_shape] in batches of `batch_size` under `torch.inference_mode`.

    The model is moved to the device for the call and returned to where it was.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    target = resolve_device(device)
    bf16 = autocast_enabled(autocast, target)
    inputs = as_model_input(items, spec)
    original = next(model.parameters()).device
    was_training = model.training
    model.to(target).eval()
    probs = np.empty((len(inputs), spec.n_classes), dtype=np.float32)
    embed_dim = model.head.in_features
    embeddings = np.empty((len(inputs), embed_dim), dtype=np.float32)
    try:
        with torch.inference_mode():
            for start in range(0, len(inputs), batch_size):
                batch = inputs[start : start + batch_size].to(target, non_blocking=True)
                with torch.autocast(target.type, dtype=torch.bfloat16, enabled=bf16):
                    embedding = model.embed(batch)
                    logits = model.head(embedding)
                stop = start + len(batch)
                probs[start:stop] = torch.softmax(logits.float() / temperature, 1).cpu().numpy()
                embeddings[start:stop] = embedding.float().cpu().numpy()
    finally:
        model.to(original).train(was_training)
    return ScoreOutput(probs=probs, embeddings=embeddings)
