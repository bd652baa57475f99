"""GET / on `nn2run serve`: the playground page, in raw HTTP and in headless Chromium
(selenium with chromium-driver; skipped where they are not installed)."""

from __future__ import annotations

import json
import re
import shutil
import time

import pytest

from support.models import build_model
from test_serve import Served


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    d = tmp_path_factory.mktemp("play")
    path, _, _ = build_model(d / "m.nnb", "lstm", 16, 2, 5)
    s = Served(path, "--max-tokens-limit", 10**7, tmp_path=d)
    yield s
    assert s.stop() == 0


def test_the_page_is_one_document_with_no_external_assets(served):
    status, headers, body = served.request("GET", "/")
    page = body.decode()
    assert status == 200 and headers["Content-Type"].startswith("text/html")
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", page)      # nothing fetched from elsewhere
    assert "<script src" not in page and "<link" not in page
    for control in ('id="prompt"', 'id="max_tokens"', 'id="temperature"', 'id="top_k"', 'id="top_p"',
                    'id="seed"', 'id="go"', 'id="stop"'):
        assert control in page
    # the model's equations and parameters, as `nn2run --info` prints them
    assert "hₜ = oₜ ⊙" in page and "W_f@0" in page and "weights" in page


def _browser():
    webdriver = pytest.importorskip("selenium.webdriver")
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver_path = shutil.which("chromedriver")
    if not chromium or not driver_path:
        pytest.skip("chromium and chromium-driver are not installed")
    from selenium.webdriver.chrome.service import Service
    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1200,900"):
        opts.add_argument(arg)
    return webdriver.Chrome(service=Service(driver_path), options=opts)


@pytest.fixture(scope="module")
def browser():
    driver = _browser()
    yield driver
    driver.quit()


def _wait(predicate, timeout=20.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError("timed out")


def _fill(browser, **fields):
    for name, value in fields.items():
        box = browser.find_element("id", name)
        box.clear()
        box.send_keys(str(value))


def test_a_prompt_streams_text_into_the_page(browser, served, tmp_path):
    browser.get(f"http://127.0.0.1:{served.port}/")
    _fill(browser, prompt="abc", max_tokens=120, temperature=0.9, top_k=4, seed=21)
    browser.find_element("id", "go").click()
    status = _wait(lambda: "finished" in browser.find_element("id", "status").text and
                   browser.find_element("id", "status").text)
    out = browser.find_element("id", "out").text
    expected = served.complete(prompt="abc", max_tokens=120, temperature=0.9, top_k=4, seed=21)
    assert out == "abc" + expected["choices"][0]["text"]
    assert "120 characters" in status
    browser.save_screenshot(str(tmp_path / "playground.png"))


def test_the_stop_button_cancels_the_request(browser, served):
    browser.get(f"http://127.0.0.1:{served.port}/")
    _fill(browser, prompt="a", max_tokens=5_000_000)
    browser.find_element("id", "go").click()
    _wait(lambda: len(browser.find_element("id", "out").text) > 50)
    browser.find_element("id", "stop").click()
    _wait(lambda: "stopped" in browser.find_element("id", "status").text)
    _wait(lambda: served.metric("nn2_rows_running") == 0, timeout=10)       # the row left the batch
    assert browser.find_element("id", "go").is_enabled()


def test_a_bad_prompt_shows_the_server_message(browser, served):
    browser.get(f"http://127.0.0.1:{served.port}/")
    _fill(browser, prompt="aQ", max_tokens=5)
    browser.find_element("id", "go").click()
    # the status reads "generating…" until the server's answer arrives; wait for the error line
    text = _wait(lambda: "error" in browser.find_element("id", "status").get_attribute("class") and
                 browser.find_element("id", "status").text)
    assert "'Q'" in text and "vocabulary" in text
    assert json.loads(served.request("POST", "/tokenize", {"prompt": "a"})[2])["count"] == 1
