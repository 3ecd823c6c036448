"""What goes to Label Studio and what comes back, as plain data (no SDK, no network).

Tasks carry our item id in `data.focalloop_item`, so every annotation, webhook and listing can be
traced back to an item without a lookup table on Label Studio's side. Two kinds of task exist:
`label` (an item the loop selected) and `review` (a labeled item the model confidently
contradicts); both use the same labeling interface, and a review task shows the current label
and the model's suggestion in its note.
"""

from __future__ import annotations

import math
import xml.etree.ElementTree as ET
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

from services.errors import InvalidInput

TaskKind = Literal["label", "review"]
# The names in the labeling interface; annotations are parsed by these.
CHOICES_NAME = "label"
ITEM_KEY = "focalloop_item"
KIND_KEY = "focalloop_kind"
NOTE_KEY = "focalloop_note"
EXTERNAL_ID_KEY = "focalloop_external_id"
# How many feature values a features task shows (a wider row is cut, and says so).
MAX_SHOWN_FEATURES = 64


def object_name(modality: str) -> str:
    """The labeling interface's object tag name (also the task data key) for a modality."""
    if modality == "image":
        return "image"
    if modality == "features":
        return "features"
    raise InvalidInput(f"no labeling interface for modality {modality!r}")


def label_config(labels: Sequence[str], modality: str) -> str:
    """The Label Studio labeling interface (XML) for single-choice classification.

    Images are shown with zoom; a feature row as a two-column table (name, value). The note
    header carries a review task's context and is empty on ordinary tasks.
    """
    if len(labels) < 2:
        raise InvalidInput("a labeling interface needs at least two labels")
    target = object_name(modality)
    view = ET.Element("View")
    ET.SubElement(view, "Header", {"value": f"${NOTE_KEY}"})
    if modality == "image":
        ET.SubElement(view, "Image", {"name": target, "value": f"${target}", "zoom": "true"})
    else:
        ET.SubElement(view, "Table", {"name": target, "value": f"${target}"})
    choices = ET.SubElement(
        view,
        "Choices",
        {
            "name": CHOICES_NAME,
            "toName": target,
            "choice": "single-radio",
            "showInline": "true",
            "required": "true",
        },
    )
    keys = hotkeys(labels)
    for label in labels:
        # ElementTree escapes quotes, ampersands and angle brackets in attribute values.
        attributes = {"value": label} | ({"hotkey": keys[label]} if label in keys else {})
        ET.SubElement(choices, "Choice", attributes)
    return ET.tostring(view, encoding="unicode")


# The keys Label Studio's editor hands out itself, in its order, when a choice names none.
HOTKEY_POOL = "1234567890qwetasdfgzxcvbyiopjklnm"


def hotkeys(labels: Sequence[str]) -> dict[str, str]:
    """The key that selects each label: a one-digit label gets its own digit (left to Label
    Studio, classes "0".."9" got keys 1..9 and 0, so pressing 3 chose "2"), every other label
    the next free key of HOTKEY_POOL in order (1..9 first). Labels past the pool get none."""
    keys = {label: label for label in labels if len(label) == 1 and label.isdigit()}
    free = (key for key in HOTKEY_POOL if key not in keys.values())
    for label in labels:
        if label not in keys:
            key = next(free, None)
            if key is None:
                break
            keys[label] = key
    return keys


@dataclass(frozen=True)
class TaskSpec:
    """One task to create.

    media: the image URL (image projects) or the feature row as {name: value} (features).
    prediction: (label, score) where score is the model's probability of that label, so
    ascending score = least confident = hardest. None with a model_version: a task that must
    not anchor its annotator on the model's answer (an evaluation item, a review), which gets
    an empty prediction instead (see `unanchored_prediction`). None without one: no model yet.
    """

    item_id: int
    external_id: str
    kind: TaskKind
    media: str | Mapping[str, str]
    note: str = ""
    prediction: tuple[str, float] | None = None
    model_version: str | None = None


