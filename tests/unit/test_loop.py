"""The cycle's plain functions and the simulated annotator, on small real data."""

from typing import Any

import numpy as np
import pytest
from numpy.typing import NDArray

from labeling.simulated import SimulatedAnnotator
from services.errors import InvalidInput
from services.loop import (
    CycleResult,
    LabeledSet,
    LoopConfig,
    SelectionConfig,
    choose_batch,
    ingest,
    needs_cold_start,
    rare_classes,
    run_cycle,
    train_stage,
)
from services.ml.nets import spec_for_inputs
from services.ml.score import score
from services.ml.train import TrainConfig
from tests.conftest import Digits

FAST = LoopConfig(train=TrainConfig(max_epochs=15, patience=5, threads=1), batch_size=10)


def cycle_on(
    digits: Digits,
    labeled_ids: NDArray[Any],
    pool_size: int,
    *,
    config: LoopConfig = FAST,
    seed: int = 0,
) -> tuple[CycleResult, NDArray[Any]]:
    """One cycle over the first `pool_size` digits with `labeled_ids` labeled truthfully;
    returns the result and the unlabeled ids it chose from."""
    dataset = ingest(LabeledSet.empty(), labeled_ids, digits.labels[labeled_ids])
    unlabeled = np.setdiff1d(np.arange(pool_size), labeled_ids)
    result = run_cycle(
        items=digits.features[:pool_size],
        unlabeled_ids=unlabeled,
        dataset=dataset,
        spec=spec_for_inputs((64,), 10),
        config=config,
        seed=seed,
    )
    return result, unlabeled


def test_ingest_makes_a_new_version_and_keeps_the_old_one() -> None:
    first = ingest(LabeledSet.empty(), [5, 2], [1, 0])
    second = ingest(first, [7, 2], [1, 1])  # item 2 relabeled
    assert (first.version, first.parent) == (1, 0)
    assert first.item_ids.tolist() == [2, 5] and first.labels.tolist() == [0, 1]
    assert (second.version, second.parent) == (2, 1)
    assert second.item_ids.tolist() == [2, 5, 7] and second.labels.tolist() == [1, 1, 1]
    with pytest.raises(InvalidInput, match="2 item ids but 1 labels"):
        ingest(second, [1, 2], [0])


def test_cold_start_until_two_classes_are_labeled(digits: Digits) -> None:
    spec = spec_for_inputs((64,), 10)
    one_class = ingest(LabeledSet.empty(), [0, 10], [0, 0])
    assert needs_cold_start(one_class, 10)
    unlabeled = np.setdiff1d(np.arange(300), one_class.item_ids)
    result = run_cycle(
        items=digits.features[:300],
        unlabeled_ids=unlabeled,
        dataset=one_class,
        spec=spec,
        config=FAST,
        seed=0,
    )
    assert result.model is None and result.cold_start_picks == 10
    assert len(set(result.selected.tolist())) == 10
    assert not set(result.selected.tolist()) & {0, 10}


def test_a_cycle_trains_and_picks_unlabeled_items_only(digits: Digits) -> None:
    result, unlabeled = cycle_on(digits, np.arange(0, 200, 2), 400)
    assert result.model is not None and result.cold_start_picks == 0
    assert len(result.selected) == 10 and len(set(result.selected.tolist())) == 10
    assert set(result.selected.tolist()) <= set(unlabeled.tolist())
    again, _ = cycle_on(digits, np.arange(0, 200, 2), 400)
    np.testing.assert_array_equal(result.selected, again.selected)


def test_uncertainty_picks_are_harder_than_random(digits: Digits) -> None:
    """The batch's mean top probability under the cycle's own model is lower than the pool's."""
    plain = LoopConfig(
        train=FAST.train,
        batch_size=20,
        selection=SelectionConfig(oversample=None, quota_min_share=None),
    )
    result, unlabeled = cycle_on(digits, np.arange(0, 300, 3), 900, config=plain)
    assert result.model is not None
    probs = score(
        result.model.model,
        digits.features[:900],
        spec=result.model.spec,
        temperature=result.model.temperature,
    ).probs
    assert probs[result.selected].max(1).mean() < probs[unlabeled].max(1).mean() - 0.2


