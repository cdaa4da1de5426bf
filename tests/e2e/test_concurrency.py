"""Crashes and concurrency on a real DuckDB file with real processes: ``kill -9`` while a spool is
ingested, ``kill -9`` while an old store is upgraded in place, and two prediction jobs (a CLI
process and an in-process call) on overlapping slides while the app keeps reading the store."""
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from tests.unit.test_store_layout import V3_DDL
from pathlib import Path

import duckdb
import numpy as np
import pandas as pd
import pytest
import torch

from core.engine.access import StoreAccess
from core.engine.modelhub import load_model
from core.engine.predict import predict_cohort, predict_slides
from core.engine.spool import Spool, spool_dir
from core.errors import StoreBusyError
from core.store.db import SCHEMA_VERSION, Store
from models.scist import HeadConfig, ModelCard, ReferenceInformedHead, save_checkpoint
from tests.conftest import make_slide

REPO = Path(__file__).resolve().parents[2]
GENES = ["ERBB2", "ESR1", "CD8A", "MKI67"]
OPTS = dict(device="cpu", workers=0, runtime="torch", batch_size=4)


def _env(root: Path, **extra) -> dict:
    return {**os.environ, "PYTHONPATH": str(REPO), "TESSERA_MODEL_DIRS": str(root / "models"),
            "TESSERA_CACHE_DIR": str(root / "cache"), "OMP_NUM_THREADS": "2", **extra}


