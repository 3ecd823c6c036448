"""The `focalloop` command: parse input, call down into services, render output."""

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from services.bench.focal_loss import run_focal_loss_bench
from services.bench.report import write_json
from services.errors import FocalloopError
from services.ml.train import resolve_device, torch_threads

app = typer.Typer(
    help="focalloop: an active-learning labeling loop built on focal-loss models.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
bench_app = typer.Typer(
    help="Benchmarks: print a table; --json PATH saves the figures.", no_args_is_help=True
)
app.add_typer(bench_app, name="bench")

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


def main() -> None:
    """Console entry point: expected errors end with one clear line and exit code 2."""
    try:
        app()
    except (FocalloopError, ValueError, FileExistsError, FileNotFoundError) as error:
        errors.print(f"[bold red]error:[/] {error}", highlight=False)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
