"""Background prediction jobs: started from the app, run as detached CLI processes.

A job is ``python -m core.cli predict … --job-file F`` in its own session, so it survives the
browser tab (and the Streamlit server) closing; the app only reads its status file. One job per
(store, cohort, model, tissue threshold): a second request — from another browser session —
attaches to the running job instead of starting another (an exclusive lock file, created
atomically). Cancel = a ``.cancel`` file the engine polls between batches; finished chunks stay
in the spool, so starting again resumes.

Status file (JSON, replaced atomically and fsynced, ≤ once a second): ``status`` (starting |
running | done | cancelled | failed), ``done``/``total`` tiles, ``tiles_per_s``, ``eta_s``,
``slide``, ``pid``, ``pid_start``, ``heartbeat``, ``started``, ``updated``, ``message``.

Liveness: a pid alone can be reused by an unrelated process after the job died, so the status file
also holds the process's start time (``pid_start``: field 22 of ``/proc/<pid>/stat``, clock ticks
since boot) and a ``heartbeat`` (seconds since the epoch) that the job refreshes every
:data:`HEARTBEAT_S` seconds while it runs. A job in ``starting``/``running`` counts as running only
while a process with that pid *and* that start time exists and its heartbeat (or, before the first
one, its last update) is under :data:`STALE_S` seconds old; otherwise it reads as ``failed`` with
the tail of its log. A launch that exits at once (or cannot start) is recorded as failed with the
tail of its output.
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from typing import TYPE_CHECKING

from core.config import REPO_ROOT

if TYPE_CHECKING:
    from core.engine.plan import Progress

ACTIVE = ("starting", "running")
HEARTBEAT_S = 10.0   # how often a running job refreshes its heartbeat
STALE_S = 60.0       # a heartbeat older than this: the job is not running any more
STARTING_S = 300.0   # the same for a launched process (pid and start time known) not yet reporting
_write_lock = threading.Lock()   # the heartbeat thread and the progress callback share the file


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


def process_start(pid: int | None) -> int | None:
    """The process's start time (field 22 of ``/proc/<pid>/stat``, clock ticks since boot), or
    None where it cannot be read (no such process, no /proc)."""
    if not pid:
        return None
    try:
        with open(f"/proc/{int(pid)}/stat") as fh:
            fields_after_name = fh.read().rsplit(")", 1)[1].split()
        return int(fields_after_name[19])   # field 3 is index 0, so field 22 is index 19
    except (OSError, IndexError, ValueError):
        return None


def process_alive(pid: int | None, start: int | None = None) -> bool:
    """The pid exists (not a zombie) and, when ``start`` is given, is the same process (same start
    time: not an unrelated process that got the pid after the job died)."""
    if not _alive(pid):
        return False
    if start is None:
        return True
    now = process_start(pid)
    return now is None or int(now) == int(start)   # unknown (no /proc): the pid check is all we have


def write_status(path: Path, **values) -> None:
    from core.engine.spool import write_atomic

    path = Path(path)
    with _write_lock:
        current = read_status(path) or {}
        current.update(values, updated=time.time())
        write_atomic(path, json.dumps(current))


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
    pid_start: int | None = None
    heartbeat: float = 0.0
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

    def not_running_reason(self, now: float | None = None) -> str:
        """Why an active-looking status is not a running job ('' when it is running)."""
        if not self.active:
            return ""
        now = time.time() if now is None else now
        if self.pid and not _alive(self.pid):
            return "the job process died"
        if self.pid and not process_alive(self.pid, self.pid_start):
            return "the job process died (its pid now belongs to another process)"
        beat = self.heartbeat or self.updated or self.started
        # before its first heartbeat a live, verified process may still be importing its libraries
        limit = STARTING_S if (self.status == "starting" and self.pid and self.pid_start) else STALE_S
        if beat and now - beat > limit:
            return f"the job stopped reporting (no heartbeat for {now - beat:.0f} s)"
        return ""


def _log_tail(path: Path, lines: int = 12, size: int = 4000) -> str:
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            fh.seek(max(0, fh.tell() - size))
            text = fh.read().decode(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.strip().splitlines()[-lines:])


@dataclass
class Job:
    id: str
    status_path: Path

    @property
    def log_path(self) -> Path:
        return self.status_path.with_suffix(".log")

    @property
    def status(self) -> JobStatus:
        status = JobStatus.from_file(read_status(self.status_path) or {})
        reason = status.not_running_reason()
        if reason:
            tail = _log_tail(self.log_path)
            status = JobStatus(**{**asdict(status), "status": "failed",
                                  "message": status.message or (reason + (f":\n{tail}" if tail else ""))})
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
              nuclei: bool = False, extra_args: list[str] | None = None, env: dict | None = None,
              launch_check_s: float = 0.5) -> tuple[Job, bool]:
    """Start (or attach to) the job; returns (job, started_now). The launch is watched for
    ``launch_check_s`` seconds: a process that exits with an error by then is recorded as failed
    with the tail of its output (one that dies later reads as failed on the next look)."""
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
            if status.active and (process_alive(status.pid, status.pid_start) or recent):
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
        try:
            with open(job.log_path, "w") as log_file:
                proc = subprocess.Popen(cmd, cwd=REPO_ROOT, stdout=log_file, stderr=subprocess.STDOUT,
                                        stdin=subprocess.DEVNULL, start_new_session=True,
                                        env={**os.environ, **(env or {})})
        except OSError as exc:
            write_status(job.status_path, status="failed", message=f"the job could not start: {exc}")
            lock.unlink(missing_ok=True)
            return job, True
        write_status(job.status_path, pid=proc.pid, pid_start=process_start(proc.pid))
        try:
            code = proc.wait(timeout=launch_check_s) if launch_check_s > 0 else None
        except subprocess.TimeoutExpired:
            code = None
        if code is not None and code != 0 and (read_status(job.status_path) or {}).get("status") in ACTIVE:
            tail = _log_tail(job.log_path)
            write_status(job.status_path, status="failed",
                         message=f"the job exited at once (exit code {code})" + (f":\n{tail}" if tail else ""))
            lock.unlink(missing_ok=True)
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
    write_status(path, status="running", pid=os.getpid(), pid_start=process_start(os.getpid()),
                 heartbeat=time.time())
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(HEARTBEAT_S):
            try:
                write_status(path, heartbeat=time.time())
            except OSError:  # a full disk for a moment: the next beat tries again
                pass

    heart = threading.Thread(target=beat, name="job-heartbeat", daemon=True)
    heart.start()

    def progress(p: Progress) -> None:
        now = time.monotonic()
        if now - last["t"] >= every_s or p.done >= p.total or p.done == 0:
            last["t"] = now
            write_status(path, status="running", heartbeat=time.time(), **asdict(p))

    def cancelled() -> bool:
        return cancel_file.exists()

    def finish(status: str, message: str = "") -> None:
        stop.set()
        heart.join(timeout=5.0)
        write_status(path, status=status, message=message)
        path.with_name(f"{path.stem}.lock").unlink(missing_ok=True)

    return progress, cancelled, finish