def test_missing_classes_trigger_exploration(digits: Digits) -> None:
    no_eights = np.flatnonzero(digits.labels[:300] != 8)[:60]
    cycle, unlabeled = cycle_on(digits, no_eights, 600, seed=1)
    assert cycle.cold_start_picks == 5  # explore_share 0.5 of a batch of 10
    dataset = ingest(LabeledSet.empty(), no_eights, digits.labels[no_eights])
    result = choose_batch(
        model=cycle.model,
        items=digits.features[:600],
        unlabeled_ids=unlabeled,
        dataset=dataset,
        n_classes=10,
        config=FAST,
        batch_size=4,
        seed=1,
    )
    assert result.cold_start_picks == 2 and len(result.selected) == 4


def test_rare_classes_are_those_well_below_the_mean_count() -> None:
    assert rare_classes(np.array([50, 50, 4, 0, 30]), 0.5) == [2, 3]


def test_choose_batch_refuses_an_exhausted_pool(digits: Digits) -> None:
    with pytest.raises(InvalidInput, match="nothing left"):
        choose_batch(
            model=None,
            items=digits.features[:10],
            unlabeled_ids=np.empty(0, np.int64),
            dataset=LabeledSet.empty(),
            n_classes=10,
            config=FAST,
            batch_size=3,
            seed=0,
        )


def test_simulated_annotator_is_exact_without_noise_and_marked() -> None:
    truth = np.array([0, 1, 2, 1, 0])
    answers = SimulatedAnnotator(truth, n_classes=3).annotate([4, 2, 1])
    assert [(a.item_id, a.label) for a in answers] == [(4, 0), (2, 2), (1, 1)]
    assert all(a.simulated and a.annotator == "simulated" for a in answers)


def test_simulated_noise_rate_and_wrong_answers_are_other_classes() -> None:
    truth = np.zeros(20_000, dtype=np.int64)
    answers = SimulatedAnnotator(truth, n_classes=4, noise=0.2, seed=3).annotate(np.arange(20_000))
    wrong = [a.label for a in answers if a.label != a.true_label]
    assert abs(len(wrong) / 20_000 - 0.2) < 0.01
    assert set(wrong) == {1, 2, 3}
    counts = np.bincount(wrong, minlength=4)[1:]
    assert counts.min() > 0.3 * len(wrong)
    with pytest.raises(InvalidInput, match="noise"):
        SimulatedAnnotator(truth, n_classes=4, noise=1.0)
    with pytest.raises(InvalidInput, match="unknown item id"):
        SimulatedAnnotator(truth[:3], n_classes=4).annotate([5])


def test_warm_start_fine_tunes_the_previous_model(digits: Digits) -> None:
    spec = spec_for_inputs((64,), 10)
    first = ingest(LabeledSet.empty(), np.arange(100), digits.labels[:100])
    second = ingest(first, np.arange(100, 160), digits.labels[100:160])
    # 160 labels in batches of 64 = 3 steps per epoch: 7 steps round up to 3 epochs.
    config = LoopConfig(
        train=TrainConfig(max_epochs=12, val_fraction=0.0, threads=1), warm_start_steps=7
    )
    previous = train_stage(items=digits.features, dataset=first, spec=spec, config=config, seed=0)
    assert len(previous.train_loss) == 12
    warm = train_stage(
        items=digits.features, dataset=second, spec=spec, config=config, seed=0, previous=previous
    )
    cold = train_stage(items=digits.features, dataset=second, spec=spec, config=config, seed=0)
    assert len(warm.train_loss) == 3 and len(cold.train_loss) == 12
    # Fine-tuning starts where the previous model ended, so its first epoch is already good.
    assert warm.train_loss[0] < 0.7 * cold.train_loss[0]
    other_spec = spec_for_inputs((64,), 10, hidden=(32,))
    fresh = train_stage(
        items=digits.features,
        dataset=second,
        spec=other_spec,
        config=config,
        seed=0,
        previous=previous,
    )
    assert len(fresh.train_loss) == 12  # a different architecture cannot be warm-started


def test_small_sets_train_from_scratch_even_with_a_previous_model(digits: Digits) -> None:
    spec = spec_for_inputs((64,), 10)
    small = ingest(LabeledSet.empty(), np.arange(60), digits.labels[:60])
    # 60 labels = 1 step per epoch: 12 epochs from scratch = 12 steps, not more than 2 x 7.
    config = LoopConfig(
        train=TrainConfig(max_epochs=12, val_fraction=0.0, threads=1), warm_start_steps=7
    )
    previous = train_stage(items=digits.features, dataset=small, spec=spec, config=config, seed=0)
    again = train_stage(
        items=digits.features, dataset=small, spec=spec, config=config, seed=0, previous=previous
    )
    assert len(again.train_loss) == 12 and again.train_loss == previous.train_loss
