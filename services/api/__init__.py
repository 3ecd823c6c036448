"""The HTTP API (FastAPI): `create_app(settings)` builds it; `focalloop api` serves it."""

from services.api.app import create_app

__all__ = ["create_app"]
