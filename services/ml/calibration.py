"""Temperature scaling (Guo et al. 2017): one scalar T > 0 fitted on validation logits.

Calibrated probabilities softmax(logits / T) keep the argmax (so accuracy and F1 do not change)
and are what selection ranks on.
"""

import torch
import torch.nn.functional as F  # noqa: N812
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
