"""One active-learning cycle as plain functions, top to bottom.

    train_stage   fit a model on the current dataset version (focal loss, early stopping,
                  temperature scaling)
    score_stage   score the unlabeled pool in chunks; keep each chunk's candidates, merge them
    select_stage  choose the batch: strategy scores + diversity + class quotas (cold start when
                  there is no model yet or the labels still miss a class)
    hand off      give the batch to a labeler (the simulated annotator, later Label Studio)
    ingest        the answers become the next immutable dataset version

`run_cycle` calls the first three in order. Every function takes what it needs as arguments and
keeps no process-level state, so the Celery workers can run the same functions on other machines.
"""

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import numpy as np
from numpy.typing import NDArray

from services.errors import InvalidInput
from services.ml.nets import Classifier, ModelSpec
from services.ml.score import score
from services.ml.train import DeviceChoice, LossSpec, TrainConfig, TrainResult, train
from services.selection.batch import BatchSelector, ClassQuota, KCenterDiversity, TopScores
from services.selection.candidates import Candidates, chunk_candidates, merge_candidates
from services.selection.cold_start import ColdStartMethod, cold_start
from services.selection.strategies import STRATEGIES, make_strategy


@dataclass(frozen=True)
class SelectionConfig:
    """How a batch is chosen.

    strategy: a name from `STRATEGIES`. oversample: k-center diversity over the top
    batch x oversample candidates (None = off). quota_min_share: share of each batch reserved
    for items predicted as a rare class (None = off); a class is rare when its labeled count is
    below `rare_share` x the mean count per class. cold_start: how to pick without a model.
    explore_share: while the labels still miss a class, this share of each batch comes from
    cold start over the unlabeled pool, to find the missing class.
    """

    strategy: str = "least_confidence"
    oversample: int | None = 5
    quota_min_share: float | None = 0.25
    rare_share: float = 0.5
    cold_start: ColdStartMethod = "kmeans"
    explore_share: float = 0.5

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise InvalidInput(
                f"unknown strategy {self.strategy!r}; choose from {sorted(STRATEGIES)}"
            )
        if self.oversample is not None and self.oversample < 1:
            raise InvalidInput(f"oversample must be >= 1 or None, got {self.oversample}")
        for name in ("quota_min_share", "rare_share", "explore_share"):
            value = getattr(self, name)
            if value is not None and not 0.0 <= value <= 1.0:
                raise InvalidInput(f"{name} must be in [0, 1], got {value}")
        if self.cold_start not in ("random", "kmeans"):
            raise InvalidInput(f"cold_start must be random or kmeans, got {self.cold_start!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "SelectionConfig":
        unknown = set(data) - set(cls.__dataclass_fields__)
        if unknown:
            raise InvalidInput(f"unknown selection settings: {sorted(unknown)}")
        try:
            return cls(**data)
        except InvalidInput:
            raise
        except (TypeError, ValueError) as error:  # a value of the wrong type
            raise InvalidInput(f"invalid selection settings: {error}") from None

    def candidate_multiplier(self) -> int:
        """k' / batch: how many candidates per batch slot scoring chunks must keep."""
        return self.oversample or 1

    def selector(self, rare_classes: Sequence[int]) -> BatchSelector:
        selector: BatchSelector = TopScores()
        if self.oversample is not None:
            selector = KCenterDiversity(selector, oversample=self.oversample)
        if self.quota_min_share is not None and rare_classes:
            selector = ClassQuota(
                selector, rare_classes=rare_classes, min_share=self.quota_min_share
            )
        return selector


@dataclass(frozen=True)
class LoopConfig:
    """Everything a cycle needs besides data. batch_size: items handed off per cycle;
    chunk_size: pool items scored per chunk. warm_start_steps: when the previous
    cycle's model is given, fine-tune it for about this many optimizer steps (whole epochs)
    instead of training from scratch (None = always from scratch)."""

    loss: LossSpec = field(default_factory=LossSpec)
    train: TrainConfig = field(default_factory=TrainConfig)
    selection: SelectionConfig = field(default_factory=SelectionConfig)
    batch_size: int = 20
    chunk_size: int = 4096
    warm_start_steps: int | None = None


def default_loop_config() -> LoopConfig:
    """The project default: what `simulate` runs without --strategy/--loss/--gamma/--alpha, and
    what projects start with. Each choice was measured on the demo setting (BENCHMARKS.md)."""
    return LoopConfig(
        loss=LossSpec(kind="focal", gamma=2.0, alpha="effective_number", prior_bias=True),
        # Below 500 labels nothing is held out: every label trains, for 100 epochs. Early
        # stopping on a few dozen held-out items stopped models that were still learning, and
        # the held-out share costs the rare class its scarcest examples.
        train=TrainConfig(
            max_epochs=100, patience=15, learning_rate=3e-3, val_fraction=0.2, min_val_items=100
        ),
        selection=SelectionConfig(),
        # Once a cycle's from-scratch training would exceed 200 steps, fine-tune the previous
        # model for 100 instead: the same minority F1 at 300 labels in half the time.
        warm_start_steps=100,
    )


class PreviousModel(Protocol):
    """What a warm start needs of the last model: a `TrainResult` or a loaded `Checkpoint`."""

    @property
    def model(self) -> Classifier: ...

    @property
    def spec(self) -> ModelSpec: ...


@dataclass(frozen=True)
class LabeledSet:
    """An immutable dataset version: item_ids [m] int64 (unique, sorted) and labels [m]."""

    version: int
    item_ids: NDArray[np.int64]
    labels: NDArray[np.int64]
    parent: int | None = None

    @classmethod
    def empty(cls) -> "LabeledSet":
        return cls(0, np.empty(0, dtype=np.int64), np.empty(0, dtype=np.int64))

    def counts(self, n_classes: int) -> NDArray[np.int64]:
        """Labels per class, [n_classes]."""
        return np.bincount(self.labels, minlength=n_classes).astype(np.int64)

    def __len__(self) -> int:
        return len(self.item_ids)


@dataclass(frozen=True)
class CycleResult:
    """What one cycle produced: the model (None on a cold start) and the batch, in labeling
    order, as item ids."""

    model: TrainResult | None
    selected: NDArray[np.int64]
    cold_start_picks: int


def ingest(
    dataset: LabeledSet,
    item_ids: Sequence[int] | NDArray[np.integer[Any]],
    labels: Sequence[int] | NDArray[np.integer[Any]],
) -> LabeledSet:
    """The next dataset version: `dataset` plus these answers (a newer answer for an item that
    is already labeled replaces its label). Raises InvalidInput on mismatched lengths."""
    if len(item_ids) != len(labels):
        raise InvalidInput(f"{len(item_ids)} item ids but {len(labels)} labels")
    merged = dict(zip(dataset.item_ids.tolist(), dataset.labels.tolist(), strict=True))
    merged.update(zip((int(i) for i in item_ids), (int(y) for y in labels), strict=True))
    ids = np.array(sorted(merged), dtype=np.int64)
    return LabeledSet(
        version=dataset.version + 1,
        item_ids=ids,
        labels=np.array([merged[i] for i in ids.tolist()], dtype=np.int64),
        parent=dataset.version,
    )


def train_stage(
    *,
    items: NDArray[Any],
    dataset: LabeledSet,
    spec: ModelSpec,
    config: LoopConfig,
    seed: int,
    previous: PreviousModel | None = None,
) -> TrainResult:
    """Train on the dataset version's items. items: [n_pool, *item_shape], indexed by id.

    With `previous` (the last cycle's model, same architecture) and `warm_start_steps` set,
    the previous weights are fine-tuned on the new version for that many optimizer steps,
    rounded up to whole epochs (a budget in epochs would starve small sets, whose epochs are a
    single step), but only where that saves real compute: when training from scratch would
    take more than twice as many steps. Fresh training generalizes better than warm starts
    (Ash & Adams 2020), and on small sets it is cheap.
    """
    overrides: dict[str, Any] = {"seed": seed}
    init_state = None
    steps_per_epoch = math.ceil(len(dataset) / config.train.batch_size)
    from_scratch_steps = config.train.max_epochs * steps_per_epoch
    warm = config.warm_start_steps
    if (
        previous is not None
        and warm is not None
        and previous.spec == spec
        and (from_scratch_steps > 2 * warm)
    ):
        init_state = previous.model.state_dict()
        overrides["max_epochs"] = max(1, math.ceil(warm / steps_per_epoch))
    train_config = TrainConfig(**{**config.train.__dict__, **overrides})
    return train(
        items=items[dataset.item_ids],
        labels=dataset.labels,
        spec=spec,
        loss=config.loss,
        config=train_config,
        init_state=init_state,
    )


def score_stage(
    *,
    model: TrainResult,
    items: NDArray[Any],
    item_ids: NDArray[np.int64],
    strategy_name: str,
    k_prime: int,
    chunk_size: int,
    seed: int,
    device: DeviceChoice = "auto",
) -> Candidates:
    """Score the unlabeled items chunk by chunk and keep each chunk's candidates.

    items: [n_pool, *item_shape] indexed by id; item_ids: the unlabeled ids to score.
    Returns the merged candidates, ranked.
    """
    if len(item_ids) == 0:
        raise InvalidInput("the pool is empty: there is nothing to score")
    strategy = make_strategy(strategy_name, seed=seed, gamma=_scalar_gamma(model.loss))
    chunks = []
    for start in range(0, len(item_ids), chunk_size):
        ids = item_ids[start : start + chunk_size]
        output = score(
            model.model, items[ids], spec=model.spec, temperature=model.temperature, device=device
        )
        scored = Candidates.build(
            ids, output.probs, strategy.scores(output.probs), output.embeddings
        )
        chunks.append(chunk_candidates(scored, k_prime))
    return merge_candidates(chunks, k_prime=k_prime)


def rare_classes(counts: NDArray[np.integer[Any]], rare_share: float) -> list[int]:
    """Classes whose labeled count is below rare_share x the mean count per class."""
    threshold = rare_share * counts.sum() / len(counts)
    return [int(c) for c in np.flatnonzero(counts < threshold)]


def select_stage(
    *,
    candidates: Candidates,
    counts: NDArray[np.integer[Any]],
    config: SelectionConfig,
    batch_size: int,
) -> NDArray[np.int64]:
    """The batch's item ids, in labeling order."""
    selector = config.selector(rare_classes(counts, config.rare_share))
    return candidates.item_ids[selector.select(candidates, batch_size)]


def run_cycle(
    *,
    items: NDArray[Any],
    unlabeled_ids: NDArray[np.int64],
    dataset: LabeledSet,
    spec: ModelSpec,
    config: LoopConfig,
    seed: int,
    previous: TrainResult | None = None,
) -> CycleResult:
    """One cycle: train on `dataset` (unless a cold start is due), then choose the batch.

    items: [n_pool, *item_shape] indexed by item id. previous: the last cycle's model, for warm
    starts (see `train_stage`). Returns the model and the batch to hand off.
    """
    model = None
    if not needs_cold_start(dataset, spec.n_classes):
        model = train_stage(
            items=items, dataset=dataset, spec=spec, config=config, seed=seed, previous=previous
        )
    return choose_batch(
        model=model,
        items=items,
        unlabeled_ids=unlabeled_ids,
        dataset=dataset,
        n_classes=spec.n_classes,
        config=config,
        batch_size=config.batch_size,
        seed=seed,
    )


def needs_cold_start(dataset: LabeledSet, n_classes: int) -> bool:
    """True while there is nothing a classifier could learn from (fewer than 2 classes)."""
    return bool(np.count_nonzero(dataset.counts(n_classes)) < 2)


def choose_batch(
    *,
    model: TrainResult | None,
    items: NDArray[Any],
    unlabeled_ids: NDArray[np.int64],
    dataset: LabeledSet,
    n_classes: int,
    config: LoopConfig,
    batch_size: int,
    seed: int,
) -> CycleResult:
    """score -> select with `model`, or a cold start when there is no model.

    While the labels still miss a class, `explore_share` of the batch comes from cold start
    over the unlabeled items, since a model cannot point at a class it has never seen.
    """
    if len(unlabeled_ids) == 0:
        raise InvalidInput("every item is labeled: nothing left to select")
    features = items.reshape(len(items), -1)
    selection = config.selection
    if model is None:
        picks = cold_start(
            features[unlabeled_ids], batch_size, method=selection.cold_start, seed=seed
        )
        return CycleResult(model=None, selected=unlabeled_ids[picks], cold_start_picks=len(picks))

    counts = dataset.counts(n_classes)
    explore = 0
    if np.any(counts == 0):
        explore = min(math.ceil(selection.explore_share * batch_size), batch_size)
    exploit: NDArray[np.int64] = np.empty(0, dtype=np.int64)
    if batch_size > explore:
        candidates = score_stage(
            model=model,
            items=items,
            item_ids=unlabeled_ids,
            strategy_name=selection.strategy,
            k_prime=batch_size * selection.candidate_multiplier(),
            chunk_size=config.chunk_size,
            seed=seed,
            device=config.train.device,
        )
        exploit = select_stage(
            candidates=candidates, counts=counts, config=selection, batch_size=batch_size - explore
        )
    explored: NDArray[np.int64] = np.empty(0, dtype=np.int64)
    remaining = np.setdiff1d(unlabeled_ids, exploit)
    if explore and len(remaining):
        picks = cold_start(
            features[remaining], explore, method=selection.cold_start, seed=seed + len(dataset)
        )
        explored = remaining[picks].astype(np.int64)
    return CycleResult(
        model=model, selected=np.concatenate([exploit, explored]), cold_start_picks=len(explored)
    )


def _scalar_gamma(loss: LossSpec) -> float:
    # expected_focal scores with one gamma; a per-class gamma is summarized by its mean.
    if isinstance(loss.gamma, tuple):
        return float(np.mean(loss.gamma))
    return float(loss.gamma)
