"""Label Studio's labeling screen as an annotator meets it, in headless Chromium against a real
Label Studio and our API: a second user (signed up through Label Studio's own page) presses
"Label All Tasks" after a second batch arrived and the waiting tasks' predictions were
refreshed, with focalloop connected as the project's model backend. Each task's image loads;
evaluation items come first with nothing pre-selected, then ascending score; a hotkey selects its
label; Submit stores the label in our database under the annotator's email; the browser console
shows no error from our API's origin."""

from pathlib import Path

import pyarrow as pa
import sqlalchemy as sa
from selenium import webdriver
from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.by import By
from sqlmodel import select

from labeling.label_studio.gateway import LabelStudioGateway
from labeling.label_studio.server import LocalLabelStudio
from services import db
from services.config import Settings
from services.cycle.trigger import maybe_start_cycle
from services.local import write_demo_images
from services.models import Annotation, ItemStatus, LabelTask, LabelTaskState
from services.projects import ProjectSpec
from tests.browser.conftest import ARTIFACTS
from tests.browser.screen import (
    SUBMIT,
    checked_choices,
    console_entries,
    current_task_id,
    image_width,
    sign_up,
    until,
)
from tests.integration.conftest import unique_name
from tests.integration.cycle_helpers import run_stages
from tests.integration.ls_harness import (
    ApiServer,
    inbox_count,
    wait_for,
)
from tests.integration.ls_project import (
    LabelStudioAdmin,
    api,
    api_port,
    broker,
    connect,
    first_cycle,
    ingest_all,
    item_of,
    ls_settings,
    project_id_of,
    register,
    sqlite_engine,
    tasks_of,
)

__all__ = [
    "api",
    "api_port",
    "broker",
    "ls_settings",
    "sqlite_engine",
]  # fixtures, used by name


def annotators_of(engine: sa.Engine, item_id: int) -> set[str]:
    with db.session_scope(engine) as session:
        return set(
            session.exec(select(Annotation.annotator).where(Annotation.item_id == item_id)).all()
        )


def test_an_annotator_labels_hardest_first_with_images_and_hotkeys(
    sqlite_engine: sa.Engine,
    ls_settings: Settings,
    label_studio: LocalLabelStudio,
    annotator: LabelStudioGateway,
    api: ApiServer,
    ls_token: str,
    browser: webdriver.Chrome,
    tmp_path: Path,
) -> None:
    engine = sqlite_engine
    sources = tmp_path / "sources"
    manifest, truth_table = write_demo_images(sources / "digits")
    truth = dict(
        zip(truth_table["item_id"].to_pylist(), truth_table["label"].to_pylist(), strict=True)
    )
    assert isinstance(truth_table, pa.Table)
    name = unique_name("see")
    register(
        engine,
        ls_settings,
        ProjectSpec(
            name=name,
            labels=[str(digit) for digit in range(10)],
            modality="image",
            store_url=f"file://{tmp_path / 'store'}",
            image_size=32,
            image_channels=1,
            batch_size=10,
            retrain_min_new_labels=5,
        ),
        str(manifest),
        f"file://{sources}",
    )
    ls_project = connect(engine, name, label_studio, ls_settings)
    first_cycle(engine, name, ls_settings)
    first_batch = tasks_of(engine, name)
    # The admin answers 7 through the API; 3 wait, and the next cycle refreshes them.
    for task in first_batch[:7]:
        external = item_of(engine, task.item_id).external_id
        annotator.annotate(int(task.external_task_id or 0), truth[external], modality="image")
    project_id = project_id_of(engine, name)
    wait_for(lambda: inbox_count(engine, project_id) == 7, what="7 webhooks")
    ingest_all(engine)
    second = maybe_start_cycle(engine, name, ls_settings)
    assert second is not None and second.id is not None
    run_stages(engine, second.id, ls_settings)
    waiting: dict[int, LabelTask] = {
        int(row.external_task_id or 0): row
        for row in tasks_of(engine, name) + tasks_of(engine, name, "review")
        if row.state == LabelTaskState.OPEN
        and item_of(engine, row.item_id).status in (ItemStatus.QUEUED, ItemStatus.IN_REVIEW)
    }
    assert len(waiting) >= 13
    assert all(row.model_version is not None for row in waiting.values())  # all refreshed

    # Connected as a model backend too: evaluation items must still arrive with nothing chosen.
    LabelStudioAdmin(label_studio, ls_token).add_model_backend(engine, name, ls_project, api.url)
    email = f"{unique_name('annotator')}@example.com"
    sign_up(browser, label_studio.url, email)
    console_entries(browser)  # start the console record here
    browser.get(f"{label_studio.url}/projects/{ls_project}/data?labeling=1")
    served: list[int] = []
    pressed = 0
    for _ in range(10):
        task_id = until(
            browser,
            "the next task",
            lambda: (t := current_task_id(browser)) is not None and t not in served and t,
        )
        assert isinstance(task_id, int)
        assert task_id in waiting, f"task {task_id} is not one of ours waiting"
        row = waiting[task_id]
        until(browser, f"task {task_id}'s image", lambda: image_width(browser) > 0)
        # Unanchored tasks open with nothing chosen; the others with the model's answer.
        shown = [] if row.prediction_label is None else [row.prediction_label]
        until(browser, f"task {task_id}'s choices", lambda: checked_choices(browser) == shown)  # noqa: B023
        label = truth[item_of(engine, row.item_id).external_id]
        if shown != [label]:  # a hotkey toggles: press it only to change the choice
            ActionChains(browser).send_keys(label).perform()  # the label's own hotkey
            until(browser, f"hotkey {label}", lambda: checked_choices(browser) == [label])  # noqa: B023
            pressed += 1
        if not served:
            browser.save_screenshot(str(ARTIFACTS / "labeling-screen.png"))
        browser.find_element(By.CSS_SELECTOR, SUBMIT).click()
        served.append(task_id)
    # Unanchored tasks (evaluation items, reviews) first, then ascending score.
    kinds = [waiting[t].prediction_label is None for t in served]
    assert kinds == sorted(kinds, reverse=True), kinds
    assert 1 <= sum(kinds) <= 7, kinds  # some of each kind were served
    assert pressed >= sum(kinds)  # every unanchored task was labeled by its hotkey
    scores = [float(waiting[t].prediction_score or 0) for t in served if not kinds[served.index(t)]]
    assert scores == sorted(scores), scores
    # Every submission reached our database, under the annotator who gave it.
    before = 7
    wait_for(lambda: inbox_count(engine, project_id) == before + 10, what="10 webhooks")
    ingest_all(engine)
    for task_id in served:
        item = item_of(engine, waiting[task_id].item_id)
        assert item.label == truth[item.external_id]
        assert item.status == ItemStatus.LABELED
        assert annotators_of(engine, item.id or 0) == {email}  # not label-studio-user-N
    # No console error names our API (images, CORS).
    ours = [
        entry["message"]
        for entry in console_entries(browser)
        if entry["level"] == "SEVERE" and api.url in entry["message"]
    ]
    assert ours == []
