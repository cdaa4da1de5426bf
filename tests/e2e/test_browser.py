"""A real browser against a real server: `streamlit run app.py` on the tiny demo cohort.

Needs Debian's chromium (``make test`` installs it when run as root); skipped with a reason
otherwise.
"""
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARTIFACTS = ROOT / "tests" / "artifacts"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(demo_env):
    if not Path(CHROMIUM).exists():
        pytest.skip("chromium not installed (apt-get install chromium chromium-driver)")
    settings, _ = demo_env
    port = free_port()
    env = {**os.environ, "TESSERA_DEMO_DIR": str(settings.demo_dir)}
    proc = subprocess.Popen([sys.executable, "-m", "streamlit", "run", "app.py", "--server.address", "127.0.0.1",
                             "--server.port", str(port), "--server.headless", "true",
                             "--browser.gatherUsageStats", "false"], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            if urllib.request.urlopen(f"{url}/_stcore/health", timeout=2).read() == b"ok":
                break
        except OSError:
            time.sleep(0.5)
    else:
        proc.kill()
        pytest.fail("streamlit did not come up: " + proc.stdout.read().decode()[-2000:])
    yield url
    proc.terminate()
    proc.wait(timeout=20)


@pytest.fixture(scope="module")
def page(server):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"])
        pg = browser.new_page(viewport={"width": 1400, "height": 1000})
        yield pg
        browser.close()


def visit(page, url: str, shot: str, *, texts=(), selectors=(), click: str | None = None) -> None:
    """Open a page, wait for what proves it rendered, screenshot it, and check for no exception."""
    page.goto(url)
    if click:
        page.get_by_text(click).first.click(timeout=60_000)
    for text in texts:
        page.get_by_text(text).first.wait_for(timeout=60_000)
    for selector in selectors:
        page.locator(selector).first.wait_for(timeout=60_000)
    page.wait_for_timeout(1000)  # let plotly finish drawing before the screenshot
    page.screenshot(path=str(ARTIFACTS / shot), full_page=True)
    assert page.locator("[data-testid='stException']").count() == 0, shot


def test_pages_in_a_real_browser(server, page):
    ARTIFACTS.mkdir(exist_ok=True)
    visit(page, server, "cohort.png", texts=["Patients"])
    visit(page, f"{server}/slide", "slide.png", selectors=[".js-plotly-plot"])
    visit(page, f"{server}/survival", "survival.png", texts=["Log-rank p"], selectors=[".js-plotly-plot"])
    visit(page, f"{server}/importer", "import.png", texts=["Link report", "Patients without slides"])
    visit(page, f"{server}/slide", "slide_mask.png", click="Tissue mask and tile grid",
          selectors=["[data-testid='stImage']"])
    visit(page, f"{server}/crossmodal", "crossmodal.png", selectors=["[data-testid='stImage']"])
