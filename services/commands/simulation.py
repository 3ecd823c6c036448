"""`focalloop simulate` and `focalloop demo`: the product's cycle with a simulated annotator,
arms compared over seeds (the simulation is imported when a command runs)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, cast, get_args

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table

from services.errors import InvalidInput

if TYPE_CHECKING:
    from services.simulation.config import Arm, SimulationConfig
    from services.simulation.data import Dataset

console = Console()


def _arms(strategies: list[str] | None, losses: list[str] | None) -> tuple[Arm, ...]:
    from services.selection.strategies import STRATEGIES
    from services.simulation.config import DEFAULT_STRATEGY, Arm, LossKind, with_random_baselines

    known = [DEFAULT_STRATEGY, *STRATEGIES]
    for name in strategies or []:
        if name not in known:
            raise InvalidInput(f"unknown --strategy {name!r}; choose from {', '.join(known)}")
    for loss in losses or []:
        if loss not in get_args(LossKind):
            raise InvalidInput(f"unknown --loss {loss!r}; choose focal or ce")
    arms = [
        Arm(strategy, cast(LossKind, loss))
        for strategy in strategies or [DEFAULT_STRATEGY]
        for loss in losses or ["focal"]
    ]
    return with_random_baselines(arms)


def _labels(median: float | str) -> str:
    """A labels-to-target median: a count, or a censored ">B" string."""
    return f"{median:.0f}" if isinstance(median, float | int) else median


def interval(metric: dict[str, Any]) -> str:
    """A mean with its 95% interval, as the tables print it."""
    low, high = metric["ci95"]
    return f"{metric['mean']:.3f} [{low:.2f}, {high:.2f}]"


def _run_and_report(dataset: Dataset, config: SimulationConfig, out: Path) -> dict[str, Any]:
    from services.config import get_settings
    from services.simulation.report import plot_learning_curves, write_results
    from services.simulation.run import run_simulation

    jobs = config.seeds * (len(config.arms) + int(config.full_pool_reference))
    with Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
    ) as progress:
        task = progress.add_task("simulating (annotator: simulated)", total=jobs)
        result = run_simulation(
            dataset,
            config,
            get_settings(),
            on_progress=lambda message: progress.update(
                task, advance=1, description=f"done: {message}"
            ),
        )
    summary = result.summary
    results_path = write_results(summary, out)
    plot_path = plot_learning_curves(summary, out)
    table = Table(
        title=f"minority class {summary['minority_class']}, {config.seeds} seeds, "
        "simulated annotator (mean [95% CI])"
    )
    reference = summary["full_pool_minority_f1"] is not None
    columns = ["arm", "labels", "minority F1", "minority recall", "macro-F1", "AUC minority F1"]
    columns += ["labels to target"] if reference else []
    for column in [*columns, "stopped by"]:
        table.add_column(column, justify="left" if column in ("arm", "stopped by") else "right")
    for arm in summary["arms"]:
        last = arm["rounds"][-1]
        needed = arm["labels_to_target"]
        table.add_row(
            arm["name"],
            str(last["labels"]),
            interval(last["minority_f1"]),
            interval(last["minority_recall"]),
            interval(last["macro_f1"]),
            interval(arm["auc_minority_f1"]),
            *([] if needed is None else [_labels(needed["median"])]),
            ",".join(sorted(set(arm["stop_reasons"]))),
        )
    console.print(table)
    low, high = summary["arms"][0]["auc_labels"]
    console.print(f"AUC = mean minority F1 over {low}..{high} labels (the span every arm reached)")
    if reference:
        full_pool = summary["full_pool_minority_f1"]["mean"]
        console.print(
            "labels to target = median labels at which a seed first reaches its full-pool "
            f"model's minority F1 (mean {full_pool:.3f})"
        )
    console.print(f"wrote {results_path} and {plot_path}")
    return summary


def simulate(
    data: Annotated[Path, typer.Option(help="FILE.npz with X, y (optionally X_test, y_test).")],
    out: Annotated[Path, typer.Option(help="Directory for results.json and the plot.")],
    rare_class: Annotated[
        int | None, typer.Option(help="The minority class (default: the least frequent).")
    ] = None,
    seeds: Annotated[int, typer.Option(min=1, help="Seeds 0..N-1, the same for every arm.")] = 5,
    rounds: Annotated[int, typer.Option(min=0, help="Labeling rounds after the initial set.")] = 15,
    batch: Annotated[int, typer.Option(min=1, help="Items labeled per round.")] = 20,
    init: Annotated[
        int,
        typer.Option(
            min=0, help="Initial labels (uniform, seeded); 0: the product's cold start picks."
        ),
    ] = 20,
    budget: Annotated[int | None, typer.Option(min=1, help="Stop at this many labels.")] = None,
    strategy: Annotated[
        list[str] | None,
        typer.Option(help="Arms' strategies: 'default' (the project default) or a strategy name."),
    ] = None,
    loss: Annotated[list[str] | None, typer.Option(help="Arms' losses: focal or ce.")] = None,
    gamma: Annotated[float | None, typer.Option(min=0.0, help="Focal gamma.")] = None,
    alpha: Annotated[
        str | None, typer.Option(help="Focal alpha scheme: inverse_frequency or effective_number.")
    ] = None,
    noise: Annotated[
        float, typer.Option(min=0.0, max=0.99, help="Simulated annotator's error rate.")
    ] = 0.0,
    plateau: Annotated[
        int | None,
        typer.Option(min=1, help="Stop when validation minority F1 stalls this many rounds."),
    ] = None,
    workers: Annotated[int, typer.Option(min=1, help="Worker processes.")] = 2,
) -> None:
    """Run the product's cycle with a simulated annotator on your data and compare arms (each
    gets a random twin with the same loss)."""
    from services.simulation.config import SimulationConfig
    from services.simulation.data import load_dataset

    config = SimulationConfig(
        arms=_arms(strategy, loss),
        seeds=seeds,
        rounds=rounds,
        batch=batch,
        init=init,
        budget=budget,
        rare_class=rare_class,
        gamma=gamma,
        alpha=alpha,  # type: ignore[arg-type]
        noise=noise,
        plateau_rounds=plateau,
        workers=workers,
    )
    _run_and_report(load_dataset(data), config, out)


def demo(
    out: Annotated[Path, typer.Option(help="Directory for results.json and the plot.")] = Path(
        "demo-output"
    ),
    seeds: Annotated[int, typer.Option(min=1)] = 10,
    workers: Annotated[int, typer.Option(min=1)] = 2,
) -> None:
    """`simulate` on scikit-learn's digits with digit 8 kept at 2% (98:2): default vs random,
    focal vs cross-entropy, 20 initial labels, batches of 20, up to 300 labels."""
    from services.simulation.demo import DEMO_ARMS, demo_config, digits_with_rare_class

    dataset = digits_with_rare_class()
    console.print(
        f"digits: {len(dataset.labels)} items, digit 8 = "
        f"{int((dataset.labels == 8).sum())} of them; 30% held out for testing"
    )
    # No full-pool reference here (labels-to-target is `bench label-efficiency`'s job): it
    # would cost the demo a fifth of its time.
    config = demo_config(arms=DEMO_ARMS, seeds=seeds, workers=workers)
    _run_and_report(dataset, config, out)
