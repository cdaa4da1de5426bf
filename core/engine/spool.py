"""The write spool: how prediction jobs hand results to the store without holding its lock.

DuckDB lets one process write a database file, and a writer excludes readers in other processes.
So engines never write the store while they run: each finished *chunk* of a slide's tiles
(a fixed tile-index range) goes to a Parquet file here, written to a temporary name, flushed and
fsynced, renamed (atomic on POSIX) and the folder fsynced; when every chunk of a slide is present,
a ``run.json`` marker with the run record is put in place the same way. The store ingests complete
runs in one transaction each (:func:`core.engine.access.ingest_spool`), by whichever process next
holds the write lock for a moment: the CLI between slides, or the app.

Resuming after ``kill -9``: chunks on disk are kept, a half-written chunk is only a ``.tmp`` file
(ignored, and removed by the next holder of the run's lock), so a rerun computes the missing
chunks only and every tile lands exactly once; a run without its marker is never ingested, so no
partial slide is ever visible.

Run locks (several writers on one spool: a CLI job and an app job on overlapping slides, Ray
actors). Every run key has a lock file ``<spool>/<run_key>.lock`` taken with ``fcntl.flock``
(exclusive, non-blocking by default). Whoever changes a run's folder holds it:

- a writer, from planning the run (before it lists done chunks, removes stale ``.tmp`` files or,
  with ``force``, deletes the old chunks) until the run's marker is written or the job ends;
- the ingest, while it reads, stores and removes a complete run (or moves it to quarantine).

A second writer that finds the lock taken skips that slide (status ``busy``; the first writer
computes it and it reaches the store by the usual ingest) — it never deletes or rewrites another
writer's chunks; an ingest skips a locked run until the next ingest. The kernel drops a flock
when its holder dies (``kill -9`` included), so a crashed writer never leaves a run locked; a
forked child (a loader worker) closes its copies of the parent's lock descriptors at once, so a
run is free the moment the parent releases it.
The holder writes its pid and slide name into the lock file (for messages only). A lock file may
be unlinked by its holder (the ingest, after the run left the spool); whoever then gets a lock
checks that its file is still the one at the path (same inode) and retries otherwise, so an
unlinked lock file can never be held by two processes at once.

Quarantine: a complete run that cannot be ingested — a chunk or the marker unreadable, or the
store refusing the write (:data:`MAX_INGEST_ATTEMPTS` times; a failed write is rolled back and
retried by the next ingest) — is moved to ``<store>.quarantine/<run_key>-<time>/`` with a
``reason.json`` (run key, slide, reason, time), so the other runs go in and the pages keep
working. :meth:`Spool.quarantined` lists them; :meth:`Spool.restore` puts one back for another try.

Layout: ``<spool>/<run_key>/chunk1024-00000.parquet … run.json``, ``<spool>/<run_key>.lock``.
"""
from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
import threading
import time
import weakref
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from core.errors import SpoolCorruptError

log = logging.getLogger(__name__)

# Tiles per chunk: the unit of resumption. Part of every chunk's file name, so chunks written
# with another size are never mixed in (they are recomputed).
CHUNK_TILES = int(os.environ.get("TESSERA_CHUNK_TILES", "1024"))
OUTPUTS = ("expression", "embedding", "composition")
# store writes refused this many times (each rolled back) before a run is quarantined
MAX_INGEST_ATTEMPTS = 3
_MARKER = "run.json"
_FAILURES = "ingest-failures.json"
_REASON = "reason.json"


def spool_dir(store_path: str | Path) -> Path:
    """The spool that belongs to a store file (``store.duckdb`` → ``store.duckdb.spool``)."""
    return Path(str(store_path) + ".spool")


def quarantine_dir(spool_root: str | Path) -> Path:
    """The quarantine beside a spool (``store.duckdb.spool`` → ``store.duckdb.quarantine``)."""
    root = Path(spool_root)
    name = root.name[: -len(".spool")] if root.name.endswith(".spool") else root.name
    return root.with_name(name + ".quarantine")


