"""Fault containment: one bad spooled run, one vanished slide, two writers on one run, a dead job
whose pid was reused, a torn status file, a gene panel that DuckDB cannot hold. Real slides, real
DuckDB, real processes."""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from core.engine import jobs as jobs_mod
from core.engine.access import StoreAccess
from core.engine.modelhub import load_model
from core.engine.predict import predict_slides
from core.engine.spool import MAX_INGEST_ATTEMPTS, Spool, atomic_write, spool_dir, write_atomic
from core.errors import StoreError
from core.store.db import Store
from models.scist import HeadConfig, ModelCard, ReferenceInformedHead, save_checkpoint
from tests.conftest import make_slide

REPO = Path(__file__).resolve().parents[2]
GENES = ["ERBB2", "ESR1", "CD8A", "MKI67"]
OPTS = dict(device="cpu", workers=0, runtime="torch")


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    head = ReferenceInformedHead(HeadConfig(1280, len(GENES), 2), torch.rand(2, len(GENES)))
    save_checkpoint(root / "tiny", head, ModelCard("tiny", GENES, ["a", "b"], "efficientnet_lite0", 112.0, 1.0, 112))
    return load_model("tiny", [root])


@pytest.fixture
def slides(tmp_path):
    return [make_slide(tmp_path / f"s{i}.tiff", seed=i) for i in range(3)]


def _spooled(tmp_path, model, slides):
    """Compute the slides into the spool only (as Ray actors do), leaving the store empty."""
    store = tmp_path / "store.duckdb"
    Store(store).close()
    results = predict_slides(store, [(s, None) for s in slides], model, ingest=False, **OPTS)
    assert [r.status for r in results] == ["computed"] * len(slides)
    return store, {r.slide_name: r.run_key for r in results}


def _runs(store):
    with Store(store, read_only=True) as st:
        return dict(st.con.execute("SELECT run_key, n_tiles FROM runs").fetchall())


# -- 1. a bad spooled run is quarantined, the others go in ----------------------------------------
def test_corrupt_chunk_and_marker_are_quarantined_and_the_others_ingested(tmp_path, model, slides):
    store, keys = _spooled(tmp_path, model, slides)
    spool = Spool(spool_dir(store))
    bad_chunk, bad_marker, good = keys["s0.tiff"], keys["s1.tiff"], keys["s2.tiff"]
    next((spool.root / bad_chunk).glob("chunk*.parquet")).write_bytes(b"not parquet at all")
    (spool.root / bad_marker / "run.json").write_text('{"run_key": ')
    access = StoreAccess(store)
    assert access.ingest() == 1
    assert set(_runs(store)) == {good}
    assert spool.complete_runs() == [] and spool.pending_runs() == []
    listed = {q["run_key"]: q for q in access.quarantined()}
    assert set(listed) == {bad_chunk, bad_marker}
    assert listed[bad_chunk]["slide"] == "s0.tiff" and listed[bad_marker]["slide"] == "s1.tiff"
    for q in listed.values():
        assert "unreadable" in q["reason"] and abs(q["time"] - time.time()) < 120
        assert Path(q["path"]).parent == spool.quarantine_root == tmp_path / "store.duckdb.quarantine"
        reason = json.loads((Path(q["path"]) / "reason.json").read_text())
        assert reason["run_key"] == q["run_key"] and reason["reason"] == q["reason"]
    # the store still opens and answers: every page works
    with Store(store, read_only=True) as st:
        assert len(st.heatmap(model.key, good, "CD8A")) == _runs(store)[good]


