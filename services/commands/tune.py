"""`focalloop tune PROJECT`: cross-validated search over the focal loss's gamma and alpha."""

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from services.commands.audited import audit_cli
from services.commands.state import engine_for

console = Console()


def tune(
    name: Annotated[str, typer.Argument(help="Project name.")],
    trials: Annotated[
        int, typer.Option(min=1, help="Optuna trials (--search only; the grid has its own).")
    ] = 30,
    folds: Annotated[int, typer.Option(help="Stratified folds per repeat.")] = 3,
    repeats: Annotated[int, typer.Option(help="Repeats of the k-fold split.")] = 3,
    search: Annotated[
        bool,
        typer.Option(
            "--search/--grid",
            help="--grid: each --gamma x (none, inverse_frequency, effective_number) alpha; "
            "--search: Optuna TPE over gamma in [0, 5] and the alpha schemes, gamma 0 first.",
        ),
    ] = False,
    gamma: Annotated[
        list[float] | None,
        typer.Option("--gamma", help="Grid gammas (repeatable; default 0, 0.5, 1, 2, 3)."),
    ] = None,
    metric: Annotated[
        str,
        typer.Option(
            help="minority_f1 (the class with the fewest labels), macro_f1, recall:CLASS or "
            "f1:CLASS (a label name)."
        ),
    ] = "minority_f1",
    out: Annotated[
        Path, typer.Option(help="Where tuning.json, heatmaps.png, validation_curve.png go.")
    ] = Path("tuning-output"),
    apply: Annotated[
        bool, typer.Option("--apply", help="Set the project's loss to the best setting.")
    ] = False,
    in_process: Annotated[
        bool,
        typer.Option(
            "--in-process",
            help="Run the trials in this process instead of on the gpu queue's workers.",
        ),
    ] = False,
    wait: Annotated[
        float,
        typer.Option(min=1, help="Give up when no trial ends for this many seconds (workers)."),
    ] = 3600.0,
) -> None:
    """Tune gamma and alpha on the project's newest dataset version (its own model and recipe),
    by repeated stratified k-fold; print the table, write heatmaps, optionally apply the best."""
    from rich.progress import Progress

    from services.config import get_settings
    from services.tuning.coordinator import tune_project
    from services.tuning.run import TuneOptions, apply_best, celery_dispatch
    from services.tuning.space import GRID_GAMMAS

    options = TuneOptions(
        mode="search" if search else "grid",
        trials=trials,
        folds=folds,
        repeats=repeats,
        metric=metric,
        gammas=tuple(gamma) if gamma else GRID_GAMMAS,
    )
    settings = get_settings()
    engine = engine_for(settings)
    dispatch = None if in_process else celery_dispatch(settings)
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("tuning trials", total=None)

        def on_progress(done: int, total: int) -> None:
            progress.update(task, completed=done, total=total)

        summary = tune_project(
            engine,
            settings,
            name,
            options,
            out=out,
            dispatch=dispatch,
            on_progress=on_progress,
            wait_s=wait,
        )
    _print_table(summary)
    files = ("tuning.json", "heatmaps.png", "validation_curve.png")
    written = ", ".join(str(out / file) for file in files)
    console.print(f"wrote {written}")
    if apply:
        loss = apply_best(
            engine,
            name,
            summary,
            lambda session, detail: audit_cli(session, "project.tune", name, detail=detail),
        )
        console.print(f"applied to {name}: loss {loss}")


def _print_table(summary: dict[str, Any]) -> None:
    minority = summary["minority_class"]
    table = Table(
        title=f"{summary['project']} v{summary['dataset_version']}: {summary['labels']} labels, "
        f"{summary['repeats']}x{summary['folds']} folds, mean over folds"
    )
    for column in ("gamma", "alpha", f"precision {minority}", f"recall {minority}",
                   f"F1 {minority}", summary["metric"], "95% interval"):  # fmt: skip
        table.add_column(column, justify="left" if column == "alpha" else "right")
    best = summary["best"]
    for cell in sorted(summary["heatmap"]["cells"], key=lambda c: (c["gamma"], c["alpha"])):
        marker = " *" if (cell["gamma"], cell["alpha"]) == (best["gamma"], best["alpha"]) else ""
        low, high = cell["metric_ci95"]
        table.add_row(
            f"{cell['gamma']:g}",
            cell["alpha"] + marker,
            f"{cell['minority_precision']:.3f}",
            f"{cell['minority_recall']:.3f}",
            f"{cell['minority_f1']:.3f}",
            f"{cell['metric']:.3f}",
            f"[{low:.3f}, {high:.3f}]",
        )
    console.print(table)
    if summary["pruned"]:
        console.print(f"{summary['pruned']} trial(s) pruned (stopped early; not in the table)")
    ce = summary["ce"]
    verdict = (
        f"best gamma={best['gamma']:g} alpha={best['alpha']}: {summary['metric']} "
        f"{best['metric']:.3f}"
    )
    if ce is not None:
        verdict += f" vs cross-entropy {ce['metric']:.3f} ({best['metric'] - ce['metric']:+.3f})"
    console.print(verdict)
    recall = summary["per_class_recall"]
    if recall["ce"] is not None:
        pairs = ", ".join(
            f"{label} {b:.2f}/{c:.2f}"
            for label, b, c in zip(summary["classes"], recall["best"], recall["ce"], strict=True)
        )
        console.print(f"per-class recall, best/cross-entropy: {pairs}")