def fsync_dir(folder: Path) -> None:
    """Make a rename in ``folder`` durable (best effort where directories cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: str | Path, write) -> None:
    """``write(tmp)`` writes the content to a temporary name beside ``path``; it is then flushed
    to disk (fsync), renamed over ``path`` (atomic on POSIX) and the folder is fsynced, so a
    reader sees the old file or the whole new one, also after a crash or a power cut."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{threading.get_ident()}.tmp")
    try:
        write(tmp)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def write_atomic(path: str | Path, data: str | bytes) -> None:
    """Write text or bytes to ``path`` atomically and durably (:func:`atomic_write`)."""
    raw = data.encode() if isinstance(data, str) else data
    atomic_write(path, lambda p: Path(p).write_bytes(raw))


_atomic_write = atomic_write  # the old private name


_HELD: "weakref.WeakSet[RunLock]" = weakref.WeakSet()   # this process's run locks


def _drop_inherited_locks() -> None:
    """In a forked child (e.g. a DataLoader worker): close the copies of the parent's lock
    descriptors, so a flock goes as soon as the parent releases it, not when the child exits."""
    for lock in list(_HELD):
        fd, lock._fd = lock._fd, None
        if fd is not None:
            try:
                os.close(fd)
            except OSError:
                pass
    _HELD.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_drop_inherited_locks)


class RunLock:
    """An exclusive ``flock`` on one run's lock file; release it (or use it as a context manager).
    A forked child does not keep it (see :func:`_drop_inherited_locks`)."""

    def __init__(self, path: Path, fd: int):
        self.path, self._fd = path, fd
        _HELD.add(self)

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self, *, unlink: bool = False) -> None:
        """Give the lock up; ``unlink`` also removes the lock file (only when the run has left the
        spool: a process waiting on the old file notices and retries on a new one)."""
        if self._fd is None:
            return
        if unlink:
            self.path.unlink(missing_ok=True)
        fd, self._fd = self._fd, None
        _HELD.discard(self)
        os.close(fd)  # closing the last descriptor drops the flock

    def __enter__(self) -> "RunLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def __del__(self):  # a lock object dropped on the floor must not keep the run locked
        try:
            self.release()
        except Exception:  # noqa: BLE001
            pass