def _wait_line(proc, expected: str, timeout: float = 120.0) -> None:
    """Read the child's stdout until ``expected`` (the child is ready, imports done)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        if line.strip() == expected:
            return
    raise AssertionError(f"the child never said {expected!r}: {proc.communicate(timeout=30)}")


def _kill_after(proc, delay: float) -> bool:
    """SIGKILL the child ``delay`` s from now; True when it was still running at that moment."""
    time.sleep(delay)
    alive = proc.poll() is None
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    return alive


# == 1. kill -9 during ingest ====================================================================
SYN_MODEL = {"model_id": "syn", "version": "v1", "genes": GENES, "cell_types": ["a", "b"],
             "card": {"tile_um": 112.0, "mpp": 1.0}}
N_RUNS, N_TILES, SIDE = 6, 2500, 50


def _synthetic_spool(spool: Spool) -> dict:
    """Complete runs written the way the engine writes them (chunks, then the marker); no model work."""
    expected = {}
    side = SIDE
    for i in range(N_RUNS):
        rng = np.random.default_rng(i)
        n = N_TILES - 37 * i                                      # runs of different sizes
        xy = np.stack(np.divmod(np.arange(n), side)[::-1], axis=1) * 224
        out = {"expression": rng.gamma(2.0, 1.0, (n, len(GENES))).astype(np.float32),
               "embedding": rng.normal(size=(n, 32)).astype(np.float32),
               "composition": rng.dirichlet([1, 1], n).astype(np.float32)}
        tissue = rng.uniform(0.3, 1, n).astype(np.float32)
        key = f"run{i:02d}"
        size = 1024
        n_chunks = -(-n // size)
        for c in range(n_chunks):
            sl = slice(c * size, (c + 1) * size)
            spool.write_chunk(key, c, np.arange(n)[sl], xy[sl], tissue[sl], {k: v[sl] for k, v in out.items()})
        record = {"run_key": key, "slide_fp": f"fp{i}", "model_key": "syn@v1", "tiling_key": "t", "tiling": {},
                  "slide_name": f"s{i}.tiff", "slide_path": f"/slides/s{i}.tiff", "tile_size": 224,
                  "width": side * 224, "height": side * 224, "mpp": 0.5, "device": "cpu/torch", "seconds": 1.0,
                  "model": SYN_MODEL}
        lock = spool.lock(key)
        spool.finish(key, record, n_chunks)
        lock.release()
        expected[key] = (n, out["expression"])
    return expected


INGESTER = """
import sys, time
from core.engine.access import StoreAccess
access = StoreAccess(sys.argv[1])
print("ready", flush=True)
t0 = time.perf_counter()
n = access.ingest(wait_s=10.0)
print(f"{n} {time.perf_counter() - t0:.4f}", flush=True)
"""


def _ingester(store: Path):
    return subprocess.Popen([sys.executable, "-c", INGESTER, str(store)], env={**os.environ, "PYTHONPATH": str(REPO)},
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _check_store(store: Path, expected: dict, *, complete: bool) -> set:
    """Every run in the store is whole (all its tiles, once, in every per-tile table); with
    ``complete`` every expected run is there, exactly once, with the spooled values."""
    with Store(store, read_only=True) as st:
        con = st.con
        runs = con.execute("SELECT run_key, run_id, n_tiles FROM runs").fetchall()
        keys = [r[0] for r in runs]
        assert len(keys) == len(set(keys)), f"a run stored twice: {keys}"
        assert set(keys) <= set(expected)
        pred = st.model_info("syn@v1").pred_table if keys else None
        for key, run_id, n_tiles in runs:
            assert n_tiles == expected[key][0]
            for table in ("tiles", "tile_vectors", pred):
                got = con.execute(f"SELECT count(*), count(DISTINCT tile_idx), min(tile_idx), max(tile_idx) "
                                  f"FROM {table} WHERE run_id = ?", [run_id]).fetchone()
                assert got == (n_tiles, n_tiles, 0, n_tiles - 1), (table, key, got)
            assert con.execute("SELECT count(*) FROM slide_summary WHERE run_key = ?", [key]).fetchone()[0] == len(GENES)
        ids = {r[1] for r in runs}
        for table in ("tiles", "tile_vectors", *([pred] if pred else [])):    # no rows of a half-written run
            orphans = con.execute(f"SELECT count(*) FROM {table} WHERE run_id NOT IN "
                                  f"(SELECT run_id FROM runs)").fetchone()[0]
            assert orphans == 0, f"{orphans} rows in {table} belong to no complete run"
        assert con.execute("SELECT count(*) FROM slide_summary WHERE run_key NOT IN (SELECT run_key FROM runs)"
                           ).fetchone()[0] == 0
        if complete:
            assert set(keys) == set(expected) and len(ids) == len(expected)
            for key, (n, expr) in expected.items():
                heat = st.heatmap("syn@v1", key, "CD8A")
                np.testing.assert_allclose(heat["value"].to_numpy(), expr[:, GENES.index("CD8A")], atol=1e-6)
        return set(keys)


def test_kill_9_during_ingest_then_rerun(tmp_path):
    pristine = tmp_path / "pristine.spool"
    expected = _synthetic_spool(Spool(pristine))

    def fresh(name: str) -> Path:
        store = tmp_path / name / "store.duckdb"
        store.parent.mkdir()
        Store(store).close()
        shutil.copytree(pristine, spool_dir(store))
        return store

    # how long an uninterrupted ingest takes (after the child's imports)
    clean = fresh("clean")
    proc = _ingester(clean)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    n, seconds = out.split()[-2:]
    assert int(n) == N_RUNS
    seconds = float(seconds)
    _check_store(clean, expected, complete=True)

    rng = random.Random(1234)
    mid = 0
    # kills spread over the whole ingest; more (random) ones until one landed between two runs
    spread = [0.1, 0.3, 0.5, 0.7, 0.9, 1.05]
    for attempt in range(10):
        if attempt >= len(spread) and mid:
            break
        at = spread[attempt] if attempt < len(spread) else rng.uniform(0.2, 0.9)
        store = fresh(f"kill{attempt}")
        proc = _ingester(store)
        _wait_line(proc, "ready")
        killed_alive = _kill_after(proc, (at + rng.uniform(-0.05, 0.05)) * seconds)
        before = _check_store(store, expected, complete=False)      # nothing half-written is visible
        mid += killed_alive and 0 < len(before) < N_RUNS
        spool = Spool(spool_dir(store))
        StoreAccess(store).ingest()       # the rerun (a run committed just before the kill goes in again)
        _check_store(store, expected, complete=True)
        assert spool.complete_runs() == [] and spool.pending_runs() == []
        assert spool.quarantined() == [], f"a stored run was quarantined after the crash: {spool.quarantined()}"
    assert mid >= 1, "no kill landed between two runs' ingests; the test did not test anything"


CRASH_IN_REMOVAL = """
import os, signal, sys
from pathlib import Path
import core.engine.spool as spool_mod
from core.engine.access import StoreAccess
first = sys.argv[2]

def rmtree_then_die(path, ignore_errors=False):
    # the run is committed to the store; its folder goes file by file: die after the first one
    files = sorted(Path(path).iterdir(), key=lambda p: (p.name != first, p.name))
    files[0].unlink()
    os.kill(os.getpid(), signal.SIGKILL)

