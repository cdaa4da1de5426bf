"""P6: the dashboard under concurrent use, on loopback.

``python -m benchmarks.load_bench [--sessions 10] [--seconds 60] [--timeout 30] [--no-warmup] [--json FILE]``

Starts ``streamlit run app.py`` (loopback, a free port, headless, no file watcher) against the demo
store with the default settings (the demo is built first when it is absent), waits for
``/_stcore/health``, then drives ``--sessions`` concurrent browser sessions (one headless Chromium,
one context and page each, async Playwright) for ``--seconds``. Each session loops over the views
``/slide``, ``/survival``, ``/crossmodal``: it navigates (a fresh page load, so a fresh Streamlit
session and script run), waits until the view has rendered (its plot or image visible) and the
script has finished (no running status widget), and records the time from navigation to that point.
An error is a traceback on the page (``stException``), an alert saying "Something went wrong" (what
the pages' guard shows for an unexpected error), or a view that did not render within ``--timeout``.
Before the timed part one session loads each view once to fill the server's caches (not counted;
``--no-warmup`` skips it). The server's RSS (its process and all descendants, VmRSS from /proc) is
sampled every second, with the CPU the server and the browser use (on a small machine the
browser, which renders every session's plots, is the first to saturate: read the CPU line before
blaming the server). A view still loading when the time is up finishes (within ``--timeout``).

Targets: no errors, p95 ≤ 2 s per view, peak server RSS ≤ 2 GB. Missing one is reported, not fatal:
exits 0 after a measurement, 1 when the server does not start, 130 when interrupted (Ctrl-C stops
the browser and the server and prints what was measured so far).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]
VIEWS = ("/slide", "/survival", "/crossmodal")
# what proves each view rendered: its first plot / image, visible (hidden tabs do not count)
READY = {
    "/slide": "iframe[src*='tessera_viewer']:visible",
    "/survival": ".js-plotly-plot:visible",
    "/crossmodal": "[data-testid='stImage']:visible",
}
EXCEPTION = "[data-testid='stException']"
ALERT = "[data-testid='stAlert']"
STATUS = "[data-testid='stStatusWidget']"
GUARD_TEXT = "Something went wrong"
TARGET_P95_S = 2.0
TARGET_RSS_MB = 2048.0
TARGET_ERRORS = 0


# ----------------------------------------------------------------------------------------- server

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ensure_demo() -> Path:
    """The demo store with the default settings; built (idempotent, cache hits) only when absent."""
    from core.config import load_settings

    settings = load_settings()
    if not (settings.store_path.exists() and (settings.demo_dir / "world.json").exists()):
        from core.demo import build_demo

        print(f"building the demo in {settings.demo_dir} …", flush=True)
        build_demo(settings)
    return settings.store_path


def start_server(port: int, log_path: Path) -> subprocess.Popen:
    log = open(log_path, "wb")
    cmd = [sys.executable, "-m", "streamlit", "run", "app.py", "--server.address", "127.0.0.1",
           "--server.port", str(port), "--server.headless", "true",
           "--browser.gatherUsageStats", "false", "--server.fileWatcherType", "none"]
    # its own session: a Ctrl-C in the terminal reaches us, and we stop the server in order
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    log.close()
    return proc


def wait_healthy(proc: subprocess.Popen, url: str, timeout_s: float = 90.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        try:
            with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as r:
                if r.read().strip() == b"ok":
                    return True
        except OSError:
            pass
        time.sleep(0.5)
    return False


def stop_server(proc: subprocess.Popen) -> None:
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)   # the server and anything it started
    except ProcessLookupError:
        return
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=10)


# ------------------------------------------------------------------------------------------- RSS

def _children_map() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                stat = fh.read()
        except OSError:
            continue
        # "pid (comm) state ppid …": comm may hold spaces and parentheses
        ppid = int(stat[stat.rindex(")") + 2:].split()[1])
        kids.setdefault(ppid, []).append(int(entry))
    return kids


def _vmrss_kb(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def _tree(pid: int) -> list[int]:
    kids = _children_map()
    out, stack = [], [pid]
    while stack:
        p = stack.pop()
        if p not in out:
            out.append(p)
            stack.extend(kids.get(p, ()))
    return out


def tree_cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process and its live descendants (and their reaped children)."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for p in _tree(pid):
        try:
            with open(f"/proc/{p}/stat") as fh:
                f = fh.read()
        except OSError:
            continue
        fields = f[f.rindex(")") + 2:].split()
        total += sum(int(x) for x in fields[11:15])  # utime stime cutime cstime
    return total / tick


def tree_rss_mb(pid: int) -> float:
    """VmRSS of a process and all its descendants, in MB (MiB)."""
    try:
        import psutil  # noqa: F401  (optional)
    except ImportError:
        psutil = None
    if psutil is not None:
        try:
            root = psutil.Process(pid)
            procs = [root, *root.children(recursive=True)]
            total = 0
            for p in procs:
                try:
                    total += p.memory_info().rss
                except psutil.Error:
                    pass
            return total / 2**20
        except psutil.Error:
            return 0.0
    return sum(_vmrss_kb(p) for p in _tree(pid)) / 1024


class RssSampler(threading.Thread):
    def __init__(self, pid: int, every_s: float = 1.0):
        super().__init__(daemon=True)
        self.pid, self.every_s = pid, every_s
        self.samples: list[float] = []
        self.cpu: list[tuple[float, float]] = []   # (monotonic time, server CPU seconds)
        self.client_cpu: list[tuple[float, float]] = []   # the same for this process and the browser
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            self.samples.append(tree_rss_mb(self.pid))
            now, server = time.monotonic(), tree_cpu_s(self.pid)
            self.cpu.append((now, server))
            self.client_cpu.append((now, tree_cpu_s(os.getpid()) - server))
            self._halt.wait(self.every_s)

    def stop(self) -> None:
        self._halt.set()
        self.join(timeout=5)

    @property
    def peak_mb(self) -> float:
        return max(self.samples, default=0.0)


# -------------------------------------------------------------------------------------- sessions

async def load_view(page, base: str, view: str, timeout_s: float) -> tuple[float, float, str | None]:
    """Navigate to a view: seconds until it rendered and its script finished, seconds until its plot
    or image first showed, and the error if any."""
    from playwright.async_api import Error as PlaywrightError
    from playwright.async_api import TimeoutError as PlaywrightTimeout

    timeout_ms = timeout_s * 1000
    t0 = time.perf_counter()
    deadline = t0 + timeout_s
    try:
        await page.goto(base + view, wait_until="domcontentloaded", timeout=timeout_ms)
        ready = page.locator(READY[view]).or_(page.locator(EXCEPTION)).or_(
            page.locator(ALERT).filter(has_text=GUARD_TEXT))
        await ready.first.wait_for(state="visible", timeout=max(1.0, deadline - time.perf_counter()) * 1000)
        shown = time.perf_counter() - t0
        # the script is still running while the status widget shows; wait for it to go
        await page.wait_for_function(f"() => !document.querySelector(\"{STATUS}\")",
                                     timeout=max(1.0, deadline - time.perf_counter()) * 1000, polling=100)
        elapsed = time.perf_counter() - t0
    except PlaywrightTimeout:
        return time.perf_counter() - t0, math.nan, f"timeout after {timeout_s:g} s"
    except PlaywrightError as exc:
        return time.perf_counter() - t0, math.nan, f"browser error: {str(exc).splitlines()[0]}"
    if await page.locator(EXCEPTION).count():
        text = " ".join(await page.locator(EXCEPTION).all_inner_texts())
        return elapsed, shown, "exception: " + " ".join(text.split())[:200]
    alerts = " | ".join(await page.locator(ALERT).all_inner_texts())
    if GUARD_TEXT in alerts:
        return elapsed, shown, "alert: " + " ".join(alerts.split())[:200]
    return elapsed, shown, None


async def session(browser, base: str, idx: int, end: float, timeout_s: float, records: list) -> None:
    context = await browser.new_context(viewport={"width": 1400, "height": 1000})
    try:
        page = await context.new_page()
        i = idx  # start the sessions on different views
        while time.monotonic() < end:
            view = VIEWS[i % len(VIEWS)]
            i += 1
            elapsed, shown, error = await load_view(page, base, view, timeout_s)
            records.append({"session": idx, "view": view, "seconds": round(elapsed, 3),
                            "shown_s": round(shown, 3), "error": error})
    finally:
        try:
            await context.close()
        except Exception:  # the browser may already be gone (Ctrl-C)
            pass


async def drive(base: str, sessions: int, seconds: float, timeout_s: float, warmup: bool,
                records: list, warm: list, window: dict) -> bool:
    """Run the load; returns False when interrupted."""
    from playwright.async_api import async_playwright

    loop = asyncio.get_running_loop()
    interrupted = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, interrupted.set)
    try:
        async with async_playwright() as p:
            browser = await p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS,
                                              handle_sigint=False, handle_sigterm=False)
            try:
                async def timed():
                    if warmup:
                        ctx = await browser.new_context(viewport={"width": 1400, "height": 1000})
                        page = await ctx.new_page()
                        for view in VIEWS:
                            elapsed, shown, error = await load_view(page, base, view, max(timeout_s, 120))
                            warm.append({"view": view, "seconds": round(elapsed, 3),
                                         "shown_s": round(shown, 3), "error": error})
                        await ctx.close()
                    window["start"] = time.monotonic()
                    window["load_start"] = os.getloadavg()[0]
                    end = window["start"] + seconds
                    try:
                        await asyncio.gather(*(session(browser, base, i, end, timeout_s, records)
                                               for i in range(sessions)))
                    finally:
                        window["stop"] = time.monotonic()
                        window["load_stop"] = os.getloadavg()[0]

                work = asyncio.ensure_future(timed())
                stop = asyncio.ensure_future(interrupted.wait())
                await asyncio.wait({work, stop}, return_when=asyncio.FIRST_COMPLETED)
                if not work.done():
                    work.cancel()
                    await asyncio.gather(work, return_exceptions=True)
                else:
                    stop.cancel()
                    work.result()
            finally:
                try:
                    await asyncio.wait_for(browser.close(), timeout=20)
                except Exception:
                    pass
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
    return not interrupted.is_set()


# --------------------------------------------------------------------------------------- figures

def percentile(values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    if not values:
        return math.nan
    xs = sorted(values)
    pos = (len(xs) - 1) * q
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def server_cores(cpu: list[tuple[float, float]], window: dict) -> float:
    """Mean CPU cores the server used over the timed part (from the 1-s samples inside it)."""
    inside = [c for c in cpu if window.get("start", math.inf) <= c[0] <= window.get("stop", -math.inf)]
    if len(inside) < 2:
        return math.nan
    (t0, c0), (t1, c1) = inside[0], inside[-1]
    return (c1 - c0) / (t1 - t0)


def summarise(records: list, warm: list, peak_mb: float, rss_samples: int, args, server_log: str,
              completed: bool, cores: float = math.nan, window: dict | None = None,
              client_cores: float = math.nan) -> dict:
    views = {}
    for view in VIEWS:
        recs = [r for r in records if r["view"] == view]
        ok = [r["seconds"] for r in recs if r["error"] is None]
        p95 = percentile(ok, 0.95)
        shown = [r["shown_s"] for r in recs if r["error"] is None]
        views[view] = {"count": len(recs), "errors": sum(r["error"] is not None for r in recs),
                       "p50_s": round(percentile(ok, 0.50), 3), "p95_s": round(p95, 3),
                       "max_s": round(max(ok), 3) if ok else math.nan,
                       "shown_p50_s": round(percentile(shown, 0.5), 3),
                       "meets_p95": bool(ok) and p95 <= TARGET_P95_S}
    all_ok = [r["seconds"] for r in records if r["error"] is None]
    errors = [r for r in records if r["error"] is not None]
    samples: dict[str, int] = {}
    for r in errors:
        key = f"{r['view']}: {r['error']}"
        samples[key] = samples.get(key, 0) + 1
    return {
        "sessions": args.sessions, "seconds": args.seconds, "timeout_s": args.timeout,
        "completed": completed, "loads": len(records),
        "views": views,
        "all": {"count": len(records), "errors": len(errors),
                "p50_s": round(percentile(all_ok, 0.5), 3), "p95_s": round(percentile(all_ok, 0.95), 3),
                "max_s": round(max(all_ok), 3) if all_ok else math.nan},
        "errors": len(errors), "error_kinds": samples,
        "peak_rss_mb": round(peak_mb, 1), "rss_samples": rss_samples,
        "server_cpu_cores": round(cores, 2), "client_cpu_cores": round(client_cores, 2),
        "cpus": os.cpu_count(),
        "loadavg_1m": [round((window or {}).get(k, math.nan), 2) for k in ("load_start", "load_stop")],
        "warmup": warm,
        "server_tracebacks": server_log.count("Traceback (most recent call last)"),
        "targets": {"errors": TARGET_ERRORS, "p95_s": TARGET_P95_S, "rss_mb": TARGET_RSS_MB},
        "meets": {"errors": len(errors) <= TARGET_ERRORS,
                  "p95": all(v["meets_p95"] for v in views.values()),
                  "rss": peak_mb <= TARGET_RSS_MB},
    }


def _ok(flag: bool) -> str:
    return "ok" if flag else "MISSED"


def _s(x: float) -> str:
    return "–" if x != x else f"{x:.2f}"


def print_table(fig: dict) -> None:
    head = (f"Load test: {fig['sessions']} sessions × {fig['seconds']:g} s on loopback, views "
            f"{', '.join(VIEWS)} (demo store; warm-up {'excluded' if fig['warmup'] else 'skipped'})")
    if not fig["completed"]:
        head += "  [INTERRUPTED: partial figures]"
    print(head)
    print(f"{'view':<13}{'loads':>7}{'errors':>8}{'p50 (s)':>10}{'p95 (s)':>10}{'max (s)':>10}"
          f"{'shown p50':>11}   p95 ≤ {TARGET_P95_S:g} s")
    for view, v in fig["views"].items():
        print(f"{view:<13}{v['count']:>7}{v['errors']:>8}{_s(v['p50_s']):>10}{_s(v['p95_s']):>10}"
              f"{_s(v['max_s']):>10}{_s(v['shown_p50_s']):>11}   {_ok(v['meets_p95'])}")
    a = fig["all"]
    print(f"{'all':<13}{a['count']:>7}{a['errors']:>8}{_s(a['p50_s']):>10}{_s(a['p95_s']):>10}{_s(a['max_s']):>10}")
    print(f"errors overall      {fig['errors']:>8}          target {TARGET_ERRORS}            "
          f"{_ok(fig['meets']['errors'])}")
    print(f"peak server RSS     {fig['peak_rss_mb']:>8.0f} MB       target ≤ {TARGET_RSS_MB:.0f} MB    "
          f"{_ok(fig['meets']['rss'])}")
    la = fig["loadavg_1m"]
    print(f"CPU (mean cores over the timed part, of {fig['cpus']}): server {_s(fig['server_cpu_cores'])}, "
          f"browser + driver {_s(fig['client_cpu_cores'])}; "
          f"machine load average {_s(la[0])} → {_s(la[1])} (browser and server share the machine)")
    for kind, n in fig["error_kinds"].items():
        print(f"  {n}× {kind}")
    if fig["server_tracebacks"]:
        print(f"  server log: {fig['server_tracebacks']} traceback(s)")
    if fig["warmup"]:
        print("warm-up (1 session, not counted): "
              + ", ".join(f"{w['view']} {w['seconds']:.2f} s" + (f" [{w['error']}]" if w["error"] else "")
                          for w in fig["warmup"]))


# ------------------------------------------------------------------------------------------ main

def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sessions", type=int, default=10, help="concurrent browser sessions (default 10)")
    ap.add_argument("--seconds", type=float, default=60.0, help="duration of the timed part (default 60)")
    ap.add_argument("--timeout", type=float, default=30.0, help="a view not rendered by then is an error")
    ap.add_argument("--no-warmup", dest="warmup", action="store_false",
                    help="count the first (cold-cache) loads too")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    args = ap.parse_args(argv)
    if args.sessions < 1 or args.seconds <= 0:
        ap.error("--sessions ≥ 1 and --seconds > 0")

    ensure_demo()
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    log_path = Path(tempfile.mkstemp(prefix="tessera-load-", suffix=".log")[1])
    proc = start_server(port, log_path)
    records: list = []
    warm: list = []
    window: dict = {}
    sampler = None
    completed = False
    try:
        try:
            healthy = wait_healthy(proc, base)
        except KeyboardInterrupt:
            healthy = False
        if not healthy:
            print(f"streamlit did not come up on {base}:\n" + log_path.read_text(errors="replace")[-3000:],
                  file=sys.stderr)
            return 1
        sampler = RssSampler(proc.pid)
        sampler.start()
        completed = asyncio.run(drive(base, args.sessions, args.seconds, args.timeout, args.warmup,
                                      records, warm, window))
    finally:
        try:
            if sampler is not None:
                sampler.stop()
        finally:
            stop_server(proc)
    server_log = log_path.read_text(errors="replace")
    fig = summarise(records, warm, sampler.peak_mb, len(sampler.samples), args, server_log, completed,
                    server_cores(sampler.cpu, window), window, server_cores(sampler.client_cpu, window))
    keep_log = not completed or fig["errors"] or fig["server_tracebacks"]
    if keep_log:
        fig["server_log"] = str(log_path)
    else:
        log_path.unlink(missing_ok=True)
    print_table(fig)
    if keep_log:
        print(f"server log kept: {log_path}")
    if args.json:
        args.json.write_text(json.dumps(_no_nan(fig), indent=2, default=str))
    return 0 if completed else 130


def _no_nan(x):
    if isinstance(x, float) and x != x:
        return None
    if isinstance(x, dict):
        return {k: _no_nan(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_no_nan(v) for v in x]
    return x


if __name__ == "__main__":
    sys.exit(main())