def task_payload(spec: TaskSpec, modality: str) -> dict[str, Any]:
    """The import payload of one task: data (with our ids) and at most one prediction."""
    target = object_name(modality)
    if modality == "image" and not isinstance(spec.media, str):
        raise InvalidInput("an image task needs an image URL")
    if modality == "features" and isinstance(spec.media, str):
        raise InvalidInput("a features task needs the feature row")
    payload: dict[str, Any] = {
        "data": {
            target: spec.media,
            ITEM_KEY: spec.item_id,
            EXTERNAL_ID_KEY: spec.external_id,
            KIND_KEY: spec.kind,
            NOTE_KEY: spec.note,
        }
    }
    if spec.prediction is not None:
        if spec.model_version is None:
            raise InvalidInput("a prediction needs its model version")
        payload["predictions"] = [
            prediction_payload(spec.prediction, spec.model_version, modality=modality)
        ]
    elif spec.model_version is not None:
        payload["predictions"] = [unanchored_prediction(spec.model_version)]
    return payload


# The score of an unanchored prediction: below any probability, so Label Studio's uncertainty
# sampling (ascending score) serves evaluation items and reviews before ordinary tasks, and the
# promotion gate never waits for its evaluation labels.
UNANCHORED_SCORE = 0.0


def unanchored_prediction(model_version: str) -> dict[str, Any]:
    """A prediction that selects nothing: the task shows no model answer (an evaluation item
    must judge the model, a review must not push its suggestion), yet carries the current model
    version and UNANCHORED_SCORE, which is what places it in Label Studio's stream."""
    return {"model_version": model_version, "score": UNANCHORED_SCORE, "result": []}


def prediction_payload(
    prediction: tuple[str, float], model_version: str, *, modality: str
) -> dict[str, Any]:
    label, score = prediction
    if not math.isfinite(score):
        raise InvalidInput(f"prediction score must be finite, got {score}")
    return {
        "model_version": model_version,
        "score": float(score),
        "result": [
            {
                "from_name": CHOICES_NAME,
                "to_name": object_name(modality),
                "type": "choices",
                "value": {"choices": [label]},
            }
        ],
    }


def feature_row(values: Sequence[float]) -> dict[str, str]:
    """A feature vector as the table a features task shows: f0, f1, ... (4 significant digits),
    cut to MAX_SHOWN_FEATURES with the number left out named."""
    row = {f"f{i}": f"{float(v):.4g}" for i, v in enumerate(values[:MAX_SHOWN_FEATURES])}
    if len(values) > MAX_SHOWN_FEATURES:
        row["..."] = f"{len(values) - MAX_SHOWN_FEATURES} more values not shown"
    return row


@dataclass(frozen=True)
class ParsedAnnotation:
    """One Label Studio annotation, reduced to what the loop stores.

    label is None for a cancelled (skipped) annotation. error names why the annotation cannot
    give a label (no choice, several choices); the label it named, if any, is kept for the
    report.
    """

    annotation_id: int
    task_id: int
    item_id: int | None
    kind: TaskKind
    label: str | None
    cancelled: bool
    updated_at: datetime
    annotator: str
    error: str | None = None


def parse_time(value: object) -> datetime:
    """Label Studio's ISO timestamps ('...Z' or with an offset) as aware UTC."""
    if not isinstance(value, str) or not value:
        raise InvalidInput(f"expected an ISO timestamp, got {value!r}")
    if len(value) > 64:
        raise InvalidInput("bad timestamp: longer than any ISO timestamp")
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
        if parsed.tzinfo is None:
            parsed = parsed.replace(tzinfo=UTC)  # Label Studio's server time is UTC
        # Converting can leave datetime's range (year 1 at +01:00 is year 0 in UTC).
        return parsed.astimezone(UTC)
    except (ValueError, OverflowError) as error:
        raise InvalidInput(f"bad timestamp {value!r}: {error}") from None


def annotator_name(completed_by: object, names: Mapping[int, str] | None = None) -> str:
    """Who answered: their Label Studio email from `names` (user id -> email), else a name made
    of their user id (webhooks send the id, listings may send the user object)."""
    if isinstance(completed_by, Mapping):
        completed_by = completed_by.get("id")
    if isinstance(completed_by, int) and not isinstance(completed_by, bool):
        known = (names or {}).get(completed_by)
        return known[:200] if known else f"label-studio-user-{completed_by}"
    return "label-studio-user-unknown"


