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

Memory: vectors are read from the store in batches of whole runs (``BATCH_VECTORS`` vectors, or
one larger run), never all at once. An IVF build reads a training sample first (whole runs drawn
at random with the build's seed, ``TRAIN_READ`` times the sample's size, thinned evenly), trains
the cells on it, then adds the batches one by one while keeping the exact top-k of the tuning
queries up to date; so a build holds the index, one batch and the sample, whatever the cohort size.
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
from typing import NamedTuple

import numpy as np
import pandas as pd

from core.errors import TesseraError
from core.store.vector_index import EXACT_MAX, VectorIndex, plan

log = logging.getLogger(__name__)
INDEX_MIN = EXACT_MAX       # tiles per model from which an index file is kept
REBUILD_STALE = 0.25        # rebuild when this fraction of the indexed runs is gone from the store
BATCH_VECTORS = 1_000_000   # vectors read from the store at once (~270 MB of 64-d float32 + ids)
TRAIN_READ = 4              # IVF training: read this many times the sample's size, from random runs
TUNE_QUERIES = 1000         # held-out tiles nprobe is tuned on (their exact top-k costs one pass)
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
            rebuild_stale: float = REBUILD_STALE, batch_vectors: int = BATCH_VECTORS,
            **build_kw) -> dict[str, str]:
    """Bring the index of ``model_key`` (default: every model) up to date with the store.

    ``store``: an open :class:`core.store.db.Store` (used as is), or the store's path — then the
    store is opened read-only only while vectors are read, never while the index is trained, so
    the app and other jobs are not locked out for the minutes a large build takes.

    Returns per model (and per ``"<model> (joint)"`` for a model whose runs hold joint-space
    embeddings, indexed apart) what was done: ``none`` (too few tiles for an index), ``current``,
    ``added N runs`` or ``built N vectors``. It rebuilds when more than ``rebuild_stale`` of the
    indexed runs were replaced or removed (``< 0``: always), when an exact index outgrew
    ``exact_max``, or when an IVF index has grown ~4x past the size its cells were trained for.
    ``batch_vectors``: at most this many vectors are read from the store at once (a larger run
    is read alone). ``build_kw`` go to :meth:`VectorIndex.build_streamed`.
    """
    from core.store.db import Store

    if batch_vectors < 1:
        raise TesseraError(f"batch_vectors must be at least 1, got {batch_vectors}")

    def reading():
        return contextlib.nullcontext(store) if isinstance(store, Store) else Store(store, read_only=True, wait_s=30.0)

    store_path = store.path if isinstance(store, Store) else Path(store)
    with reading() as st:
        models = [model_key] if model_key else list(st.models()["model_key"])
        plans = {}
        for key in models:
            runs = st.model_runs(key)
            plans[key] = (st.model_info(key).pred_table, runs, "image")
            if len(runs) and st.has_joint(list(runs["run_key"])):      # the joint space has its own index
                plans[f"{key} (joint)"] = (index_table(st.model_info(key).pred_table, "joint"), runs, "joint")
    done = {}
    plain = reading
    for key, (table, runs, space) in plans.items():
        reading = plain if space == "image" else _space_reading(plain, space)
        folder = _model_dir(store_path, table)
        if int(runs["n_tiles"].sum()) < min_vectors:
            if folder.exists():
                shutil.rmtree(folder, ignore_errors=True)
            done[key] = "none"
            continue
        with _lock(folder):
            done[key] = _refresh_one(reading, store_path, folder, table, runs, kind, rebuild_stale,
                                     batch_vectors, build_kw)
        log.info("vector index of %s: %s", key, done[key])
    return done


class _SpaceView:
    """A store whose ``embeddings`` are those of another space (the index code reads one kind)."""

    def __init__(self, store, space: str):
        self._store, self._space = store, space

    def embeddings(self, run_ids, space: str | None = None):
        return self._store.embeddings(run_ids, space=self._space)

    def __getattr__(self, name):
        return getattr(self._store, name)


def _space_reading(reading, space: str):
    @contextlib.contextmanager
    def read():
        with reading() as st:
            yield _SpaceView(st, space)
    return read


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
                 rebuild_stale: float, batch_vectors: int, build_kw: dict) -> str:
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
            for emb, ids in _stream(reading, _batches(runs[runs["run_id"].isin(new)], batch_vectors)):
                index.add(emb, ids)
                del emb, ids                         # before the next batch is read
            _publish(folder, index, (covered & live) | set(new), built_for)
            return f"added {len(new)} runs"
    t0 = time.perf_counter()
    index = build_index(reading, runs, kind=kind, batch_vectors=batch_vectors, **build_kw)
    _publish(folder, index, live, len(index))
    return f"built {len(index)} vectors in {time.perf_counter() - t0:.1f} s"


def build_index(reading, runs: pd.DataFrame, *, kind: str = "auto", batch_vectors: int = BATCH_VECTORS,
                **build_kw) -> VectorIndex:
    """A new index of the embeddings of ``runs`` (run_id, n_tiles), read batch by batch.

    ``reading()``: a context manager giving an open Store, entered once per batch, so a store
    opened by path is not held while the cells are trained. For IVF, the training sample and the
    tuning queries (``n_tune``, default ``TUNE_QUERIES``) are read first (:func:`_training_sample`),
    then every batch is added to the trained index.
    """
    seed = int(build_kw.get("seed", 0))
    total = int(runs["n_tiles"].sum())
    kind, nlist, n_train = plan(total, kind=kind, exact_max=build_kw.get("exact_max", EXACT_MAX),
                                expected_size=build_kw.get("expected_size"), nlist=build_kw.get("nlist"))
    train = queries = None
    if kind == "ivf":
        train, _, queries = _training_sample(reading, runs, n_train, batch_vectors, seed,
                                             n_queries=build_kw.pop("n_tune", TUNE_QUERIES))
        if len(train) < nlist:
            raise TesseraError(f"an IVF index with {nlist} cells needs at least {nlist} embeddings, the store "
                               f"holds {len(train)} for these {len(runs)} runs: build an exact one (kind='exact')")
        queries = queries if len(queries) else None          # every tile read went into training
    batches = _stream(reading, _batches(runs, batch_vectors))
    return VectorIndex.build_streamed(batches, train=train, queries=queries, total=total, kind=kind, **build_kw)


