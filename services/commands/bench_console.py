"""`focalloop bench console`: the server time of the console's pages on a large project.
Registered on `bench`'s app; the benchmark is imported when it runs."""

from typing import Annotated

import typer
from rich.table import Table

from services.commands.bench import JsonOption, bench_app, console
from services.errors import InvalidInput


@bench_app.command("console")
def bench_console(
    items: Annotated[int, typer.Option(min=1000, help="Pool items in the project.")] = 1_000_000,
    models: Annotated[int, typer.Option(min=1, help="Model versions.")] = 200,
    cycles: Annotated[int, typer.Option(min=1, help="Cycles.")] = 500,
    repeats: Annotated[int, typer.Option(min=1, help="Timed requests per endpoint.")] = 7,
    database: Annotated[str, typer.Option(help="postgresql (local server) or sqlite.")] = (
        "postgresql"
    ),
    json_path: JsonOption = None,
) -> None:
    """Server time of the console's pages and data endpoints on a large project (goal: every
    one under 200 ms), against the REST API's project GET in the same run."""
    from services.bench.console import as_rows, run_console_bench
    from services.bench.report import write_json
    from services.ml.train import resolve_device

    if database not in ("postgresql", "sqlite"):
        raise InvalidInput(f"--database takes postgresql or sqlite, got {database!r}")
    timed, baseline, seeding_s = run_console_bench(
        items=items, models=models, cycles=cycles, repeats=repeats, database=database
    )
    table = Table(
        title=f"console on {items:,} items, {models} models, {cycles} cycles ({database}), "
        f"median of {repeats}"
    )
    for column in ("endpoint", "median ms", "max ms", "KiB", "x REST project GET"):
        table.add_column(column)
    for row in [*timed, baseline]:
        table.add_row(
            row.path.replace("console-bench", "{p}"),
            f"{row.median_ms:.1f}",
            f"{row.max_ms:.1f}",
            f"{row.bytes / 1024:.0f}",
            f"{row.median_ms / baseline.median_ms:.1f}",
        )
    console.print(table)
    slowest = max(timed, key=lambda t: t.median_ms)
    console.print(
        f"seeded in {seeding_s:.0f} s; slowest {slowest.path} {slowest.median_ms:.1f} ms: "
        + ("under" if slowest.median_ms < 200 else "OVER")
        + " the 200 ms goal"
    )
    if json_path is not None:
        write_json(
            json_path,
            benchmark="console",
            device=resolve_device("cpu"),
            rows=as_rows(timed, baseline),
            summary={
                "slowest_path": slowest.path,
                "slowest_median_ms": slowest.median_ms,
                "seeding_s": seeding_s,
            },
        )
        console.print(f"wrote {json_path}")
