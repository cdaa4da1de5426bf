"""Similar tiles across a cohort: a vector index per model beside the store, kept up to date by
the processes that write predictions, with exact search for whatever it does not cover yet.

Files: ``<store>.index/<pred_table>/current`` names the live version directory ``v<ns>/``, which
holds a :class:`core.store.vector_index.VectorIndex` and ``runs.npy`` (the run ids it covers). A refresh
writes a new version and then swaps ``current`` atomically, so a reader always loads a whole index.
Index ids are ``run_id << 32 | tile_idx`` (:meth:`core.store.db.Store.embeddings`).

Policy:
- below ``INDEX_MIN`` tiles per model no index file is kept: exact search over the embeddings in
  DuckDB takes milliseconds at that size;
- :func:`refresh` (end of a prediction job, ``python -m core.cli index``) adds the vectors of new
  runs to the index, and rebuilds it when more than ``REBUILD_STALE`` of the runs it holds were
  replaced or removed;
- :func:`similar_tiles` searches the index for the runs it covers (results of runs outside the
  query's cohort, or no longer in the store, are filtered out) and searches the runs it does not
  cover exactly, then merges: a lagging index makes a query slower, not stale. Selections of at
  most ``INDEX_MIN`` tiles are searched exactly (as fast, and exact). The index is approximate:
  its ``nprobe`` is tuned for recall@24 ≥ 0.95 against exact search.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pandas as pd

from core.store.vector_index import EXACT_MAX, VectorIndex

log = logging.getLogger(__name__)
INDEX_MIN = EXACT_MAX       # tiles per model from which an index file is kept
REBUILD_STALE = 0.25        # rebuild when this fraction of the indexed runs is gone from the store
_LOADED: dict[tuple[str, str], tuple[VectorIndex, frozenset]] = {}


def index_root(store_path: str | Path) -> Path:
    store_path = Path(store_path)
    return store_path.with_name(store_path.name + ".index")


def _model_dir(store_path, pred_table: str) -> Path:
    return index_root(store_path) / pred_table


@contextlib.contextmanager
def _lock(folder: Path):
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def load(store_path, pred_table: str, *, mmap: bool = True) -> tuple[VectorIndex, frozenset] | None:
    """The live index of a model and the run ids it covers, or None (cached per version). A
    version swapped away between reading ``current`` and opening it is retried once."""
    folder = _model_dir(store_path, pred_table)
    for attempt in range(2):
        try:
            version = (folder / "current").read_text().strip()
        except FileNotFoundError:
            return None
        key = (str(folder), version)
        if mmap and key in _LOADED:
            return _LOADED[key]
        try:
            index = VectorIndex.load(folder / version, mmap=mmap)
            runs = frozenset(int(r) for r in np.load(folder / version / "runs.npy"))
        except (OSError, RuntimeError, ValueError) as exc:   # swapped away under us, or an old format
            if attempt == 0:
                continue
            log.warning("vector index %s/%s unreadable (%s): exact search instead", folder, version, exc)
            return None
        if mmap:
            _LOADED.clear()                              # one model's index in memory at a time
            _LOADED[key] = (index, runs)
        return index, runs
    return None


def refresh(store, model_key: str | None = None, *, min_vectors: int = INDEX_MIN, kind: str = "auto",
            rebuild_stale: float = REBUILD_STALE, **build_kw) -> dict[str, str]:
    """Bring the index of ``model_key`` (default: every model) up to date with the store.

    ``store``: an open :class:`core.store.db.Store` (used as is), or the store's path — then the
    store is opened read-only only while vectors are read, never while the index is trained, so
    the app and other jobs are not locked out for the minutes a large build takes.

    Returns per model what was done: ``none`` (too few tiles for an index), ``current``,
    ``added N runs`` or ``built N vectors``. It rebuilds when more than ``rebuild_stale`` of the
    indexed runs were replaced or removed (``< 0``: always), when an exact index outgrew
    ``exact_max``, or when an IVF index has grown ~4x past the size its cells were trained for.
    ``build_kw`` go to :meth:`VectorIndex.build`.
    """
    from core.store.db import Store

    def reading():
        return contextlib.nullcontext(store) if isinstance(store, Store) else Store(store, read_only=True, wait_s=30.0)

    store_path = store.path if isinstance(store, Store) else Path(store)
    with reading() as st:
        models = [model_key] if model_key else list(st.models()["model_key"])
        plans = {key: (st.model_info(key).pred_table, st.model_runs(key)) for key in models}
    done = {}
    for key, (table, runs) in plans.items():
        folder = _model_dir(store_path, table)
        if int(runs["n_tiles"].sum()) < min_vectors:
            if folder.exists():
                shutil.rmtree(folder, ignore_errors=True)
            done[key] = "none"
            continue
        with _lock(folder):
            done[key] = _refresh_one(reading, store_path, folder, table, runs, kind, rebuild_stale, build_kw)
        log.info("vector index of %s: %s", key, done[key])
    return done


def _covered(folder: Path) -> set[int] | None:
    """The run ids the live index holds (None: no index)."""
    try:
        version = (folder / "current").read_text().strip()
        return {int(r) for r in np.load(folder / version / "runs.npy")}
    except (FileNotFoundError, ValueError, OSError):
        return None


def _built_for(folder: Path) -> int:
    """How many vectors the live index's cells were trained on (0 if unknown)."""
    try:
        version = (folder / "current").read_text().strip()
        return int(json.loads((folder / version / "build.json").read_text())["built_for"])
    except (FileNotFoundError, ValueError, KeyError):
        return 0