def test_a_run_the_store_refuses_is_retried_then_quarantined(tmp_path, model, slides, monkeypatch):
    store, keys = _spooled(tmp_path, model, slides[:2])
    poison = keys["s0.tiff"]
    real = Store.write_run

    def refuse(self, run, *args, **kwargs):
        if run.run_key == poison:
            raise StoreError("disk says no")
        return real(self, run, *args, **kwargs)

    monkeypatch.setattr(Store, "write_run", refuse)
    access = StoreAccess(store)
    failures = {}
    assert access.ingest(failures=failures) == 1           # the other run goes in at once
    assert "disk says no" in failures[poison]
    assert set(_runs(store)) == {keys["s1.tiff"]}
    for attempt in range(2, MAX_INGEST_ATTEMPTS):            # left in the spool for the next tries
        assert access.spool.complete_runs() == [poison]
        assert access.ingest() == 0
    assert access.spool.complete_runs() == [poison]
    assert access.ingest() == 0                              # the last try: quarantined
    assert access.spool.complete_runs() == []
    [q] = access.quarantined()
    assert q["run_key"] == poison and q["slide"] == "s0.tiff" and "disk says no" in q["reason"]
    # put back once the store is fine again: ingested like any other run
    monkeypatch.undo()
    assert access.spool.restore(q["path"]) == poison
    assert access.ingest() == 1 and set(_runs(store)) == set(keys.values())
    assert access.quarantined() == []


# -- 2. a slide that vanishes fails alone ---------------------------------------------------------
def test_slide_deleted_after_import_fails_alone(tmp_path, model, slides):
    store = tmp_path / "store.duckdb"
    slides[1].unlink()                                       # gone before the job plans it
    results = predict_slides(store, [(s, None) for s in slides], model, **OPTS)
    assert [r.status for r in results] == ["computed", "failed", "computed"]
    assert results[1].message and results[1].slide_name == "s1.tiff"
    assert set(_runs(store)) == {results[0].run_key, results[2].run_key}


def test_slide_deleted_while_the_job_runs_fails_alone(tmp_path, model, slides, monkeypatch):
    import core.engine.predict as predict_mod

    real = predict_mod.plan_slides

    def plan_then_delete(*args, **kwargs):
        planned = real(*args, **kwargs)
        slides[0].unlink()                                   # planned, then moved away before it is read
        return planned

    monkeypatch.setattr(predict_mod, "plan_slides", plan_then_delete)
    store = tmp_path / "store.duckdb"
    results = predict_slides(store, [(s, None) for s in slides], model, **OPTS)
    assert [r.status for r in results] == ["failed", "computed", "computed"]
    assert results[0].message
    assert set(_runs(store)) == {results[1].run_key, results[2].run_key}
    # its run's lock is released: nothing is left locked for the next writer
    spool = Spool(spool_dir(store))
    lock = spool.lock(results[0].run_key)
    assert lock is not None
    lock.release()


# -- 3. two writers on one run --------------------------------------------------------------------
LOCK_HOLDER = """
import sys, time
from core.engine.spool import Spool
spool = Spool(sys.argv[1])
lock = spool.lock(sys.argv[2], slide="s0.tiff")
print("locked" if lock else "busy", flush=True)
sys.stdin.readline()
"""


