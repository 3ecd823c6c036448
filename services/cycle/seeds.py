"""Seeds: every random choice of a cycle derives from the project's seed, the cycle's number
within the project and what the randomness is for, so a run is reproducible whatever database
ids it was given, and two purposes never share a stream."""

import hashlib
from enum import StrEnum

import numpy as np


class Purpose(StrEnum):
    """What a derived seed is used for (part of the derivation: changing one changes it)."""

    TRAIN = "train"  # weight init, shuffling, the validation split
    EVALUATION_SET = "evaluation-set"  # which unlabeled items are reserved for evaluation
    STRATEGY = "strategy"  # a random acquisition strategy's scores (per chunk)
    COLD_START = "cold-start"  # k-means (or random) picks without a model
    # The subsamples cold start works on in huge pools (extra 1: of the labeled items).
    COLD_START_SAMPLE = "cold-start-sample"
    REVIEW = "review"  # the folds of the label-noise review's cross-fitting
    TUNE = "tune"  # `focalloop tune`'s folds (extra 0) and per-fold training (extra 1, fold)


def derive_seed(project_seed: int, cycle_number: int, purpose: Purpose, *extra: int) -> int:
    """A seed in [0, 2**31) for `purpose` in cycle `cycle_number` of a project seeded with
    `project_seed`; `extra` tells apart several draws of one purpose (a chunk's index)."""
    tag = int.from_bytes(hashlib.sha256(purpose.value.encode()).digest()[:4], "big")
    sequence = np.random.SeedSequence([project_seed, cycle_number, tag, *extra])
    return int(sequence.generate_state(1)[0]) & 0x7FFFFFFF
