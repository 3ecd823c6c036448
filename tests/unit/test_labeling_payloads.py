"""Label Studio payloads and annotation parsing, as plain data."""

import xml.etree.ElementTree as ET
from datetime import UTC, datetime

import numpy as np
import pytest

from labeling.label_studio.payloads import (
    MAX_SHOWN_FEATURES,
    TaskSpec,
    annotator_name,
    feature_row,
    hotkeys,
    label_config,
    parse_annotation,
    parse_time,
    task_payload,
)
from services.cycle.review import review_candidates
from services.errors import InvalidInput


def test_label_config_escapes_labels_and_names_the_object() -> None:
    config = label_config(['a "quoted" & <odd>', "plain"], "image")
    root = ET.fromstring(config)
    choices = root.find("Choices")
    assert choices is not None
    assert [c.get("value") for c in choices] == ['a "quoted" & <odd>', "plain"]
    assert choices.get("toName") == "image"
    image = root.find("Image")
    assert image is not None and image.get("value") == "$image"
    table = ET.fromstring(label_config(["x", "y"], "features")).find("Table")
    assert table is not None and table.get("name") == "features"


def _keys(config: str) -> dict[str, str | None]:
    choices = ET.fromstring(config).find("Choices")
    assert choices is not None
    return {str(c.get("value")): c.get("hotkey") for c in choices}


def test_digit_classes_get_their_own_digit() -> None:
    # Left to Label Studio, "0".."9" got keys 1..9 and 0: pressing 3 labelled the item "2".
    digits = [str(d) for d in range(10)]
    assert _keys(label_config(digits, "image")) == {d: d for d in digits}


def test_other_labels_get_one_to_nine_in_order_then_letters() -> None:
    assert hotkeys(["cat", "dog"]) == {"cat": "1", "dog": "2"}
    many = [f"class-{i}" for i in range(12)]
    keys = _keys(label_config(many, "features"))
    assert [keys[label] for label in many] == [*"1234567890", "q", "w"]
    # A digit label keeps its digit; the others skip it.
    assert hotkeys(["other", "8", "scratch"]) == {"8": "8", "other": "1", "scratch": "2"}
    assert len(set(hotkeys([f"c{i}" for i in range(40)]).values())) == 33  # the pool's size


@pytest.mark.parametrize(
    ("labels", "modality", "message"),
    [(["only"], "image", "at least two"), (["a", "b"], "audio", "no labeling interface")],
)
def test_label_config_refuses(labels: list[str], modality: str, message: str) -> None:
    with pytest.raises(InvalidInput, match=message):
        label_config(labels, modality)


def test_task_payload_carries_our_ids_and_one_prediction() -> None:
    payload = task_payload(
        TaskSpec(
            item_id=7,
            external_id="x-7",
            kind="label",
            media="http://host/img.png",
            prediction=("cat", 0.61),
            model_version="proj-m3",
        ),
        "image",
    )
    assert payload["data"] == {
        "image": "http://host/img.png",
        "focalloop_item": 7,
        "focalloop_external_id": "x-7",
        "focalloop_kind": "label",
        "focalloop_note": "",
    }
    assert payload["predictions"] == [
        {
            "model_version": "proj-m3",
            "score": 0.61,
            "result": [
                {
                    "from_name": "label",
                    "to_name": "image",
                    "type": "choices",
                    "value": {"choices": ["cat"]},
                }
            ],
        }
    ]
    no_model = task_payload(
        TaskSpec(item_id=1, external_id="a", kind="label", media={"f0": "1"}), "features"
    )
    assert "predictions" not in no_model
    with pytest.raises(InvalidInput, match="model version"):
        task_payload(
            TaskSpec(item_id=1, external_id="a", kind="label", media="u", prediction=("c", 0.5)),
            "image",
        )
    with pytest.raises(InvalidInput, match="image URL"):
        task_payload(TaskSpec(item_id=1, external_id="a", kind="label", media={}), "image")


def test_feature_row_is_cut_and_says_so() -> None:
    row = feature_row([0.123456, 2.0])
    assert row == {"f0": "0.1235", "f1": "2"}
    wide = feature_row(list(range(MAX_SHOWN_FEATURES + 5)))
    assert len(wide) == MAX_SHOWN_FEATURES + 1
    assert wide["..."] == "5 more values not shown"


def _annotation(**changes: object) -> dict[str, object]:
    base: dict[str, object] = {
        "id": 11,
        "task": 5,
        "updated_at": "2026-11-22T16:57:13.389430Z",
        "completed_by": 3,
        "was_cancelled": False,
        "result": [
            {
                "from_name": "label",
                "to_name": "image",
                "type": "choices",
                "value": {"choices": ["b"]},
            }
        ],
    }
    base.update(changes)
    return base


