"""The decision core (services.cycle.decide): budget allowance, evaluation picks, exploration,
a chunk's candidates and the batch, on small real data."""

from typing import Any

import numpy as np
import pytest
from numpy.typing import NDArray

from services.cycle.decide import (
    allowance,
    chunk_picks,
    evaluation_count,
    exploration_count,
    plan_batch,
)
from services.ml.nets import spec_for_inputs
from services.ml.score import score
from services.ml.train import TrainConfig, TrainResult
from services.recipe import Recipe, fit
from services.selection.candidates import Candidates, merge_candidates
from services.selection.config import SelectionConfig, rare_classes
from services.selection.strategies import make_strategy
from tests.conftest import Digits

FAST = Recipe(train=TrainConfig(max_epochs=15, patience=5, threads=1))
PLAIN = SelectionConfig(oversample=None, quota_min_share=None)


def _trained(digits: Digits, labeled: NDArray[Any]) -> TrainResult:
    return fit(
        items=digits.features[labeled],
        labels=digits.labels[labeled],
        spec=spec_for_inputs((64,), 10),
        recipe=FAST,
        seed=0,
    )


def _candidates(
    model: TrainResult, digits: Digits, pool: NDArray[np.int64], *, k_prime: int
) -> tuple[Candidates, NDArray[np.float32]]:
    """The pool's candidates as two chunks would keep and merge them, and its probs."""
    output = score(
        model.model, digits.features[pool], spec=model.spec, temperature=model.temperature
    )
    strategy = make_strategy("least_confidence")
    halves = np.array_split(np.arange(len(pool)), 2)
    merged = merge_candidates(
        [
            chunk_picks(
                item_ids=pool[half],
                probs=output.probs[half],
                embeddings=output.embeddings[half],
                strategy=strategy,
                k_prime=k_prime,
            )
            for half in halves
        ],
        k_prime=k_prime,
    )
    return merged, output.probs


def _no_cold_start(k: int, exclude: set[int]) -> list[int]:
    raise AssertionError(f"cold start asked for {k} items")


def test_the_budget_caps_the_batch_and_evaluation_items_lead_it() -> None:
    assert allowance(batch_size=20, budget=None, spent=999, committed=5) == 20
    assert allowance(batch_size=20, budget=300, spent=270, committed=0) == 20
    assert allowance(batch_size=20, budget=300, spent=280, committed=10) == 10
    assert allowance(batch_size=20, budget=300, spent=300, committed=0) == 0
    assert evaluation_count(allowance=20, share=0.5, waiting=58) == 10
    assert evaluation_count(allowance=20, share=0.5, waiting=3) == 3
    assert evaluation_count(allowance=1, share=0.5, waiting=3) == 1  # one while any wait
    assert evaluation_count(allowance=0, share=0.5, waiting=3) == 0


def test_the_evaluation_share_catches_up_to_the_gates_minimum_evidence() -> None:
    # 4 of 20 normally; 5 while fewer than 10 labels judge, so two batches give the third
    # model 10 held items; never more than half a small batch.
    def of_twenty(held: int) -> int:
        return evaluation_count(allowance=20, share=0.2, waiting=58, held=held, evidence_minimum=10)

    assert [of_twenty(0), of_twenty(5), of_twenty(10)] == [5, 5, 4]
    assert evaluation_count(allowance=6, share=0.2, waiting=58, held=0, evidence_minimum=10) == 3
    assert evaluation_count(allowance=20, share=0.2, waiting=2, held=0, evidence_minimum=10) == 2


def test_cold_start_until_a_model_exists(digits: Digits) -> None:
    asked: list[tuple[int, set[int]]] = []

    def cold(k: int, exclude: set[int]) -> list[int]:
        asked.append((k, exclude))
        return list(range(100, 100 + k))

    plan = plan_batch(
        allowance=10,
        evaluation=[7, 9],
        counts=np.array([2, 0, 0]),
        candidates=None,
        has_model=False,
        selection=SelectionConfig(),
        cold_start=cold,
    )
    assert plan.item_ids() == [7, 9, *range(100, 108)]
    assert (plan.model, asked) == ([], [(8, set())])


