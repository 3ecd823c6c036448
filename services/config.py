"""Settings: the only place in focalloop that reads the environment.

Built once per process by `get_settings()` and passed down; nothing below the edges calls it.
Every field maps to an environment variable `FOCALLOOP_<FIELD>`; unknown `FOCALLOOP_*` keys in a
`.env` file are refused, so a typo cannot silently fall back to a default.
"""

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """Process-wide configuration (env prefix `FOCALLOOP_`)."""

    model_config = SettingsConfigDict(
        env_prefix="FOCALLOOP_", env_file=".env", extra="forbid", frozen=True
    )

    data_dir: Path = Field(
        default=Path("~/.local/share/focalloop"),
        description="Root of the embedded defaults (SQLite file, local dataset store).",
    )
    device: Literal["auto", "cpu", "cuda"] = Field(
        default="auto", description="Where training and scoring run; auto = CUDA when present."
    )
    torch_threads: int | None = Field(
        default=None, ge=1, description="CPU threads for torch; None keeps torch's default."
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process's Settings, read from the environment on first use."""
    return Settings()
