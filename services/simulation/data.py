"""A simulation's data: arrays from FILE.npz (or the demo's digits), checked, and each seed's
split into a pool (registered in the product's project) and a test set (never seen by the loop,
only used to measure the models it ships), with the seed's initial labels."""

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray
from sklearn.model_selection import train_test_split

from services.errors import InvalidInput


@dataclass(frozen=True)
class Dataset:
    """Arrays from FILE.npz: pool items [n, ...] float32 and labels [n] int64; optional fixed
    test split. Item shape: (d,) features, (H, W) or (C, H, W) images."""

    items: NDArray[np.float32]
    labels: NDArray[np.int64]
    test_items: NDArray[np.float32] | None = None
    test_labels: NDArray[np.int64] | None = None

    @property
    def n_classes(self) -> int:
        top = int(self.labels.max())
        if self.test_labels is not None and len(self.test_labels):
            top = max(top, int(self.test_labels.max()))
        return top + 1


def _integer_labels(array: NDArray[Any], name: str) -> NDArray[np.int64]:
    if array.ndim != 1:
        raise InvalidInput(f"{name} must be a 1-d array of labels, got shape {array.shape}")
    whole_floats = np.issubdtype(array.dtype, np.floating) and np.all(np.mod(array, 1) == 0)
    if not np.issubdtype(array.dtype, np.integer) and not whole_floats:
        raise InvalidInput(f"{name} must hold integer class labels, got {array.dtype}")
    if array.size and array.min() < 0:
        raise InvalidInput(f"{name} must hold class indices >= 0")
    return array.astype(np.int64)


def _item_array(array: NDArray[Any], name: str) -> NDArray[np.float32]:
    if array.ndim not in (2, 3, 4):
        raise InvalidInput(
            f"{name} must be features [n, d] or images [n, H, W] / [n, C, H, W], "
            f"got shape {array.shape}"
        )
    if not (np.issubdtype(array.dtype, np.number) and np.all(np.isfinite(array))):
        raise InvalidInput(f"{name} must hold finite numbers")
    return array.astype(np.float32)


def load_dataset(path: Path) -> Dataset:
    """Read and validate FILE.npz (X, y, optionally X_test, y_test); InvalidInput otherwise."""
    try:
        archive = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise InvalidInput(f"no such file: {path}") from None
    except (OSError, ValueError) as error:
        raise InvalidInput(f"{path} is not a readable .npz file: {error}") from None
    with archive:
        missing = [key for key in ("X", "y") if key not in archive.files]
        if missing:
            raise InvalidInput(f"{path} lacks the array(s) {', '.join(missing)}; it needs X and y")
        items, labels = _item_array(archive["X"], "X"), _integer_labels(archive["y"], "y")
        if len(items) != len(labels):
            raise InvalidInput(f"X has {len(items)} items but y has {len(labels)} labels")
        has_test = ("X_test" in archive.files, "y_test" in archive.files)
        if any(has_test) and not all(has_test):
            raise InvalidInput("give both X_test and y_test, or neither")
        test_items = test_labels = None
        if all(has_test):
            test_items = _item_array(archive["X_test"], "X_test")
            test_labels = _integer_labels(archive["y_test"], "y_test")
            if test_items.shape[1:] != items.shape[1:] or len(test_items) != len(test_labels):
                raise InvalidInput("X_test/y_test do not match X/y in item shape or length")
    return Dataset(items, labels, test_items, test_labels)


@dataclass(frozen=True)
class Split:
    pool_items: NDArray[np.float32]
    pool_labels: NDArray[np.int64]
    test_items: NDArray[np.float32]
    test_labels: NDArray[np.int64]
    init_ids: NDArray[np.int64]


def make_split(dataset: Dataset, *, seed: int, init: int, test_fraction: float) -> "Split":
    """Seed s's pool/test split (stratified) and its initial labeled ids (uniform, seeded)."""
    if dataset.test_items is not None and dataset.test_labels is not None:
        pool_items, pool_labels = dataset.items, dataset.labels
        test_items, test_labels = dataset.test_items, dataset.test_labels
    else:
        counts = np.bincount(dataset.labels)
        stratify = dataset.labels if counts[counts > 0].min() >= 2 else None
        pool_items, test_items, pool_labels, test_labels = train_test_split(
            dataset.items,
            dataset.labels,
            test_size=test_fraction,
            random_state=seed,
            stratify=stratify,
        )
    rng = np.random.default_rng(seed)
    init_ids = np.sort(
        rng.choice(len(pool_labels), size=min(init, len(pool_labels)), replace=False)
    ).astype(np.int64)
    return Split(pool_items, pool_labels, test_items, test_labels, init_ids)


def check_fits_product(dataset: Dataset) -> None:
    """The product holds features [n, d] as float32 and images as 8-bit square pixels: refuse
    data it would have to change (InvalidInput naming the problem)."""
    shape = dataset.items.shape[1:]
    if len(shape) == 1:
        return
    side = shape[-1]
    channels = 1 if len(shape) == 2 else shape[0]
    if shape[-2] != side or not 8 <= side <= 1024 or channels not in (1, 3):
        raise InvalidInput(
            f"images must be square, 8 to 1024 pixels, with 1 or 3 channels (a project's "
            f"images are), got items of shape {shape}"
        )
    arrays = [dataset.items] + ([dataset.test_items] if dataset.test_items is not None else [])
    if any(array.min() < 0.0 or array.max() > 1.0 for array in arrays):
        raise InvalidInput("image values must lie in [0, 1] (projects store 8-bit pixels)")
