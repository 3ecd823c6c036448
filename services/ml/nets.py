"""Model architectures built from JSON-serializable specs (never from pickles).

Every model maps inputs to logits [n, C] and exposes `embed(x) -> [n, D]`, the penultimate
layer that diversity selection clusters on, and `head`, the final `nn.Linear(D, C)`.
"""

import math
from dataclasses import asdict, dataclass
from typing import Any, Literal, get_args

import torch
from torch import Tensor, nn

ModelKind = Literal["mlp", "cnn"]
_MODEL_KINDS: tuple[str, ...] = get_args(ModelKind)


@dataclass(frozen=True)
class ModelSpec:
    """An architecture, fully described by JSON-friendly values.

    kind "mlp": input_shape (d,), a feature vector (tabular data, embeddings a user computed
        with any backbone, or a small image's C*H*W pixels, flattened on the way in); hidden
        layer widths in `hidden`; the embedding is the last hidden.
    kind "cnn": input_shape (channels, height, width) of an image; `channels` per conv stage
        (3x3 conv + ReLU, 2x2 max-pool while the map is >= 4 pixels), global average pool, then
        a dense embedding of width `embedding_dim`.
    """

    kind: ModelKind
    input_shape: tuple[int, ...]
    n_classes: int
    hidden: tuple[int, ...] = (256,)
    channels: tuple[int, ...] = (32, 64)
    embedding_dim: int = 128
    dropout: float = 0.0

    def __post_init__(self) -> None:
        if self.kind not in _MODEL_KINDS:
            raise ValueError(f"unknown model kind {self.kind!r}; choose one of {_MODEL_KINDS}")
        expected_rank = 1 if self.kind == "mlp" else 3
        if len(self.input_shape) != expected_rank or min(self.input_shape, default=0) < 1:
            raise ValueError(
                f"a {self.kind} needs input_shape of {expected_rank} positive sizes, "
                f"got {self.input_shape}"
            )
        if self.n_classes < 2:
            raise ValueError(f"n_classes must be >= 2, got {self.n_classes}")
        widths = self.hidden if self.kind == "mlp" else (*self.channels, self.embedding_dim)
        if not widths or min(widths) < 1:
            raise ValueError(f"layer widths must be positive and non-empty, got {widths}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serializable dict that `from_dict` turns back into an equal spec."""
        data = asdict(self)
        return {
            key: list(value) if isinstance(value, tuple) else value for key, value in data.items()
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelSpec":
        """Rebuild a spec; unknown keys or wrong types are refused with a ValueError."""
        allowed = set(cls.__dataclass_fields__)
        unknown = set(data) - allowed
        if unknown:
            raise ValueError(f"unknown model spec keys: {sorted(unknown)}")
        try:
            converted: dict[str, Any] = {
                key: tuple(int(v) for v in value) if isinstance(value, list) else value
                for key, value in data.items()
            }
            return cls(**converted)
        except TypeError as error:
            raise ValueError(f"invalid model spec: {error}") from error


class MLP(nn.Module):
    """Feature vectors [n, d] -> logits [n, C]; embedding = last hidden layer [n, hidden[-1]]."""

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width = spec.input_shape[0]
        for hidden in spec.hidden:
            layers += [nn.Linear(width, hidden), nn.ReLU()]
            if spec.dropout > 0:
                layers.append(nn.Dropout(spec.dropout))
            width = hidden
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(width, spec.n_classes)

    def embed(self, x: Tensor) -> Tensor:
        return self.body(x.flatten(1))  # type: ignore[no-any-return]

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.embed(x))  # type: ignore[no-any-return]


class SmallCNN(nn.Module):
    """Images [n, channels, H, W] -> logits [n, C]; embedding [n, embedding_dim]."""

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        in_channels, height, width = spec.input_shape
        layers: list[nn.Module] = []
        for out_channels in spec.channels:
            layers += [nn.Conv2d(in_channels, out_channels, 3, padding=1), nn.ReLU()]
            # Pool only while it leaves at least a 2x2 map: 8x8 digits and 224x224 photos alike.
            if min(height, width) >= 4:
                layers.append(nn.MaxPool2d(2))
                height, width = height // 2, width // 2
            in_channels = out_channels
        layers += [
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(in_channels, spec.embedding_dim),
            nn.ReLU(),
        ]
        if spec.dropout > 0:
            layers.append(nn.Dropout(spec.dropout))
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(spec.embedding_dim, spec.n_classes)

    def embed(self, x: Tensor) -> Tensor:
        return self.body(x)  # type: ignore[no-any-return]

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.embed(x))  # type: ignore[no-any-return]


Classifier = MLP | SmallCNN


def build_model(spec: ModelSpec, *, seed: int | None = None) -> Classifier:
    """A freshly initialized model for `spec`; with `seed`, initialization is reproducible
    without touching the global RNG."""
    with torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(seed)
        return MLP(spec) if spec.kind == "mlp" else SmallCNN(spec)


# A small image (at most SMALL_IMAGE_PIXELS pixels per channel) trains flattened, through the
# MLP, while fewer than FLAT_BELOW_LABELS items are labeled; the CNN takes over from there. On the
# peer suite's four 8x8 digit-image settings (10 seeds, bench peers) the MLP's rare-class F1 was
# ahead of the CNN's up to 100-120 labels (by up to +0.40 at one point) and behind it from 160 on
# (-0.03 to -0.11 at 300); on the same labeled sets, 80 labels: MLP 0.52, CNN 0.38. Sizes between
# 8x8 and 32x32 were not measured: 16x16 is where a 3x3 convolution's locality has some room.
SMALL_IMAGE_PIXELS = 16 * 16
FLAT_BELOW_LABELS = 150


def spec_for_inputs(
    input_shape: tuple[int, ...], n_classes: int, *, labeled: int | None = None, **overrides: Any
) -> ModelSpec:
    """The default spec for data of this shape: an MLP for vectors; for images a CNN, except
    small images (at most SMALL_IMAGE_PIXELS pixels) with fewer than FLAT_BELOW_LABELS
    `labeled` items, which an MLP takes flattened to C*H*W (labeled None: the CNN).

    input_shape: one item's shape, (d,) for features, (H, W) or (C, H, W) for images.
    """
    if len(input_shape) == 1:
        return ModelSpec(kind="mlp", input_shape=input_shape, n_classes=n_classes, **overrides)
    if len(input_shape) == 2:
        input_shape = (1, *input_shape)
    if len(input_shape) == 3:
        small = input_shape[1] * input_shape[2] <= SMALL_IMAGE_PIXELS
        if small and labeled is not None and labeled < FLAT_BELOW_LABELS:
            flat = (math.prod(input_shape),)
            return ModelSpec(kind="mlp", input_shape=flat, n_classes=n_classes, **overrides)
        return ModelSpec(kind="cnn", input_shape=input_shape, n_classes=n_classes, **overrides)
    raise ValueError(f"items must be vectors (d,) or images (H, W)/(C, H, W), got {input_shape}")
