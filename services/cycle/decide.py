"""The decision core: how many items a cycle may ask for, which of them are evaluation items,
how the model scores a chunk, and which items it picks (exploring with cold start while a class
is still missing). Pure: counts, probabilities and candidates in, item ids out. The score and
select stages gather the inputs from the database and the store and write the rows.
"""

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

from services.selection.candidates import Candidates, chunk_candidates
from services.selection.config import SelectionConfig, select_from
from services.selection.strategies import AcquisitionStrategy

# Batches after the first model in which the gate's minimum evidence is labeled.
EVIDENCE_BATCHES = 2


def allowance(*, batch_size: int, budget: int | None, spent: int, committed: int) -> int:
    """Items a cycle may ask people for: the batch, capped by what is left of the budget.
    spent: labels people gave; committed: items already asked for and not answered yet."""
    if budget is None:
        return batch_size
    return max(0, min(batch_size, budget - spent - committed))


def evaluation_count(
    *, allowance: int, share: float, waiting: int, held: int = 0, evidence_minimum: int = 0
) -> int:
    """How many unlabeled evaluation items lead a batch of `allowance`: `share` of it, at least
    one while any wait, so a large evaluation set neither stalls selection nor waits forever.

    held: labeled evaluation items still judging; evidence_minimum: how many the gate needs to
    compare models. While fewer are held, the batch takes half that minimum (at most half the
    batch): two batches after the first model, the third model is judged on evidence rather than
    promoted for want of it. Those labels train once released, so the catch-up costs only their
    delay.
    """
    if allowance < 1:
        return 0
    wanted = max(1, math.floor(share * allowance))
    if held < evidence_minimum:
        catch_up = min(math.ceil(evidence_minimum / EVIDENCE_BATCHES), max(1, allowance // 2))
        wanted = max(wanted, catch_up)
    return min(waiting, wanted)


def exploration_count(
    *, counts: NDArray[np.integer[Any]], has_model: bool, room: int, explore_share: float
) -> int:
    """Picks left to cold start: all of them without a model; `explore_share` of them while the
    labels (counts [C]) still miss a class, since a model cannot point at a class it has never
    seen; none otherwise."""
    if not has_model:
        return room
    if np.any(counts == 0):
        return min(math.ceil(explore_share * room), room)
    return 0


def chunk_picks(
    *,
    item_ids: NDArray[np.int64],
    probs: NDArray[np.float32],
    embeddings: NDArray[np.float32],
    strategy: AcquisitionStrategy,
    k_prime: int,
) -> Candidates:
    """A scored chunk's candidates: the strategy's scores for its selectable items [n] (probs
    [n, C], embeddings [n, D]), cut to its top-k' overall and per predicted class."""
    scored = Candidates.build(item_ids, probs, strategy.scores(probs), embeddings)
    return chunk_candidates(scored, k_prime)


@dataclass(frozen=True)
class ModelPick:
    """An item the model chose: its strategy score and calibrated probabilities [C]."""

    item_id: int
    score: float
    probs: NDArray[np.float32]


@dataclass(frozen=True)
class BatchPlan:
    """A cycle's batch in labeling order: evaluation items, the model's picks, cold start."""

    evaluation: list[int]
    model: list[ModelPick]
    cold_start: list[int]

    def item_ids(self) -> list[int]:
        return [*self.evaluation, *(pick.item_id for pick in self.model), *self.cold_start]


def plan_batch(
    *,
    allowance: int,
    evaluation: Sequence[int],
    counts: NDArray[np.integer[Any]],
    candidates: Candidates | None,
    has_model: bool,
    selection: SelectionConfig,
    cold_start: Callable[[int, set[int]], list[int]],
) -> BatchPlan:
    """The batch: `evaluation` (the waiting evaluation items chosen to lead it) first, then the
    model's picks from `candidates` (merged and still unlabeled; None or empty when nothing was
    scored), then `cold_start(k, exclude)`'s picks for the exploring share.

    counts: labels per class [C] of the dataset version the cycle trained on.
    """
    room = max(0, allowance - len(evaluation))
    explore = exploration_count(
        counts=counts, has_model=has_model, room=room, explore_share=selection.explore_share
    )
    model: list[ModelPick] = []
    if candidates is not None and len(candidates) and room > explore:
        chosen = select_from(candidates, counts=counts, config=selection, batch_size=room - explore)
        position = {int(item_id): p for p, item_id in enumerate(candidates.item_ids)}
        model = [
            ModelPick(
                int(item_id),
                float(candidates.scores[position[int(item_id)]]),
                candidates.probs[position[int(item_id)]],
            )
            for item_id in chosen
        ]
    explored = cold_start(explore, {pick.item_id for pick in model}) if explore else []
    return BatchPlan(evaluation=list(evaluation), model=model, cold_start=explored)
