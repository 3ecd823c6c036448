"""`focalloop bench peers|demo-project`: label efficiency, against scikit-activeml on the suite
and on `up`'s digits project. Registered on `bench`'s app; each command imports its benchmark
when it runs."""

import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from services.commands.bench import JsonOption, bench_app, console
from services.commands.simulation import interval


def _signed(metric: dict[str, Any]) -> str:
    low, high = metric["ci95"]
    return f"{metric['mean']:+.3f} [{low:+.3f}, {high:+.3f}]"


@bench_app.command("peers")
def bench_peers(
    setting: Annotated[
        list[str] | None, typer.Option("--setting", help="A setting's name (default: the suite).")
    ] = None,
    group: Annotated[
        str, typer.Option(help="suite (fixed before tuning), check (added after) or all.")
    ] = "suite",
    arm: Annotated[
        list[str] | None,
        typer.Option("--arm", help="Arms (default: all but focalloop-random)."),
    ] = None,
    seeds: Annotated[int, typer.Option(min=2, help="Seeds 0..N-1 per arm.")] = 10,
    workers: Annotated[int, typer.Option(min=1, help="Processes running jobs.")] = 2,
    peers_from: Annotated[
        Path | None,
        typer.Option(
            help="Take the peer arms' curves an earlier run's --json file holds (same Python, "
            "numpy and scikit-learn) instead of running them again; the rest run."
        ),
    ] = None,
    json_path: JsonOption = None,
) -> None:
    """Mean rare-class F1 over 20-300 labels and at 300, focalloop vs scikit-activeml (paired by
    seed: same split, initial labels and annotator answers)."""
    from services.bench.peers.reuse import load_peer_curves, this_environment
    from services.bench.peers.run import DEFAULT_ARMS, Curve, run_peers
    from services.bench.peers.suite import CHECK, SUITE
    from services.bench.peers.summary import summarize
    from services.bench.report import write_json
    from services.config import get_settings
    from services.errors import InvalidInput
    from services.ml.train import resolve_device

    groups = {"suite": SUITE, "check": CHECK, "all": (*SUITE, *CHECK)}
    if group not in groups:
        raise InvalidInput(f"--group takes suite, check or all, got {group!r}")
    names = setting or [s.name for s in groups[group]]
    arms = list(arm or DEFAULT_ARMS)
    reused = (
        load_peer_curves(
            peers_from, settings=names, arms=arms, seeds=seeds, here=this_environment()
        )
        if peers_from is not None
        else []
    )
    started = time.monotonic()

    def progress(curve: Curve, done: int, total: int) -> None:
        console.print(
            f"[{done}/{total} {time.monotonic() - started:.0f} s] {curve.setting} "
            f"{curve.arm} seed {curve.seed}: mean {sum(curve.rare_f1) / len(curve.rare_f1):.3f}"
        )

    results = run_peers(
        get_settings(),
        settings=names,
        arms=arms,
        seeds=seeds,
        workers=workers,
        on_progress=progress,
        reused=reused,
    )
    figures = summarize(results)
    table = Table(title=f"rare-class F1, 20-300 labels, {seeds} seeds, mean [95% CI]")
    for column in ("setting", "arm", "mean 20-300", "at 300"):
        table.add_column(column, justify="left" if column in ("setting", "arm") else "right")
    for name, figure in figures.items():
        for arm_name, arm_figures in figure["arms"].items():
            table.add_row(
                name,
                arm_name,
                interval(arm_figures["mean_rare_f1_20_300"]),
                interval(arm_figures["rare_f1_at_300"]),
            )
        if "vs_best_peer" in figure:
            versus = figure["vs_best_peer"]
            verdict = "goal met" if versus["goal_met"] else "goal NOT met"
            table.add_row(
                name,
                f"focalloop - {figure['best_peer']} ({verdict})",
                _signed(versus["mean_rare_f1_20_300"]),
                _signed(versus["rare_f1_at_300"]),
            )
        if "focal_minus_ce" in figure:
            table.add_row(name, "focal - ce", _signed(figure["focal_minus_ce"]), "")
        if figure.get("not_above_random_at"):
            table.add_row(name, "not above random at", str(figure["not_above_random_at"]), "")
        table.add_section()
    console.print(table)
    if json_path is not None:
        write_json(
            json_path,
            benchmark="peers",
            device=resolve_device("cpu"),
            rows=[
                {"setting": c.setting, "arm": c.arm, "seed": c.seed, "rare_f1": list(c.rare_f1)}
                for c in results.curves
            ],
            summary=figures,
            **({"peers_from": str(peers_from)} if peers_from is not None else {}),
        )
        console.print(f"wrote {json_path}")


@bench_app.command("demo-project")
def bench_demo_project(
    seeds: Annotated[int, typer.Option(min=2, help="Seeds 0..N-1.")] = 5,
    size: Annotated[
        list[int] | None, typer.Option("--size", help="Train at these sizes (default 8 and 32).")
    ] = None,
    workers: Annotated[int, typer.Option(min=1)] = 2,
    json_path: JsonOption = None,
) -> None:
    """Macro-F1 at 300 labels of `up`'s digits project on the product path: trained at 8x8
    (the project's setting) vs at the 32x32 its images are shown at."""
    from services.bench.demo_project import run_demo_project_bench
    from services.bench.report import write_json
    from services.config import get_settings
    from services.ml.train import resolve_device

    figures = run_demo_project_bench(
        get_settings(), seeds=seeds, workers=workers, sizes=tuple(size or (8, 32))
    )
    table = Table(title=f"up's digits project, 300 labels, {seeds} seeds, mean [95% CI]")
    table.add_column("trained at")
    table.add_column("macro-F1 @300", justify="right")
    for trained_at, figure in figures.items():
        table.add_row(trained_at, interval(figure["macro_f1_at_300"]))
    console.print(table)
    if json_path is not None:
        write_json(
            json_path,
            benchmark="demo-project",
            device=resolve_device("cpu"),
            rows=[{"trained_at": at, **figure} for at, figure in figures.items()],
        )
        console.print(f"wrote {json_path}")