def test_two_writers_on_one_run_never_lose_a_chunk(tmp_path, model, slides):
    from core.engine.plan import plan_slides

    store = tmp_path / "store.duckdb"
    access = StoreAccess(store)
    [job] = plan_slides(lambda: access.open(5.0), access.spool, [(slides[0], None)], model, model.tiling())
    run_key = job.run_key
    job.release()
    # writer A (another process) is in the middle of the run: a chunk in flight, as a .tmp
    folder = access.spool.root / run_key
    folder.mkdir(parents=True)
    in_flight = folder / ".chunk1024-00000.parquet.999-1.tmp"
    in_flight.write_bytes(b"half a chunk")
    holder = subprocess.Popen([sys.executable, "-c", LOCK_HOLDER, str(access.spool.root), run_key],
                              env={**os.environ, "PYTHONPATH": str(REPO)}, stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        # writer B (this process): the run is skipped, A's files are untouched — also with force
        for force in (False, True):
            [r] = predict_slides(store, [(slides[0], None)], model, force=force, **OPTS)
            assert r.status == "busy" and str(holder.pid) in r.message
            assert in_flight.read_bytes() == b"half a chunk"
        assert StoreAccess(store).ingest() == 0
    finally:
        holder.communicate("\n", timeout=30)
    # A is gone (its flock went with it): B now owns the run, cleans the stale .tmp and computes it
    [r] = predict_slides(store, [(slides[0], None)], model, **OPTS)
    assert r.status == "computed" and not folder.exists()
    with Store(store, read_only=True) as st:
        n = st.con.execute("SELECT count(*), count(DISTINCT tile_idx) FROM tiles").fetchone()
    assert n == (r.n_tiles, r.n_tiles)


def test_run_lock_is_exclusive_and_survives_unlink(tmp_path):
    spool = Spool(tmp_path / "spool")
    a = spool.lock("r1", slide="x.tiff")
    assert a is not None and spool.lock("r1") is None       # a second holder (even in-process) waits
    assert spool.lock("r1", wait_s=0.2) is None
    a.release(unlink=True)
    b = spool.lock("r1")
    assert b is not None and spool.lock_path("r1").exists()
    b.release()


# -- 4. planning does not hold the store ----------------------------------------------------------
WRITER = """
import sys
from core.store.db import Store
Store(sys.argv[1], wait_s=0.0).close()
"""


def test_planning_leaves_the_store_free_for_other_writers(tmp_path, model, slides, monkeypatch):
    import core.engine.plan as plan_mod

    store = tmp_path / "store.duckdb"
    Store(store).close()
    seen = []
    real_hash, real_grid = plan_mod.file_fingerprint, plan_mod.tile_grid

    def other_writer_can_open():
        seen.append(subprocess.run([sys.executable, "-c", WRITER, str(store)], env={**os.environ,
                                   "PYTHONPATH": str(REPO)}, capture_output=True, timeout=120).returncode)

    def hashing(*a, **k):
        other_writer_can_open()
        return real_hash(*a, **k)

    def grid(*a, **k):
        other_writer_can_open()
        return real_grid(*a, **k)

    monkeypatch.setattr(plan_mod, "file_fingerprint", hashing)
    monkeypatch.setattr(plan_mod, "tile_grid", grid)
    [r] = predict_slides(store, [(slides[0], None)], model, **OPTS)
    assert r.status == "computed"
    assert seen == [0, 0]


# -- 5. job liveness ------------------------------------------------------------------------------
def _status_file(tmp_path, **values) -> jobs_mod.Job:
    path = tmp_path / "job.json"
    jobs_mod.write_status(path, status="running", cohort="c", model="m", started=time.time(), **values)
    return jobs_mod.Job("job", path)


def test_process_start_time_is_read_from_proc():
    start = jobs_mod.process_start(os.getpid())
    if start is None:
        pytest.skip("no /proc here")
    assert jobs_mod.process_alive(os.getpid(), start)
    assert not jobs_mod.process_alive(os.getpid(), start + 1)


def test_a_live_job_with_a_fresh_heartbeat_is_running(tmp_path):
    job = _status_file(tmp_path, pid=os.getpid(), pid_start=jobs_mod.process_start(os.getpid()),
                       heartbeat=time.time())
    assert job.status.status == "running" and job.active


def test_pid_reused_by_another_process_is_not_running(tmp_path):
    start = jobs_mod.process_start(os.getpid())
    if start is None:
        pytest.skip("no /proc here")
    # the job died and this (unrelated) process got its pid: same pid, another start time
    job = _status_file(tmp_path, pid=os.getpid(), pid_start=start - 1, heartbeat=time.time())
    status = job.status
    assert status.status == "failed" and not job.active and "pid" in status.message


def test_stale_heartbeat_is_not_running(tmp_path):
    job = _status_file(tmp_path, pid=os.getpid(), pid_start=jobs_mod.process_start(os.getpid()),
                       heartbeat=time.time() - 2 * jobs_mod.STALE_S)
    status = job.status
    assert status.status == "failed" and "heartbeat" in status.message


def test_job_reporter_beats_and_stops(tmp_path, monkeypatch):
    monkeypatch.setattr(jobs_mod, "HEARTBEAT_S", 0.05)
    path = tmp_path / "j.json"
    progress, cancelled, finish = jobs_mod.job_reporter(path)
    first = jobs_mod.read_status(path)
    assert first["pid"] == os.getpid() and first["pid_start"] == jobs_mod.process_start(os.getpid())
    time.sleep(0.3)
    assert jobs_mod.read_status(path)["heartbeat"] > first["heartbeat"]
    finish("done", "ok")
    final = jobs_mod.read_status(path)
    time.sleep(0.2)
    assert jobs_mod.read_status(path) == final and final["status"] == "done"


def test_failed_launch_is_recorded_with_its_output(tmp_path):
    store = tmp_path / "store.duckdb"
    job, started = jobs_mod.start_job(store, "demo", "tiny", extra_args=["--no-such-option"], launch_check_s=60)
    assert started
    status = job.wait(timeout=60)
    assert status.status == "failed"
    assert "exit" in status.message and "no-such-option" in status.message
    assert not (jobs_mod.jobs_dir(store) / f"{job.id}.lock").exists()   # a new start is not blocked
    again, started_again = jobs_mod.start_job(store, "demo", "tiny", extra_args=["--no-such-option"],
                                              launch_check_s=60)
    assert started_again


# -- 6. atomic, durable writes --------------------------------------------------------------------
def test_atomic_write_is_all_or_nothing_and_fsynced(tmp_path, monkeypatch):
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(fd) or real_fsync(fd))
    path = tmp_path / "status.json"
    write_atomic(path, '{"status": "running"}')
    assert json.loads(path.read_text()) == {"status": "running"} and len(synced) >= 2   # the file and its folder

    def torn(tmp):
        Path(tmp).write_text('{"status": "do')
        raise OSError("disk full")

    with pytest.raises(OSError):
        atomic_write(path, torn)
    assert json.loads(path.read_text()) == {"status": "running"}
    assert [p.name for p in tmp_path.iterdir()] == ["status.json"]


