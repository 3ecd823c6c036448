"""`focalloop bench tune-value|tune-scaling`: what `focalloop tune` buys on the test split, and
how its grid's wall time scales with gpu worker processes. Registered on `bench`'s app; each
command imports its benchmark when it runs."""

from typing import Annotated, Any

import typer
from rich.table import Table

from services.commands.bench import JsonOption, bench_app, console
from services.commands.simulation import interval


def _signed(metric: dict[str, Any]) -> str:
    low, high = metric["ci95"]
    return f"{metric['mean']:+.3f} [{low:+.3f}, {high:+.3f}]"


@bench_app.command("tune-value")
def bench_tune_value(
    setting: Annotated[
        list[str] | None,
        typer.Option("--setting", help="A peer-suite setting (default: three of them)."),
    ] = None,
    seeds: Annotated[int, typer.Option(min=2, help="Seeds 0..N-1 per setting.")] = 10,
    workers: Annotated[int, typer.Option(min=1, help="Processes running jobs.")] = 2,
    folds: Annotated[int, typer.Option(min=2)] = 3,
    repeats: Annotated[int, typer.Option(min=1)] = 1,
    rank_by: Annotated[
        str,
        typer.Option(
            help="What tuning maximizes: minority_f1 (tune's default, the class with the fewest "
            "labels) or rare_f1 (the setting's rare class)."
        ),
    ] = "minority_f1",
    json_path: JsonOption = None,
) -> None:
    """Tuned vs default vs cross-entropy: rare-class F1 on the test split after the default
    loop's 300 labels, tuned by k-fold on those labels only; paired differences over seeds."""
    from services.bench.peers.suite import SETTINGS
    from services.bench.report import write_json
    from services.bench.tuning import ARMS, VALUE_SETTINGS, run_value_bench
    from services.config import get_settings
    from services.ml.train import resolve_device
    from services.simulation.summary import mean_ci95

    names = tuple(setting or VALUE_SETTINGS)
    unknown = [name for name in names if name not in SETTINGS]
    if unknown:
        raise typer.BadParameter(f"unknown settings {unknown}", param_hint="--setting")
    if rank_by not in ("minority_f1", "rare_f1"):
        raise typer.BadParameter("minority_f1 or rare_f1", param_hint="--rank-by")
    rows = run_value_bench(
        get_settings(),
        settings=names,
        seeds=seeds,
        workers=workers,
        folds=folds,
        repeats=repeats,
        rank_by=rank_by,
        on_row=lambda row, done, total: console.print(
            f"  {done}/{total} {row.setting} seed {row.seed}: "
            + ", ".join(f"{arm} {row.rare_f1[arm]:.3f}" for arm in ARMS)
            + f" (tuned gamma={row.tuned_gamma:g} alpha={row.tuned_alpha}, {row.seconds:.0f} s)"
        ),
    )
    table = Table(title=f"tuning's value: rare-class F1 on the test split, {seeds} seeds")
    for column in ("setting", *ARMS, "tuned - default", "tuned - ce"):
        table.add_column(column, justify="left" if column == "setting" else "right")
    summary: dict[str, Any] = {}
    for name in names:
        mine = sorted((r for r in rows if r.setting == name), key=lambda r: r.seed)
        figures: dict[str, Any] = {arm: mean_ci95([r.rare_f1[arm] for r in mine]) for arm in ARMS}
        for other in ("default", "ce"):
            figures[f"tuned-{other}"] = mean_ci95(
                [r.rare_f1["tuned"] - r.rare_f1[other] for r in mine], bounds=None
            )
        figures["tuned_settings"] = [f"gamma={r.tuned_gamma:g} alpha={r.tuned_alpha}" for r in mine]
        summary[name] = figures
        table.add_row(
            name,
            *(interval(figures[arm]) for arm in ARMS),
            _signed(figures["tuned-default"]),
            _signed(figures["tuned-ce"]),
        )
    console.print(table)
    if json_path is not None:
        write_json(
            json_path,
            benchmark="tune-value",
            device=resolve_device("cpu"),
            rows=[row.to_dict() for row in rows],
            summary=summary,
            rank_by=rank_by,
        )
        console.print(f"wrote {json_path}")


@bench_app.command("tune-scaling")
def bench_tune_scaling(
    repeats: Annotated[int, typer.Option(min=1, help="Grids per worker count.")] = 3,
    json_path: JsonOption = None,
) -> None:
    """Wall time of the 15-cell grid (3 x 3 folds) with 1 and 2 gpu worker processes."""
    from services.bench.report import write_json
    from services.bench.tuning import run_scaling_bench
    from services.config import get_settings
    from services.ml.train import resolve_device

    rows = run_scaling_bench(get_settings(), repeats=repeats)
    table = Table(title=f"tune grid wall time, 15 cells x 9 folds, median of {repeats}")
    for column in ("worker processes", "median s", "runs s", "speed-up vs 1"):
        table.add_column(column, justify="right")
    single = rows[0].median_seconds
    for row in rows:
        table.add_row(
            str(row.workers),
            f"{row.median_seconds:.1f}",
            ", ".join(f"{s:.1f}" for s in row.runs),
            f"{single / row.median_seconds:.2f}",
        )
    console.print(table)
    if json_path is not None:
        write_json(
            json_path,
            benchmark="tune-scaling",
            device=resolve_device("cpu"),
            rows=[row.to_dict() for row in rows],
            summary={"speedup_2_vs_1": single / rows[-1].median_seconds},
        )
        console.print(f"wrote {json_path}")
