"""The live map page in a real browser: headless Debian Chromium through selenium and /usr/bin/chromedriver.

The simulator publishes a small fleet; the page, opened with a token in its URL fragment, must show
every device (the status line's count) and a device's position must change in the DOM (the device
list's data attributes). A screenshot is saved under the test's tmp dir. Skipped with the reason
where Chromium or its driver is missing; in CI (CI=true) that is a failure (.ci/run installs both).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time

import pytest

from tests.gateway.conftest import token
from tests.helpers import ROOT, wait_until

# The gateway reads positions only for its snapshot, and the snapshot's test runs on both backends;
# the rest is the WebSocket side, the same whatever table is behind it (and the suite stays under
# ten minutes: issue 12).
pytestmark = pytest.mark.backends("plain")

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
DEVICES = 6


def _need_chromium() -> None:
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not os.path.exists(p)]
    try:
        import selenium  # noqa: F401
    except ImportError:
        missing.append("selenium (the test extra)")
    if missing:
        message = f"the browser test needs {', '.join(missing)} (apt-get install chromium chromium-driver)"
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(message)
        pytest.skip(message)


@pytest.fixture
def browser(tmp_path):
    _need_chromium()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
                 "--window-size=1000,700", f"--user-data-dir={tmp_path / 'chromium-profile'}"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


def test_the_page_shows_the_simulated_devices_moving(start_gateway, browser, gateway_env, tmp_path):
    from selenium.webdriver.common.by import By

    gw = start_gateway()
    simulator = subprocess.Popen([sys.executable, str(ROOT / "processor.py"), "simulate", "--devices", str(DEVICES),
                                  "--rate", str(DEVICES * 4), "--duration", "60", "--seed", "7"],
                                 env=gateway_env, cwd=str(ROOT), stdout=subprocess.DEVNULL,
                                 stderr=subprocess.DEVNULL)
    try:
        browser.get(f"{gw.http}/#access_token={token()}")
        text = lambda element_id: browser.find_element(By.ID, element_id).text  # noqa: E731
        wait_until(lambda: text("count") == str(DEVICES) and text("state") == "connected", timeout=30,
                   message=f"the status line to show {DEVICES} devices, connected")

        def position_of(device: str) -> list[str]:
            # Read in one script: the list is rebuilt every second, so an element handle goes stale.
            return browser.execute_script(
                "const li = [...document.querySelectorAll('#list li')].find(e => e.dataset.device === arguments[0]);"
                "return li ? [li.dataset.lat, li.dataset.lon] : null;", device)

        first = browser.execute_script("return document.querySelector('#list li').dataset.device")
        before = position_of(first)
        wait_until(lambda: position_of(first) != before, timeout=20, message=f"{first} to move on the page")
        assert browser.execute_script("return document.querySelectorAll('#list li').length") == DEVICES
        assert "s ago" in text("age")
        time.sleep(1.0)  # a few more frames of trails for the picture
        shot = tmp_path / "live-map.png"
        assert browser.save_screenshot(str(shot)) and shot.stat().st_size > 5000
        # The page's own script ran without errors (a CSP violation or an exception would be logged here).
        severe = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
        assert severe == [], severe
        print(f"screenshot: {shot}")
    finally:
        simulator.terminate()
        simulator.wait(10)
    assert gw.metric("gateway_clients") == 1