def test_parse_annotation_label_cancel_and_errors() -> None:
    task = {"id": 5, "data": {"focalloop_item": 42, "focalloop_kind": "review"}}
    parsed = parse_annotation(_annotation(), task)
    assert (parsed.annotation_id, parsed.task_id, parsed.item_id, parsed.kind) == (
        11,
        5,
        42,
        "review",
    )
    assert (parsed.label, parsed.cancelled, parsed.error) == ("b", False, None)
    assert parsed.updated_at == datetime(2026, 11, 22, 16, 57, 13, 389430, tzinfo=UTC)
    assert parsed.annotator == "label-studio-user-3"
    skipped = parse_annotation(_annotation(was_cancelled=True, result=[]))
    assert (skipped.label, skipped.cancelled, skipped.item_id) == (None, True, None)
    empty = parse_annotation(_annotation(result=[]))
    assert empty.error == "the annotation chose no label"
    two = parse_annotation(
        _annotation(
            result=[
                {"from_name": "label", "type": "choices", "value": {"choices": ["a", "b"]}},
            ]
        )
    )
    assert two.error is not None and "2 labels" in two.error
    with pytest.raises(InvalidInput, match="integer id"):
        parse_annotation(_annotation(id="x"))
    with pytest.raises(InvalidInput, match="names no task"):
        parse_annotation(_annotation(task=None))
    with pytest.raises(InvalidInput, match="bad timestamp"):
        parse_annotation(_annotation(updated_at="yesterday"))


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"id": True}, "integer id"),
        ({"id": -1}, "integer id"),
        ({"id": 2**63}, "integer id"),
        ({"task": 2**64}, "names task"),
        ({"updated_at": "0001-01-01T00:00:00+00:01"}, "out of range"),
        ({"updated_at": "9999-12-31T23:59:59-00:01"}, "out of range"),
        ({"updated_at": "2026-01-01T00:00:00" + "0" * 100}, "longer than"),
        ({"result": {"choices": ["a"]}}, "not a list"),
        ({"result": ["a"]}, "not an object"),
        ({"result": [{"from_name": "label", "type": "choices", "value": ["a"]}]}, "choices"),
        (
            {"result": [{"from_name": "label", "type": "choices", "value": {"choices": [1]}}]},
            "choices",
        ),
    ],
)
def test_what_label_studio_never_sends_is_invalid_input(
    changes: dict[str, object], reason: str
) -> None:
    with pytest.raises(InvalidInput, match=reason):
        parse_annotation(_annotation(**changes), {"id": 5, "data": {}})


def test_times_and_annotators() -> None:
    assert parse_time("2026-01-02T03:04:05+02:00") == datetime(2026, 1, 2, 1, 4, 5, tzinfo=UTC)
    assert parse_time("2026-01-02T03:04:05") == datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    assert annotator_name({"id": 9, "email": "a@b"}) == "label-studio-user-9"
    assert annotator_name(None) == "label-studio-user-unknown"
    assert annotator_name(True) == "label-studio-user-unknown"
    # Named by their Label Studio email when it is known; by id when Label Studio was not asked.
    names = {9: "ann@example.com"}
    assert annotator_name(9, names) == "ann@example.com"
    assert annotator_name({"id": 9}, names) == "ann@example.com"
    assert annotator_name(10, names) == "label-studio-user-10"


def test_review_candidates_find_flipped_labels_cross_fitted() -> None:
    rng = np.random.default_rng(0)
    inputs = np.concatenate([rng.normal(-2, 1, (60, 4)), rng.normal(2, 1, (60, 4))]).astype(
        np.float32
    )
    labels = np.array([0] * 60 + [1] * 60, dtype=np.int64)
    labels[[3, 70]] = [1, 0]  # two obvious mistakes
    ids = np.arange(100, 220, dtype=np.int64)
    picked = review_candidates(inputs, labels, ids, n_classes=3, threshold=0.05, limit=10, seed=0)
    assert {c.item_id for c in picked} == {103, 170}
    assert all(c.given_probability < 0.05 and c.suggested != c.given for c in picked)
    assert [c.given_probability for c in picked] == sorted(c.given_probability for c in picked)
    capped = review_candidates(inputs, labels, ids, n_classes=3, threshold=0.05, limit=1, seed=0)
    assert len(capped) == 1
    one_class = review_candidates(
        inputs, np.zeros(120, dtype=np.int64), ids, n_classes=2, threshold=0.5, limit=5, seed=0
    )
    assert one_class == []
