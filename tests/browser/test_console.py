"""The console as an ML engineer meets it, in headless Chromium against a real `focalloop api`
process on a project with four real models: signing in through the form (a wrong token is
refused and sets no cookie), the learning curve with one point per model version, the live
cycle view following the cycle's rows as the test writes them (no reload, no race with a real
cycle), actions for a write token and none for a read token, a state-changing request from a
page on another port refused, /docs and /redoc offline, no request to any other host and no
error in the browser's console. Screenshots go to test-artifacts/browser/."""

import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest
import sqlalchemy as sa
from selenium import webdriver
from selenium.webdriver.common.by import By
from sqlmodel import col, select

from services import db
from services.api.console.auth import COOKIE
from services.auth import create_token
from services.config import Settings, child_environment
from services.models import AuditEntry, Cycle, CycleState, ModelVersion, Project, utcnow
from tests.browser.conftest import ARTIFACTS
from tests.browser.screen import console_entries, until
from tests.conftest import Digits
from tests.integration.conftest import free_port, insert_row
from tests.integration.cycle_helpers import project_with_models

pytestmark = pytest.mark.timeout(300)


@dataclass(frozen=True)
class Console:
    """A `focalloop api` process serving the console, its database, one project, two tokens."""

    url: str
    engine: sa.Engine
    project: str
    read_token: str
    write_token: str