def task_item(task: Mapping[str, Any]) -> tuple[int | None, TaskKind]:
    """Our item id and task kind from a task's data; (None, 'label') for a task we did not
    create."""
    data = task.get("data") or {}
    raw = data.get(ITEM_KEY) if isinstance(data, Mapping) else None
    kind = data.get(KIND_KEY, "label") if isinstance(data, Mapping) else "label"
    return label_studio_id(raw), "review" if kind == "review" else "label"


# Label Studio's ids are 64-bit database keys; anything outside cannot be one of its ids and
# would overflow our BIGINT columns.
MAX_ID = 2**63 - 1


def label_studio_id(value: object) -> int | None:
    """value when it is a Label Studio id (an int in [0, 2**63 - 1], not a bool), else None."""
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_ID:
        return value
    return None


def chosen_labels(result: object) -> list[str]:
    """The labels an annotation's result picks in our Choices tag. InvalidInput when the result
    is not the list of regions Label Studio sends (so it cannot be read at all); an empty list
    when it picks nothing."""
    if result is None:
        return []
    if not isinstance(result, list):
        raise InvalidInput("the annotation's result is not a list of regions")
    chosen: list[str] = []
    for region in result:
        if not isinstance(region, Mapping):
            raise InvalidInput("the annotation's result holds a region that is not an object")
        if region.get("from_name") != CHOICES_NAME or region.get("type") != "choices":
            continue  # another tag's region (a future interface may add some): not ours
        value = region.get("value")
        choices = value.get("choices") if isinstance(value, Mapping) else None
        if not isinstance(choices, list) or not all(isinstance(c, str) for c in choices):
            raise InvalidInput("a choices region whose value is not {'choices': [label, ...]}")
        chosen.extend(choices)
    return chosen


def parse_annotation(
    annotation: Mapping[str, Any],
    task: Mapping[str, Any] | None = None,
    names: Mapping[int, str] | None = None,
) -> ParsedAnnotation:
    """Reduce an annotation (as a webhook or a task listing carries it) to a ParsedAnnotation.

    `task` is the annotation's task when the payload carries it separately (webhooks); listings
    nest annotations under their task and pass it too. `names`: user id -> email, for the
    annotator's name (`annotator_name`). Raises InvalidInput when the annotation
    has no id, task or timestamp, or a result that cannot be read.
    """
    annotation_id = label_studio_id(annotation.get("id"))
    if annotation_id is None:
        raise InvalidInput("annotation without an integer id in [0, 2**63)")
    task = task if task is not None else {}
    raw_task_id = label_studio_id(task.get("id", annotation.get("task")))
    if raw_task_id is None:
        raise InvalidInput(f"annotation {annotation_id} names no task id in [0, 2**63)")
    named = annotation.get("task")
    if named is not None and named != raw_task_id:
        # Label Studio never sends this; trusting either side could label the wrong item.
        raise InvalidInput(
            f"annotation {annotation_id} names task {str(named)[:40]} "
            f"but comes with task {raw_task_id}"
        )
    item_id, kind = task_item(task)
    updated_at = parse_time(annotation.get("updated_at") or annotation.get("created_at"))
    cancelled = bool(annotation.get("was_cancelled", False))
    common = {
        "annotation_id": annotation_id,
        "task_id": raw_task_id,
        "item_id": item_id,
        "kind": kind,
        "updated_at": updated_at,
        "annotator": annotator_name(annotation.get("completed_by"), names),
    }
    chosen = chosen_labels(annotation.get("result"))
    if cancelled:
        return ParsedAnnotation(label=None, cancelled=True, **common)  # type: ignore[arg-type]
    if len(chosen) == 1:
        return ParsedAnnotation(label=chosen[0], cancelled=False, **common)  # type: ignore[arg-type]
    error = (
        "the annotation chose no label"
        if not chosen
        else f"the annotation chose {len(chosen)} labels {chosen}; exactly one is needed"
    )
    return ParsedAnnotation(label=None, cancelled=False, error=error, **common)  # type: ignore[arg-type]
