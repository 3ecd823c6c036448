"""The `focalloop` command: parse input, call down into services, render output."""

from pathlib import Path
from typing import Annotated, Any, cast, get_args

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

from services.bench.focal_loss import run_focal_loss_bench
from services.bench.label_efficiency import run_label_efficiency_bench
from services.bench.labeling import run_ingest_bench, run_push_bench
from services.bench.manifest import run_manifest_bench
from services.bench.report import write_json
from services.bench.scoring import run_score_bench
from services.bench.selection import run_select_bench
from services.commands.admin import model_app, token_app
from services.commands.cycles import beat, cycle_app, worker
from services.commands.datasets import datasets_app
from services.commands.labeling import api, labelstudio_app
from services.commands.state import db_app, pool_app, project_app
from services.commands.up import up
from services.demo import DEMO_ARMS, digits_with_rare_class
from services.errors import FocalloopError, InvalidInput
from services.ml.train import resolve_device, torch_threads
from services.selection.strategies import STRATEGIES
from services.simulate import (
    DEFAULT_STRATEGY,
    Arm,
    Dataset,
    LossKind,
    SimulationConfig,
    load_dataset,
    run_simulation,
    with_random_baselines,
)
from services.simulate_report import plot_learning_curves, write_results

app = typer.Typer(
    help="focalloop: an active-learning labeling loop built on focal-loss models.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
bench_app = typer.Typer(
    help="Benchmarks: print a table; --json PATH saves the figures.", no_args_is_help=True
)
app.add_typer(bench_app, name="bench")
app.add_typer(db_app, name="db")
app.add_typer(project_app, name="project")
app.add_typer(pool_app, name="pool")
app.add_typer(datasets_app, name="datasets")
app.add_typer(cycle_app, name="cycle")
app.add_typer(labelstudio_app, name="labelstudio")
app.add_typer(token_app, name="token")
app.add_typer(model_app, name="model")
app.command("api")(api)
app.command("worker")(worker)
app.command("beat")(beat)
app.command("up")(up)

console = Console()
errors = Console(stderr=True)

JsonOption = Annotated[
    Path | None, typer.Option("--json", help="Also write the figures as JSON to this path.")
]


@app.command()
def version() -> None:
    """Print focalloop's version."""
    from importlib.metadata import version as package_version

    console.print(f"focalloop {package_version('focalloop')}")


@bench_app.command("focal-loss")
def bench_focal_loss(
    n: Annotated[int, typer.Option(min=1, help="Items per batch (rows of logits).")] = 65_536,
    classes: Annotated[
        list[int] | None, typer.Option("--classes", help="Class counts C to measure (repeatable).")
    ] = None,
    repeats: Annotated[int, typer.Option(min=1, help="Timed runs per side.")] = 7,
    device: Annotated[str, typer.Option(help="cpu, cuda or auto.")] = "cpu",
    threads: Annotated[int | None, typer.Option(min=1, help="CPU threads for torch.")] = None,
    compiled: Annotated[
        bool, typer.Option(help="Also time a torch.compile'd sigmoid_focal_loss.")
    ] = True,
    json_path: JsonOption = None,
) -> None:
    """Forward+backward time of the focal losses against cross-entropy / BCE on equal logits."""
    if device not in ("cpu", "cuda", "auto"):
        raise typer.BadParameter("device must be cpu, cuda or auto", param_hint="--device")
    target = resolve_device(device)  # type: ignore[arg-type]
    with torch_threads(threads):
        rows = run_focal_loss_bench(
            n=n,
            classes=tuple(classes or (10, 1_000)),
            repeats=repeats,
            device=target,
            compiled=compiled,
        )
        table = Table(
            title=f"focal loss vs baseline, forward+backward, N={n}, {target}, median of {repeats}"
        )
        for column in ("loss", "baseline", "C", "ours ms", "baseline ms", "ratio"):
            table.add_column(column, justify="left" if column in ("loss", "baseline") else "right")
        for row in rows:
            table.add_row(
                row.name,
                row.baseline,
                str(row.classes),
                f"{row.ours_ms:.2f}",
                f"{row.baseline_ms:.2f}",
                f"{row.ratio:.3f}",
            )
        console.print(table)
        if json_path is not None:
            eager = [row.ratio for row in rows if "compiled" not in row.name]
            write_json(
                json_path,
                benchmark="focal-loss",
                device=target,
                rows=[row.to_dict() for row in rows],
                summary={"max_eager_ratio": max(eager)},
            )
            console.print(f"wrote {json_path}")


@bench_app.command("manifest")
def bench_manifest(
    items: Annotated[int, typer.Option(min=1, help="Rows of the dataset version.")] = 1_000_000,
    repeats: Annotated[int, typer.Option(min=1, help="Timed runs per side.")] = 5,
    backend: Annotated[
        list[str] | None, typer.Option("--backend", help="local and/or s3 (repeatable).")
    ] = None,
    s3_endpoint: Annotated[
        str | None,
        typer.Option(help="An S3 server to use; default: start moto's on a free local port."),
    ] = None,
    json_path: JsonOption = None,
) -> None:
    """Commit and read back (hashes verified) a large dataset version vs plain pyarrow."""
    rows = run_manifest_bench(
        items=items, repeats=repeats, backends=backend or ["local", "s3"], s3_endpoint=s3_endpoint
    )
    table = Table(title=f"dataset version of {items:,} items, median of {repeats}")
    for column in ("backend", "direction", "seconds", "pyarrow floor s", "ratio to floor", "MB"):
        table.add_column(column, justify="left" if column in ("backend", "direction") else "right")
    for row in rows:
        table.add_row(
            row.backend,
            row.direction,
            f"{row.seconds:.3f}",
            f"{row.floor_seconds:.3f}",
            f"{row.ratio_to_floor:.2f}",
            f"{row.bytes_stored / 1e6:.1f}",
        )
    console.print(table)
    if json_path is not None:
        write_json(
            json_path,
            benchmark="manifest",
            device=resolve_device("cpu"),
            rows=[row.to_dict() for row in rows],
            summary={
                f"{row.backend}_{row.direction}": {
                    "seconds": row.seconds,
                    "ratio_to_floor": row.ratio_to_floor,
                }
                for row in rows
            },
        )
        console.print(f"wrote {json_path}")


@bench_app.command("score")
def bench_score(
    items: Annotated[int, typer.Option(min=1, help="Pool items (128 features each).")] = 200_000,
    chunk_size: Annotated[
        list[int] | None, typer.Option("--chunk-size", help="Chunk sizes (repeatable).")
    ] = None,
    repeats: Annotated[int, typer.Option(min=1)] = 3,
    json_path: JsonOption = None,
) -> None:
    """Scoring items/s: (1) bare forward pass, (2) in-process chunks, (3) 2 Celery workers."""
    rows = run_score_bench(items=items, chunk_sizes=chunk_size, repeats=repeats)
    table = Table(
        title=f"scoring {items:,} x 128 features, MLP 128-256-256-10, median of {repeats}"
    )
    # (1) roofline, (2) in-process, (3) distributed; see `focalloop bench score --help`.
    for column in ("chunk", "chunks", "(1)/s", "(2)/s", "(3)/s", "(2)/(1)", "(3)/(2)", "ovh ms"):
        table.add_column(column, justify="right")
    for row in rows:
        table.add_row(
            str(row.chunk_size),
            str(row.chunks),
            f"{row.roofline_items_per_s:,.0f}",
            f"{row.inprocess_items_per_s:,.0f}",
            f"{row.distributed_items_per_s:,.0f}",
            f"{row.inprocess_vs_roofline:.2f}",
            f"{row.distributed_vs_inprocess_ratio:.2f}",
            f"{row.chunk_overhead_ms:.1f}",
        )
    console.print(table)
    if json_path is not None:
        write_json(
            json_path,
            benchmark="score",
            device=resolve_device("cpu"),
            rows=[row.to_dict() for row in rows],
            summary={
                str(row.chunk_size): {
                    "distributed_vs_inprocess_ratio": row.distributed_vs_inprocess_ratio,
                    "chunk_overhead_ms": row.chunk_overhead_ms,
                }
                for row in rows
            },
        )
        console.print(f"wrote {json_path}")


@bench_app.command("select")
def bench_select(
    pool_items: Annotated[int, typer.Option(min=1, help="Items in the scored pool.")] = 1_000_000,
    chunk_size: Annotated[int, typer.Option(min=1, help="Items per scoring chunk.")] = 16_384,
    batch: Annotated[int, typer.Option(min=1, help="Batch to choose.")] = 1000,
    repeats: Annotated[int, typer.Option(min=1)] = 5,
    json_path: JsonOption = None,
) -> None:
    """Merge a pool's chunk candidates and choose a batch (diversity + class quotas)."""
    result = run_select_bench(
        pool_items=pool_items, chunk_size=chunk_size, batch=batch, repeats=repeats
    )
    console.print(
        f"{result.pool_items:,} items in {result.chunks} chunks -> {result.candidates:,} "
        f"candidates -> batch of {result.batch}: {result.select_seconds:.3f} s median of "
        f"{result.repeats} (merge {result.merge_seconds:.3f} s, choose "
        f"{result.choose_seconds:.3f} s); keeping all {result.full_candidates:,} candidates: "
        f"{result.full_merge_select_seconds:.3f} s"
    )
    if json_path is not None:
        write_json(
            json_path,
            benchmark="select",
            device=resolve_device("cpu"),
            rows=[result.to_dict()],
            summary={"select_seconds": result.select_seconds},
        )
        console.print(f"wrote {json_path}")


@bench_app.command("push")
def bench_push(
    tasks: Annotated[int, typer.Option(min=1, help="Tasks handed off per run.")] = 10_000,
    batch: Annotated[int, typer.Option(min=1, help="Tasks per import request.")] = 500,
    repeats: Annotated[int, typer.Option(min=1)] = 3,
    json_path: JsonOption = None,
) -> None:
    """Hand-off tasks/s into a real Label Studio, against the SDK's bare import_tasks."""
    result = run_push_bench(tasks=tasks, repeats=repeats, batch=batch)
    console.print(
        f"{result.tasks:,} tasks in batches of {result.batch}, median of {result.repeats}: "
        f"focalloop push {result.ours_tasks_per_s:,.0f} tasks/s ({result.ours_s:.1f} s), "
        f"bare import_tasks {result.sdk_tasks_per_s:,.0f} tasks/s ({result.sdk_s:.1f} s), "
        f"ratio {result.ours_vs_sdk_ratio:.2f}"
    )
    if json_path is not None:
        write_json(
            json_path,
            benchmark="push",
            device=resolve_device("cpu"),
            rows=[result.to_dict()],
            summary={
                "ours_tasks_per_s": result.ours_tasks_per_s,
                "sdk_tasks_per_s": result.sdk_tasks_per_s,
                "ours_vs_sdk_ratio": result.ours_vs_sdk_ratio,
            },
        )
        console.print(f"wrote {json_path}")


@bench_app.command("ingest")
def bench_ingest(
    events: Annotated[int, typer.Option(min=1, help="Distinct webhook events per run.")] = 5000,
    senders: Annotated[int, typer.Option(min=1, help="Concurrent HTTP senders.")] = 8,
    duplicate_share: Annotated[
        float, typer.Option(min=0.0, max=1.0, help="Share of events sent a second time.")
    ] = 0.05,
    database: Annotated[str, typer.Option(help="postgresql (local server) or sqlite.")] = (
        "postgresql"
    ),
    api_workers: Annotated[int, typer.Option(min=1, help="`focalloop api --workers`.")] = 1,
    repeats: Annotated[int, typer.Option(min=1)] = 3,
    json_path: JsonOption = None,
) -> None:
    """Webhook events/s from the API's door until every label is in the database."""
    if database not in ("postgresql", "sqlite"):
        raise InvalidInput(f"--database takes postgresql or sqlite, got {database!r}")
    result = run_ingest_bench(
        events=events,
        senders=senders,
        repeats=repeats,
        duplicate_share=duplicate_share,
        database=database,
        api_workers=api_workers,
    )
    console.print(
        f"{result.events:,} events (+{result.duplicates_sent} resent) from {result.senders} "
        f"senders, {result.api_workers} API process(es), {result.database}, median of "
        f"{result.repeats}: {result.events_per_s:,.0f} "
        f"events/s ({result.seconds:.2f} s; all sent in {result.send_seconds:.2f} s); webhook "
        f"answer p50 {result.webhook_p50_ms:.1f} ms, p99 {result.webhook_p99_ms:.1f} ms; "
        f"lost {result.lost}, duplicated {result.duplicated}"
    )
    if json_path is not None:
        write_json(
            json_path,
            benchmark="ingest",
            device=resolve_device("cpu"),
            rows=[result.to_dict()],
            summary={
                "events_per_s": result.events_per_s,
                "lost": result.lost,
                "duplicated": result.duplicated,
            },
        )
        console.print(f"wrote {json_path}")


@bench_app.command("label-efficiency")
def bench_label_efficiency(
    seeds: Annotated[int, typer.Option(min=1)] = 5,
    workers: Annotated[int, typer.Option(min=1)] = 2,
    out: Annotated[Path, typer.Option(help="Where results.json and the plot go.")] = Path(
        "bench-output/label-efficiency"
    ),
    json_path: JsonOption = None,
) -> None:
    """Labels needed on the demo setting: default vs least-confidence vs random, focal vs CE."""
    result, figures = run_label_efficiency_bench(seeds=seeds, workers=workers)
    write_results(result.summary, out)
    plot_learning_curves(result.summary, out)
    table = Table(title=f"label efficiency, digits 98:2 (8 rare), {seeds} seeds, mean [95% CI]")
    for column in ("arm", "F1@300", "recall@300", "AUC F1 20-300", "labels to target"):
        table.add_column(column, justify="left" if column == "arm" else "right")
    for name, arm in figures["arms"].items():
        median = arm["labels_to_target_median"]
        table.add_row(
            name,
            _fmt(arm["minority_f1_at_300"]),
            _fmt(arm["minority_recall_at_300"]),
            _fmt(arm["auc_minority_f1_20_300"]),
            f"{median:.0f}" if median is not None else f">{arm['labels_to_target_censored_at']}",
        )
    console.print(table)
    console.print(f"full-pool minority F1 (the target): {_fmt(figures['full_pool_minority_f1'])}")
    ratio = figures["labels_to_target_ratio_default_vs_random"]
    bound = (
        " (upper bound: random never reached it)"
        if figures["labels_to_target_ratio_is_upper_bound"]
        else ""
    )
    console.print(
        f"labels-to-target ratio default/random: "
        f"{'n/a' if ratio is None else f'{ratio:.3f}'}{bound}"
    )
    if json_path is not None:
        write_json(
            json_path,
            benchmark="label-efficiency",
            device=resolve_device("cpu"),
            rows=[{"arm": name, **arm} for name, arm in figures["arms"].items()],
            summary=figures,
        )
        console.print(f"wrote {json_path}")


def _arms(strategies: list[str] | None, losses: list[str] | None) -> tuple[Arm, ...]:
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


def _fmt(metric: dict[str, Any]) -> str:
    low, high = metric["ci95"]
    return f"{metric['mean']:.3f} [{low:.2f}, {high:.2f}]"


def _run_and_report(dataset: Dataset, config: SimulationConfig, out: Path) -> dict[str, Any]:
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
            _fmt(last["minority_f1"]),
            _fmt(last["minority_recall"]),
            _fmt(last["macro_f1"]),
            _fmt(arm["auc_minority_f1"]),
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


@app.command()
def simulate(
    data: Annotated[Path, typer.Option(help="FILE.npz with X, y (optionally X_test, y_test).")],
    out: Annotated[Path, typer.Option(help="Directory for results.json and the plot.")],
    rare_class: Annotated[
        int | None, typer.Option(help="The minority class (default: the least frequent).")
    ] = None,
    seeds: Annotated[int, typer.Option(min=1, help="Seeds 0..N-1, the same for every arm.")] = 5,
    rounds: Annotated[int, typer.Option(min=0, help="Labeling rounds after the initial set.")] = 15,
    batch: Annotated[int, typer.Option(min=1, help="Items labeled per round.")] = 20,
    init: Annotated[int, typer.Option(min=1, help="Initial labels (uniform, seeded).")] = 20,
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
    """Run the loop with a simulated annotator and compare arms (each gets a random twin)."""
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


@app.command()
def demo(
    out: Annotated[Path, typer.Option(help="Directory for results.json and the plot.")] = Path(
        "demo-output"
    ),
    seeds: Annotated[int, typer.Option(min=1)] = 5,
    workers: Annotated[int, typer.Option(min=1)] = 2,
) -> None:
    """`simulate` on scikit-learn's digits with digit 8 kept at 2% (98:2): default vs random,
    focal vs cross-entropy, 20 initial labels, batches of 20, up to 300 labels."""
    dataset = digits_with_rare_class()
    console.print(
        f"digits: {len(dataset.labels)} items, digit 8 = "
        f"{int((dataset.labels == 8).sum())} of them; 30% held out for testing"
    )
    # No full-pool reference here (labels-to-target is `bench label-efficiency`'s job): it
    # would cost the demo a fifth of its time.
    config = SimulationConfig(
        arms=DEMO_ARMS,
        seeds=seeds,
        rounds=14,
        batch=20,
        init=20,
        budget=300,
        rare_class=8,
        workers=workers,
        full_pool_reference=False,
    )
    _run_and_report(dataset, config, out)


def main() -> None:
    """Console entry point: expected errors end with one clear line and exit code 2."""
    try:
        app()
    except (FocalloopError, ValueError, FileExistsError, FileNotFoundError) as error:
        errors.print(f"[bold red]error:[/] {error}", highlight=False)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
