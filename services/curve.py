"""A model's compact summary for the learning curve, written beside its full metrics when the
model is recorded (`ModelVersion.summary`).

The console draws every model version of a project; decoding each one's full metrics (training
curves, two evaluation reports: about 20 KB) for that took most of the project page's time on
200 models. The summary holds only what the curve draws, about a tenth of it.
"""

from typing import Any

from services.status import headline_report, is_imbalanced


def curve_summary(metrics: dict[str, Any]) -> dict[str, Any]:
    """What the learning curve needs of `metrics` (a ModelVersion's).

    classes: one [label index, support, predicted, hits, recall, precision] per class, where
    predicted = items the model put in the class and hits = those it got right (counts from
    the confusion matrix). Rates are fractions, focal-loss percentiles nats; report fields are
    None when the model had no held-out report.
    """
    which, report = headline_report(metrics)
    summary: dict[str, Any] = {
        "evaluated_on": which,
        "ece_before": metrics.get("ece_before"),
        "ece_after": metrics.get("ece_after"),
        "temperature": metrics.get("temperature"),
        "labels": metrics.get("labels"),
        "minority_class": None,
        "n_items": None,
        "macro_f1": None,
        "hard_example_rate": None,
        "focal_loss_percentiles": {},
        "ece": None,
        "classes": [],
    }
    if report is None:
        return summary
    confusion = report.get("confusion") or []
    predicted = [sum(column) for column in zip(*confusion, strict=True)] if confusion else []
    classes = []
    for row in report["per_class"]:
        c = int(row["label"])
        hits = int(confusion[c][c]) if confusion else round(row["recall"] * row["support"])
        classes.append(
            [
                c,
                int(row["support"]),
                int(predicted[c]) if predicted else 0,
                hits,
                float(row["recall"]),
                float(row["precision"]),
            ]
        )
    skewed = is_imbalanced(metrics.get("class_counts"))
    return summary | {
        "minority_class": int(report["minority_class"]) if skewed else None,
        "n_items": int(report["n_items"]),
        "macro_f1": float(report["macro_f1"]),
        "hard_example_rate": float(report["hard_example_rate"]),
        "focal_loss_percentiles": dict(report.get("focal_loss_percentiles") or {}),
        "ece": float(report["ece"]),
        "classes": classes,
    }
