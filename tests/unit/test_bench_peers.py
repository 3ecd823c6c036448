"""`bench peers --peers-from`: an earlier run's peer curves are paired with new product curves
only when they can be (same versions), and summarized untimed."""

import json
import math
from pathlib import Path
from typing import Any

import pytest

from services.bench.peers.reuse import load_peer_curves, this_environment
from services.bench.peers.run import LABELS_AXIS, run_peers
from services.bench.peers.summary import summarize_setting
from services.config import Settings
from services.errors import InvalidInput

SETTING = "digits-feat-5@3%"
PEER = "skactiveml-us/mlp"


def _write(path: Path, environment: dict[str, Any], seeds: int) -> Path:
    rows = [
        {"setting": SETTING, "arm": arm, "seed": seed, "rare_f1": [0.1 * seed] * len(LABELS_AXIS)}
        for arm in (PEER, "focalloop")
        for seed in range(seeds)
    ]
    path.write_text(json.dumps({"environment": environment, "rows": rows}))
    return path


def test_peer_curves_are_taken_from_a_matching_file(tmp_path: Path) -> None:
    source = _write(tmp_path / "peers.json", this_environment(), seeds=3)
    curves = load_peer_curves(
        source, settings=[SETTING], arms=["focalloop", PEER], seeds=3, here=this_environment()
    )
    assert [(c.arm, c.seed) for c in curves] == [(PEER, 0), (PEER, 1), (PEER, 2)]
    assert curves[2].rare_f1 == (0.2,) * len(LABELS_AXIS)
    assert all(math.isnan(c.seconds) for c in curves)  # not timed in this run
    # Every job is covered: nothing runs, the curves come back as they are.
    results = run_peers(
        Settings(), settings=[SETTING], arms=[PEER], seeds=3, workers=1, reused=curves
    )
    assert results.curves == curves
    figures = summarize_setting(results.curves)
    assert figures["arms"][PEER]["median_seconds_per_run"] is None
    assert figures["arms"][PEER]["mean_rare_f1_20_300"]["mean"] == pytest.approx(0.1)


def test_only_the_runs_a_file_holds_are_reused(tmp_path: Path) -> None:
    curves = load_peer_curves(
        _write(tmp_path / "short.json", this_environment(), seeds=3),
        settings=[SETTING, "gen-binary@1%"],
        arms=[PEER],
        seeds=5,
        here=this_environment(),
    )
    assert [(c.setting, c.seed) for c in curves] == [(SETTING, 0), (SETTING, 1), (SETTING, 2)]


def test_other_versions_or_broken_files_are_refused(tmp_path: Path) -> None:
    older = {**this_environment(), "scikit-learn": "0.0.1"}
    with pytest.raises(InvalidInput, match="other versions of \\['scikit-learn'\\]"):
        load_peer_curves(
            _write(tmp_path / "old.json", older, seeds=3),
            settings=[SETTING],
            arms=[PEER],
            seeds=3,
            here=this_environment(),
        )
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(InvalidInput, match="not a bench peers JSON file"):
        load_peer_curves(
            tmp_path / "broken.json", settings=[SETTING], arms=[PEER], seeds=2, here={}
        )