class Spool:
    def __init__(self, root: str | Path):
        self.root = Path(root)

    def _run_dir(self, run_key: str) -> Path:
        return self.root / run_key

    @property
    def quarantine_root(self) -> Path:
        return quarantine_dir(self.root)

    # -- locks --------------------------------------------------------------------------------
    def lock_path(self, run_key: str) -> Path:
        return self.root / f"{run_key}.lock"

    def lock(self, run_key: str, *, wait_s: float = 0.0, slide: str | None = None) -> RunLock | None:
        """Take the run's exclusive lock (see the module docstring), waiting up to ``wait_s``
        seconds; ``None`` when another writer or ingest still holds it. ``slide`` (the slide's
        name) is noted in the lock file for messages and for the quarantine."""
        self.root.mkdir(parents=True, exist_ok=True)
        path = self.lock_path(run_key)
        deadline = time.monotonic() + wait_s
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                if time.monotonic() >= deadline:
                    return None
                time.sleep(0.05)
                continue
            try:
                same = os.fstat(fd).st_ino == os.stat(path).st_ino
            except FileNotFoundError:
                same = False
            if not same:  # the holder unlinked the file after we opened it: lock the new one
                os.close(fd)
                continue
            try:
                previous = json.loads(os.pread(fd, 65536, 0) or b"{}")
            except ValueError:
                previous = {}
            note = {"pid": os.getpid(), "since": time.time(),
                    "slide": slide if slide is not None else previous.get("slide", "")}
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(note).encode(), 0)
            return RunLock(path, fd)

    def lock_holder(self, run_key: str) -> dict:
        """What the lock file says about its (last) holder: pid, since, slide (may be stale)."""
        try:
            return json.loads(self.lock_path(run_key).read_text() or "{}")
        except (OSError, ValueError):
            return {}

    # -- writers (hold the run's lock) --------------------------------------------------------
    def done_chunks(self, run_key: str) -> set[int]:
        """Chunk numbers already written for ``run_key``; stale temporary files are removed, so
        call it holding the run's lock (another writer's ``.tmp`` may be in flight otherwise)."""
        folder = self._run_dir(run_key)
        if not folder.is_dir():
            return set()
        done = set()
        for path in folder.iterdir():
            if path.name.endswith(".tmp"):
                path.unlink(missing_ok=True)
            elif path.name.startswith(f"chunk{CHUNK_TILES}-") and path.suffix == ".parquet":
                done.add(int(path.stem.split("-")[1]))
        return done

    def write_chunk(self, run_key: str, chunk: int, tile_idx: np.ndarray, xy: np.ndarray, tissue: np.ndarray,
                    outputs: dict[str, np.ndarray]) -> None:
        """One chunk: tile indices, level-0 x/y, tissue fraction and the model outputs per tile."""
        folder = self._run_dir(run_key)
        folder.mkdir(parents=True, exist_ok=True)
        table = pa.table({
            "tile_idx": np.asarray(tile_idx, np.int32), "x": np.asarray(xy[:, 0], np.int32),
            "y": np.asarray(xy[:, 1], np.int32), "tissue": np.asarray(tissue, np.float32),
            **{name: _fixed(outputs[name]) for name in OUTPUTS},
            **({"nuclei": _fixed(outputs["nuclei"], np.int16)} if outputs.get("nuclei") is not None else {}),
            **({"joint": _fixed(outputs["joint"])} if outputs.get("joint") is not None else {}),
            **(_cell_columns(outputs) if outputs.get("cells") is not None else {}),
        })
        atomic_write(folder / _chunk_name(chunk), lambda p: pq.write_table(table, p))

    def finish(self, run_key: str, record: dict, n_chunks: int) -> None:
        """Mark the run complete (all ``n_chunks`` chunks must be present)."""
        missing = set(range(n_chunks)) - self.done_chunks(run_key)
        if missing:
            raise RuntimeError(f"run {run_key}: chunks {sorted(missing)[:5]} are missing")
        self._run_dir(run_key).mkdir(parents=True, exist_ok=True)
        write_atomic(self._run_dir(run_key) / _MARKER,
                     json.dumps({**record, "n_chunks": n_chunks, "chunk_tiles": CHUNK_TILES}))

    # -- readers ------------------------------------------------------------------------------
    def complete_runs(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.parent.name for p in self.root.glob(f"*/{_MARKER}") if not p.parent.name.startswith("."))

    def pending_runs(self) -> list[str]:
        """Runs with chunks but no marker (a job running, or interrupted and not yet resumed)."""
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir()
                      if p.is_dir() and not p.name.startswith(".") and not (p / _MARKER).exists())

    def read_run(self, run_key: str) -> tuple[dict, dict[str, np.ndarray]]:
        """The run record and its tiles' arrays, ordered by tile index. A damaged or incomplete
        run raises :class:`SpoolCorruptError`."""
        try:
            return self._read_run(run_key)
        except SpoolCorruptError:
            raise
        except Exception as exc:  # noqa: BLE001 - whatever pyarrow / json raise for a damaged file
            raise SpoolCorruptError(f"run {run_key} cannot be read from the spool: {type(exc).__name__}: {exc}") \
                from exc

    def _read_run(self, run_key: str) -> tuple[dict, dict[str, np.ndarray]]:
        folder = self._run_dir(run_key)
        record = json.loads((folder / _MARKER).read_text())
        if not isinstance(record, dict):
            raise SpoolCorruptError(f"run {run_key}: the marker is not a JSON object")
        size, n_chunks = record.pop("chunk_tiles"), record.pop("n_chunks")
        parts = [pq.read_table(folder / _chunk_name(i, size)) for i in range(n_chunks)]
        table = pa.concat_tables(parts) if parts else None
        if table is None or table.num_rows == 0:
            raise SpoolCorruptError(f"run {run_key} has no tiles in the spool")
        arrays = {name: table.column(name).to_numpy() for name in ("tile_idx", "x", "y", "tissue")}
        for name in OUTPUTS:
            col = table.column(name).combine_chunks()
            arrays[name] = np.asarray(col.flatten(), np.float32).reshape(len(col), -1)
        if "joint" in table.column_names:       # the joint-space embedding (models with a joint space)
            col = table.column("joint").combine_chunks()
            arrays["joint"] = np.asarray(col.flatten(), np.float32).reshape(len(col), -1)
        if "nuclei" in table.column_names:      # per-class nucleus counts (predict --nuclei)
            col = table.column("nuclei").combine_chunks()
            arrays["nuclei"] = np.asarray(col.flatten(), np.int16).reshape(len(col), -1)
        order = np.argsort(arrays["tile_idx"], kind="stable")
        if not np.array_equal(arrays["tile_idx"][order], np.arange(table.num_rows)):
            raise SpoolCorruptError(f"run {run_key}: the chunks' tile indices are not 0 … {table.num_rows - 1}")
        cells = _read_cells(table, record, order) if "cells" in table.column_names else {}
        return record, {**{k: v[order] for k, v in arrays.items()}, **cells}

    def slide_of(self, run_key: str) -> str:
        """The run's slide name, from its marker or else its lock file ('' when unknown)."""
        try:
            return str(json.loads((self._run_dir(run_key) / _MARKER).read_text()).get("slide_name", ""))
        except (OSError, ValueError, AttributeError):
            return str(self.lock_holder(run_key).get("slide", ""))

    def remove(self, run_key: str) -> None:
        """Take a stored run out of the spool atomically: the folder is first renamed to a hidden
        tombstone (one rename: a crash leaves either the whole run or none of it in the spool),
        then deleted; tombstones a crash left behind are deleted by the next removal."""
        run_dir = self._run_dir(run_key)
        if not run_dir.exists():
            return
        tomb = self.root / f".removing-{run_key}-{os.getpid()}"
        try:
            os.replace(run_dir, tomb)
        except OSError:
            shutil.rmtree(run_dir, ignore_errors=True)
            return
        shutil.rmtree(tomb, ignore_errors=True)
        for left in self.root.glob(".removing-*"):
            shutil.rmtree(left, ignore_errors=True)

    # -- failed ingests and the quarantine ------------------------------------------------------
    def record_failure(self, run_key: str, reason: str) -> int:
        """Count a failed store write of the run; returns the number of failed attempts so far."""
        path = self._run_dir(run_key) / _FAILURES
        try:
            attempts = int(json.loads(path.read_text()).get("attempts", 0))
        except (OSError, ValueError, AttributeError):
            attempts = 0
        attempts += 1
        if path.parent.is_dir():
            write_atomic(path, json.dumps({"attempts": attempts, "reason": reason, "time": time.time()}))
        return attempts

    def quarantine(self, run_key: str, reason: str, *, stage: str = "ingest") -> Path | None:
        """Move the run's folder out of the spool into the quarantine, with a ``reason.json``
        (run key, slide, reason, stage, time); returns its new folder. Hold the run's lock."""
        folder = self._run_dir(run_key)
        if not folder.is_dir():
            return None
        slide = self.slide_of(run_key)
        root = self.quarantine_root
        root.mkdir(parents=True, exist_ok=True)
        now = time.time()
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(now))
        dest, n = root / f"{run_key}-{stamp}", 1
        while dest.exists():
            n += 1
            dest = root / f"{run_key}-{stamp}-{n}"
        os.replace(folder, dest)
        fsync_dir(root)
        fsync_dir(self.root)
        write_atomic(dest / _REASON, json.dumps({"run_key": run_key, "slide": slide, "reason": reason,
                                                 "stage": stage, "time": now}))
        log.error("run %s (%s) quarantined in %s: %s", run_key, slide or "slide unknown", dest, reason)
        return dest

    def quarantined(self) -> list[dict]:
        """Quarantined runs, newest first: dicts with ``run_key``, ``slide``, ``reason``, ``stage``,
        ``time`` (seconds since the epoch) and ``path`` (the folder, for a look or :meth:`restore`)."""
        root = self.quarantine_root
        if not root.is_dir():
            return []
        out = []
        for folder in root.iterdir():
            if not folder.is_dir():
                continue
            try:
                info = json.loads((folder / _REASON).read_text())
            except (OSError, ValueError):
                info = {}
            if not isinstance(info, dict):
                info = {}
            out.append({"run_key": str(info.get("run_key") or folder.name.split("-")[0]),
                        "slide": str(info.get("slide", "")), "reason": str(info.get("reason", "unknown")),
                        "stage": str(info.get("stage", "")),
                        "time": float(info.get("time") or folder.stat().st_mtime), "path": str(folder)})
        return sorted(out, key=lambda q: -q["time"])

    def restore(self, path: str | Path) -> str:
        """Put a quarantined run (its folder, as :meth:`quarantined` lists it) back into the spool
        for another ingest; returns its run key. Refused while the spool has that run."""
        folder = Path(path)
        entry = next((q for q in self.quarantined() if Path(q["path"]) == folder), None)
        if entry is None:
            raise FileNotFoundError(f"{folder} is not in the quarantine {self.quarantine_root}")
        run_key = entry["run_key"]
        lock = self.lock(run_key, wait_s=5.0)
        if lock is None:
            raise RuntimeError(f"run {run_key} is locked by another process; try again")
        with lock:
            if self._run_dir(run_key).exists():
                raise FileExistsError(f"run {run_key} is in the spool already")
            (folder / _REASON).unlink(missing_ok=True)
            (folder / _FAILURES).unlink(missing_ok=True)
            os.replace(folder, self._run_dir(run_key))
            fsync_dir(self.root)
        return run_key


