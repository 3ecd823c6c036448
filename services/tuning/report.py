"""A finished study as people read it: the table, heatmaps of minority precision, recall and F1
(and the chosen metric) over gamma x alpha, the validation curve, per-class recall of the best
setting against cross-entropy. JSON for machines, PNG for people.

Only trials that ran every fold enter the figures: a pruned trial's mean covers fewer folds and
would not be comparable with the rest (the table lists them as pruned).
"""

import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from services.simulation.summary import mean_ci95
from services.tuning.evaluate import Metric, TrialOutcome
from services.tuning.folds import FoldScores
from services.tuning.space import Setting

HEATMAP_FIGURES = ("minority_precision", "minority_recall", "minority_f1", "metric")


@dataclass(frozen=True)
class Cell:
    """One setting's fold means: minority precision/recall/F1 of `rare_class`, the metric,
    and the metric's 95% t-interval over folds."""

    setting: Setting
    minority_precision: float
    minority_recall: float
    minority_f1: float
    metric: float
    metric_ci95: tuple[float, float]
    folds: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "gamma": self.setting.gamma,
            "alpha": self.setting.alpha,
            "minority_precision": self.minority_precision,
            "minority_recall": self.minority_recall,
            "minority_f1": self.minority_f1,
            "metric": self.metric,
            "metric_ci95": list(self.metric_ci95),
            "folds": self.folds,
        }


def cell(outcome: TrialOutcome, metric: Metric, rare_class: int) -> Cell:
    values = [metric.of(scores) for scores in outcome.folds]
    low, high = mean_ci95(values)["ci95"]  # a t-interval over folds, clipped to [0, 1]
    return Cell(
        setting=outcome.setting,
        minority_precision=outcome.per_class_mean("precision")[rare_class],
        minority_recall=outcome.per_class_mean("recall")[rare_class],
        minority_f1=outcome.per_class_mean("f1")[rare_class],
        metric=float(np.mean(values)),
        metric_ci95=(low, high),
        folds=len(values),
    )


def outcome_from_dict(data: dict[str, Any]) -> TrialOutcome:
    return TrialOutcome(
        setting=Setting(float(data["gamma"]), str(data["alpha"])),
        folds=[FoldScores(**scores) for scores in data["folds"]],
        pruned=bool(data["pruned"]),
    )


def summarize(
    outcomes: list[TrialOutcome],
    *,
    metric: Metric,
    metric_label: str,
    rare_class: int,
    class_names: list[str],
    context: dict[str, Any],
) -> dict[str, Any]:
    """The study's figures as one JSON-friendly dict (`context`: project, version, folds, ...).

    heatmap: one cell per (gamma, alpha) that ran every fold (the grid's 15 in grid mode; a
    search's distinct settings otherwise). best: the highest metric mean. ce: gamma = 0 with no
    alpha, the plain cross-entropy baseline."""
    complete = [o for o in outcomes if not o.pruned and o.folds]
    cells = [cell(o, metric, rare_class) for o in complete]
    if not cells:
        raise ValueError("no trial ran every fold: nothing to report")
    best = max(cells, key=lambda c: c.metric)
    by_setting = {c.setting: o for c, o in zip(cells, complete, strict=True)}
    ce = next((c for c in cells if c.setting == Setting(0.0, "none")), None)
    gammas = sorted({c.setting.gamma for c in cells})
    alphas = list(dict.fromkeys(c.setting.alpha for c in cells))
    at_best_alpha = [c for c in cells if c.setting.alpha == best.setting.alpha]
    curve = sorted(at_best_alpha, key=lambda c: c.setting.gamma)
    return {
        **context,
        "metric": metric_label,
        "minority_class": class_names[rare_class],
        "classes": class_names,
        "trials": len(outcomes),
        "pruned": sum(1 for o in outcomes if o.pruned),
        "heatmap": {
            "gammas": gammas,
            "alphas": alphas,
            "cells": [c.to_dict() for c in cells],
        },
        "best": best.to_dict(),
        "ce": ce.to_dict() if ce is not None else None,
        "validation_curve": {
            "alpha": best.setting.alpha,
            "points": [
                {"gamma": c.setting.gamma, "metric": c.metric, "ci95": list(c.metric_ci95)}
                for c in curve
            ],
        },
        "per_class_recall": {
            "best": by_setting[best.setting].per_class_mean("recall"),
            "ce": by_setting[ce.setting].per_class_mean("recall") if ce is not None else None,
        },
    }


def write_outputs(summary: dict[str, Any], out: Path) -> list[Path]:
    """tuning.json, heatmaps.png and validation_curve.png in `out` (created)."""
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "tuning.json", out / "heatmaps.png", out / "validation_curve.png"]
    paths[0].write_text(json.dumps(summary, indent=2) + "\n")
    paths[1].write_bytes(heatmaps_png(summary))
    paths[2].write_bytes(validation_curve_png(summary))
    return paths


def _png(figure: Any) -> bytes:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    figure.tight_layout()
    figure.savefig(buffer, format="png", dpi=110)
    plt.close(figure)
    return buffer.getvalue()


def heatmaps_png(summary: dict[str, Any]) -> bytes:
    """Minority precision, recall, F1 and the metric over gamma (rows) x alpha (columns)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    heatmap = summary["heatmap"]
    gammas, alphas = heatmap["gammas"], heatmap["alphas"]
    panels = len(HEATMAP_FIGURES)
    figure, axes = plt.subplots(1, panels, figsize=(4.2 * panels, 3.8))
    for axis, name in zip(axes, HEATMAP_FIGURES, strict=True):
        grid = np.full((len(gammas), len(alphas)), np.nan)
        for entry in heatmap["cells"]:
            grid[gammas.index(entry["gamma"]), alphas.index(entry["alpha"])] = entry[name]
        image = axis.imshow(grid, cmap="viridis", vmin=0.0, vmax=1.0, aspect="auto")
        for row, col in np.ndindex(grid.shape):
            if not np.isnan(grid[row, col]):
                value = grid[row, col]
                shade = "black" if value > 0.6 else "white"  # readable on viridis' light end
                axis.text(col, row, f"{value:.2f}", ha="center", va="center", color=shade)
        axis.set_xticks(range(len(alphas)), [a.replace("_", "\n") for a in alphas], fontsize=8)
        axis.set_yticks(range(len(gammas)), [f"{g:g}" for g in gammas])
        axis.set_xlabel("alpha")
        axis.set_ylabel("gamma")
        title = summary["metric"] if name == "metric" else name.replace("_", " ")
        axis.set_title(f"{title} ({summary['minority_class']})" if name != "metric" else title)
        figure.colorbar(image, ax=axis, fraction=0.046)
    return _png(figure)


def validation_curve_png(summary: dict[str, Any]) -> bytes:
    """The metric against gamma at the best alpha, with its 95% interval over folds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curve = summary["validation_curve"]
    figure, axis = plt.subplots(figsize=(5.5, 3.8))
    xs = [p["gamma"] for p in curve["points"]]
    axis.plot(xs, [p["metric"] for p in curve["points"]], marker="o")
    low = [p["ci95"][0] for p in curve["points"]]
    high = [p["ci95"][1] for p in curve["points"]]
    axis.fill_between(xs, low, high, alpha=0.25, label="95% interval over folds")
    axis.set_xlabel("gamma")
    axis.set_ylabel(summary["metric"])
    axis.set_title(f"validation curve, alpha = {curve['alpha']}")
    axis.legend()
    return _png(figure)
