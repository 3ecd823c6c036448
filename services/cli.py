"""The `focalloop` command: parse input, call down into services, render output.

Only the command definitions are imported here; each command imports the services it calls when
it runs, so `focalloop --help` and `focalloop version` answer at once.
"""

import typer
from rich.console import Console

from services.commands import (  # noqa: F401 (register)
    bench_console,
    bench_peers,
    bench_people,
    bench_tune,
)
from services.commands.admin import model_app, token_app
from services.commands.bench import bench_app
from services.commands.cycles import beat, cycle_app, worker
from services.commands.datasets import datasets_app
from services.commands.labeling import api, labelstudio_app
from services.commands.simulation import demo, simulate
from services.commands.state import db_app, pool_app, project_app
from services.commands.tune import tune
from services.commands.up import up
from services.errors import FocalloopError

app = typer.Typer(
    help="focalloop: an active-learning labeling loop built on focal-loss models.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
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
app.command("simulate")(simulate)
app.command("demo")(demo)
app.command("tune")(tune)

console = Console()
errors = Console(stderr=True)


@app.command()
def version() -> None:
    """Print focalloop's version."""
    from importlib.metadata import version as package_version

    console.print(f"focalloop {package_version('focalloop')}")


def main() -> None:
    """Console entry point: expected errors end with one clear line and exit code 2."""
    try:
        app()
    except (FocalloopError, ValueError, FileExistsError, FileNotFoundError) as error:
        # One line whatever the width: scripts and logs grep it.
        errors.print(f"[bold red]error:[/] {error}", highlight=False, soft_wrap=True)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
