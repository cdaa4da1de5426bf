"""Background prediction jobs: started from the app, run as detached CLI processes.

A job is ``python -m core.cli predict … --job-file F`` in its own session, so it survives the
browser tab (and the Streamlit server) closing; the app only reads its status file. One job per
(store, cohort, model, tissue threshold): a second request — from another browser session —
attaches to the running job instead of starting another (an exclusive lock file, created
atomically). Cancel = a ``.cancel`` file the engine polls between batches; finished chunks stay
in the spool, so starting again resumes.

Status file (JSON, replaced atomically ≤ once a second): ``status`` (starting | running | done |
cancelled | failed), ``done``/``total`` tiles, ``tiles_per_s``, ``eta_s``, ``slide``, ``pid``,
``started``, ``updated``, ``message``.
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from typing import TYPE_CHECKING

from core.config import REPO_ROOT

if TYPE_CHECKING:
    from core.engine.plan import Progress

ACTIVE = ("starting", "running")


def jobs_dir(store_path: str | Path) -> Path:
    return Path(str(store_path) + ".jobs")


def job_id(store_path: str | Path, cohort: str, model_id: str, min_tissue: float | None = None,
           nuclei: bool = False) -> str:
    payload = f"{Path(store_path).resolve()}|{cohort}|{model_id}|{min_tissue}" + ("|nuclei" if nuclei else "")
    return hashlib.blake2b(payload.encode(), digest_size=6).hexdigest()


def _alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie (exited, not yet reaped by its parent) is not alive
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split(") ")[-1][:1] != "Z"
    except OSError:
        return True


def write_status(path: Path, **values) -> None:
    current = read_status(path) or {}
    current.update(values, updated=time.time())
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(current))
    os.replace(tmp, path)


def read_status(path: Path) -> dict | None:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


@dataclass(frozen=True)
class JobStatus:
    """A job's status file, read: what the Predictions page shows."""

    status: str = "starting"
    cohort: str = ""
    model: str = ""
    done: int = 0
    total: int = 0
    tiles_per_s: float = 0.0
    eta_s: float | None = None
    slide: str = ""
    pid: int | None = None
    started: float = 0.0
    updated: float = 0.0
    message: str = ""

    @classmethod
    def from_file(cls, values: dict) -> "JobStatus":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known and v is not None})

    @property
    def active(self) -> bool:
        return self.status in ACTIVE


@dataclass
class Job:
    id: str
    status_path: Path

    @property
    def status(self) -> JobStatus:
        status = JobStatus.from_file(read_status(self.status_path) or {})
        if status.active and status.pid and not _alive(status.pid):
            status = JobStatus(**{**asdict(status), "status": "failed",
                                  "message": status.message or "the job process died"})
        return status

    @property
    def active(self) -> bool:
        return self.status.active

    def cancel(self) -> None:
        self.status_path.with_suffix(".cancel").touch()

    def wait(self, timeout: float = 600.0, poll: float = 0.2) -> JobStatus:
        deadline = time.monotonic() + timeout
        while self.active and time.monotonic() < deadline:
            time.sleep(poll)
        return self.status


def start_job(store_path: str | Path, cohort: str, model_id: str, *, min_tissue: float | None = None,
              nuclei: bool = False, extra_args: list[str] | None = None, env: dict | None = None) -> tuple[Job, bool]:
    """Start (or attach to) the job; returns (job, started_now)."""
    folder = jobs_dir(store_path)
    folder.mkdir(parents=True, exist_ok=True)
    jid = job_id(store_path, cohort, model_id, min_tissue, nuclei)
    job = Job(jid, folder / f"{jid}.json")
    lock = folder / f"{jid}.lock"
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            break
        except FileExistsError:
            status = job.status
            recent = time.time() - lock.stat().st_mtime < 30 if lock.exists() else False
            if status.active and (_alive(status.pid) or recent):
                return job, False  # someone else's job for the same work: attach to it
            lock.unlink(missing_ok=True)  # a stale lock from a dead job
    else:
        return job, False
    try:
        job.status_path.with_suffix(".cancel").unlink(missing_ok=True)
        job.status_path.unlink(missing_ok=True)
        write_status(job.status_path, status="starting", cohort=cohort, model=model_id, started=time.time(),
                     done=0, total=0)
        cmd = [sys.executable, "-m", "core.cli", "predict", "--cohort", cohort, "--model", model_id,
               "--store", str(store_path), "--job-file", str(job.status_path), *(extra_args or [])]
        if min_tissue is not None:
            cmd += ["--min-tissue", str(min_tissue)]
        if nuclei:
            cmd += ["--nuclei"]
        log_file = open(folder / f"{jid}.log", "w")
        proc = subprocess.Popen(cmd, cwd=REPO_ROOT, stdout=log_file, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True, env={**os.environ, **(env or {})})
        log_file.close()
        write_status(job.status_path, pid=proc.pid)
    finally:
        os.close(fd)
    return job, True


def list_jobs(store_path: str | Path) -> list[Job]:
    folder = jobs_dir(store_path)
    if not folder.is_dir():
        return []
    jobs = [Job(p.stem, p) for p in folder.glob("*.json")]
    return sorted(jobs, key=lambda j: -j.status.started)


def job_reporter(path: Path, *, every_s: float = 1.0):
    """(progress callback, cancel check, finish) for a CLI job writing its status file."""
    cancel_file = path.with_suffix(".cancel")
    last = {"t": 0.0}
    write_status(path, status="running", pid=os.getpid())

    def progress(p: Progress) -> None:
        now = time.monotonic()
        if now - last["t"] >= every_s or p.done >= p.total or p.done == 0:
            last["t"] = now
            write_status(path, status="running", **asdict(p))

    def cancelled() -> bool:
        return cancel_file.exists()

    def finish(status: str, message: str = "") -> None:
        write_status(path, status=status, message=message)
        path.with_name(f"{path.stem}.lock").unlink(missing_ok=True)

    return progress, cancelled, finish
