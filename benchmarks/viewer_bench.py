"""The Slide page's viewer through a real browser: first render, view updates, layer and opacity changes.

``python -m benchmarks.viewer_bench [--repeats 20] [--json FILE]``

Builds (or reuses) the demo store, copies it to a temporary folder and imports + predicts the real
Aperio SVS of ``../shared/data/wsi`` into it as cohort ``svs`` (the CLI's import → predict, demo
model), then starts ``streamlit run app.py`` on that store (loopback, headless) and drives headless
Chromium (Playwright). For the demo slide and the real SVS:

- **first render**: navigate to ``/slide?cohort=…&slide=…&layer=gene:ERBB2`` (a fresh session) →
  the viewer has drawn every H&E tile of the initial view and the heatmap overlay
  (OpenSeadragon's ``getFullyLoaded`` on every image). The first navigation of a fresh server is
  reported separately (cold: imports and caches); the others are the p50 (warm);
- **view update**: zoom 2× in, pan, zoom out … without animation (``tessera.move``) → fully loaded
  again: the time for new tiles from the endpoint, decoded and drawn;
- **layer change**: pick another gene in the Layer box → the new overlay is drawn (the script's
  rerun, the overlay PNG, the component's update);
- **opacity change**: one arrow-key step of the opacity slider → the overlay has the new opacity.

Targets (issue 14): view update p50 ≤ 150 ms, first render ≤ 1 s, layer/opacity change ≤ 500 ms.
Misses are reported, not fatal. Exits 0 after measuring; 1 when the server does not start.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.parse
from pathlib import Path

from benchmarks.load_bench import CHROMIUM, CHROMIUM_ARGS, ROOT, ensure_demo, free_port, stop_server, wait_healthy

SHARED = ROOT.parent / "shared" / "data"
SVS = SHARED / "wsi" / "CMU-1-Small-Region.svs"
TARGETS = {"view_update_p50_ms": 150.0, "first_render_ms": 1000.0, "layer_change_ms": 500.0, "opacity_change_ms": 500.0}


def _cli(*args: str, env: dict) -> None:
    subprocess.run([sys.executable, "-m", "core.cli", *args], cwd=ROOT, env=env, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def prepare_store(tmp: Path) -> tuple[Path, dict]:
    """A copy of the demo store, plus cohort ``svs`` (the real SVS, imported and predicted) when present."""
    store = ensure_demo()
    copy = tmp / "tessera.duckdb"
    shutil.copy(store, copy)
    env = {**os.environ, "TESSERA_STORE": str(copy)}
    cohorts = {"demo": None}
    if SVS.exists():
        # the importer links slides to patients by TCGA barcode: the copy gets one, and a two-patient table
        slides = tmp / "svs"
        slides.mkdir()
        shutil.copy(SVS, slides / "TCGA-ZZ-0001-01Z-00-DX1.svs")
        clinical = tmp / "svs_clinical.csv"
        clinical.write_text("patient,OS.time,OS\nTCGA-ZZ-0001,100,1\nTCGA-ZZ-0002,50,0\n")
        _cli("import", "--slides", str(slides), "--clinical", str(clinical), "--format", "generic",
             "--patient-col", "patient", "--time-col", "OS.time", "--event-col", "OS", "--name", "svs",
             "--store", str(copy), env=env)
        _cli("predict", "--cohort", "svs", "--store", str(copy), "--workers", "0", env=env)
        cohorts["svs"] = SVS.name
    return copy, cohorts


def first_slide(store: Path, cohort: str) -> str:
    from core.store.db import Store

    with Store(store, read_only=True) as s:
        model = s.model_coverage(cohort)["model_key"].iloc[-1]
        runs = s.cohort_runs(cohort, model).dropna(subset=["run_key"])
        return str(runs["slide_name"].iloc[0])


def _viewer_frame(page, timeout_s: float = 90.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for f in page.frames:
            if "tessera_viewer" in f.url:
                try:
                    if f.evaluate("!!(window.tessera && window.tessera.panels.length && window.tessera.overlayLoads)"):
                        return f
                except Exception:   # the frame is still loading
                    pass
        page.wait_for_timeout(10)
    shot = Path(tempfile.gettempdir()) / "viewer_bench_timeout.png"
    page.screenshot(path=str(shot), full_page=True)
    raise TimeoutError(f"the viewer did not appear within {timeout_s:.0f} s (screenshot: {shot})")


def first_render(page, url: str) -> tuple[float, object]:
    t0 = time.perf_counter()
    page.goto(url)
    frame = _viewer_frame(page)
    frame.evaluate("window.tessera.whenLoaded()")
    return (time.perf_counter() - t0) * 1000, frame


def breakdown(page) -> dict:
    """Where a first render's time goes: navigation timing of the page and of the viewer's frame."""
    nav = page.evaluate("(() => { const n = performance.getEntriesByType('navigation')[0]; "
                        "return {dom: n.domContentLoadedEventEnd, load: n.loadEventEnd}; })()")
    frame = next(f for f in page.frames if "tessera_viewer" in f.url)
    inner = frame.evaluate("(() => ({origin: performance.timeOrigin, built: window.tessera.builtAt || null}))()")
    outer = page.evaluate("performance.timeOrigin")
    return {"page_dom_ms": nav["dom"], "page_load_ms": nav["load"], "viewer_frame_start_ms": inner["origin"] - outer,
            "viewer_built_ms": (inner["origin"] - outer + inner["built"]) if inner["built"] else None}


def page_switch(page, frame_url_part: str = "tessera_viewer") -> float:
    """From the Cohort page, a click on "Slide" in the navigation → the viewer fully loaded."""
    page.get_by_role("link", name="Cohort").first.click()
    page.get_by_role("heading", name="Cohort").first.wait_for()
    page.wait_for_timeout(300)
    t0 = time.perf_counter()
    page.get_by_role("link", name="Slide").first.click()
    frame = _viewer_frame(page)
    frame.evaluate("window.tessera.whenLoaded()")
    return (time.perf_counter() - t0) * 1000


def view_updates(frame, n: int) -> list[float]:
    moves = [(2, 0, 0), (1, 0.15, 0), (2, 0, 0.1), (1, -0.1, 0), (0.5, 0, 0), (2, 0.05, 0.05), (0.25, 0, 0)]
    return [float(frame.evaluate(f"window.tessera.move({f}, {dx}, {dy})")) for f, dx, dy in
            (moves[i % len(moves)] for i in range(n))]


def _wait_js(frame, expr: str, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if frame.evaluate(expr):
            return
        time.sleep(0.005)
    raise TimeoutError(expr)


def layer_change(page, frame, gene: str) -> float:
    before = frame.evaluate("window.tessera.overlayLoads")
    box = page.locator("[data-testid='stSelectbox']").filter(has_text="Layer").first
    box.click()
    page.keyboard.type(gene)
    t0 = time.perf_counter()
    page.keyboard.press("Enter")
    _wait_js(frame, f"window.tessera.overlayLoads > {before}")
    frame.evaluate("window.tessera.whenLoaded()")
    return (time.perf_counter() - t0) * 1000


def opacity_change(page, frame) -> float:
    before = frame.evaluate("window.tessera.args.opacity")
    thumb = page.locator("[data-testid='stSlider']").filter(has_text="Opacity").locator("input[type='range']")
    thumb.focus()
    t0 = time.perf_counter()
    thumb.press("ArrowLeft" if before > 0.5 else "ArrowRight")
    _wait_js(frame, f"window.tessera.args.opacity !== {before} && "
                    "window.tessera.panels[0].overlay.getOpacity() === window.tessera.args.opacity")
    return (time.perf_counter() - t0) * 1000


def p50(values: list[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


def measure(base: str, store: Path, cohorts: dict, repeats: int) -> dict:
    from playwright.sync_api import sync_playwright

    out = {}
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        # the baseline: any page's first element after a fresh load (the Cohort page has no viewer)
        base_ms = []
        for _ in range(4):
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            t0 = time.perf_counter()
            page.goto(f"{base}/")
            page.get_by_text("Patients").first.wait_for(timeout=90_000)
            base_ms.append((time.perf_counter() - t0) * 1000)
            page.close()
        out["_baseline"] = {"cohort_page_first_element_ms": p50(base_ms[1:])}
        for i, cohort in enumerate(cohorts):
            slide = first_slide(store, cohort)
            url = f"{base}/slide?" + urllib.parse.urlencode({"cohort": cohort, "slide": slide, "layer": "gene:ERBB2"})
            renders, cold = [], None
            for k in range(6):
                page = browser.new_page(viewport={"width": 1400, "height": 1000})
                ms, frame = first_render(page, url)
                if k == 1:
                    parts = breakdown(page)
                if i == 0 and k == 0:
                    cold = ms
                else:
                    renders.append(ms)
                if k < 5:
                    page.close()
            updates = view_updates(frame, repeats)
            frame.evaluate("window.tessera.panels[0].viewer.viewport.goHome(true)")
            layers = [layer_change(page, frame, g) for g in ("CD8A", "ESR1", "MKI67", "ERBB2", "CD8A")]
            opac = [opacity_change(page, frame) for _ in range(5)]
            switches = [page_switch(page) for _ in range(4)]
            page.close()
            out[cohort] = {"slide": slide, "first_render_cold_ms": cold, "first_render_ms": p50(renders),
                           "view_update_p50_ms": p50(updates),
                           "view_update_p95_ms": float(sorted(updates)[int(0.95 * (len(updates) - 1))]),
                           "layer_change_ms": p50(layers), "opacity_change_ms": p50(opac),
                           "n_updates": len(updates), "page_switch_ms": p50(switches), "first_render_parts": parts}
        browser.close()
    return out


def print_table(fig: dict) -> None:
    fig = dict(fig)
    base = fig.pop("_baseline", None)
    print("\nSlide viewer (real browser, loopback; p50 unless noted)")
    if base:
        print(f"baseline: a fresh load of the Cohort page (no viewer) to its first element "
              f"{base['cohort_page_first_element_ms']:.0f} ms (Streamlit's own load: bundle, session, first run)")
    print(f"{'slide':<28} {'first render':>13} {'view update':>12} {'p95':>7} {'layer':>7} {'opacity':>8}")
    for cohort, r in fig.items():
        name = f"{cohort}: {r['slide'][:18]}"
        print(f"{name:<28} {r['first_render_ms']:>10.0f} ms {r['view_update_p50_ms']:>9.0f} ms "
              f"{r['view_update_p95_ms']:>4.0f} ms {r['layer_change_ms']:>4.0f} ms {r['opacity_change_ms']:>5.0f} ms")
        print(f"{'':<28} in-app switch Cohort → Slide {r['page_switch_ms']:.0f} ms; first render: "
              + ", ".join(f"{k} {v:.0f}" for k, v in r["first_render_parts"].items() if v is not None))
        if r.get("first_render_cold_ms"):
            print(f"{'':<28} cold first render (fresh server) {r['first_render_cold_ms']:.0f} ms")
    for key, target in TARGETS.items():
        worst = max(r[key] for r in fig.values())
        print(f"target {key} ≤ {target:.0f} ms: worst {worst:.0f} ms {'met' if worst <= target else 'MISSED'}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=21, help="view updates per slide")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    if not Path(CHROMIUM).exists():
        print(f"chromium not found at {CHROMIUM} (make browser): viewer benchmark skipped")
        return 0
    with tempfile.TemporaryDirectory(prefix="tessera-viewer-bench-") as tmp:
        store, cohorts = prepare_store(Path(tmp))
        port = free_port()
        log_path = Path(tmp) / "server.log"
        env = {**os.environ, "TESSERA_STORE": str(store), "TESSERA_TILE_PORT": str(free_port())}
        with open(log_path, "wb") as log:
            proc = subprocess.Popen([sys.executable, "-m", "streamlit", "run", "app.py", "--server.address", "127.0.0.1",
                                     "--server.port", str(port), "--server.headless", "true",
                                     "--browser.gatherUsageStats", "false", "--server.fileWatcherType", "none"],
                                    cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        base = f"http://127.0.0.1:{port}"
        try:
            if not wait_healthy(proc, base):
                print(log_path.read_text()[-3000:], file=sys.stderr)
                return 1
            fig = measure(base, store, cohorts, args.repeats)
        finally:
            stop_server(proc)
    print_table(fig)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(fig, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
