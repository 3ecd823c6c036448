"""The training recipe: the project's settings on the defaults, and when a fit warm-starts."""

from dataclasses import replace

import numpy as np

from services.ml.nets import spec_for_inputs
from services.ml.train import TrainConfig
from services.models import Project
from services.recipe import Recipe, default_recipe, fit, project_recipe
from tests.conftest import Digits


def test_warm_start_fine_tunes_the_previous_model(digits: Digits) -> None:
    spec = spec_for_inputs((64,), 10)
    # 160 labels in batches of 64 = 3 steps per epoch: 7 steps round up to 3 epochs.
    recipe = Recipe(
        train=TrainConfig(max_epochs=12, val_fraction=0.0, threads=1), warm_start_steps=7
    )
    first, second = np.arange(100), np.arange(160)
    previous = fit(
        items=digits.features[first], labels=digits.labels[first], spec=spec, recipe=recipe, seed=0
    )
    assert len(previous.train_loss) == 12
    items, labels = digits.features[second], digits.labels[second]
    warm = fit(items=items, labels=labels, spec=spec, recipe=recipe, seed=0, previous=previous)
    cold = fit(items=items, labels=labels, spec=spec, recipe=recipe, seed=0)
    assert len(warm.train_loss) == 3 and len(cold.train_loss) == 12
    # Fine-tuning starts where the previous model ended, so its first epoch is already good.
    assert warm.train_loss[0] < 0.7 * cold.train_loss[0]
    other = spec_for_inputs((64,), 10, hidden=(32,))
    fresh = fit(items=items, labels=labels, spec=other, recipe=recipe, seed=0, previous=previous)
    assert len(fresh.train_loss) == 12  # a different architecture cannot be warm-started


def test_small_sets_train_from_scratch_even_with_a_previous_model(digits: Digits) -> None:
    spec = spec_for_inputs((64,), 10)
    # 60 labels = 1 step per epoch: 12 epochs from scratch = 12 steps, not more than 2 x 7.
    recipe = Recipe(
        train=TrainConfig(max_epochs=12, val_fraction=0.0, threads=1), warm_start_steps=7
    )
    items, labels = digits.features[:60], digits.labels[:60]
    previous = fit(items=items, labels=labels, spec=spec, recipe=recipe, seed=0)
    again = fit(items=items, labels=labels, spec=spec, recipe=recipe, seed=0, previous=previous)
    assert len(again.train_loss) == 12 and again.train_loss == previous.train_loss


def test_a_project_recipe_is_its_settings_on_the_defaults_with_the_process_device() -> None:
    base = default_recipe()
    project = Project(
        name="recipe",
        labels=["a", "b"],
        modality="features",
        store_url="file:///tmp/recipe",
        loss_config={"kind": "ce", "gamma": 0.0, "alpha": None, "beta": 0.999, "prior_bias": False},
        selection_config={"strategy": "margin", "oversample": None},
    )
    recipe = project_recipe(project, device="cpu", threads=1)
    assert (recipe.loss.kind, recipe.selection.strategy, recipe.selection.oversample) == (
        "ce",
        "margin",
        None,
    )
    assert recipe.train == replace(base.train, device="cpu", threads=1)
    assert recipe.warm_start_steps == base.warm_start_steps
