"""Peer curves taken from an earlier `bench peers --json` file instead of run again.

The peers' curves depend on the setting, the seed, scikit-learn/scikit-activeml and numpy, never
on focalloop's code, so a run that changes only the product can pair its new curves with the
peers of an earlier run. Refused unless the file was written with the same Python, numpy and
scikit-learn; runs the file lacks (a setting added since) are run as usual.
"""

import json
import math
from pathlib import Path
from typing import Any

from services.bench.peers.peer import PEER_ARMS
from services.bench.peers.run import LABELS_AXIS, Curve
from services.bench.report import environment
from services.errors import InvalidInput

MATCHING = ("python", "numpy", "scikit-learn")  # what a peer's curve depends on


def load_peer_curves(
    path: Path, *, settings: list[str], arms: list[str], seeds: int, here: dict[str, Any]
) -> list[Curve]:
    """The peer arms' curves among `arms` for `settings` x seeds 0..seeds-1 that `path` holds
    (here: this run's `environment`). Their seconds are NaN: they were not timed in this run."""
    try:
        payload = json.loads(path.read_text())
        rows = payload["rows"]
        recorded = payload["environment"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise InvalidInput(f"--peers-from {path}: not a bench peers JSON file ({error})") from None
    differing = [key for key in MATCHING if recorded.get(key) != here.get(key)]
    if differing:
        raise InvalidInput(
            f"--peers-from {path} was written with other versions of {differing} "
            f"({[recorded.get(k) for k in differing]} vs {[here.get(k) for k in differing]}); "
            "run the peers again"
        )
    found = {
        (row["setting"], row["arm"], int(row["seed"])): tuple(float(v) for v in row["rare_f1"])
        for row in rows
        if row.get("arm") in PEER_ARMS
    }
    wanted = [
        (setting, arm, seed)
        for setting in settings
        for arm in arms
        if arm in PEER_ARMS
        for seed in range(seeds)
    ]
    present = [key for key in wanted if key in found]
    if any(len(found[key]) != len(LABELS_AXIS) for key in present):
        raise InvalidInput(f"--peers-from {path}: a curve does not have {len(LABELS_AXIS)} points")
    return [
        Curve(setting, arm, seed, found[(setting, arm, seed)], math.nan)
        for setting, arm, seed in present
    ]


def this_environment() -> dict[str, Any]:
    """The facts `load_peer_curves` compares, for this process."""
    from services.ml.train import resolve_device

    return environment(resolve_device("cpu"))
