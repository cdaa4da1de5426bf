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


def test_pages_in_a_real_browser(server, page):
    ARTIFACTS.mkdir(exist_ok=True)
    page.goto(server)
    page.get_by_text("Patients").first.wait_for(timeout=60_000)
    page.screenshot(path=str(ARTIFACTS / "cohort.png"))
    assert page.locator("[data-testid='stException']").count() == 0

    page.goto(f"{server}/slide")
    page.locator(".js-plotly-plot").first.wait_for(timeout=60_000)
    page.wait_for_timeout(1000)
    page.screenshot(path=str(ARTIFACTS / "slide.png"))
    assert page.locator("[data-testid='stException']").count() == 0

    page.goto(f"{server}/survival")
    page.get_by_text("Log-rank p").first.wait_for(timeout=60_000)
    page.locator(".js-plotly-plot").first.wait_for(timeout=60_000)
    page.wait_for_timeout(1000)
    page.screenshot(path=str(ARTIFACTS / "survival.png"))
    assert page.locator("[data-testid='stException']").count() == 0

    page.goto(f"{server}/importer")
    page.get_by_text("Link report").first.wait_for(timeout=60_000)
    page.get_by_text("Patients without slides").first.wait_for(timeout=60_000)
    page.screenshot(path=str(ARTIFACTS / "import.png"), full_page=True)
    assert page.locator("[data-testid='stException']").count() == 0

    page.goto(f"{server}/slide")
    page.get_by_text("Tissue mask and tile grid").first.click(timeout=60_000)
    page.locator("[data-testid='stImage']").first.wait_for(timeout=60_000)
    page.screenshot(path=str(ARTIFACTS / "slide_mask.png"))
    assert page.locator("[data-testid='stException']").count() == 0

    page.goto(f"{server}/crossmodal")
    page.locator("[data-testid='stImage']").first.wait_for(timeout=60_000)
    page.screenshot(path=str(ARTIFACTS / "crossmodal.png"))
    assert page.locator("[data-testid='stException']").count() == 0
