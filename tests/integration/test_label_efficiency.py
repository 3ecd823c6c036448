"""Label efficiency, guarded in CI: the product path (`bench peers`' focalloop arm: the product's
cycle with the simulated labeler) on two settings of the peer suite, seeds 0-2, up to 300 labels.

Each threshold sits well below the mean rare-class F1 over the curve that the default measured
on these seeds and above what the same product with random selection measured on them
(`focalloop bench peers --setting digits-img-8@2% --setting digits-feat-5@3% --seeds 3 --arm
focalloop --arm focalloop-random`, at 5f77a0c): 0.650 and 0.866 for the default, 0.412 and
0.703 for random.
Run this file with FOCALLOOP_REGRESSION_ARM=focalloop-random and it fails (BENCHMARKS.md shows
the run). Not a benchmark: a tripwire for a change that makes the loop spend labels the way
random selection does.
"""

import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor

import numpy as np
import pytest

from services.bench.peers.run import run_job
from services.config import Settings

pytestmark = pytest.mark.slow

SEEDS = (0, 1, 2)
# setting -> the smallest acceptable mean (over seeds 0-2) of the rare-class F1 curve, 20-300.
THRESHOLDS = {
    "digits-img-8@2%": 0.50,
    "digits-feat-5@3%": 0.76,
}
ARM = os.environ.get("FOCALLOOP_REGRESSION_ARM", "focalloop")


@pytest.mark.timeout(240)
def test_the_product_spends_labels_better_than_random_selection() -> None:
    jobs = [(setting, seed) for setting in THRESHOLDS for seed in SEEDS]
    # Spawned processes, one torch thread each: the run's figures do not depend on the cores.
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=2, mp_context=context) as pool:
        futures = [pool.submit(run_job, setting, ARM, seed, Settings()) for setting, seed in jobs]
        curves = [future.result() for future in futures]
    means = {
        setting: float(np.mean([np.mean(c.rare_f1) for c in curves if c.setting == setting]))
        for setting in THRESHOLDS
    }
    below = {s: round(m, 3) for s, m in means.items() if m < THRESHOLDS[s]}
    assert not below, f"{ARM}: mean rare-class F1 over 20-300 labels {means} (below: {below})"
