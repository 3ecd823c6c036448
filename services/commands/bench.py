"""`focalloop bench ...`: the benchmarks (each command imports its benchmark when it runs)."""

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from services.commands.simulation import interval
from services.errors import InvalidInput

bench_app = typer.Typer(
    help="Benchmarks: print a table; --json PATH saves the figures.", no_args_is_help=True
)
console = Console()

JsonOption = Annotated[
    Path | None, typer.Option("--json", help="Also write the figures as JSON to this path.")
]


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
    from services.bench.focal_loss import run_focal_loss_bench
    from services.bench.report import write_json
    from services.ml.train import resolve_device, torch_threads

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


@bench_app.command("device")
def bench_device(
    device: Annotated[str, typer.Option(help="cpu, or cuda to add the GPU rows.")] = "cuda",
    train_items: Annotated[int, typer.Option(min=64, help="Items per training epoch.")] = 8_192,
    score_items: Annotated[int, typer.Option(min=1, help="Items scored per run.")] = 65_536,
    epochs: Annotated[int, typer.Option(min=1, help="Training epochs per run.")] = 3,
    repeats: Annotated[int, typer.Option(min=1, help="Timed runs per row.")] = 3,
    threads: Annotated[int | None, typer.Option(min=1, help="CPU threads for torch.")] = None,
    json_path: JsonOption = None,
) -> None:
    """Training and scoring items/s of the product's train/score: CPU float32 vs CUDA fp32/bf16."""
    from services.bench.device import run_device_bench
    from services.bench.report import write_json
    from services.ml.train import resolve_device, torch_threads

    if device not in ("cpu", "cuda"):
        raise typer.BadParameter("device must be cpu or cuda", param_hint="--device")
    target = resolve_device(device)  # type: ignore[arg-type]
    with torch_threads(threads):
        rows = run_device_bench(
            devices=(target.type,),
            train_items=train_items,
            score_items=score_items,
            epochs=epochs,
            repeats=repeats,
        )
        table = Table(title=f"train/score items/s by device, median of {repeats}")
        for column in ("model", "stage", "device", "precision", "items/s", "vs CPU fp32"):
            numeric = column.startswith(("items", "vs"))
            table.add_column(column, justify="right" if numeric else "left")
        for row in rows:
            table.add_row(
                row.workload,
                row.stage,
                row.device,
                row.precision,
                f"{row.items_per_s:,.0f}",
                f"{row.vs_cpu:.2f}",
            )
        console.print(table)
        if json_path is not None:
            write_json(
                json_path,
                benchmark="device",
                device=target,
                rows=[row.to_dict() for row in rows],
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
    from services.bench.manifest import run_manifest_bench
    from services.bench.report import write_json
    from services.ml.train import resolve_device

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
    from services.bench.report import write_json
    from services.bench.scoring import run_score_bench
    from services.ml.train import resolve_device

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
    from services.bench.report import write_json
    from services.bench.selection import run_select_bench
    from services.ml.train import resolve_device

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
    from services.bench.labeling import run_push_bench
    from services.bench.report import write_json
    from services.ml.train import resolve_device

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
    from services.bench.ingest import run_ingest_bench
    from services.bench.report import write_json
    from services.ml.train import resolve_device

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
    from services.bench.label_efficiency import run_label_efficiency_bench
    from services.bench.report import write_json
    from services.config import get_settings
    from services.ml.train import resolve_device
    from services.simulation.report import plot_learning_curves, write_results

    result, figures = run_label_efficiency_bench(get_settings(), seeds=seeds, workers=workers)
    write_results(result.summary, out)
    plot_learning_curves(result.summary, out)
    table = Table(title=f"label efficiency, digits 98:2 (8 rare), {seeds} seeds, mean [95% CI]")
    for column in ("arm", "F1@300", "recall@300", "AUC F1 20-300", "labels to target"):
        table.add_column(column, justify="left" if column == "arm" else "right")
    for name, arm in figures["arms"].items():
        median = arm["labels_to_target_median"]
        table.add_row(
            name,
            interval(arm["minority_f1_at_300"]),
            interval(arm["minority_recall_at_300"]),
            interval(arm["auc_minority_f1_20_300"]),
            f"{median:.0f}" if median is not None else f">{arm['labels_to_target_censored_at']}",
        )
    console.print(table)
    console.print(
        f"full-pool minority F1 (the target): {interval(figures['full_pool_minority_f1'])}"
    )
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


@bench_app.command("simulation")
def bench_simulation(
    seeds: Annotated[int, typer.Option(min=1, help="Runs per arm (seeds 0..N-1).")] = 3,
    arm: Annotated[
        list[str] | None, typer.Option("--arm", help="strategy/loss, e.g. default/focal.")
    ] = None,
    json_path: JsonOption = None,
) -> None:
    """What one simulated arm x seed costs on the demo setting, by stage of the product's cycle."""
    from services.bench.report import write_json
    from services.bench.simulation import STAGES, run_simulation_bench
    from services.config import get_settings
    from services.ml.train import resolve_device
    from services.simulation.config import Arm

    arms = []
    for name in arm or ["default/focal", "random/focal"]:
        strategy, _, loss = name.partition("/")
        if loss not in ("focal", "ce"):
            raise InvalidInput(f"--arm takes strategy/loss with loss focal or ce, got {name!r}")
        arms.append(Arm(strategy, loss))  # type: ignore[arg-type]
    rows = run_simulation_bench(get_settings(), arms=tuple(arms), seeds=seeds)
    table = Table(title=f"one arm x seed on the demo setting, 1 torch thread, median of {seeds}")
    for column in ("arm", "s per run", "cycles", *(f"{s} s/cycle" for s in STAGES)):
        table.add_column(column, justify="left" if column == "arm" else "right")
    for row in rows:
        table.add_row(
            row.arm,
            f"{row.median_seconds_per_run:.2f}",
            f"{row.cycles_per_run:.1f}",
            *(f"{row.seconds_per_cycle[stage]:.3f}" for stage in STAGES),
        )
    console.print(table)
    if json_path is not None:
        write_json(
            json_path,
            benchmark="simulation",
            device=resolve_device(get_settings().device),
            rows=[row.to_dict() for row in rows],
            summary={row.arm: row.median_seconds_per_run for row in rows},
        )
        console.print(f"wrote {json_path}")


@bench_app.command("startup")
def bench_startup(
    repeats: Annotated[int, typer.Option(min=1)] = 5,
    json_path: JsonOption = None,
) -> None:
    """Seconds until `focalloop --help`, `version` and the API answer, vs a bare interpreter."""
    from services.bench.report import write_json
    from services.bench.startup import run_startup_bench
    from services.config import get_settings
    from services.ml.train import resolve_device

    rows = run_startup_bench(get_settings(), repeats=repeats)
    table = Table(title=f"start to answer, median of {repeats}")
    for column in ("what", "seconds"):
        table.add_column(column, justify="left" if column == "what" else "right")
    for row in rows:
        table.add_row(row.what, f"{row.median_seconds:.2f}")
    console.print(table)
    if json_path is not None:
        write_json(
            json_path,
            benchmark="startup",
            device=resolve_device("cpu"),
            rows=[row.to_dict() for row in rows],
            summary={row.what: row.median_seconds for row in rows},
        )
        console.print(f"wrote {json_path}")