def _batches(runs: pd.DataFrame, limit: int) -> list[list[int]]:
    """Run ids in store order, grouped so that a group holds at most ``limit`` tiles (a run larger
    than ``limit`` forms a group alone: runs are read whole)."""
    groups: list[list[int]] = []
    size = 0
    for run_id, n in zip(runs["run_id"].tolist(), runs["n_tiles"].tolist()):
        if not groups or size + int(n) > limit:
            groups.append([])
            size = 0
        groups[-1].append(int(run_id))
        size += int(n)
    return [g for g in groups if g]


def _stream(reading, groups: list[list[int]]):
    """(embeddings, ids) per group of runs, read on demand: one group in memory at a time."""
    for group in groups:
        with reading() as st:
            ids, emb = st.embeddings(group)
        yield emb, ids
        del ids, emb                                 # drop this batch before the next one is read


class Sample(NamedTuple):
    """What an IVF build reads before adding anything: the k-means sample (and its ids), and
    held-out tuning queries (tiles of the same runs not trained on; empty when every tile read
    is needed for training)."""
    train: np.ndarray
    ids: np.ndarray
    queries: np.ndarray


def _training_sample(reading, runs: pd.DataFrame, n_train: int, limit: int, seed: int,
                     n_queries: int = TUNE_QUERIES) -> Sample:
    """About ``n_train`` embeddings spread over the cohort, for the k-means of an IVF index, and
    ``n_queries`` other tiles of the same runs to tune ``nprobe`` on (a query the cells were
    trained on sits closer to its centroid than a typical tile, so it would flatter the recall).

    Whole runs are drawn at random (fixed ``seed``) until they hold ``TRAIN_READ x n_train`` tiles,
    then the same random fraction of each is kept: many slides contribute (a slide's batch effect
    cannot shape the cells) while only a bounded share of the store is read."""
    rng = np.random.default_rng([seed, 1])
    order = rng.permutation(len(runs))
    sizes = runs["n_tiles"].to_numpy(np.int64)[order]
    n_runs = int(np.searchsorted(np.cumsum(sizes), TRAIN_READ * n_train) + 1)
    picked = runs.iloc[np.sort(order[:n_runs])]
    n_read = max(int(picked["n_tiles"].sum()), 1)
    keep = min(1.0, n_train / n_read)
    ask = min(1.0 - keep, 1.5 * n_queries / n_read)            # a margin, trimmed below
    train, ids, queries = [], [], []
    for emb, batch_ids in _stream(reading, _batches(picked, limit)):
        if len(emb):                                 # a run without embeddings comes back as [0, 0]
            u = rng.random(len(emb))
            train.append(np.ascontiguousarray(emb[u < keep], dtype=np.float32))
            ids.append(batch_ids[u < keep])
            queries.append(np.ascontiguousarray(emb[(u >= keep) & (u < keep + ask)], dtype=np.float32))
        del emb, batch_ids
    if not train:
        return Sample(np.zeros((0, 0), np.float32), np.zeros(0, np.int64), np.zeros((0, 0), np.float32))
    queries = np.concatenate(queries)
    if len(queries) > n_queries:
        queries = queries[np.sort(rng.choice(len(queries), size=n_queries, replace=False))]
    return Sample(np.concatenate(train), np.concatenate(ids), queries)


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


def index_table(pred_table: str, space: str = "image") -> str:
    """The index folder's name for a model's predictions table and a space (``image`` keeps the
    name indexes have always had; ``joint`` adds ``__joint``)."""
    if space not in ("image", "joint"):
        raise ValueError(f"space must be 'image' or 'joint', not {space!r}")
    return pred_table if space == "image" else f"{pred_table}__joint"


def nearest(store, model_key: str, run_ids: dict[str, int] | list[str], query: np.ndarray, *, k: int = 12,
            exclude: int | None = None, space: str = "image") -> pd.DataFrame:
    """The ``k`` tiles of the given runs (``run_key → run_id`` map, or run keys) closest to the
    embedding ``query`` (e.g. of an uploaded patch); ``exclude``: an id left out of the results.

    The index serves the runs it covers when they hold more than ``INDEX_MIN`` tiles; a smaller
    selection (or one the index could not fill, e.g. a few slides among thousands) is searched
    exactly, like runs the index does not cover yet. ``space``: ``image`` (the model's tile
    embeddings) or ``joint`` (the joint image ↔ expression space, its own index: :func:`index_table`)."""
    if not isinstance(run_ids, dict):
        run_ids = store.run_ids(run_ids)
    query = np.asarray(query, dtype=np.float32).ravel()
    cohort = set(run_ids.values())
    loaded = load(store.path, index_table(store.model_info(model_key).pred_table, space))
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
        rest_ids, emb = store.embeddings(rest, space=space)
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
