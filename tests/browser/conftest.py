"""What a person sees, in a real headless Chromium (Debian's `chromium` and `chromium-driver`,
installed by `make test`): one browser for the session, driven by selenium through the Debian
chromedriver (selenium never downloads one). A missing browser fails under CI=true, like a
missing service, and skips elsewhere."""

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from selenium import webdriver
from selenium.common.exceptions import WebDriverException
from selenium.webdriver.chrome.service import Service

from tests.integration.conftest import (  # noqa: F401 (fixtures, found by name)
    s3_endpoint,
    settings,
    unavailable,
)

CHROMEDRIVER = "/usr/bin/chromedriver"
CHROMIUM = "/usr/bin/chromium"
# Screenshots (the labeling screen, and the page at any wait that timed out), kept for a person
# to look at.
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts" / "browser"


@pytest.fixture(scope="session")
def browser() -> Iterator[webdriver.Chrome]:
    if not (Path(CHROMEDRIVER).exists() and Path(CHROMIUM).exists()):
        found = shutil.which("chromedriver")
        unavailable(
            f"no Chromium at {CHROMIUM} with its driver at {CHROMEDRIVER} (found: {found}); "
            "`make test` installs Debian's chromium and chromium-driver"
        )
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in (
        "--headless=new",
        "--no-sandbox",  # CI runs as root, where Chromium's sandbox cannot start
        "--disable-dev-shm-usage",
        "--window-size=1400,1000",
    ):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    try:
        driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    except WebDriverException as error:
        unavailable(f"Chromium did not start: {error.msg}")
    driver.set_page_load_timeout(60)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    try:
        yield driver
    finally:
        driver.quit()
