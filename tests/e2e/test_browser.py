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

from tests.cells_world import cells_store  # noqa: F401  (fixture)

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARTIFACTS = ROOT / "tests" / "artifacts"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(demo_env):
    settings, _ = demo_env
    yield from serve({"TESSERA_DEMO_DIR": str(settings.demo_dir)})


def serve(extra_env: dict):
    """``streamlit run app.py`` with ``extra_env``; yields its URL, stops it afterwards."""
    if not Path(CHROMIUM).exists():
        pytest.skip("chromium not installed (apt-get install chromium chromium-driver)")
    port = free_port()
    env = {**os.environ, **extra_env}
    proc = subprocess.Popen([sys.executable, "-m", "streamlit", "run", "app.py", "--server.address", "127.0.0.1",
                             "--server.port", str(port), "--server.headless", "true",
                             "--browser.gatherUsageStats", "false", "--server.fileWatcherType", "none"], cwd=ROOT, env=env,
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
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:   # a loaded machine: do not fail the tests over a slow shutdown
        proc.kill()
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
    assert_clean(page, shot)


def assert_clean(page, where: str) -> None:
    """No traceback, and no error that the pages' guard caught as unexpected."""
    assert page.locator("[data-testid='stException']").count() == 0, where
    alerts = " | ".join(page.locator("[data-testid='stAlert']").all_inner_texts())
    assert "Something went wrong" not in alerts, f"{where}: {alerts}"


def test_pages_in_a_real_browser(server, page):
    ARTIFACTS.mkdir(exist_ok=True)
    visit(page, server, "cohort.png", texts=["Patients"])
    visit(page, f"{server}/slide", "slide.png", selectors=["iframe[src*='tessera_viewer']"])
    visit(page, f"{server}/survival", "survival.png", texts=["Log-rank p", "Number at risk"],
          selectors=[".js-plotly-plot"])
    # the KM view with its risk table and censor ticks, as the user sees it once scrolled to it
    page.locator(".js-plotly-plot:visible").first.screenshot(path=str(ARTIFACTS / "survival_km.png"))
    visit(page, f"{server}/survival", "survival_screen.png", click="Cox screen", texts=["BH q < 0.05"],
          selectors=[".js-plotly-plot:visible"])
    page.locator(".js-plotly-plot:visible").first.screenshot(path=str(ARTIFACTS / "survival_volcano.png"))
    visit(page, f"{server}/associations", "associations.png", texts=["Patients"],
          selectors=[".js-plotly-plot:visible"])
    visit(page, f"{server}/importer", "import.png", texts=["Link report", "Patients without slides"])
    visit(page, f"{server}/slide", "slide_mask.png", click="Tissue mask and tile grid",
          selectors=["[data-testid='stImage']"])
    visit(page, f"{server}/crossmodal", "crossmodal.png", selectors=["[data-testid='stImage']"])


def test_uploaded_patch_in_a_real_browser(server, page, demo_env, tmp_path):
    """Image → gene from an uploaded file: the patch's profile and its look-alikes render; a file
    that is not an image gives a clear message, not a traceback."""
    from PIL import Image

    from core.analysis.crossmodal import tile_image
    from core.store.db import Store

    settings, _ = demo_env
    with Store(settings.store_path, read_only=True) as store:
        run = store.con.execute("SELECT slide_path, tile_size, run_key FROM runs LIMIT 1").df().iloc[0]
        xy = store.con.execute("SELECT x, y FROM tiles t JOIN runs r USING (run_id) WHERE r.run_key = ? LIMIT 1",
                               [run["run_key"]]).fetchall()[0]
    patch = tmp_path / "patch.png"
    Image.fromarray(tile_image(run["slide_path"], xy[0], xy[1], int(run["tile_size"]), 256)).save(patch)
    bad = tmp_path / "notes.png"
    bad.write_text("this is not an image")

    page.goto(f"{server}/crossmodal")
    page.get_by_text("Tile → genes").first.click(timeout=60_000)
    page.get_by_text("An uploaded image patch").first.click(timeout=60_000)
    page.locator("input[type='file']").first.set_input_files(str(patch))
    page.get_by_text("Similar tiles across the cohort").first.wait_for(timeout=120_000)
    page.get_by_text("patch.png:").first.wait_for(timeout=60_000)
    page.wait_for_timeout(1500)
    page.screenshot(path=str(ARTIFACTS / "crossmodal_patch.png"), full_page=True)
    assert_clean(page, "patch upload")
    assert page.locator("[data-testid='stImage']").count() >= 1 + 12

    page.locator("input[type='file']").first.set_input_files(str(bad))
    page.get_by_text("notes.png is not a readable").first.wait_for(timeout=60_000)
    assert_clean(page, "non-image upload")



def viewer_frame(page, timeout_s: float = 120.0):
    """The viewer component's frame once OpenSeadragon has drawn the slide and its overlay."""
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        for f in page.frames:
            if "tessera_viewer" in f.url:
                try:
                    if f.evaluate("!!(window.tessera && window.tessera.panels.length && window.tessera.overlayLoads)"):
                        f.evaluate("window.tessera.whenLoaded()")
                        return f
                except Exception:   # still loading
                    pass
        page.wait_for_timeout(100)
    pytest.fail("the slide viewer did not draw")


def test_viewer_zoom_click_export_and_a_copied_link(server, page, tmp_path):
    """The deep-zoom viewer in a real browser: zoom to full resolution (new tiles from the endpoint),
    click a tile (its H&E and profile open), export the slide as .h5ad (scanpy reads it), and a copied
    link reopens the same view."""
    import anndata

    ARTIFACTS.mkdir(exist_ok=True)
    page.goto(f"{server}/slide")
    frame = viewer_frame(page)
    page.screenshot(path=str(ARTIFACTS / "viewer_home.png"), full_page=True)
    viewer = "window.tessera.panels[0].viewer"
    home = frame.evaluate(f"{viewer}.viewport.getZoom()")
    ms = frame.evaluate("window.tessera.move(6, 0, 0)")
    # zoomed in to full resolution (the tiny slide reaches the viewer's cap: 2 screen px per image px)
    zoom, cap = frame.evaluate(f"[{viewer}.viewport.getZoom(), {viewer}.viewport.getMaxZoom()]")
    assert zoom > 2 * home and zoom >= min(6 * home, cap) - 1e-6 and ms < 30_000
    # at full zoom the H&E comes from the pyramid's level 0: its Deep Zoom level is the last one
    levels = frame.evaluate(f"{viewer}.world.getItemAt(0).source.maxLevel")
    drawn = frame.evaluate(f"Math.max(...{viewer}.world.getItemAt(0).lastDrawn.map(t => t.level))")
    assert drawn == levels
    page.locator("iframe[src*='tessera_viewer']").first.screenshot(path=str(ARTIFACTS / "viewer_zoomed.png"))
    frame.evaluate(f"{viewer}.viewport.goHome(true)")
    frame.evaluate("window.tessera.whenLoaded()")

    box = frame.locator(".osd").first.bounding_box()
    frame.locator(".osd").first.click(position={"x": box["width"] / 2, "y": box["height"] / 2})
    page.get_by_text("H&E at full resolution").first.wait_for(timeout=60_000)
    page.get_by_text("Top predicted genes of the tile").first.wait_for(timeout=60_000)
    assert_clean(page, "tile click")
    page.screenshot(path=str(ARTIFACTS / "viewer_tile.png"), full_page=True)

    page.get_by_text("Export (AnnData").first.click()
    button = page.locator("[data-testid='stDownloadButton']").filter(has_text=".h5ad").first
    button.wait_for(timeout=60_000)
    with page.expect_download(timeout=120_000) as download:
        button.click()
    target = tmp_path / download.value.suggested_filename
    download.value.save_as(target)
    adata = anndata.read_h5ad(target)
    n_tiles = int(frame.evaluate("window.tessera.args.panels[0].caption").split(" tiles")[0])
    assert target.suffix == ".h5ad" and adata.n_obs == n_tiles and "spatial" in adata.obsm and adata.uns["spatial"]

    # a link copied from the address bar reopens the same slide and layer
    page.goto(f"{server}/slide")
    viewer_frame(page)
    box = page.locator("[data-testid='stSelectbox']").filter(has_text="Layer").first
    box.click()
    page.keyboard.type("CD8A")
    page.keyboard.press("Enter")
    page.wait_for_function("() => window.location.search.includes('layer=gene%3ACD8A') || "
                           "window.location.search.includes('layer=gene:CD8A')", timeout=60_000)
    link = page.url
    other = page.context.browser.new_page(viewport={"width": 1400, "height": 1000})
    other.goto(link)
    frame = viewer_frame(other)
    assert frame.evaluate("window.tessera.args.panels[0].title").endswith("CD8A")
    slide = frame.evaluate("window.tessera.args.panels[0].title").split(" · ")[0]
    assert slide in link.replace("%2E", ".") or slide.split(".")[0] in link
    other.screenshot(path=str(ARTIFACTS / "viewer_link.png"), full_page=True)
    assert_clean(other, "copied link")
    other.close()


@pytest.fixture(scope="module")
def cells_server(demo_env, cells_store, tmp_path_factory):  # noqa: F811
    """A second server on a copy of the tiny demo store whose first slides have cells runs."""
    settings, _ = demo_env
    path = tmp_path_factory.mktemp("cells_app") / "store.duckdb"
    shutil.copy(cells_store, path)
    for url in serve({"TESSERA_DEMO_DIR": str(settings.demo_dir), "TESSERA_STORE": str(path)}):
        yield url, path


def test_cell_layer_in_a_real_browser(cells_server, page):
    """The cell layer in a real browser: every nucleus of a cells run drawn over the H&E by type,
    readable at full zoom, and a click gives the tile's cell-type composition beside the slide's."""
    import urllib.parse

    from core.store.db import Store

    ARTIFACTS.mkdir(exist_ok=True)
    with Store(cells_server[1], read_only=True) as store:
        key = store.model_coverage("demo")["model_key"].iloc[-1]
        runs = store.cohort_runs("demo", key)
        slide = next(n for n, k in zip(runs["slide_name"], runs["run_key"]) if isinstance(k, str) and store.has_cells(k))
    query = urllib.parse.urlencode({"slide": slide, "layer": "cells:type"})
    page.goto(f"{cells_server[0]}/slide?{query}")
    frame = viewer_frame(page)
    assert frame.evaluate("window.tessera.args.panels[0].title").endswith("Cells · by type")
    page.screenshot(path=str(ARTIFACTS / "cells_home.png"), full_page=True)
    frame.evaluate("window.tessera.move(8, 0, 0)")
    page.locator("iframe[src*='tessera_viewer']").first.screenshot(path=str(ARTIFACTS / "cells_zoomed.png"))
    frame.evaluate("window.tessera.panels[0].viewer.viewport.goHome(true)")
    frame.evaluate("window.tessera.whenLoaded()")
    box = frame.locator(".osd").first.bounding_box()
    frame.locator(".osd").first.click(position={"x": box["width"] / 2, "y": box["height"] / 2})
    page.get_by_text("Cell-type composition · slide and tile").first.wait_for(timeout=60_000)
    assert_clean(page, "cell layer click")
    page.screenshot(path=str(ARTIFACTS / "cells_tile.png"), full_page=True)
