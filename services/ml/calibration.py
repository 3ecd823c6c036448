"""Temperature scaling (Guo et al. 2017): one scalar T > 0 fitted on validation logits.

Calibrated probabilities softmax(logits / T) keep the argmax (so accuracy and F1 do not change)
and are what selection ranks on.
"""

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812
from numpy.typing import NDArray
from torch import Tensor

# T outside this range means the validation set is degenerate (e.g. perfectly separated),
# not that the model is that miscalibrated; clamping keeps scores usable.
MIN_TEMPERATURE = 0.05
MAX_TEMPERATURE = 20.0


def fit_temperature(logits: Tensor, targets: Tensor, *, max_iter: int = 200) -> float:
    """The T minimizing the negative log-likelihood of softmax(logits / T) on (logits, targets).

    logits: [n, C] validation logits (any float dtype, computed in float64); targets: [n].
    Returns T in [MIN_TEMPERATURE, MAX_TEMPERATURE]; 1.0 when n == 0.
    """
    if logits.dim() != 2 or targets.shape != (logits.shape[0],):
        raise ValueError(
            f"need logits [n, C] and targets [n], got {tuple(logits.shape)} and "
            f"{tuple(targets.shape)}"
        )
    if logits.shape[0] == 0:
        return 1.0
    x = logits.detach().to(torch.float64).cpu()
    y = targets.detach().long().cpu()
    # Optimize log T so that T stays positive without a constraint.
    log_t = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t], lr=0.1, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(x / log_t.exp(), y)
        torch.autograd.backward(loss)
        return loss

    optimizer.step(closure)  # type: ignore[no-untyped-call]
    temperature = float(log_t.detach().exp())
    if temperature != temperature:  # NaN: the line search failed; no scaling is the safe answer
        return 1.0
    return min(max(temperature, MIN_TEMPERATURE), MAX_TEMPERATURE)


def calibrated_probs(logits: Tensor, temperature: float) -> Tensor:
    """softmax(logits / T) in float32: [n, C], rows sum to 1."""
    return torch.softmax(logits.float() / temperature, dim=1)


def estimate_prior_shift(
    train_probs: NDArray[np.floating[Any]],
    pool_probs: NDArray[np.floating[Any]],
    *,
    max_iter: int = 100,
    tolerance: float = 1e-6,
) -> NDArray[np.float64]:
    """Class-prior reweighting for a pool whose class mix differs from the training labels.

    Active learning over-samples rare classes on purpose, so a model trained on its labels
    believes in a rare class more often than the pool warrants. Saerens, Latinne & Decaestecker
    (2002): estimate the pool's priors by EM on the model's pool predictions, then reweight.
    train_probs: [n_train, C] predictions on the training items (their mean is the prior the
    model learned); pool_probs: [n_pool, C] predictions on the unlabeled pool.
    Returns weights [C] = pool prior / training prior; apply with `apply_prior_shift`.
    """
    if train_probs.ndim != 2 or pool_probs.ndim != 2 or train_probs.shape[1] != pool_probs.shape[1]:
        raise ValueError("train_probs and pool_probs must be [n, C] with the same C")
    if len(train_probs) == 0 or len(pool_probs) == 0:
        raise ValueError("need at least one training and one pool prediction")
    train_prior = np.clip(np.asarray(train_probs, dtype=np.float64).mean(axis=0), 1e-12, None)
    probs = np.asarray(pool_probs, dtype=np.float64)
    prior = probs.mean(axis=0)
    for _ in range(max_iter):
        adjusted = apply_prior_shift(probs, prior / train_prior)
        updated = adjusted.mean(axis=0)
        if np.max(np.abs(updated - prior)) < tolerance:
            prior = updated
            break
        prior = updated
    weights: NDArray[np.float64] = prior / train_prior
    return weights


def apply_prior_shift(
    probs: NDArray[np.floating[Any]], weights: NDArray[np.floating[Any]]
) -> NDArray[np.float64]:
    """probs [n, C] reweighted by weights [C] and renormalized: rows sum to 1."""
    adjusted = np.asarray(probs, dtype=np.float64) * np.asarray(weights, dtype=np.float64)
    totals = adjusted.sum(axis=1, keepdims=True)
    result: NDArray[np.float64] = adjusted / np.where(totals > 0, totals, 1.0)
    return result