@pytest.fixture(scope="module")
def console(digits: Digits, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Console]:
    folder = tmp_path_factory.mktemp("console")
    # No broker listens here: the console's actions under test need none, and a start that
    # needed one would be refused instead of queueing work on a shared Redis.
    settings = Settings(
        data_dir=folder / "data",
        database_url=f"sqlite:///{folder / 'state.db'}",
        broker_url=f"redis://127.0.0.1:{free_port()}/0",
        pool_shard_items=200,
    )
    engine = db.make_engine(settings.resolved_database_url())
    db.upgrade(engine)
    project = project_with_models(engine, settings, digits, folder / "project", cycles=5)
    with db.session_scope(engine) as session:
        _, read = create_token(session, name="reader", scope="read", actor="test")
        _, write = create_token(session, name="writer", scope="write", actor="test")
    port = free_port()
    log = (folder / "api.log").open("wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "services.cli", "api", "--port", str(port)],
        env=child_environment(settings),
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert process.poll() is None, (folder / "api.log").read_text()
            try:
                if httpx.get(f"{url}/api/v1/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "focalloop api did not start"
            time.sleep(0.2)
        yield Console(url, engine, project.name, read, write)
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()
        engine.dispose()


def _errors(browser: webdriver.Chrome) -> list[str]:
    return [e["message"] for e in console_entries(browser) if e["level"] == "SEVERE"]


def _foreign_requests(browser: webdriver.Chrome, origin: str) -> list[str]:
    """Every URL this page loaded (itself, scripts, styles, images, fetches) not from `origin`."""
    names: list[str] = browser.execute_script(
        "return performance.getEntries().map(e => e.name).filter(n => n.includes('://'))"
    )
    return [name for name in names if not name.startswith(origin + "/")]


def _sign_in(browser: webdriver.Chrome, console: Console, token: str) -> None:
    browser.get(f"{console.url}/console/")
    until(browser, "the sign-in form", lambda: browser.find_elements(By.ID, "token"))
    browser.find_element(By.ID, "token").send_keys(token)
    browser.find_element(By.ID, "sign-in").click()


def _screenshot(browser: webdriver.Chrome, name: str) -> None:
    """The whole page, not only the window."""
    height = browser.execute_script("return document.documentElement.scrollHeight")
    browser.set_window_size(1400, min(int(height) + 40, 8000))
    browser.save_screenshot(str(ARTIFACTS / name))
    browser.set_window_size(1400, 1000)


def _live(browser: webdriver.Chrome, key: str) -> str:
    return str(
        browser.execute_script(
            f"const e = document.querySelector('[data-live=\"{key}\"]'); return e && e.textContent"
        )
    )


def _audit(engine: sa.Engine, action: str) -> list[str]:
    with db.session_scope(engine) as session:
        return list(session.exec(select(AuditEntry.actor).where(AuditEntry.action == action)).all())


def _versions(engine: sa.Engine, project: str) -> list[int]:
    with db.session_scope(engine) as session:
        return list(
            session.exec(
                select(ModelVersion.version)
                .join(Project, col(Project.id) == col(ModelVersion.project_id))
                .where(Project.name == project)
                .order_by(col(ModelVersion.version))
            ).all()
        )


def test_a_wrong_token_is_refused_and_sets_no_cookie(
    browser: webdriver.Chrome, console: Console
) -> None:
    browser.delete_all_cookies()
    _sign_in(browser, console, "flt_not-a-token-anyone-was-given")
    message = until(
        browser, "the sign-in error", lambda: browser.find_elements(By.ID, "sign-in-error")
    )
    assert "unknown, revoked or expired" in message[0].text
    assert browser.current_url == f"{console.url}/console/sign-in"
    assert [c for c in browser.get_cookies() if c["name"] == COOKIE] == []
    # No complaint but the 401 of the refused form itself (if Chromium logs that at all).
    assert [error for error in _errors(browser) if "401" not in error] == []


def test_a_read_token_sees_the_learning_curve_and_the_live_cycle_but_no_actions(
    browser: webdriver.Chrome, console: Console
) -> None:
    browser.delete_all_cookies()
    _sign_in(browser, console, console.read_token)
    until(
        browser,
        "the projects list",
        lambda: browser.find_elements(By.CSS_SELECTOR, "tr[data-project]"),
    )
    (cookie,) = [c for c in browser.get_cookies() if c["name"] == COOKIE]
    assert (cookie["httpOnly"], cookie["sameSite"], cookie["path"]) == (True, "Strict", "/console")
    assert console.read_token not in browser.current_url
    _screenshot(browser, "console-projects.png")
    assert _errors(browser) == []
    assert _foreign_requests(browser, console.url) == []

    browser.find_element(By.LINK_TEXT, console.project).click()
    until(browser, "the project page", lambda: browser.find_elements(By.ID, "curve"))
    versions = _versions(console.engine, console.project)
    assert len(versions) >= 3
    drawn = browser.find_elements(By.CSS_SELECTOR, "svg[data-chart='macro-f1'] circle.point")
    assert sorted(int(str(p.get_attribute("data-version"))) for p in drawn) == versions
    # Per-class recall and precision are drawn with their intervals.
    assert browser.find_elements(By.CSS_SELECTOR, "svg[data-chart='recall'] path.whiskers")
    assert browser.find_elements(By.CSS_SELECTOR, "svg[data-chart='precision'] circle.point")
    # Read scope: nothing to act with.
    assert browser.find_elements(By.ID, "actions") == []
    assert browser.find_elements(By.CSS_SELECTOR, "a.promote, a.rollback, button#pause") == []

    # The live view follows the cycle's rows as they change, without reloading the page.
    browser.execute_script("window.focalloopMarker = 'same page'")
    with db.session_scope(console.engine) as session:
        project = session.exec(select(Project).where(Project.name == console.project)).one()
        number = 1 + max(
            session.exec(select(Cycle.number).where(Cycle.project_id == project.id)).all()
        )
        project_id = project.id or 0
    started = utcnow()
    insert_row(
        console.engine,
        Cycle(
            project_id=project_id,
            number=number,
            state=CycleState.TRAINING,
            trigger="written by the test",
            timeline=[
                {"state": "pending", "at": started.isoformat()},
                {"state": "training", "at": started.isoformat()},
            ],
            progress={
                "epoch": 3,
                "epochs": 100,
                "train_loss": 0.5,
                "val_loss": None,
                "started_at": started.isoformat(),
                "at": (started + timedelta(seconds=6)).isoformat(),
            },
        ),
    )
    until(browser, "training's epoch", lambda: "epoch 3 of at most 100" in _live(browser, "stage"))
    assert _live(browser, "number") == str(number)
    assert _live(browser, "eta") == "194"  # 2 s an epoch, 97 epochs left
    _set(console.engine, number, progress_epoch=40)
    until(browser, "a later epoch", lambda: "epoch 40 of at most 100" in _live(browser, "stage"))
    _set(console.engine, number, state=CycleState.SCORING, chunks=(4, 10))
    until(browser, "scoring", lambda: _live(browser, "stage") == "scoring: 4 of 10 chunks")
    bar = browser.find_element(By.CSS_SELECTOR, "progress[data-live='progress']")
    assert (bar.get_attribute("value"), bar.get_attribute("max")) == ("4", "10")
    assert browser.execute_script("return window.focalloopMarker") == "same page"
    _screenshot(browser, "console-project.png")
    assert _errors(browser) == []
    assert _foreign_requests(browser, console.url) == []


def _set(
    engine: sa.Engine,
    number: int,
    *,
    progress_epoch: int | None = None,
    state: CycleState | None = None,
    chunks: tuple[int, int] | None = None,
) -> None:
    """Move the test's cycle along the way the stages would (rows only)."""
    with db.session_scope(engine) as session:
        cycle = session.exec(
            select(Cycle).where(Cycle.number == number, Cycle.trigger == "written by the test")
        ).one()
        if progress_epoch is not None:
            cycle.progress = dict(cycle.progress or {}) | {"epoch": progress_epoch}
        if state is not None:
            cycle.state = state
            cycle.timeline = [*cycle.timeline, {"state": state, "at": utcnow().isoformat()}]
        if chunks is not None:
            cycle.chunks_done, cycle.chunks_total = chunks
        cycle.updated_at = utcnow()
        session.add(cycle)


def test_a_write_token_pauses_and_cancels_with_a_confirmation_and_is_audited(
    browser: webdriver.Chrome, console: Console
) -> None:
    browser.delete_all_cookies()
    _sign_in(browser, console, console.write_token)
    until(
        browser,
        "the projects list",
        lambda: browser.find_elements(By.CSS_SELECTOR, "tr[data-project]"),
    )
    browser.get(f"{console.url}/console/projects/{console.project}")
    browser.find_element(By.ID, "pause").click()
    notice = until(browser, "the notice", lambda: browser.find_elements(By.ID, "notice"))
    assert notice[0].text == "Done: Pause."
    with db.session_scope(console.engine) as session:
        assert session.exec(select(Project.paused).where(Project.name == console.project)).one()
    assert _audit(console.engine, "project.pause")[-1].endswith(":writer")

    # A cycle is running (the previous test's): cancelling it asks first.
    browser.find_element(By.ID, "cancel-cycle").click()
    until(browser, "the confirmation", lambda: browser.find_elements(By.ID, "confirm"))
    browser.find_element(By.ID, "confirm").click()
    notice = until(browser, "the notice", lambda: browser.find_elements(By.ID, "notice"))
    assert notice[0].text == "Done: Cancel the running cycle."
    assert _audit(console.engine, "cycle.cancel")[-1].endswith(":writer")
    browser.find_element(By.ID, "resume").click()
    until(browser, "resumed", lambda: browser.find_elements(By.ID, "pause"))
    assert _errors(browser) == []
    assert _foreign_requests(browser, console.url) == []


def test_a_page_on_another_port_cannot_act_with_the_cookie(
    browser: webdriver.Chrome, console: Console
) -> None:
    """Cookies ignore ports: the browser sends ours with this form, and the origin check
    refuses it."""
    browser.delete_all_cookies()
    _sign_in(browser, console, console.write_token)
    until(
        browser,
        "the projects list",
        lambda: browser.find_elements(By.CSS_SELECTOR, "tr[data-project]"),
    )
    target = f"{console.url}/console/projects/{console.project}/actions/pause"
    page = (
        f'<form id="f" method="post" action="{target}"></form>'
        "<script>document.getElementById('f').submit()</script>"
    ).encode()

    class Attacker(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.end_headers()
            self.wfile.write(page)

        def log_message(self, *_: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", free_port()), Attacker)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        browser.get(f"http://127.0.0.1:{server.server_port}/")
        until(
            browser,
            "the refusal",
            lambda: "did not come from a page of this console" in browser.page_source,
        )
    finally:
        server.shutdown()
        server.server_close()
    with db.session_scope(console.engine) as session:
        assert not session.exec(select(Project.paused).where(Project.name == console.project)).one()
    console_entries(browser)  # the 403 of the refused form


def test_the_api_docs_work_without_internet(browser: webdriver.Chrome, console: Console) -> None:
    browser.get(f"{console.url}/docs")
    until(
        browser,
        "Swagger UI's title",
        lambda: (
            "focalloop"
            in " ".join(
                e.text for e in browser.find_elements(By.CSS_SELECTOR, ".swagger-ui .title")
            )
        ),
    )
    assert _foreign_requests(browser, console.url) == []
    browser.get(f"{console.url}/redoc")
    until(
        browser,
        "ReDoc's title",
        lambda: "focalloop" in " ".join(e.text for e in browser.find_elements(By.TAG_NAME, "h1")),
    )
    assert _foreign_requests(browser, console.url) == []
    assert _errors(browser) == []
