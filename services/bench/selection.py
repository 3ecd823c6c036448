"""`focalloop bench select`: merge a large pool's chunk candidates and choose one batch.

The chunk candidates are made the way `score_chunk` makes them (least-confidence scores, each
chunk's top-k' overall and per predicted class, k' = batch x oversample) from synthetic model
outputs: long-tailed predicted classes, Dirichlet probabilities, Gaussian embeddings. Timed:
`merge_candidates` over every chunk (keeping the top-k' overall and per class) plus
`select_from` with the default selection (k-center diversity over the top batch x 5, a quarter
of the batch reserved for rare classes), which is what `select_cycle` does once it has read the
candidates. Baseline, in the same run: the merge keeping every chunk candidate, then the same
selection (it must choose the same batch, which is checked).
"""

import statistics
import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from services.selection.candidates import Candidates, chunk_candidates, merge_candidates
from services.selection.config import SelectionConfig, select_from
from services.selection.strategies import make_strategy


@dataclass(frozen=True)
class SelectBenchResult:
    pool_items: int
    chunk_size: int
    chunks: int
    candidates: int
    n_classes: int
    embedding_dim: int
    batch: int
    select_seconds: float  # median of merge + select
    merge_seconds: float
    choose_seconds: float
    full_merge_select_seconds: float  # baseline: merge keeping every candidate, then select
    full_candidates: int
    repeats: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def synthetic_chunks(
    *, pool_items: int, chunk_size: int, n_classes: int, embedding_dim: int, k_prime: int, seed: int
) -> list[Candidates]:
    rng = np.random.default_rng(seed)
    # Class 0 dominates; the last classes are rare (about 1% each), as in the projects we serve.
    prior = np.array([0.6] + [0.4 / (n_classes - 1)] * (n_classes - 1))
    prior[-3:] = 0.01
    prior /= prior.sum()
    strategy = make_strategy("least_confidence")
    chunks = []
    for start in range(0, pool_items, chunk_size):
        n = min(chunk_size, pool_items - start)
        leading = rng.choice(n_classes, size=n, p=prior)
        alpha = np.full((n, n_classes), 0.3)
        alpha[np.arange(n), leading] = rng.uniform(1.0, 12.0, size=n)
        probs = np.asarray(np.stack([rng.dirichlet(row) for row in alpha]), dtype=np.float32)
        embeddings = rng.standard_normal((n, embedding_dim), dtype=np.float32)
        ids = np.arange(start, start + n, dtype=np.int64)
        scored = Candidates.build(ids, probs, strategy.scores(probs), embeddings)
        chunks.append(chunk_candidates(scored, k_prime))
    return chunks


def run_select_bench(
    *,
    pool_items: int = 1_000_000,
    chunk_size: int = 16_384,
    n_classes: int = 10,
    embedding_dim: int = 256,
    batch: int = 1000,
    repeats: int = 5,
    seed: int = 0,
) -> SelectBenchResult:
    config = SelectionConfig()
    chunks = synthetic_chunks(
        pool_items=pool_items,
        chunk_size=chunk_size,
        n_classes=n_classes,
        embedding_dim=embedding_dim,
        k_prime=batch * config.candidate_multiplier(),
        seed=seed,
    )
    # Labeled so far: the three rare classes are below half the mean count, so quotas apply.
    counts = np.array([500] + [60] * (n_classes - 4) + [5, 3, 1], dtype=np.int64)
    totals: list[float] = []
    merges: list[float] = []
    chooses: list[float] = []
    baselines: list[float] = []
    candidates = full_candidates = 0
    for _ in range(repeats):
        start = time.perf_counter()
        everything = merge_candidates(chunks)
        baseline = select_from(
            candidates=everything, counts=counts, config=config, batch_size=batch
        )
        baselines.append(time.perf_counter() - start)
        full_candidates = len(everything)
        del everything
        start = time.perf_counter()
        merged = merge_candidates(chunks, k_prime=batch * config.candidate_multiplier())
        merged_at = time.perf_counter()
        chosen = select_from(merged, counts=counts, config=config, batch_size=batch)
        end = time.perf_counter()
        assert len(chosen) == batch == len(set(chosen.tolist()))
        # Keeping only the top-k' overall and per class changes nothing about the choice.
        assert chosen.tolist() == baseline.tolist()
        candidates = len(merged)
        totals.append(end - start)
        merges.append(merged_at - start)
        chooses.append(end - merged_at)
    return SelectBenchResult(
        pool_items=pool_items,
        chunk_size=chunk_size,
        chunks=len(chunks),
        candidates=candidates,
        n_classes=n_classes,
        embedding_dim=embedding_dim,
        batch=batch,
        select_seconds=statistics.median(totals),
        merge_seconds=statistics.median(merges),
        choose_seconds=statistics.median(chooses),
        full_merge_select_seconds=statistics.median(baselines),
        full_candidates=full_candidates,
        repeats=repeats,
    )
