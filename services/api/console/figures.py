"""The project page's charts, from the learning curve's model points."""

from markupsafe import Markup

from services.api.console.charts import (
    MARKER_LIMIT,
    Point,
    Series,
    color,
    line_chart,
    reliability_chart,
)
from services.api.console.history import ModelPoint


def _title(model: ModelPoint, what: str, value: float | None) -> str:
    shown = f"{value:.3f}" if value is not None else "-"
    return f"m{model.version} ({model.labels} labels, {model.promotion}): {what} {shown}"


def macro_f1_chart(models: list[ModelPoint]) -> Markup:
    """One point per model version, its promotion decision as the marker's class. A model
    without a held-out report (the first one, before any evaluation item was labeled) sits on
    the x axis, marked "no-report" and left off the line."""
    points = [
        Point(
            m.labels,
            m.macro_f1 if m.macro_f1 is not None else 0.0,
            kind=f"promotion-{m.promotion}" + ("" if m.macro_f1 is not None else " no-report"),
            title=(
                _title(m, "macro-F1", m.macro_f1)
                if m.macro_f1 is not None
                else f"m{m.version} ({m.labels} labels, {m.promotion}): no held-out report"
            )
            + (f" ({m.reason})" if m.reason else ""),
            version=m.version,
            on_line=m.macro_f1 is not None,
        )
        for m in models
    ]
    return line_chart(
        [Series("macro-F1", points)],
        markers=True,  # one marker per model version, however many
        name="macro-f1",
        title="Macro-F1 by labels used, one point per model version",
        x_label="labels in the training dataset version",
        y_label="macro-F1",
    )


def per_class_chart(models: list[ModelPoint], labels: list[str], which: str) -> Markup:
    """Recall or precision per class over labels, whiskers = 95% Wilson intervals."""
    # Tooltips only where markers are drawn (line_chart drops them past MARKER_LIMIT points).
    titled = len(models) <= MARKER_LIMIT
    by_class: dict[str, list[Point]] = {label: [] for label in labels}
    for m in models:
        for row in m.classes:
            value = getattr(row, which)
            if value is None or row.label not in by_class:
                continue
            low, high = getattr(row, f"{which}_interval") or (None, None)
            n = row.support if which == "recall" else row.predicted
            title = _title(m, f"{row.label} {which}", value) + f" over {n} items" if titled else ""
            by_class[row.label].append(
                Point(m.labels, value, low, high, kind=f"promotion-{m.promotion}", title=title)
            )
    return line_chart(
        [Series(label, by_class[label], color(i)) for i, label in enumerate(labels)],
        name=which,
        title=f"Per-class {which} with 95% intervals",
        x_label="labels in the training dataset version",
        y_label=which,
    )


def hardness_chart(models: list[ModelPoint]) -> Markup:
    """Hard-example rate (fraction) over model versions."""
    points = [
        Point(m.version, rate, title=_title(m, "hard-example rate", rate))
        for m in models
        if (rate := m.hard_example_rate) is not None
    ]
    return line_chart(
        [Series("hard-example rate", points)],
        name="hard-example-rate",
        title="Share of held-out items the model finds hard (p_t < threshold), per version",
        x_label="model version",
        y_label="share",
    )


def focal_percentile_chart(models: list[ModelPoint]) -> Markup:
    """Focal-loss p50/p90/p99 (nats) over model versions."""
    series = []
    top = 0.0
    for index, key in enumerate(("p50", "p90", "p99")):
        points = []
        for m in models:
            value = m.focal_loss_percentiles.get(key)
            if value is not None:
                top = max(top, value)
                points.append(Point(m.version, value, title=_title(m, f"focal loss {key}", value)))
        series.append(Series(key, points, color(index)))
    return line_chart(
        series,
        name="focal-loss",
        title="Per-item focal loss percentiles (nats), per version",
        x_label="model version",
        y_label="nats",
        y_range=(0.0, max(top * 1.1, 0.1)),
    )


def calibration_chart(models: list[ModelPoint]) -> Markup:
    """ECE per version: on the held-out report the model is judged by, and on the validation
    split before and after temperature scaling (small labeled sets have no validation split)."""
    series = []
    keys = (("ece", "held-out"), ("ece_before", "before scaling"), ("ece_after", "after scaling"))
    for index, (key, name) in enumerate(keys):
        points = [
            Point(m.version, getattr(m, key), title=_title(m, f"ECE {name}", getattr(m, key)))
            for m in models
            if getattr(m, key) is not None
        ]
        series.append(Series(f"ECE {name}", points, color(index)))
    return line_chart(
        series,
        name="ece",
        title="Expected calibration error per version (validation split: before and after "
        "temperature scaling)",
        x_label="model version",
        y_label="ECE",
        y_range=(0.0, 0.5),
    )


def reliability(found: tuple[int, list[dict[str, float]]] | None) -> Markup | None:
    """The reliability diagram of `history.reliability_of`'s model (None without one)."""
    if found is None:
        return None
    version, bins = found
    return reliability_chart(bins, title=f"Reliability of m{version} on its held-out report")
