"""Benchmarks behind `focalloop bench ...`: each returns plain rows the CLI renders and saves."""
