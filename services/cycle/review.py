"""The label-noise review: labeled items a cross-fitted model confidently contradicts go back to
people (as review tasks their labeler sends), at most a few per cycle and once per item. Focal
loss amplifies label noise, so the loop questions the labels it trains on.
"""

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import log_loss
from sklearn.model_selection import StratifiedKFold, cross_val_predict
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sqlmodel import Session, col, select

from services.models import Item, ItemStatus, LabelTask, Project


@dataclass(frozen=True)
class ReviewCandidate:
    item_id: int
    given: int  # class index of the current label
    given_probability: float  # cross-fitted probability of the current label
    suggested: int
    suggested_probability: float


# The logistic regression's inverse regularization strengths tried; the one whose out-of-fold
# probabilities have the lowest log loss judges. One fixed C cannot fit every input: C = 10 (used
# until 2026-11-30) overfits the demo's 1,024 pixels at a few hundred labels (cross-fitted
# accuracy 0.71 at 300 labels with 10% noise; `focalloop bench review`, 3 seeds: 15 false flags
# per 100 correct labels), while C = 0.01, right for those pixels, gives the 13 features of
# scikit-learn's wine data probabilities too flat to flag anything. Larger Cs cost the most time
# on wide inputs and were rarely chosen.
REVIEW_CS = (0.01, 0.1, 1.0)


def cross_fitted_probabilities(
    x: NDArray[np.float32], y: NDArray[np.int64], *, folds: int, seed: int
) -> NDArray[np.float64]:
    """[n, classes present] out-of-fold probabilities of a standardized logistic regression
    (stratified `folds`), at the C of REVIEW_CS with the lowest log loss on them."""
    cv = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    best: tuple[float, NDArray[np.float64]] | None = None
    for strength in REVIEW_CS:
        probs = cross_val_predict(
            make_pipeline(StandardScaler(), LogisticRegression(C=strength, max_iter=2000)),
            x,
            y,
            cv=cv,
            method="predict_proba",
        )
        loss = float(log_loss(y, probs, labels=np.unique(y)))
        if best is None or loss < best[0]:
            best = (loss, probs)
    assert best is not None
    return best[1]


def review_candidates(
    inputs: NDArray[np.float32],
    labels: NDArray[np.int64],
    item_ids: NDArray[np.int64],
    *,
    n_classes: int,
    threshold: float,
    limit: int,
    seed: int,
) -> list[ReviewCandidate]:
    """Labeled items whose label a cross-fitted model confidently contradicts, most
    contradicted first.

    inputs [n, ...] (the items as the network sees them, flattened here), labels [n] class
    indices. Each item's probability of its given label comes from a standardized logistic
    regression fitted on the other folds (5-fold, stratified), so no label can vouch for
    itself. The trained network's own embeddings are not used: it was fitted on these very
    labels and has learned the mistakes (measured on digits with 3 flipped labels: embeddings
    found 1 of 3, the inputs 3 of 3). Classes with fewer than 2 labeled items take no part.
    """
    if limit <= 0 or len(labels) == 0:
        return []
    counts = np.bincount(labels, minlength=n_classes)
    usable = counts[labels] >= 2
    if len(np.unique(labels[usable])) < 2:
        return []
    x = inputs.reshape(len(inputs), -1)[usable]
    y, ids = labels[usable], item_ids[usable]
    folds = int(min(5, counts[counts >= 2].min()))
    probs = cross_fitted_probabilities(x, y, folds=folds, seed=seed)
    present = np.unique(y)  # predict_proba's columns are these classes, in this order
    column = {int(cls): j for j, cls in enumerate(present)}
    given_p = probs[np.arange(len(y)), [column[int(c)] for c in y]]
    order = np.argsort(given_p, kind="stable")
    picked: list[ReviewCandidate] = []
    for row in order:
        if given_p[row] >= threshold or len(picked) >= limit:
            break
        suggested_column = int(probs[row].argmax())
        picked.append(
            ReviewCandidate(
                item_id=int(ids[row]),
                given=int(y[row]),
                given_probability=float(given_p[row]),
                suggested=int(present[suggested_column]),
                suggested_probability=float(probs[row, suggested_column]),
            )
        )
    return picked


def plan_reviews(
    session: Session,
    project: Project,
    cycle_id: int,
    candidates: Iterable[ReviewCandidate],
    model_version: str,
) -> int:
    """Pending review tasks for the candidates. An item is reviewed at most once (a reviewer's
    answer is final; a model that still disagrees does not send it back again). Returns how
    many were planned."""
    candidates = list(candidates)
    if not candidates:
        return 0
    ids = [c.item_id for c in candidates]
    reviewed = set(
        session.exec(
            select(LabelTask.item_id).where(
                LabelTask.project_id == project.id,
                LabelTask.kind == "review",
                col(LabelTask.item_id).in_(ids),
            )
        ).all()
    )
    labeled = set(
        session.exec(
            select(Item.id).where(col(Item.id).in_(ids), col(Item.status) == ItemStatus.LABELED)
        ).all()
    )
    planned = 0
    for candidate in candidates:
        if candidate.item_id in reviewed or candidate.item_id not in labeled:
            continue
        given = project.labels[candidate.given]
        suggested = project.labels[candidate.suggested]
        session.add(
            LabelTask(
                project_id=project.id or 0,
                item_id=candidate.item_id,
                kind="review",
                cycle_id=cycle_id,
                # No prediction: the suggestion is in the note, and nothing is pre-selected
                # (a pre-selected suggestion is one click from overwriting a correct label).
                model_version=model_version,
                note=(
                    f"Review: labeled {given!r}; the model suggests {suggested!r} "
                    f"(p={candidate.suggested_probability:.2f}; p({given!r})="
                    f"{candidate.given_probability:.3f}). Choose the correct label."
                ),
            )
        )
        planned += 1
    session.flush()
    return planned
