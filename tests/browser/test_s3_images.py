"""Images in S3, shown through presigned URLs, in headless Chromium against a real Label Studio
and moto's S3 server (its global wildcard CORS off: MOTO_DISABLE_GLOBAL_CORS, set in
tests/conftest.py, so the bucket's own rule decides, as on AWS or MinIO). Without a CORS rule
the image does not load and `labelstudio connect`'s check says so; with the rule it suggests,
five tasks in a row show their image, are labeled by hotkey and reach our database, and the
Data Manager's thumbnails load."""

from pathlib import Path

import sqlalchemy as sa
from selenium import webdriver
from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.by import By
from sklearn.datasets import load_digits
from sqlmodel import select

from labeling.label_studio.bucket_cors import bucket_cors_problems
from labeling.label_studio.gateway import LabelStudioGateway
from labeling.label_studio.link import LabelStudioLink
from labeling.label_studio.server import LocalLabelStudio
from services import db
from services.config import Settings, web_origin
from services.datasets.store import s3_client
from services.local import write_demo_images
from services.models import Item, ItemStatus
from services.projects import ProjectSpec, get_project
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
from tests.integration.ls_harness import (
    ApiServer,
    inbox_count,
    wait_for,
)
from tests.integration.ls_project import (
    api,
    api_port,
    broker,
    connect,
    first_cycle,
    ingest_all,
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


def _problems(engine: sa.Engine, name: str, settings: Settings) -> list[str]:
    with db.session_scope(engine) as session:
        project = get_project(session, name)
        return bucket_cors_problems(session, project, LabelStudioLink.of(project), settings)


def test_s3_images_load_once_the_bucket_lets_label_studio_read_them(
    sqlite_engine: sa.Engine,
    ls_settings: Settings,
    label_studio: LocalLabelStudio,
    annotator: LabelStudioGateway,
    api: ApiServer,
    browser: webdriver.Chrome,
    tmp_path: Path,
) -> None:
    engine = sqlite_engine
    _, truth_table = write_demo_images(tmp_path / "digits")
    bucket = unique_name("shown")
    client = s3_client(ls_settings)
    client.create_bucket(Bucket=bucket)
    for item_id in truth_table["item_id"].to_pylist()[:60]:
        body = (tmp_path / "digits" / f"{item_id}.png").read_bytes()
        client.put_object(Bucket=bucket, Key=f"raw/{item_id}.png", Body=body)
    source = f"s3://{bucket}/raw"
    settings = ls_settings.model_copy(update={"source_roots": [source]})
    name = unique_name("s3i")
    register(
        engine,
        settings,
        ProjectSpec(
            name=name,
            labels=[str(digit) for digit in range(10)],
            modality="image",
            store_url=f"file://{tmp_path / 'store'}",
            image_size=32,
            image_channels=1,
            batch_size=10,
        ),
        source,
        source,
    )
    ls_project = connect(engine, name, label_studio, settings)
    (problem,) = _problems(engine, name, settings)
    assert f"bucket {bucket} has no CORS rule letting {label_studio.url} GET" in problem
    first_cycle(engine, name, settings)
    assert len(tasks_of(engine, name)) == 10

    # Without the rule, the browser refuses the image and says why in the console.
    sign_up(browser, label_studio.url, f"{unique_name('s3-annotator')}@example.com")
    console_entries(browser)
    browser.get(f"{label_studio.url}/projects/{ls_project}/data?labeling=1")
    until(browser, "the first task", lambda: current_task_id(browser))
    refused = until(
        browser,
        "the console's CORS error",
        lambda: [
            entry["message"]
            for entry in console_entries(browser)
            if entry["level"] == "SEVERE" and "CORS" in entry["message"]
        ],
    )
    assert settings.s3_endpoint_url in refused[0]
    assert image_width(browser) == 0

    # The rule `connect` suggests.
    client.put_bucket_cors(
        Bucket=bucket,
        CORSConfiguration={
            "CORSRules": [
                {
                    "AllowedOrigins": [web_origin(label_studio.url)],
                    "AllowedMethods": ["GET"],
                    "AllowedHeaders": ["*"],
                }
            ]
        },
    )
    assert _problems(engine, name, settings) == []
    targets = load_digits().target
    console_entries(browser)  # what the refused loads logged is not asked about below
    browser.get(f"{label_studio.url}/projects/{ls_project}/data?labeling=1")
    served: list[int] = []
    for _ in range(5):
        task_id = until(
            browser,
            "the next task",
            lambda: (t := current_task_id(browser)) is not None and t not in served and t,
        )
        assert isinstance(task_id, int)
        until(browser, f"task {task_id}'s image", lambda: image_width(browser) > 0)
        until(browser, "nothing chosen (no model yet)", lambda: checked_choices(browser) == [])
        item = _item_of_task(engine, name, task_id)
        label = str(targets[int(Path(item.uri).stem.split("-")[1])])
        ActionChains(browser).send_keys(label).perform()
        until(browser, f"hotkey {label}", lambda: checked_choices(browser) == [label])  # noqa: B023
        if not served:
            browser.save_screenshot(str(ARTIFACTS / "labeling-screen-s3.png"))
        browser.find_element(By.CSS_SELECTOR, SUBMIT).click()
        served.append(task_id)
    project_id = project_id_of(engine, name)
    wait_for(lambda: inbox_count(engine, project_id) == 5, what="5 webhooks")
    ingest_all(engine)
    for task_id in served:
        item = _item_of_task(engine, name, task_id)
        assert item.status == ItemStatus.LABELED
        assert item.label == str(targets[int(Path(item.uri).stem.split("-")[1])])

    # The Data Manager's table shows each task's image as a thumbnail.
    browser.get(f"{label_studio.url}/projects/{ls_project}/data")
    until(
        browser,
        "a thumbnail from S3",
        lambda: (
            browser.execute_script(
                "return Array.from(document.images).filter("
                "i => i.src.startsWith(arguments[0]) && i.naturalWidth > 0).length",
                settings.s3_endpoint_url,
            )
            >= 5
        ),
    )
    ours = [
        entry["message"]
        for entry in console_entries(browser)
        if entry["level"] == "SEVERE" and (settings.s3_endpoint_url or "") in entry["message"]
    ]
    assert ours == []


def _item_of_task(engine: sa.Engine, name: str, task_id: int) -> Item:
    (task,) = [t for t in tasks_of(engine, name) if t.external_task_id == task_id]
    with db.session_scope(engine) as session:
        item = session.exec(select(Item).where(Item.id == task.item_id)).one()
        session.expunge(item)
    return item
