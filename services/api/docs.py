"""/docs and /redoc without internet: Swagger UI's and ReDoc's assets come from the
fastapi-offline package, served by this app.

ReDoc's bundle still names one remote file, the Redocly logo in its sidebar footer; the bundle is
served here with that URL pointed at a copy of the console's icon, so opening /redoc makes no
request to another host.
"""

from functools import cache
from pathlib import Path
from typing import Any

import fastapi_offline
from fastapi import FastAPI
from fastapi.openapi.docs import get_redoc_html
from fastapi.responses import HTMLResponse, Response

ASSETS = "/docs-assets"
REDOC_JS = "/redoc-assets/redoc.standalone.js"
REMOTE_LOGO = b"https://cdn.redoc.ly/redoc/logo-mini.svg"
LOCAL_LOGO = b"/console/static/favicon.svg"


@cache
def _redoc_bundle() -> bytes:
    bundle = (Path(fastapi_offline.__file__).parent / "static" / "redoc.standalone.js").read_bytes()
    return bundle.replace(REMOTE_LOGO, LOCAL_LOGO)


def offline_app(**options: Any) -> FastAPI:
    """A FastAPI app whose /docs (Swagger UI) and /redoc load only from this server."""
    app = fastapi_offline.FastAPIOffline(
        static_url=ASSETS,
        favicon_url="/console/static/favicon.svg",
        redoc_url=None,
        **options,
    )

    @app.get("/redoc", include_in_schema=False)
    def redoc() -> HTMLResponse:
        return get_redoc_html(
            openapi_url=app.openapi_url or "/openapi.json",
            title=f"{app.title} - ReDoc",
            redoc_js_url=REDOC_JS,
            redoc_favicon_url="/console/static/favicon.svg",
            with_google_fonts=False,
        )

    @app.get(REDOC_JS, include_in_schema=False)
    def redoc_bundle() -> Response:
        return Response(_redoc_bundle(), media_type="text/javascript")

    return app
