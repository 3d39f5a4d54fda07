"""Headless Chromium through Selenium for the UI tests: find the browser, wait for visible text, save screenshots.

Debian's `chromium` and `chromium-driver` packages are used. Tests never install system packages: `make
system-deps` does (CI runs it first); without them the browser tests are skipped, saying so.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from selenium.webdriver.remote.webdriver import WebDriver
    from selenium.webdriver.remote.webelement import WebElement

WIDTH, HEIGHT = 1500, 1000
WAIT_S = 30.0  # a page of either UI renders in 1-5 s here; the first MLflow page compiles its bundle cache
SCREENSHOTS_ENV = "TRAINFLOW_SCREENSHOTS"  # a folder: screenshots are also saved there, under stable names


def chromium() -> tuple[str, str]:
    """Paths of the Chromium browser and its chromedriver; the test is skipped when they are not installed."""
    found = _find_chromium()
    if not found:
        pytest.skip("chromium and chromedriver are not installed: run `make system-deps` (Debian's chromium and "
                    "chromium-driver), or put both on PATH")  # fmt: skip
    return found


def _find_chromium() -> tuple[str, str] | None:
    browser = next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None)
    driver = shutil.which("chromedriver")
    return (browser, driver) if browser and driver else None


def headless_chromium() -> Iterator[WebDriver]:
    """A headless Chromium with a 1500x1000 viewport, quit on leaving (for a fixture to yield from)."""
    webdriver = pytest.importorskip(
        "selenium.webdriver", reason="selenium is in the dev extra: pip install -e '.[dev]'"
    )
    browser, driver_path = chromium()
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-proxy-server",
                 f"--window-size={WIDTH},{HEIGHT}"):  # fmt: skip
        options.add_argument(flag)
    driver = webdriver.Chrome(service=webdriver.ChromeService(executable_path=driver_path), options=options)
    try:  # the window size includes the browser's frame; screenshots show the viewport, so size that
        driver.execute_cdp_cmd(
            "Emulation.setDeviceMetricsOverride",
            {"width": WIDTH, "height": HEIGHT, "deviceScaleFactor": 1, "mobile": False},
        )
        yield driver
    finally:
        driver.quit()


def text_xpath(text: str, exact: bool = True) -> str:
    """The innermost elements whose text is `text` (or starts with it, exact=False)."""
    assert "'" not in text, text
    match = f"normalize-space(.)='{text}'" if exact else f"starts-with(normalize-space(.), '{text}')"
    return f"//*[{match} and not(*[{match}])]"


def wait_visible(driver: WebDriver, xpath: str, what: str, timeout_s: float = WAIT_S) -> WebElement:
    """The first visible element at `xpath`; fails naming `what` and the page's URL if none shows in time."""
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as seen
    from selenium.webdriver.support.ui import WebDriverWait

    try:
        return WebDriverWait(driver, timeout_s).until(seen.visibility_of_element_located((By.XPATH, xpath)))
    except TimeoutException:
        pytest.fail(f"{what} not visible within {timeout_s:g} s on {driver.current_url}")


def wait_text(driver: WebDriver, text: str, exact: bool = True, timeout_s: float = WAIT_S) -> WebElement:
    return wait_visible(driver, text_xpath(text, exact), repr(text), timeout_s)


def click_if_present(driver: WebDriver, xpath: str, gone_xpath: str | None = None) -> bool:
    """Click the first visible element at `xpath` (a close button, a view toggle), then wait until `gone_xpath`
    (if given) shows nothing; False when there was nothing to click. For what the tests do not depend on."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as seen
    from selenium.webdriver.support.ui import WebDriverWait

    for element in driver.find_elements(By.XPATH, xpath):
        if element.is_displayed():
            element.click()
            if gone_xpath:
                WebDriverWait(driver, WAIT_S).until(seen.invisibility_of_element_located((By.XPATH, gone_xpath)))
            return True
    return False


def screenshot(driver: WebDriver, folder: Path, name: str) -> Path:
    """Save a PNG of the viewport as `folder/name`, and under the same name in $TRAINFLOW_SCREENSHOTS when set."""
    path = folder / name
    assert driver.save_screenshot(str(path)), path
    extra = os.environ.get(SCREENSHOTS_ENV)
    if extra:
        Path(extra).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, Path(extra) / name)
    return path
