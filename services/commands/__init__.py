"""Sub-commands of the `focalloop` CLI, one typer app per area."""
