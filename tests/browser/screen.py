"""What the browser tests do on Label Studio's pages: sign up, wait, read the labeling screen."""

from collections.abc import Callable
from typing import Any, TypeVar

from selenium import webdriver
from selenium.common.exceptions import TimeoutException
from selenium.webdriver.common.by import By
from selenium.webdriver.support.wait import WebDriverWait

from tests.browser.conftest import ARTIFACTS

T = TypeVar("T")
PASSWORD = "a-second-annotator-9271"
SUBMIT = "button[aria-label='Submit current annotation']"


def until(browser: webdriver.Chrome, what: str, check: Callable[[], T], timeout_s: float = 60) -> T:
    """check()'s first truthy answer, polled; a screenshot and a clear failure otherwise."""
    try:
        return WebDriverWait(browser, timeout_s, poll_frequency=0.25).until(lambda _: check())
    except TimeoutException:
        browser.save_screenshot(str(ARTIFACTS / "timeout.png"))
        raise AssertionError(f"timed out after {timeout_s} s waiting for {what}") from None


def sign_up(browser: webdriver.Chrome, url: str, email: str) -> None:
    """A new annotator signs up on Label Studio's own page (Label Studio's user API takes no
    password, so a person can only log in as a user made this way)."""
    browser.delete_all_cookies()
    browser.get(f"{url}/user/signup/")
    until(browser, "the sign-up form", lambda: browser.find_elements(By.NAME, "email"))
    browser.find_element(By.NAME, "email").send_keys(email)
    browser.find_element(By.NAME, "password").send_keys(PASSWORD)
    browser.find_element(By.CSS_SELECTOR, "button[type=submit], input[type=submit]").click()
    until(browser, "the signed-in page", lambda: "/user/signup" not in browser.current_url)


def console_entries(browser: webdriver.Chrome) -> list[dict[str, Any]]:
    """The console entries since the last call (Chromium hands each out once)."""
    entries: list[dict[str, Any]] = browser.get_log("browser")  # type: ignore[no-untyped-call]
    return entries


def current_task_id(browser: webdriver.Chrome) -> int | None:
    text = browser.execute_script(
        "const e = document.querySelector('.lsf-current-task__task-id');"
        "return e && e.firstChild ? e.firstChild.textContent : null;"
    )
    return int(text) if text and str(text).strip().isdigit() else None


def image_width(browser: webdriver.Chrome) -> int:
    """The natural width of the task's image as the browser decoded it (0: not loaded)."""
    widths = browser.execute_script(
        "return Array.from(document.images).filter(i => i.src).map(i => i.naturalWidth)"
    )
    return max(widths, default=0)


def checked_choices(browser: webdriver.Chrome) -> list[str]:
    return [
        str(element.get_attribute("name"))
        for element in browser.find_elements(By.CSS_SELECTOR, "input.ant-radio-input")
        if element.is_selected()
    ]
