"""The console: pages for ML engineers, served by the API itself at /console/ (and / redirects
there). Server-rendered HTML (templates/) with server-drawn SVG charts (charts.py), one small
script (static/console.js) that refreshes the live cycle view, nothing from any other host.

auth.py         signing in with an API token (kept in the console's own cookie), same-origin
                checks
history.py      the learning curve: one point per model version, intervals, promotion decisions
figures.py      the project page's charts (charts.py draws them)
curve_cache.py  the learning curve and its charts, kept until the models behind them change
actions.py      what a write token may do: start/cancel a cycle, pause/resume, promote/roll back
tuning.py       tuning studies and their heatmaps
routes.py       the pages, the JSON the script polls, the actions' forms

What a project looks like right now (the glance, the live cycle, label issues, dataset versions)
is services/overview.py, shared with the terminal's live status; the alerts are services/alerts.py.
"""

from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles

from services.api.console.auth import SIGN_IN_PATH, SignInRequiredError
from services.api.console.routes import router

STATIC = Path(__file__).parent / "static"


def install(app: FastAPI) -> None:
    """Add the console's routes, its static files and its sign-in redirect to `app`."""
    app.include_router(router)
    app.mount("/console/static", StaticFiles(directory=STATIC), name="console-static")

    @app.exception_handler(SignInRequiredError)
    async def sign_in_first(request: Request, _: SignInRequiredError) -> Response:
        if request.url.path.startswith("/console/data/"):
            return JSONResponse({"detail": "sign in to the console first"}, status_code=401)
        return RedirectResponse(SIGN_IN_PATH, status_code=303)
