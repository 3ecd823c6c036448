"""Writing a simulation's outputs: DIR/results.json and DIR/learning_curves.png."""

import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only: never open a window, work without a display
import matplotlib.pyplot as plt


def write_results(summary: dict[str, Any], out_dir: Path) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "results.json"
    path.write_text(json.dumps(summary, indent=2) + "\n")
    return path


def plot_learning_curves(summary: dict[str, Any], out_dir: Path) -> Path:
    """Minority F1 and macro-F1 against labels used, one line per arm, 95% CI bands."""
    out_dir.mkdir(parents=True, exist_ok=True)
    figure, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharex=True)
    for arm in summary["arms"]:
        labels = [r["labels"] for r in arm["rounds"]]
        for axis, metric in zip(axes, ("minority_f1", "macro_f1"), strict=True):
            means = [r[metric]["mean"] for r in arm["rounds"]]
            low = [r[metric]["ci95"][0] for r in arm["rounds"]]
            high = [r[metric]["ci95"][1] for r in arm["rounds"]]
            (line,) = axis.plot(labels, means, label=arm["name"], linewidth=1.8)
            axis.fill_between(labels, low, high, color=line.get_color(), alpha=0.15)
    if summary["full_pool_minority_f1"] is not None:
        full_pool = summary["full_pool_minority_f1"]["mean"]
        axes[0].axhline(
            full_pool,
            color="grey",
            linestyle="--",
            linewidth=1,
            label=f"full pool ({full_pool:.2f})",
        )
    seeds = len(summary["seeds"])
    axes[0].set_title(f"minority class {summary['minority_class']}: F1 (mean of {seeds} seeds)")
    axes[1].set_title("macro-F1")
    for axis in axes:
        axis.set_xlabel("labels used (simulated annotator)")
        axis.set_ylim(0, 1)
        axis.grid(alpha=0.3)
    axes[0].legend(fontsize=8, loc="lower right")
    figure.tight_layout()
    path = out_dir / "learning_curves.png"
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path
