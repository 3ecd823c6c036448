"""`focalloop bench annotator|review`: the benchmarks of what annotators meet (whether they
wait for tasks, how often the review questions their correct labels). Registered on `bench`'s
app; each command imports its benchmark when it runs."""

from typing import Annotated

import typer
from rich.table import Table

from services.commands.bench import JsonOption, bench_app, console
from services.errors import InvalidInput


@bench_app.command("annotator")
def bench_annotator(
    batches: Annotated[int, typer.Option(min=2, help="Answer every task of this many.")] = 5,
    pace: Annotated[float, typer.Option(min=0.1, help="Seconds between answers.")] = 2.0,
    repeats: Annotated[int, typer.Option(min=1, help="Runs per arm.")] = 1,
    arm: Annotated[
        list[str] | None, typer.Option("--arm", help="refill (default) and/or beat-only.")
    ] = None,
    json_path: JsonOption = None,
) -> None:
    """Does an annotator wait? `up --with-label-studio`, one answer every PACE s through Label
    Studio: idle seconds, first task, and the time from an answer to the batch it started."""
    from services.bench.annotator import ARMS, bench_annotator, summary
    from services.bench.report import write_json
    from services.config import get_settings
    from services.ml.train import resolve_device

    chosen = tuple(arm or ARMS)
    unknown = set(chosen) - set(ARMS)
    if unknown:
        raise InvalidInput(f"--arm takes {', '.join(ARMS)}, got {sorted(unknown)}")
    runs = bench_annotator(
        get_settings(), batches=batches, pace_s=pace, repeats=repeats, arms=chosen
    )
    table = Table(title=f"an annotator answering every {pace} s for {batches} batches")
    columns = ("arm", "runs", "median idle s", "max idle s", "first task s", "refill p50 s")
    for column in (*columns, "refill p95 s", "batches into an empty queue"):
        table.add_column(column, justify="left" if column == "arm" else "right")
    for name, row in summary(runs).items():
        table.add_row(
            name,
            f"{row['runs']:.0f}",
            f"{row['median_idle_s']:.1f}",
            f"{row['max_idle_s']:.1f}",
            f"{row['median_first_task_s']:.1f}",
            f"{row['refill_p50_s']:.1f}",
            f"{row['refill_p95_s']:.1f}",
            f"{row['batches_arriving_to_an_empty_queue']:.0f}",
        )
    console.print(table)
    if json_path is not None:
        write_json(
            json_path,
            benchmark="annotator",
            device=resolve_device(get_settings().device),
            rows=[run.to_dict() for run in runs],
            summary=summary(runs),
        )
        console.print(f"wrote {json_path}")


@bench_app.command("review")
def bench_review(
    seeds: Annotated[int, typer.Option(min=1, help="Runs per noise level.")] = 10,
    labels: Annotated[int, typer.Option(min=20, help="Labels at the end of a run.")] = 300,
    batch: Annotated[int, typer.Option(min=1, help="Labels per cycle.")] = 20,
    data: Annotated[str, typer.Option(help="digits, wine or breast_cancer.")] = "digits",
    threshold: Annotated[
        float, typer.Option(min=0.0, max=1.0, help="Review threshold (default: connect's).")
    ] = 0.05,
    json_path: JsonOption = None,
) -> None:
    """The label-noise review on a project's schedule: false flags per 100 correct labels,
    and precision/recall when 10% of the labels are wrong."""
    from services.bench.report import write_json
    from services.bench.review import bench_review, summary
    from services.ml.train import resolve_device

    runs = bench_review(seeds=seeds, labels=labels, batch=batch, data=data, threshold=threshold)
    table = Table(
        title=f"review on {data}, threshold {threshold:g}: {labels} labels in batches of "
        f"{batch}, {seeds} seeds"
    )
    for column in ("labels", "false flags / 100 correct", "min-max over seeds", "precision"):
        table.add_column(column, justify="left" if column == "labels" else "right")
    table.add_column("recall", justify="right")

    def shown(value: float | None) -> str:
        return "-" if value is None else f"{value:.2f}"

    for name, row in summary(runs).items():
        table.add_row(
            name,
            shown(row["false_flags_per_100_clean"]),
            f"{shown(row['false_flags_per_100_clean_min'])}-"
            f"{shown(row['false_flags_per_100_clean_max'])}",
            shown(row["precision"]),
            shown(row["recall"]),
        )
    console.print(table)
    if json_path is not None:
        write_json(
            json_path,
            benchmark="review",
            device=resolve_device("cpu"),
            rows=[run.to_dict() for run in runs],
            summary=summary(runs),
        )
        console.print(f"wrote {json_path}")