def _chunk_name(chunk: int, size: int = CHUNK_TILES) -> str:
    return f"chunk{size}-{chunk:05d}.parquet"


def _fixed(matrix: np.ndarray, dtype=np.float32) -> pa.FixedSizeListArray:
    matrix = np.ascontiguousarray(matrix, dtype=dtype)
    return pa.FixedSizeListArray.from_arrays(pa.array(matrix.ravel()), matrix.shape[1])


def _cell_columns(outputs: dict) -> dict:
    """A cells run's chunk columns: per tile, its cells' rows flattened (``cells``: record fields,
    then cell type and confidence) and the refinement's ``cell_w`` and ``cell_z`` per type."""
    rows = outputs["cells"]   # per tile: (n_i, CELL_FIELDS + 2) float32
    lengths = np.array([r.size for r in rows], np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    flat = np.concatenate([np.asarray(r, np.float32).ravel() for r in rows]) if len(rows) else np.zeros(0, np.float32)
    return {"cells": pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat, pa.float32())),
            "cell_w": _fixed(outputs["cell_w"]), "cell_z": _fixed(outputs["cell_z"])}


def _read_cells(table: pa.Table, record: dict, order: np.ndarray) -> dict:
    """Flat per-cell rows ``cells`` ``(M, width)`` with ``cell_tile`` (tile index of each), in
    tile order, and per-tile ``cell_w``, ``cell_z``."""
    width = len((record.get("cell_layout") or {}).get("fields") or [])
    if width <= 0:
        raise SpoolCorruptError("a cells run's marker lacks its cell_layout")
    col = table.column("cells").combine_chunks()
    lengths = np.diff(np.asarray(col.offsets))
    if (lengths % width).any():
        raise SpoolCorruptError(f"cell rows are not multiples of {width} values")
    flat = np.asarray(col.flatten(), np.float32)
    starts = np.concatenate([[0], np.cumsum(lengths)])
    tile_idx = np.asarray(table.column("tile_idx").to_numpy(), np.int32)
    per_tile = [flat[starts[i]:starts[i + 1]].reshape(-1, width) for i in order]
    counts = lengths[order] // width
    out = {"cells": np.concatenate(per_tile) if per_tile else np.zeros((0, width), np.float32),
           "cell_tile": np.repeat(tile_idx[order], counts).astype(np.int32)}
    for name in ("cell_w", "cell_z"):
        c = table.column(name).combine_chunks()
        out[name] = np.asarray(c.flatten(), np.float32).reshape(len(c), -1)[order]
    return out
