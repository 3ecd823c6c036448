"""Shared fixtures: real data (scikit-learn's bundled digits), small enough for the CPU."""

import os
from dataclasses import dataclass

import numpy as np
import pytest
from numpy.typing import NDArray
from sklearn.datasets import load_digits

# moto's S3 server answers every request with a wildcard CORS grant unless told not to, which
# would hide a bucket without a CORS rule from the browser tests. Read when moto is imported:
# this file is imported before any test module.
os.environ["MOTO_DISABLE_GLOBAL_CORS"] = "true"

# One Label Studio for the whole session. A session fixture imported into several test modules
# is a separate fixture in each (one server start per module, about 40 s each); a plugin
# registered here defines it once.
pytest_plugins = ["tests.integration.ls_harness"]


@dataclass(frozen=True)
class Digits:
    """8x8 handwritten digits scaled to [0, 1]: features [n, 64], images [n, 8, 8], labels [n]."""

    features: NDArray[np.float32]
    images: NDArray[np.float32]
    labels: NDArray[np.int64]


@pytest.fixture(scope="session")
def digits() -> Digits:
    data = load_digits()
    return Digits(
        features=(data.data / 16.0).astype(np.float32),
        images=(data.images / 16.0).astype(np.float32),
        labels=data.target.astype(np.int64),
    )
