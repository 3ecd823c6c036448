"""Training: seeded, device-aware, early-stopped on a validation split carved from the labels.

`train` never mutates anything it is given: a failed run (non-finite loss) raises and leaves
whatever model the caller had as it was.
"""

import contextlib
import copy
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np
import torch
from numpy.typing import NDArray
from sklearn.model_selection import train_test_split
from torch import Tensor

from services.errors import DeviceUnavailable, NonFiniteLossError
from services.ml.calibration import calibrated_probs, fit_temperature
from services.ml.losses import AlphaScheme, FocalLoss, class_priors, init_prior_bias_
from services.ml.metrics import expected_calibration_error
from services.ml.nets import Classifier, ModelSpec, build_model

DeviceChoice = Literal["auto", "cpu", "cuda"]
AutocastChoice = Literal["auto", "bf16", "off"]


MAX_GAMMA = 10.0
MAX_ALPHA = 1000.0


def _check_numbers(name: str, value: object, *, high: float) -> None:
    """value (a number or a tuple of them) lies in [0, high]; ValueError naming `name`."""
    numbers = value if isinstance(value, tuple) else (value,)
    if not numbers:
        raise ValueError(f"{name} needs at least one value")
    for number in numbers:
        if isinstance(number, bool) or not isinstance(number, int | float):
            raise ValueError(f"{name} must be numbers, got {number!r}")
        if not 0.0 <= number <= high:
            raise ValueError(f"{name} must be in [0, {high:g}], got {number!r}")


@dataclass(frozen=True)
class LossSpec:
    """The training objective, JSON-friendly.

    kind "ce" is plain cross-entropy (focal with gamma = 0), optionally class-weighted.
    gamma: a float or a per-class tuple. alpha: None, a scheme name computed from the training
    split's label counts, or a per-class tuple. prior_bias: initialize the output bias to the
    training split's class priors (softmax form of RetinaNet's pi trick).
    """

    kind: Literal["focal", "ce"] = "focal"
    gamma: float | tuple[float, ...] = 2.0
    alpha: AlphaScheme | tuple[float, ...] | None = None
    beta: float = 0.999
    prior_bias: bool = False

    def __post_init__(self) -> None:
        # Bounds a project's settings must meet. Beyond MAX_GAMMA (1-p)^gamma underflows to 0
        # for every p the model reaches, so training gets no gradient; beyond MAX_ALPHA a
        # weighted float32 loss overflows.
        if self.kind not in ("focal", "ce"):
            raise ValueError(f"kind must be focal or ce, got {self.kind!r}")
        _check_numbers("gamma", self.gamma, high=MAX_GAMMA)
        if self.alpha is not None and not isinstance(self.alpha, str):
            _check_numbers("alpha", self.alpha, high=MAX_ALPHA)
            if not any(weight > 0 for weight in self.alpha):
                raise ValueError("alpha needs a positive weight for some class")
        if isinstance(self.beta, bool) or not isinstance(self.beta, int | float):
            raise ValueError(f"beta must be a number, got {self.beta!r}")
        if not 0.0 <= self.beta < 1.0:
            raise ValueError(f"beta must be in [0, 1), got {self.beta}")
        if not isinstance(self.prior_bias, bool):
            raise ValueError(f"prior_bias must be true or false, got {self.prior_bias!r}")

    def build(self, class_counts: Sequence[int]) -> FocalLoss:
        gamma: float | tuple[float, ...] = 0.0 if self.kind == "ce" else self.gamma
        return FocalLoss(gamma=gamma, alpha=self.alpha, class_counts=class_counts, beta=self.beta)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in data.items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "LossSpec":
        unknown = set(data) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown loss spec keys: {sorted(unknown)}")
        values: dict[str, Any] = {
            k: tuple(v) if isinstance(v, list) else v for k, v in data.items()
        }
        return cls(**values)


@dataclass(frozen=True)
class TrainConfig:
    """How to train. Epoch counts are upper bounds; early stopping usually ends sooner.

    val_fraction: share of the labeled items held out for early stopping and temperature
    fitting; with fewer than `min_val_items` held out, training runs `max_epochs` without a
    validation split (tiny cold-start sets) and the temperature stays 1.
    autocast: "auto" = bf16 on CUDA, off on CPU; "bf16" forces it on either device.
    early_stopping: what the kept epoch minimizes on the validation split. "error": the error
    rate, ties broken by the loss; "loss": the loss alone. Validation loss bottoms out well
    before the error does (the model keeps getting more accurate while growing overconfident,
    which temperature scaling corrects afterwards), so "loss" stops too early on small sets.
    threads: CPU threads for torch during this call (restored afterwards); None keeps the
    process setting.
    """

    max_epochs: int = 200
    batch_size: int = 64
    learning_rate: float = 1e-3
    weight_decay: float = 1e-4
    val_fraction: float = 0.2
    min_val_items: int = 10
    patience: int = 20
    grad_clip_norm: float | None = 5.0
    seed: int = 0
    device: DeviceChoice = "auto"
    threads: int | None = None
    autocast: AutocastChoice = "auto"
    calibrate: bool = True
    early_stopping: Literal["error", "loss"] = "error"

    def __post_init__(self) -> None:
        if self.max_epochs < 1 or self.batch_size < 1 or self.patience < 1:
            raise ValueError("max_epochs, batch_size and patience must be >= 1")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate}")