spool_mod.shutil.rmtree = rmtree_then_die
StoreAccess(sys.argv[1]).ingest()
"""


@pytest.mark.parametrize("first", ["run.json", "chunk1024-00000.parquet"])
def test_kill_9_while_a_stored_run_leaves_the_spool(tmp_path, first):
    store = tmp_path / "store.duckdb"
    spool = Spool(spool_dir(store))
    expected = dict(list(_synthetic_spool(spool).items())[:1])
    for key in spool.complete_runs()[1:]:
        spool.remove(key)
    Store(store).close()
    proc = subprocess.run([sys.executable, "-c", CRASH_IN_REMOVAL, str(store), first],
                          env={**os.environ, "PYTHONPATH": str(REPO)}, cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    _check_store(store, expected, complete=True)            # committed before the crash
    StoreAccess(store).ingest()                              # the next ingest (the app's next page load)
    _check_store(store, expected, complete=True)
    assert spool.quarantined() == [], "a run the store holds was quarantined as unreadable"
    assert spool.complete_runs() == [] and spool.pending_runs() == [], "a stored run's leftovers stay in the spool"


# == 2. kill -9 during a v3 -> v4 migration ======================================================
V3_RUNS, V3_TILES = 4, 150_000


def _make_v3(path: Path) -> None:
    """A store as Tessera v3 wrote it (run_key on every per-tile table, no run ids), big enough that
    the upgrade takes a while, with an orphan tile row of a run that never completed."""
    con = duckdb.connect(str(path))
    con.execute(V3_DDL)
    for i in range(V3_RUNS):
        key = f"{(i * 7919) % 65536:04x}"                         # insertion order is not key order
        n = V3_TILES + i
        con.execute(f"""INSERT INTO tiles SELECT '{key}', r::INTEGER, (r % 400)::INTEGER * 224,
                            (r // 400)::INTEGER * 224, 0.5 FROM range({n}) t(r)""")
        con.execute(f"""INSERT INTO tile_vectors SELECT '{key}', r::INTEGER, [r::FLOAT, {i}::FLOAT, 1.0, 2.0],
                            [0.5, 0.5] FROM range({n}) t(r)""")
        con.execute(f"""INSERT INTO pred_old SELECT '{key}', r::INTEGER, (r * 0.001 + {i})::REAL,
                            sin(r + {i})::REAL, (r % 17)::REAL FROM range({n}) t(r)""")
        con.execute(f"INSERT INTO runs VALUES ('{key}', 'fp{i}', 'sim@v1', 't', '{{}}', 's{i}', '/s{i}', {n}, 224, "
                    f"1, 1, 0.5, 'cpu', 1.0, TIMESTAMP '2026-01-0{i + 1}')")
    con.execute("INSERT INTO tiles VALUES ('partial', 0, 0, 0, 1.0)")
    con.execute("INSERT INTO pred_old VALUES ('partial', 0, 1, 1, 1)")
    con.close()


def _content(path: Path) -> dict:
    """What a v4 store holds, table by table (aggregates that catch a lost, doubled or moved row)."""
    with Store(path, read_only=True) as st:
        con = st.con
        version = con.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()[0]
        return {
            "version": int(version),
            "runs": con.execute("SELECT run_key, run_id, n_tiles FROM runs ORDER BY run_id").fetchall(),
            "tiles": con.execute("SELECT run_id, count(*), count(DISTINCT tile_idx), sum(x::BIGINT), sum(y::BIGINT) "
                                 "FROM tiles GROUP BY run_id ORDER BY run_id").fetchall(),
            "vectors": con.execute("SELECT run_id, count(*), sum(embedding[1]::DOUBLE) FROM tile_vectors "
                                   "GROUP BY run_id ORDER BY run_id").fetchall(),
            "pred": con.execute('SELECT run_id, count(*), sum("ERBB2"::DOUBLE), sum("CD8A"::DOUBLE), '
                                'sum(x::BIGINT) FROM pred_old GROUP BY run_id ORDER BY run_id').fetchall(),
            "pred_columns": st._columns("pred_old"),
        }


MIGRATOR = """
import sys, time
from core.store.db import Store
print("ready", flush=True)
t0 = time.perf_counter()
Store(sys.argv[1], wait_s=10.0).close()
print(f"{time.perf_counter() - t0:.4f}", flush=True)
"""


def _migrator(path: Path):
    return subprocess.Popen([sys.executable, "-c", MIGRATOR, str(path)], env={**os.environ, "PYTHONPATH": str(REPO)},
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_kill_9_during_migration_then_reopen(tmp_path):
    old = tmp_path / "v3.duckdb"
    _make_v3(old)
    reference = tmp_path / "reference.duckdb"
    shutil.copy(old, reference)
    proc = _migrator(reference)                       # the uninterrupted upgrade, timed
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    seconds = float(out.split()[-1])
    want = _content(reference)
    assert want["version"] == SCHEMA_VERSION and len(want["runs"]) == V3_RUNS
    assert "run_key" not in want["pred_columns"]

    rng = random.Random(99)
    outcomes = []
    # early in the rewrite, late in it, around the commit and the checkpoint that follows
    for attempt, at in enumerate((0.3, 0.7, 0.9, 1.0, 1.1)):
        path = tmp_path / f"kill{attempt}.duckdb"
        shutil.copy(old, path)
        proc = _migrator(path)
        _wait_line(proc, "ready")
        alive = _kill_after(proc, (at + rng.uniform(-0.05, 0.05)) * seconds)
        raw = duckdb.connect(str(path), read_only=True)          # what the crash left, looked at raw
        try:
            left = raw.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()[0]
            cols = [r[0] for r in raw.execute("SELECT column_name FROM information_schema.columns "
                                              "WHERE table_name='tiles'").fetchall()]
        finally:
            raw.close()
        outcomes.append((alive, left, "run_key" in cols))
        with Store(path) as st:                                    # opens (and finishes the upgrade)
            assert st.con.execute("SELECT count(*) FROM runs").fetchone()[0] == V3_RUNS
        assert _content(path) == want, f"attempt {attempt}: killed with {outcomes[-1]}"
    assert any(alive for alive, _, _ in outcomes), f"every kill came after the upgrade ended: {outcomes}"


# == 3. two prediction jobs and the app's reader on one store ===================================
@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("concurrency")
    torch.manual_seed(0)
    head = ReferenceInformedHead(HeadConfig(1280, len(GENES), 2), torch.rand(2, len(GENES)))
    save_checkpoint(root / "models" / "tiny", head,
                    ModelCard("tiny", GENES, ["a", "b"], "efficientnet_lite0", 112.0, 1.0, 112))
    slides = [make_slide(root / f"s{i}.tiff", seed=i) for i in range(4)]
    return root, slides


def _cohort(store: Store, name: str, slides: list[Path]) -> None:
    rows = pd.DataFrame({"slide_name": [s.name for s in slides], "slide_path": [str(s) for s in slides],
                         "patient": [f"P{i}" for i in range(len(slides))], "status": "ok", "message": ""})
    store.save_cohort(name, rows, pd.DataFrame({"patient": rows["patient"]}), {"kind": "test"})


def _predictions(store: Path, model_key: str) -> dict:
    with Store(store, read_only=True) as st:
        runs = st.con.execute("SELECT run_key, slide_name, n_tiles, run_id FROM runs").fetchall()
        out = {}
        for key, name, n_tiles, run_id in runs:
            tiles = st.con.execute("SELECT count(*), count(DISTINCT tile_idx) FROM tiles WHERE run_id=?",
                                   [run_id]).fetchone()
            assert tiles == (n_tiles, n_tiles), (name, tiles, n_tiles)
            out[key] = (name, np.stack([st.heatmap(model_key, key, g)["value"].to_numpy() for g in GENES], 1))
        return out


CLI = [sys.executable, "-m", "core.cli", "predict", "--cohort", "c1", "--model", "tiny", "--device", "cpu",
       "--workers", "0", "--runtime", "torch", "--batch-size", "4", "--ingest-wait", "60"]


PAGE_TRIES = 3     # a page that finds the store busy (after Store's own 2 s wait) may try again, not more


def _read_like_a_page(store: Path, model_key: str) -> int:
    """What a page does: open the store read-only (Store waits up to 2 s on a writer), query, close.
    A busy store is retried (``PAGE_TRIES`` in all); returns how many tries were refused busy."""
    for attempt in range(PAGE_TRIES):
        try:
            with Store(store, read_only=True) as st:
                st.cohorts()
                for (key,) in st.con.execute("SELECT run_key FROM runs").fetchall():
                    st.heatmap(model_key, key, "CD8A")
            return attempt
        except StoreBusyError:
            if attempt == PAGE_TRIES - 1:
                raise
    raise AssertionError("unreachable")


class ThreadReader:
    """The app's reader in this process (Streamlit serves every session from threads of one process)."""

    def __init__(self, store: Path, model_key: str):
        self.store, self.model_key, self.stop, self.errors, self.reads = store, model_key, threading.Event(), [], 0
        self.busy = 0
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    def _loop(self):
        while not self.stop.is_set():
            try:
                self.busy += _read_like_a_page(self.store, self.model_key)
                self.reads += 1
            except Exception as exc:  # noqa: BLE001 - StoreBusyError included: a page would show it
                self.errors.append(exc)
            time.sleep(0.01)

    def finish(self) -> tuple[int, int, list]:
        self.stop.set()
        self.thread.join(timeout=30)
        return self.reads, self.busy, self.errors


READER = """
import json, sys, time
from pathlib import Path
from tests.e2e.test_concurrency import _read_like_a_page
store, model_key, stop, out = sys.argv[1:]
reads, busy, errors = 0, 0, []
print("ready", flush=True)
while not Path(stop).exists():
    try:
        busy += _read_like_a_page(Path(store), model_key)
        reads += 1
    except Exception as exc:
        errors.append(f"{type(exc).__name__}: {exc}")
    time.sleep(0.01)
Path(out).write_text(json.dumps({"reads": reads, "busy": busy, "errors": errors}))
"""


class ProcessReader:
    """The app's reader in a process of its own (the app while a CLI job and another writer run)."""

    def __init__(self, store: Path, model_key: str, root: Path):
        self.stop_file, self.out = store.with_suffix(".stop"), store.with_suffix(".reads.json")
        self.proc = subprocess.Popen([sys.executable, "-c", READER, str(store), model_key, str(self.stop_file),
                                      str(self.out)], env=_env(root), cwd=REPO, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)
        _wait_line(self.proc, "ready")

    def finish(self) -> tuple[int, int, list]:
        self.stop_file.touch()
        _, err = self.proc.communicate(timeout=60)
        assert self.proc.returncode == 0, err
        import json

        got = json.loads(self.out.read_text())
        return got["reads"], got["busy"], got["errors"]


@pytest.fixture(scope="module")
def serial(world):
    """The reference: one job predicting every slide, nothing else running."""
    root, slides = world
    model = load_model("tiny", [root / "models"])
    store = root / "serial.duckdb"
    predict_slides(store, [(s, None) for s in slides], model, **OPTS)
    want = _predictions(store, model.key)
    assert sorted(name for name, _ in want.values()) == [s.name for s in slides]
    return want


def _two_jobs_while_the_app_reads(world, want, tmp_path, monkeypatch, reader_kind):
    root, slides = world
    monkeypatch.setenv("TESSERA_CACHE_DIR", str(root / "cache"))
    model = load_model("tiny", [root / "models"])

    store = tmp_path / "store.duckdb"
    with Store(store) as st:
        _cohort(st, "c1", slides[:3])                       # the CLI job: s0 s1 s2
        _cohort(st, "c2", slides[1:])                       # the in-process job: s1 s2 s3

    reader = ThreadReader(store, model.key) if reader_kind == "thread" else ProcessReader(store, model.key, root)
    cli = subprocess.Popen([*CLI, "--store", str(store)], env=_env(root), cwd=REPO, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)
    try:
        mine = predict_cohort(store, "c2", model, device="cpu", workers=0, runtime="torch", batch_size=4,
                              ingest_wait_s=60.0)
        out, err = cli.communicate(timeout=300)
    finally:
        if cli.poll() is None:
            cli.kill()
        reads, busy, errors = reader.finish()
    if reader_kind == "thread":          # the first failure as it was raised
        for exc in errors:
            if isinstance(exc, duckdb.ConnectionException):
                raise exc
        errors = [f"{type(e).__name__}: {e}" for e in errors]
    assert cli.returncode == 0, err
    assert "Traceback" not in err and "busy" not in out.lower(), (out, err)
    assert {r.status for r in mine} <= {"computed", "cached", "busy"}, \
        [(r.slide_name, r.status, r.message) for r in mine]
    StoreAccess(store).ingest(wait_s=10.0)                  # what the app does on its next page load
    spool = Spool(spool_dir(store))
    assert spool.complete_runs() == [] and spool.pending_runs() == [] and spool.quarantined() == []

    got = _predictions(store, model.key)
    assert sorted(got) == sorted(want), "every slide stored exactly once, under the serial run's key"
    for key, (name, values) in want.items():
        assert got[key][0] == name
        np.testing.assert_allclose(got[key][1], values, atol=1e-6, rtol=0)
    assert reads > 0
    assert not errors, f"{len(errors)} read(s) failed ({reads} ok, {busy} retried busy), first: {errors[:3]}"


def test_cli_job_and_in_process_job_on_overlapping_slides_while_another_process_reads(world, serial, tmp_path,
                                                                                      monkeypatch):
    _two_jobs_while_the_app_reads(world, serial, tmp_path, monkeypatch, "process")


def test_cli_job_and_in_process_job_on_overlapping_slides_while_a_thread_reads(world, serial, tmp_path,
                                                                                  monkeypatch):
    _two_jobs_while_the_app_reads(world, serial, tmp_path, monkeypatch, "thread")