def test_a_cycle_trains_and_picks_unlabeled_items_only(
    digits: Digits,
) -> None:
    labeled = np.arange(0, 200, 2)
    pool = np.setdiff1d(np.arange(400), labeled)
    model = _trained(digits, labeled)
    candidates, _ = _candidates(model, digits, pool, k_prime=50)
    counts = np.bincount(digits.labels[labeled], minlength=10)

    def plan() -> list[int]:
        return plan_batch(
            allowance=10,
            evaluation=[],
            counts=counts,
            candidates=candidates,
            has_model=True,
            selection=SelectionConfig(),
            cold_start=_no_cold_start,
        ).item_ids()

    chosen = plan()
    assert len(chosen) == 10 == len(set(chosen))
    assert set(chosen) <= set(pool.tolist())
    assert plan() == chosen


def test_uncertainty_picks_are_harder_than_random(digits: Digits) -> None:
    """The batch's mean top probability under the cycle's own model is lower than the pool's
    (what a random batch's would be, in expectation)."""
    labeled = np.arange(0, 300, 3)
    pool = np.setdiff1d(np.arange(900), labeled)
    model = _trained(digits, labeled)
    candidates, probs = _candidates(model, digits, pool, k_prime=20)
    plan = plan_batch(
        allowance=20,
        evaluation=[],
        counts=np.bincount(digits.labels[labeled], minlength=10),
        candidates=candidates,
        has_model=True,
        selection=PLAIN,
        cold_start=_no_cold_start,
    )
    position = {int(item_id): p for p, item_id in enumerate(pool)}
    picked = [position[item_id] for item_id in plan.item_ids()]
    assert probs[picked].max(1).mean() < probs.max(1).mean() - 0.2


def test_missing_classes_trigger_exploration(digits: Digits) -> None:
    no_eights = np.flatnonzero(digits.labels[:300] != 8)[:60]
    counts = np.bincount(digits.labels[no_eights], minlength=10)
    assert exploration_count(counts=counts, has_model=True, room=10, explore_share=0.5) == 5
    assert exploration_count(counts=counts, has_model=True, room=4, explore_share=0.5) == 2
    assert exploration_count(counts=counts + 1, has_model=True, room=10, explore_share=0.5) == 0
    pool = np.setdiff1d(np.arange(600), no_eights)
    candidates, _ = _candidates(_trained(digits, no_eights), digits, pool, k_prime=50)
    asked: list[int] = []

    def cold(k: int, exclude: set[int]) -> list[int]:
        asked.append(k)
        return sorted(set(pool.tolist()) - exclude)[:k]

    plan = plan_batch(
        allowance=10,
        evaluation=[],
        counts=counts,
        candidates=candidates,
        has_model=True,
        selection=SelectionConfig(),
        cold_start=cold,
    )
    assert (len(plan.model), len(plan.cold_start), asked) == (5, 5, [5])
    assert not {p.item_id for p in plan.model} & set(plan.cold_start)


def test_rare_classes_are_those_well_below_the_mean_count() -> None:
    assert rare_classes(np.array([50, 50, 4, 0, 30]), 0.5) == [2, 3]


def test_an_exhausted_pool_gives_an_empty_batch() -> None:
    plan = plan_batch(
        allowance=3,
        evaluation=[],
        counts=np.array([5, 5]),
        candidates=Candidates.build(
            np.empty(0, np.int64), np.empty((0, 2)), np.empty(0), np.empty((0, 4))
        ),
        has_model=True,
        selection=SelectionConfig(),
        cold_start=_no_cold_start,
    )
    assert plan.item_ids() == []


@pytest.mark.parametrize("has_model", [True, False])
def test_nothing_is_picked_when_the_budget_allows_nothing(has_model: bool) -> None:
    plan = plan_batch(
        allowance=0,
        evaluation=[],
        counts=np.array([0, 5]),
        candidates=None,
        has_model=has_model,
        selection=SelectionConfig(),
        cold_start=_no_cold_start,
    )
    assert plan.item_ids() == []