@dataclass(frozen=True)
class EpochDone:
    """One finished epoch, as training reports it while it runs.

    epoch: 1-based; max_epochs: the most it may run (early stopping may end it sooner).
    train_loss/val_loss: mean loss over the epoch, nats (val_loss None without a validation split).
    """

    epoch: int
    max_epochs: int
    train_loss: float
    val_loss: float | None


EpochCallback = Callable[[EpochDone], None]


@dataclass
class TrainResult:
    """A trained model (on the CPU, eval mode) and how it got there.

    train_loss/val_loss: mean loss per epoch; val_error: validation error rate per epoch (both
    empty without a validation split).
    best_epoch: 0-based index of the epoch whose weights were kept.
    train_indices/val_indices: positions in the `items` given to `train`.
    class_counts: labels per class in the training split, [C].
    """

    model: Classifier
    spec: ModelSpec
    loss: LossSpec
    train_loss: list[float]
    val_loss: list[float]
    val_error: list[float]
    best_epoch: int
    temperature: float
    ece_before: float | None
    ece_after: float | None
    train_indices: NDArray[np.int64]
    val_indices: NDArray[np.int64]
    class_counts: list[int]
    device: str
    autocast: bool


def resolve_device(choice: DeviceChoice) -> torch.device:
    """CUDA when asked for (DeviceUnavailable if absent) or when "auto" finds one; otherwise
    the CPU."""
    if choice == "cuda" and not torch.cuda.is_available():
        raise DeviceUnavailable(
            "device 'cuda' was requested (FOCALLOOP_DEVICE) but no CUDA device is available "
            "on this machine; set FOCALLOOP_DEVICE=cpu or auto"
        )
    if choice == "cuda" or (choice == "auto" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


def use_autocast(choice: AutocastChoice, device: torch.device) -> bool:
    return choice == "bf16" or (choice == "auto" and device.type == "cuda")


@contextlib.contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """Run the block with `threads` CPU threads, restoring the previous count afterwards."""
    if threads is None:
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def as_model_input(x: NDArray[Any], spec: ModelSpec) -> Tensor:
    """Items as a float32 tensor in the layout the model expects: [n, d] or [n, C, H, W]
    (small images an MLP takes arrive [n, H, W] or [n, C, H, W] and are flattened)."""
    tensor = torch.as_tensor(np.ascontiguousarray(x), dtype=torch.float32)
    if spec.kind == "mlp" and tensor.dim() > 2:
        tensor = tensor.reshape(tensor.shape[0], -1)
    if spec.kind == "cnn" and tensor.dim() == 3:
        tensor = tensor.unsqueeze(1)  # [n, H, W] greyscale -> [n, 1, H, W]
    expected = (tensor.shape[0], *spec.input_shape)
    if tuple(tensor.shape) != expected:
        raise ValueError(
            f"items have shape {tuple(tensor.shape)[1:]}, model expects {spec.input_shape}"
        )
    return tensor


def split_for_validation(
    labels: NDArray[np.int64], *, val_fraction: float, min_val_items: int, seed: int
) -> tuple[NDArray[np.int64], NDArray[np.int64]]:
    """(train, validation) index arrays; stratified when every class has 2+ items."""
    indices = np.arange(len(labels), dtype=np.int64)
    n_val = round(len(labels) * val_fraction)
    if n_val < min_val_items or len(labels) - n_val < 2:
        return indices, np.empty(0, dtype=np.int64)
    counts = np.bincount(labels)
    stratify = (
        labels if counts[counts > 0].min() >= 2 and n_val >= np.count_nonzero(counts) else None
    )
    train_idx, val_idx = train_test_split(
        indices, test_size=n_val, random_state=seed, stratify=stratify
    )
    return np.sort(train_idx), np.sort(val_idx)


def train(
    *,
    items: NDArray[Any],
    labels: NDArray[np.integer[Any]],
    spec: ModelSpec,
    loss: LossSpec,
    config: TrainConfig,
    init_state: dict[str, Tensor] | None = None,
    on_epoch: EpochCallback | None = None,
) -> TrainResult:
    """Train a model of `spec` on labeled items.

    items: [n, *item_shape] float (features [n, d], images [n, H, W] or [n, C, H, W]).
    labels: [n] integer classes in [0, spec.n_classes).
    init_state: optional state_dict to start from (warm start); it is copied, never modified.
    on_epoch: called after every epoch (progress reporting; it must be cheap or throttle itself).
    Raises NonFiniteLossError when a training or validation loss becomes NaN/inf.
    """
    labels = np.asarray(labels)
    if labels.ndim != 1 or len(labels) != len(items) or len(labels) < 2:
        raise ValueError(
            f"need items [n, ...] and labels [n] with n >= 2, got {len(items)} items and "
            f"labels of shape {labels.shape}"
        )
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be integers, got {labels.dtype}")
    if labels.min() < 0 or labels.max() >= spec.n_classes:
        raise ValueError(f"labels must lie in [0, {spec.n_classes})")
    targets: NDArray[np.int64] = labels.astype(np.int64)
    device = resolve_device(config.device)
    autocast = use_autocast(config.autocast, device)
    inputs = as_model_input(items, spec)

    with torch_threads(config.threads), torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        train_idx, val_idx = split_for_validation(
            targets,
            val_fraction=config.val_fraction,
            min_val_items=config.min_val_items,
            seed=config.seed,
        )
        class_counts = np.bincount(targets[train_idx], minlength=spec.n_classes).tolist()
        model = build_model(spec, seed=config.seed)
        if init_state is not None:
            model.load_state_dict(copy.deepcopy(init_state))
        elif loss.prior_bias:
            init_prior_bias_(model.head, class_priors(class_counts))
        model.to(device)
        memory_format = (
            torch.channels_last
            if spec.kind == "cnn" and device.type == "cuda"
            else torch.contiguous_format
        )
        model.to(memory_format=memory_format)  # type: ignore[call-overload]
        loss_fn = loss.build(class_counts).to(device)

        x_train = inputs[train_idx].to(device, memory_format=memory_format)
        y_train = torch.as_tensor(targets[train_idx], device=device)
        x_val = inputs[val_idx].to(device, memory_format=memory_format)
        y_val = torch.as_tensor(targets[val_idx], device=device)

        optimizer = torch.optim.AdamW(
            model.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay
        )
        shuffler = torch.Generator().manual_seed(config.seed)
        train_curve: list[float] = []
        val_curve: list[float] = []
        error_curve: list[float] = []
        best_epoch, best_key = 0, (math.inf, math.inf)
        best_state = copy.deepcopy(model.state_dict())
        for epoch in range(config.max_epochs):
            model.train()
            order = torch.randperm(len(train_idx), generator=shuffler).to(device)
            total = torch.zeros((), device=device)
            for step, start in enumerate(range(0, len(order), config.batch_size)):
                batch = order[start : start + config.batch_size]
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                    logits = model(x_train[batch])
                batch_loss = loss_fn(logits, y_train[batch])
                # One host sync per step: a NaN must stop training before it reaches the weights.
                if not torch.isfinite(batch_loss):
                    raise NonFiniteLossError(epoch=epoch, step=step, value=batch_loss.item())
                optimizer.zero_grad(set_to_none=True)
                torch.autograd.backward(batch_loss)
                if config.grad_clip_norm is not None:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip_norm)
                optimizer.step()
                total += batch_loss.detach() * len(batch)
            train_curve.append(float(total) / len(train_idx))

            if len(val_idx) == 0:
                best_epoch = epoch
                if on_epoch is not None:
                    on_epoch(EpochDone(epoch + 1, config.max_epochs, train_curve[-1], None))
                continue
            val_logits = _logits(model, x_val, autocast, device)
            val_loss = float(loss_fn(val_logits, y_val))
            if not math.isfinite(val_loss):
                raise NonFiniteLossError(epoch=epoch, step=-1, value=val_loss)
            val_error = float((val_logits.argmax(dim=1) != y_val).float().mean())
            val_curve.append(val_loss)
            error_curve.append(val_error)
            if on_epoch is not None:
                on_epoch(EpochDone(epoch + 1, config.max_epochs, train_curve[-1], val_loss))
            key = (val_error, val_loss) if config.early_stopping == "error" else (val_loss, 0.0)
            if key < best_key:
                best_epoch, best_key = epoch, key
                best_state = copy.deepcopy(model.state_dict())
            elif epoch - best_epoch >= config.patience:
                break
        if len(val_idx) > 0:
            model.load_state_dict(best_state)

        temperature, ece_before, ece_after = 1.0, None, None
        if len(val_idx) > 0:
            val_logits = _logits(model, x_val, autocast, device).float().cpu()
            y_val_np = targets[val_idx]
            ece_before = expected_calibration_error(
                calibrated_probs(val_logits, 1.0).numpy(), y_val_np
            )
            if config.calibrate:
                temperature = fit_temperature(val_logits, y_val.cpu())
                ece_after = expected_calibration_error(
                    calibrated_probs(val_logits, temperature).numpy(), y_val_np
                )

    model.to("cpu", memory_format=torch.contiguous_format)  # type: ignore[call-overload]
    model.eval()
    return TrainResult(
        model=model,
        spec=spec,
        loss=loss,
        train_loss=train_curve,
        val_loss=val_curve,
        val_error=error_curve,
        best_epoch=best_epoch,
        temperature=temperature,
        ece_before=ece_before,
        ece_after=ece_after,
        train_indices=train_idx,
        val_indices=val_idx,
        class_counts=class_counts,
        device=str(device),
        autocast=autocast,
    )


def _logits(model: Classifier, x: Tensor, autocast: bool, device: torch.device) -> Tensor:
    model.eval()
    with (
        torch.inference_mode(),
        torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast),
    ):
        logits: Tensor = model(x)
        return logits.float()