def _outgrown(index: VectorIndex, total: int, kind: str, exact_max: int, built_for: int) -> bool:
    if index.kind == "exact":
        return kind != "exact" and total > exact_max
    return total > 4 * built_for                         # cells trained for < 1/4 of today's vectors


def _refresh_one(reading, store_path: Path, folder: Path, table: str, runs: pd.DataFrame, kind: str,
                 rebuild_stale: float, build_kw: dict) -> str:
    live = {int(r) for r in runs["run_id"]}
    total = int(runs["n_tiles"].sum())
    covered = _covered(folder)
    if covered is not None and covered == live and rebuild_stale >= 0:
        return "current"                             # nothing to do: do not even load the index
    current = load(store_path, table, mmap=False) if covered is not None else None
    if current is not None:
        index, covered = current
        stale = len(covered - live) / max(len(covered), 1)
        new = sorted(live - covered)
        built_for = _built_for(folder)
        if stale <= rebuild_stale and not _outgrown(index, total, kind, build_kw.get("exact_max", EXACT_MAX),
                                                    built_for):
            if not new:
                return "current"
            with reading() as st:
                ids, emb = st.embeddings(new)
            index.add(emb, ids)
            _publish(folder, index, (covered & live) | set(new), built_for)
            return f"added {len(new)} runs"
    t0 = time.perf_counter()
    with reading() as st:
        ids, emb = st.embeddings(sorted(live))
    index = VectorIndex.build(emb, ids, kind=kind, **build_kw)
    _publish(folder, index, live, len(ids))
    return f"built {len(ids)} vectors in {time.perf_counter() - t0:.1f} s"


def _publish(folder: Path, index: VectorIndex, runs: set[int], built_for: int) -> None:
    """Write a new version, point ``current`` at it, and delete versions older than the previous
    one (a reader that read ``current`` just before the swap can still open the previous one)."""
    version = f"v{time.time_ns()}"
    target = folder / version
    index.save(target)
    np.save(target / "runs.npy", np.array(sorted(runs), dtype=np.int64))
    (target / "build.json").write_text(json.dumps({"built_for": int(built_for), "size": len(index)}))
    try:
        previous = (folder / "current").read_text().strip()
    except FileNotFoundError:
        previous = None
    pointer = folder / "current.tmp"
    pointer.write_text(version)
    os.replace(pointer, folder / "current")
    for old in folder.glob("v*"):
        if old.name not in (version, previous):
            shutil.rmtree(old, ignore_errors=True)


