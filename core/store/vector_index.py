"""Nearest-neighbour index over tile embeddings, for the cross-modal "similar tiles" query.

Scores are inner products, so on unit-norm embeddings (what the model writes) they are cosines.
Two kinds behind one API:

- ``exact``: every vector in a numpy matrix, brute-force search in blocks. Used up to
  ``EXACT_MAX`` vectors (a single query over 200k x 64 floats is ~10 ms), needs no faiss.
- ``ivf``: a FAISS inverted file (``IVF<nlist>,Flat`` or ``SQ8``) with ``nlist ~ 4 sqrt(N)``
  spherical k-means cells trained on a sample; a query scans the ``nprobe`` nearest cells only.
  From ``HNSW_NLIST`` cells on, the cell lookup is an HNSW graph over the centroids instead of a
  flat scan (3x faster adds at 12k cells, faster queries; the k-means itself stays exact).
  ``nprobe`` is tuned at build time so that recall@k against exact search reaches a target
  (0.95 by default) on a sample of the indexed vectors; :meth:`VectorIndex.tune` redoes it.

Ids are caller-chosen int64 (e.g. ``run_id << 32 | tile_idx``); missing results (``k`` larger
than what the index can return) come back as id ``-1`` with score ``-inf``. faiss is imported
lazily, only when an IVF index is built or loaded.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Iterable

import numpy as np

EXACT_MAX = 200_000          # above this many vectors, "auto" builds an IVF index
TRAIN_PER_CELL = 40          # k-means sample: this many vectors per IVF cell (faiss warns below 39)
HNSW_NLIST = 4096            # "auto" coarse quantizer: flat below this many cells, HNSW32 from it
FORMAT_VERSION = 1
_BLOCK_SCORES = 1 << 26      # exact search: at most this many query x vector scores at once (256 MB)


def _faiss():
    try:
        import faiss
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("An IVF vector index needs faiss: pip install faiss-cpu") from exc
    return faiss


def default_nlist(n: int) -> int:
    """IVF cells for ``n`` vectors: ~4 sqrt(n), at least 1, never more than n / 39."""
    return int(max(1, min(round(4 * math.sqrt(max(n, 1))), n // 39 or 1)))


def plan(total: int, *, kind: str = "auto", exact_max: int = EXACT_MAX, expected_size: int | None = None,
         nlist: int | None = None) -> tuple[str, int, int]:
    """(kind, nlist, training-sample size) of an index for ``total`` vectors: what a caller that
    streams the vectors needs to know before reading any (0, 0 for the exact kind)."""
    if kind not in ("auto", "exact", "ivf"):
        raise ValueError(f"kind must be 'auto', 'exact' or 'ivf', not {kind!r}")
    size = max(int(total), expected_size or 0)
    if kind == "auto":
        kind = "ivf" if size > exact_max else "exact"
    if kind == "exact":
        return "exact", 0, 0
    nlist = int(nlist or default_nlist(size))
    return "ivf", nlist, min(int(total), TRAIN_PER_CELL * nlist)


class VectorIndex:
    """A k-nearest-neighbour index by inner product; build with :meth:`build`, or :meth:`load`."""

    def __init__(self, dim: int, *, kind: str = "exact", nlist: int = 0, codec: str = "flat",
                 quantizer: str = "auto", exact_max: int = EXACT_MAX):
        if kind not in ("exact", "ivf"):
            raise ValueError(f"kind must be 'exact' or 'ivf', not {kind!r}")
        if codec not in ("flat", "sq8"):
            raise ValueError(f"codec must be 'flat' or 'sq8', not {codec!r}")
        if quantizer not in ("auto", "flat", "hnsw"):
            raise ValueError(f"quantizer must be 'auto', 'flat' or 'hnsw', not {quantizer!r}")
        self.dim = int(dim)
        self.kind = kind
        self.codec = codec
        self.nlist = int(nlist)
        if quantizer == "auto":
            quantizer = "hnsw" if self.nlist >= HNSW_NLIST else "flat"
        self.quantizer = quantizer
        self.nprobe = 1
        self.recall: float | None = None      # measured recall@k of the tuned nprobe
        self.exact_max = exact_max
        self.build_seconds = 0.0
        self._vectors = np.zeros((0, self.dim), np.float32)   # exact kind only
        self._ids = np.zeros(0, np.int64)                      # exact kind only
        self._ivf = None                                       # faiss index, ivf kind only

    # -- building -------------------------------------------------------------------------------
    @classmethod
    def build(cls, embeddings: np.ndarray, ids: np.ndarray, *, kind: str = "auto", exact_max: int = EXACT_MAX,
              expected_size: int | None = None, nlist: int | None = None, codec: str = "flat",
              quantizer: str = "auto", target_recall: float = 0.95, k: int = 24, n_tune: int = 200, niter: int = 10,
              seed: int = 0) -> "VectorIndex":
        """An index holding ``embeddings`` [N, D] under ``ids`` [N].

        ``kind="auto"`` picks exact up to ``exact_max`` vectors (or ``expected_size``, when more
        are to be added later) and IVF above. For IVF the k-means cells are trained on a sample
        of ``embeddings``, and ``nprobe`` is tuned for ``target_recall`` at ``k``. Everything is
        in memory at once; :meth:`build_streamed` builds from batches instead.
        """
        x, ids = _check_vectors(embeddings, ids)
        kind, nlist, n_train = plan(len(x), kind=kind, exact_max=exact_max, expected_size=expected_size,
                                    nlist=nlist)
        rng = np.random.default_rng(seed)
        train = x if n_train >= len(x) else x[np.sort(rng.choice(len(x), size=n_train, replace=False))]
        rng = np.random.default_rng(seed)
        queries = x[rng.choice(len(x), size=min(n_tune, len(x)), replace=False)] if kind == "ivf" else None
        return cls.build_streamed([(x, ids)], train=train, queries=queries, total=len(x), kind=kind,
                                  exact_max=exact_max, nlist=nlist, codec=codec, quantizer=quantizer,
                                  target_recall=target_recall, k=k, niter=niter, seed=seed)

    @classmethod
    def build_streamed(cls, batches: Iterable[tuple[np.ndarray, np.ndarray]], *, train: np.ndarray | None,
                       total: int, queries: np.ndarray | None = None, kind: str = "auto",
                       exact_max: int = EXACT_MAX, expected_size: int | None = None, nlist: int | None = None,
                       codec: str = "flat", quantizer: str = "auto", target_recall: float = 0.95, k: int = 24,
                       n_tune: int = 200, niter: int = 10, seed: int = 0) -> "VectorIndex":
        """An index filled from ``batches`` of ``(embeddings, ids)``, consumed once, so that a
        cohort larger than memory can be indexed: only one batch (plus the index) is held at a time.

        ``total``: how many vectors the batches hold (it picks the kind and ``nlist`` as in
        :func:`plan`). For IVF, ``train`` is a sample of those vectors spread over the cohort
        (:func:`plan` says how many; more are subsampled) on which the cells are trained before
        the first batch is added, and ``queries`` (default: ``n_tune`` rows of ``train``) tune
        ``nprobe``: their exact top-``k`` is kept up to date batch by batch while adding, so the
        ground truth costs no second pass. The exact kind ignores ``train`` and ``queries``.
        """
        kind, nlist, n_train = plan(total, kind=kind, exact_max=exact_max, expected_size=expected_size,
                                    nlist=nlist)
        t0 = time.perf_counter()
        if kind == "exact":
            index = cls._filled_exact(batches, exact_max=exact_max)
        else:
            index = cls(_dim_of(train), kind="ivf", nlist=nlist, codec=codec, quantizer=quantizer,
                        exact_max=exact_max)
            index._train(_training_set(train, nlist, n_train, seed), niter=niter, seed=seed)
            if queries is None:
                rng = np.random.default_rng(seed)
                queries = train[rng.choice(len(train), size=min(n_tune, len(train)), replace=False)]
            truth = _RunningTopK(_check_queries(queries, index.dim), k)
            for batch in batches:
                x, ids = _check_vectors(*batch, dim=index.dim)
                index._ivf.add_with_ids(x, ids)      # = index.add, without checking the batch twice
                truth.update(x, ids)
                del batch, x, ids                # before the next batch is read, not after
            index.tune(truth.queries, k=k, target=target_recall, truth=truth.ids)
        index.build_seconds = time.perf_counter() - t0
        return index

    @classmethod
    def _filled_exact(cls, batches, *, exact_max: int) -> "VectorIndex":
        """An exact index of the batches, concatenated once at the end (a single float32 batch is
        kept as is, without a copy)."""
        parts = [_check_vectors(*batch) for batch in batches]
        if not parts:
            raise ValueError("no vectors to index: the batches were empty")
        dims = {x.shape[1] for x, _ in parts if len(x)} or {parts[0][0].shape[1]}
        if len(dims) > 1:
            raise ValueError(f"the batches hold vectors of different dimensions {sorted(dims)}")
        index = cls(dims.pop(), kind="exact", exact_max=exact_max)
        parts = [(x, ids) for x, ids in parts if len(x)] or parts[:1]
        if len(parts) == 1:
            index.add(*parts[0])
        else:
            index.add(np.concatenate([x for x, _ in parts]), np.concatenate([i for _, i in parts]))
        return index

    def _train(self, sample: np.ndarray, *, niter: int, seed: int) -> None:
        """Spherical k-means of ``sample`` (already drawn: at most TRAIN_PER_CELL per cell) into
        the coarse quantizer."""
        faiss = _faiss()
        coarse = f"IVF{self.nlist}" + ("_HNSW32" if self.quantizer == "hnsw" else "")
        factory = f"{coarse},{'Flat' if self.codec == 'flat' else 'SQ8'}"
        index = faiss.index_factory(self.dim, factory, faiss.METRIC_INNER_PRODUCT)
        ivf = faiss.extract_index_ivf(index)
        if self.quantizer == "hnsw":       # k-means on a flat index, then the centroids go into HNSW
            ivf.clustering_index = faiss.IndexFlatIP(self.dim)
        ivf.cp.niter = niter
        ivf.cp.seed = seed
        ivf.cp.spherical = True              # centroids on the unit sphere suit inner product
        ivf.cp.max_points_per_centroid = TRAIN_PER_CELL
        index.train(np.ascontiguousarray(sample, dtype=np.float32))
        self._ivf = index

    def add(self, embeddings: np.ndarray, ids: np.ndarray) -> None:
        """Add vectors; an ``auto``-sized exact index that grows past ``exact_max`` stays exact
        (rebuild with :meth:`build` and ``expected_size`` to switch to IVF)."""
        x, ids = _check_vectors(embeddings, ids, dim=self.dim)
        if self.kind == "exact":   # the first add keeps a reference to a float32 input (no copy)
            self._vectors = np.concatenate([self._vectors, x]) if len(self._vectors) else x
            self._ids = np.concatenate([self._ids, ids]) if len(self._ids) else ids
        else:
            self._ivf.add_with_ids(x, ids)

    def tune(self, queries: np.ndarray, *, k: int = 24, target: float = 0.95,
             truth: np.ndarray | None = None) -> tuple[int, float]:
        """Smallest power-of-two ``nprobe`` with mean recall@k >= ``target`` on ``queries``.

        ``truth`` [Q, k] are the exact neighbour ids; without it they are computed by scanning
        every cell (exact for a flat codec and quantizer; near-exact with SQ8 or HNSW, whose cell
        lookup is approximate). Returns (nprobe, recall).
        """
        if self.kind == "exact":
            self.recall = 1.0
            return 0, 1.0
        q = _check_queries(queries, self.dim)
        if truth is None:
            self._set_nprobe(self.nlist)
            truth = self._ivf.search(q, k)[1]
        nprobe, recall = 1, 0.0
        while True:
            self._set_nprobe(nprobe)
            recall = recall_at_k(self._ivf.search(q, k)[1], truth)
            if recall >= target or nprobe >= self.nlist:
                break
            nprobe = min(nprobe * 2, self.nlist)
        self.recall = recall
        return nprobe, recall

    def _set_nprobe(self, nprobe: int) -> None:
        self.nprobe = int(nprobe)
        _faiss().extract_index_ivf(self._ivf).nprobe = self.nprobe

    # -- querying -------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._ids) if self.kind == "exact" else int(self._ivf.ntotal)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores [Q, k] descending, ids [Q, k]); slots beyond what was found are (-inf, -1)."""
        q = _check_queries(queries, self.dim)
        if k < 1:
            raise ValueError(f"k must be at least 1, got {k}")
        if self.kind == "exact":
            return _exact_search(self._vectors, self._ids, q, k)
        kk = min(k, max(len(self), 1))
        scores, ids = self._ivf.search(q, kk)
        scores = scores.astype(np.float32, copy=False)
        scores[ids < 0] = -np.inf
        return _pad(scores, ids, k)

    # -- persistence ----------------------------------------------------------------------------
    def save(self, path: str | Path) -> None:
        """Write the index into the directory ``path`` (meta.json + vectors/ids or a faiss file)."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        meta = {"format": FORMAT_VERSION, "kind": self.kind, "dim": self.dim, "codec": self.codec,
                "quantizer": self.quantizer, "nlist": self.nlist, "nprobe": self.nprobe, "recall": self.recall,
                "size": len(self), "exact_max": self.exact_max}
        if self.kind == "exact":
            np.save(path / "vectors.npy", self._vectors)
            np.save(path / "ids.npy", self._ids)
        else:
            _faiss().write_index(self._ivf, str(path / "index.faiss"))
        (path / "meta.json").write_text(json.dumps(meta, indent=1))

    @classmethod
    def load(cls, path: str | Path, *, mmap: bool = False) -> "VectorIndex":
        path = Path(path)
        meta_file = path / "meta.json"
        if not meta_file.exists():
            raise FileNotFoundError(f"No vector index at {path} (meta.json missing)")
        meta = json.loads(meta_file.read_text())
        if meta.get("format") != FORMAT_VERSION:
            raise ValueError(f"{path}: index format {meta.get('format')}, this code reads {FORMAT_VERSION}")
        index = cls(meta["dim"], kind=meta["kind"], nlist=meta["nlist"], codec=meta["codec"],
                    quantizer=meta["quantizer"], exact_max=meta["exact_max"])
        index.recall = meta["recall"]
        if index.kind == "exact":
            mode = "r" if mmap else None
            index._vectors = np.load(path / "vectors.npy", mmap_mode=mode)
            index._ids = np.load(path / "ids.npy", mmap_mode=mode)
        else:
            faiss = _faiss()
            flags = faiss.IO_FLAG_MMAP if mmap else 0
            index._ivf = faiss.read_index(str(path / "index.faiss"), flags)
            index._set_nprobe(meta["nprobe"])
        return index


# -- helpers ---------------------------------------------------------------------------------------
def recall_at_k(found: np.ndarray, truth: np.ndarray) -> float:
    """Mean fraction of each row of ``truth`` (ignoring -1) that appears in the same row of ``found``."""
    hits, total = 0, 0
    for f, t in zip(found, truth):
        t = t[t >= 0]
        hits += len(np.intersect1d(f[f >= 0], t))
        total += len(t)
    return hits / total if total else 1.0


def _check_vectors(embeddings, ids, dim: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    x = np.asarray(embeddings)
    if x.ndim != 2:
        raise ValueError(f"embeddings must be a 2-D array [N, D], got shape {x.shape}")
    if dim is not None and x.shape[1] != dim:
        raise ValueError(f"embeddings have dimension {x.shape[1]}, the index holds {dim}-d vectors")
    ids = np.asarray(ids)
    if ids.shape != (len(x),):
        raise ValueError(f"ids must be a 1-D array of {len(x)} ids, got shape {ids.shape}")
    if len(ids) and not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"ids must be integers, got {ids.dtype}")
    x = np.ascontiguousarray(x, dtype=np.float32)
    if not np.isfinite(x).all():
        raise ValueError("embeddings contain NaN or infinite values")
    return x, np.ascontiguousarray(ids, dtype=np.int64)


def _dim_of(train) -> int:
    if train is None or np.ndim(train) != 2:
        raise ValueError("an IVF index needs a 2-D training sample [M, D] of the vectors it will hold")
    return int(np.shape(train)[1])


def _training_set(train: np.ndarray, nlist: int, n_train: int, seed: int) -> np.ndarray:
    """The k-means sample: ``train`` itself, or ``n_train`` of its rows when it holds more."""
    train = np.asarray(train, dtype=np.float32)
    if len(train) < nlist:
        raise ValueError(f"an IVF index with {nlist} cells needs at least {nlist} training vectors, "
                         f"got {len(train)}")
    if len(train) <= n_train:
        return train
    rng = np.random.default_rng(seed)
    return train[np.sort(rng.choice(len(train), size=n_train, replace=False))]


class _RunningTopK:
    """Exact top-``k`` ids of a few queries over vectors seen batch by batch: the ground truth of
    :meth:`VectorIndex.tune` without holding every vector (one batch + Q x 2k scores at a time)."""

    def __init__(self, queries: np.ndarray, k: int):
        self.queries, self.k = queries, k
        self.scores = np.full((len(queries), 0), -np.inf, np.float32)
        self.ids = np.zeros((len(queries), 0), np.int64)

    def update(self, x: np.ndarray, ids: np.ndarray) -> None:
        s, i = _exact_search(x, ids, self.queries, self.k)
        if self.ids.shape[1] == 0:
            self.scores, self.ids = s, i
            return
        s, i = np.concatenate([self.scores, s], axis=1), np.concatenate([self.ids, i], axis=1)
        order = np.argsort(-s, axis=1, kind="stable")[:, :self.k]
        self.scores, self.ids = np.take_along_axis(s, order, 1), np.take_along_axis(i, order, 1)


def _check_queries(queries, dim: int) -> np.ndarray:
    q = np.asarray(queries, dtype=np.float32)
    if q.ndim == 1:
        q = q[None, :]
    if q.ndim != 2 or q.shape[1] != dim:
        raise ValueError(f"queries have shape {np.shape(queries)}, the index holds {dim}-d vectors "
                         f"(expected [Q, {dim}])")
    return np.ascontiguousarray(q)


def _exact_search(x: np.ndarray, ids: np.ndarray, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Brute-force top-k by inner product, in blocks of rows so Q x block scores stay <= _BLOCK_SCORES."""
    n, nq = len(x), len(q)
    kk = min(k, n)
    if kk == 0:
        return _pad(np.zeros((nq, 0), np.float32), np.zeros((nq, 0), np.int64), k)
    block = max(1024, _BLOCK_SCORES // max(nq, 1))
    best_s = np.full((nq, 0), -np.inf, np.float32)
    best_i = np.zeros((nq, 0), np.int64)
    for start in range(0, n, block):
        s = q @ np.asarray(x[start:start + block]).T
        cand = _top(s, kk)
        best_s = np.concatenate([best_s, np.take_along_axis(s, cand, 1)], axis=1)
        best_i = np.concatenate([best_i, np.asarray(ids[start:start + block])[cand]], axis=1)
        keep = _top(best_s, kk)
        best_s, best_i = np.take_along_axis(best_s, keep, 1), np.take_along_axis(best_i, keep, 1)
    order = np.argsort(-best_s, axis=1, kind="stable")
    return _pad(np.take_along_axis(best_s, order, 1), np.take_along_axis(best_i, order, 1), k)


def _top(scores: np.ndarray, k: int) -> np.ndarray:
    """Column indices of the k largest scores per row (unordered)."""
    if scores.shape[1] <= k:
        return np.broadcast_to(np.arange(scores.shape[1]), scores.shape).copy()
    return np.argpartition(-scores, k - 1, axis=1)[:, :k]


def _pad(scores: np.ndarray, ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    if scores.shape[1] >= k:
        return scores, ids
    extra = k - scores.shape[1]
    return (np.pad(scores, ((0, 0), (0, extra)), constant_values=-np.inf),
            np.pad(ids, ((0, 0), (0, extra)), constant_values=-1))