def test_spool_chunks_and_markers_are_fsynced(tmp_path, monkeypatch):
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(fd) or real_fsync(fd))
    spool = Spool(tmp_path / "spool")
    out = {"expression": np.ones((3, 2)), "embedding": np.ones((3, 4)), "composition": np.ones((3, 2)) / 2}
    spool.write_chunk("r1", 0, np.arange(3), np.zeros((3, 2)), np.ones(3), out)
    n_chunk = len(synced)
    spool.finish("r1", {"run_key": "r1"}, n_chunks=1)
    assert n_chunk >= 2 and len(synced) >= n_chunk + 2
    assert spool.complete_runs() == ["r1"]


# -- 7. the store refuses what it cannot hold, and rolls back ------------------------------------
def test_gene_names_differing_only_by_case_are_refused(tmp_path):
    with Store(tmp_path / "s.duckdb") as store:
        with pytest.raises(StoreError, match="ignoring case") as info:
            store.register_model("m", "v1", ["CD8A", "ERBB2", "cd8a"], ["a"], {})
        assert "'CD8A' / 'cd8a'" in str(info.value)
        assert store.models().empty
        assert store.register_model("m", "v1", ["CD8A", "ERBB2"], ["a"], {}) == "m@v1"


def test_register_model_rolls_back_a_failed_transaction(tmp_path, monkeypatch):
    import core.store.db as db

    with Store(tmp_path / "s.duckdb") as store:
        real = db.ident
        monkeypatch.setattr(db, "ident", lambda g: real(g) if g != "BAD" else 'bad" REAL, oops')  # broken SQL
        with pytest.raises(Exception):
            store.register_model("m", "v1", ["CD8A", "BAD"], ["a"], {})
        monkeypatch.undo()
        assert store.models().empty
        assert store.register_model("m", "v1", ["CD8A"], ["a"], {}) == "m@v1"   # no transaction left open


def _forked_child(ready, go):
    ready.set()
    go.wait(30)


def test_a_forked_child_does_not_keep_a_run_locked(tmp_path):
    import multiprocessing as mp

    spool = Spool(tmp_path / "spool")
    lock = spool.lock("r1")
    ctx = mp.get_context("fork")
    ready, go = ctx.Event(), ctx.Event()
    child = ctx.Process(target=_forked_child, args=(ready, go))   # a loader worker forked while the lock is held
    child.start()
    try:
        assert ready.wait(30)
        lock.release()
        again = spool.lock("r1")
        assert again is not None        # free although the child still runs
        again.release()
    finally:
        go.set()
        child.join(30)