def similar_tiles(store, model_key: str, run_keys: list[str], run_key: str, tile_idx: int, *,
                  k: int = 12) -> pd.DataFrame:
    """The ``k`` tiles of ``run_keys`` whose embeddings are closest (cosine) to the query tile,
    itself excluded. Columns run_key, run_id, tile_idx, x, y, tile_size, slide_name, slide_path,
    similarity; ``attrs["method"]`` says how it was searched (index / exact / both)."""
    run_ids = store.run_ids(run_keys)
    if run_key not in run_ids:
        raise KeyError(f"tile {tile_idx} of run {run_key} is not among the searched runs")
    query = store.tile_embedding(run_key, tile_idx)
    return nearest(store, model_key, run_ids, query, k=k, exclude=(run_ids[run_key] << 32) | int(tile_idx))


def nearest(store, model_key: str, run_ids: dict[str, int] | list[str], query: np.ndarray, *, k: int = 12,
            exclude: int | None = None) -> pd.DataFrame:
    """The ``k`` tiles of the given runs (``run_key → run_id`` map, or run keys) closest to the
    embedding ``query`` (e.g. of an uploaded patch); ``exclude``: an id left out of the results.

    The index serves the runs it covers when they hold more than ``INDEX_MIN`` tiles; a smaller
    selection (or one the index could not fill, e.g. a few slides among thousands) is searched
    exactly, like runs the index does not cover yet."""
    if not isinstance(run_ids, dict):
        run_ids = store.run_ids(run_ids)
    query = np.asarray(query, dtype=np.float32).ravel()
    cohort = set(run_ids.values())
    loaded = load(store.path, store.model_info(model_key).pred_table)
    covered = cohort & loaded[1] if loaded else set()
    if covered:
        sizes = store.model_runs(model_key).set_index("run_id")["n_tiles"]
        if int(sizes.reindex(sorted(covered)).fillna(0).sum()) <= INDEX_MIN:
            covered = set()
    scores, ids, methods = [], [], []
    if covered:
        s, i = _search_index(loaded[0], query, covered, len(loaded[1]), k + 1)
        if len(i) >= min(k + 1, len(loaded[0])):
            scores.append(s), ids.append(i), methods.append("index")
        else:                                    # the probed cells held too few of these runs
            covered = set()
    rest = sorted(cohort - covered)
    if rest:
        rest_ids, emb = store.embeddings(rest)
        if len(rest_ids):
            scores.append(emb @ query), ids.append(rest_ids), methods.append("exact")
    score = np.concatenate(scores) if scores else np.zeros(0, np.float32)
    ident = np.concatenate(ids) if ids else np.zeros(0, np.int64)
    if exclude is not None:
        keep = ident != exclude
        score, ident = score[keep], ident[keep]
    order = np.argsort(-score, kind="stable")[:k]
    out = store.tiles_by_id(ident[order])
    by_id = dict(zip(ident[order].tolist(), score[order].tolist()))
    out_ids = (out["run_id"].to_numpy(np.int64) << 32) | out["tile_idx"].to_numpy(np.int64)
    out["similarity"] = np.array([by_id[i] for i in out_ids.tolist()], dtype=np.float32)
    out.attrs["method"] = "+".join(methods) or "none"
    return out


def _search_index(index: VectorIndex, query: np.ndarray, covered: set[int], n_runs: int,
                  k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top ``k`` of the index restricted to the runs ``covered``: ask for more neighbours than
    ``k`` in proportion to the share of the index those runs hold, until ``k`` pass the filter."""
    total = len(index)
    want = min(total, int(np.ceil(k * max(n_runs, 1) / max(len(covered), 1) * 1.5)))
    allowed = np.array(sorted(covered), dtype=np.int64)
    while True:
        s, i = index.search(query[None, :], want)
        s, i = s[0], i[0]
        ok = (i >= 0) & np.isin(i >> 32, allowed)
        exhausted = (i >= 0).sum() < want        # IVF: the probed cells hold no more vectors
        if ok.sum() >= k or want >= total or exhausted:
            return s[ok], i[ok]
        want = min(total, want * 4)
