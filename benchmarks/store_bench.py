"""The store and the similar-tiles index at cohort scale, on a simulated cohort (no images).

``python -m benchmarks.store_bench [--slides 1000] [--tiles 10000] [--path DIR] [--reuse]``

1. Fill ``DIR/store.duckdb`` through the real :class:`core.store.db.Store` API (``register_model``
   + one ``write_run`` per slide, with its slide summary) with the real panel (the genes of
   ``models/weights/breast-her2st/card.json``): tiles on a grid inside a tissue blob, a 9-type
   composition and an expression made like the model makes it (composition x type profiles on a
   log1p scale, plus smooth spatial residuals and noise, clipped to 0-5), and a unit 64-d
   embedding driven by composition, spatial state and a per-slide batch effect.
2. Time, on a read-only Store, the dashboard's queries: heatmap (one gene, one slide), cohort
   top-24 for one gene over every run, the per-slide summary for a few genes over every run,
   and one slide's tile vectors. The slides are saved as a cohort (``BENCH-SIM``: one slide per
   patient, ER status, stage, OS) with a 64-d joint-space embedding per tile (``--no-joint``:
   none), so ``python -m benchmarks.retrieval`` can time the Cross-modal queries on this store.
3. Build the model's similar-tiles index as the product does (:func:`core.store.tile_index.refresh`,
   beside the store in ``DIR/store.duckdb.index/``), time the Cross-modal page's query
   (:func:`core.analysis.crossmodal.similar_tiles`, top-24) against exact brute force over every embedding,
   with recall@24.

   The build runs in a child process (as ``python -m core.cli index`` would: the store opened by
   path), so its peak RSS is its own, not this process's; ``--compare-old`` also builds the
   index the old way (every embedding in memory, then :meth:`VectorIndex.build`) in another
   child, and reports both builds' peak RSS and raw recall@24 side by side.

``--reuse`` keeps an existing store (resuming a partial fill) and index (``--rebuild``: rebuilds
it all the same). This process holds every
embedding for the exact reference (N x 64 x 4 bytes, plus DuckDB's ``--memory-limit``); the
streamed build holds the index, one batch of ``--batch-vectors`` and the training sample.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
CARD = ROOT / "models" / "weights" / "breast-her2st" / "card.json"
MODEL_ID, MODEL_VERSION = "bench-breast-her2st", "sim1"
EMB_DIM, N_LATENT, TILE_PX = 64, 6, 224
TARGETS_MS = {"heatmap": 20, "top-24": 300, "neighbours": 300}


# -- the simulated cohort ----------------------------------------------------------------------
@dataclass
class SlideData:
    xy: np.ndarray           # [n, 2] int level-0 px
    tissue: np.ndarray       # [n]
    expression: np.ndarray   # [n, G] float32, 0-5
    embedding: np.ndarray    # [n, 64] float32 unit rows
    composition: np.ndarray  # [n, T] float32 rows summing to 1
    joint: np.ndarray        # [n, 64] float32 unit rows: the joint image <-> expression space


class Cohort:
    """Deterministic synthetic slides: ``slide(i)`` is the same array for the same ``seed``."""

    def __init__(self, genes: list[str], cell_types: list[str], n_tiles: int, seed: int = 0):
        self.genes, self.cell_types, self.n_tiles, self.seed = genes, cell_types, n_tiles, seed
        g, t = len(genes), len(cell_types)
        rng = np.random.default_rng([seed, 0])
        base = rng.lognormal(-1.0, 1.2, size=g)                       # mean counts per gene
        boost = np.ones((t, g))
        for ti in range(t):                                           # ~25 markers per type
            markers = rng.choice(g, size=25, replace=False)
            boost[ti, markers] = rng.uniform(4, 25, size=25)
        self.profiles = base * boost * rng.lognormal(0, 0.3, size=(t, g))   # [T, G] counts
        self.comp_w = rng.normal(0, 1.2, size=(N_LATENT, t))
        self.resid_w = rng.normal(0, 0.25, size=(N_LATENT, g))
        self.type_emb = rng.normal(0, 1, size=(t, EMB_DIM)) / np.sqrt(EMB_DIM) * 2.0
        self.latent_emb = rng.normal(0, 1, size=(N_LATENT, EMB_DIM)) / np.sqrt(EMB_DIM) * 0.8
        self.joint_w = rng.normal(0, 1, size=(g, EMB_DIM)) / np.sqrt(g)   # expression -> joint space

    def run_key(self, i: int) -> str:
        """Random-looking 24-hex keys, like ``core.engine.predict.run_key_for``."""
        return hashlib.blake2b(f"bench|{self.seed}|{i}".encode(), digest_size=12).hexdigest()

    def slide(self, i: int) -> SlideData:
        rng = np.random.default_rng([self.seed, 1, i])
        n = self.n_tiles
        side = int(np.ceil(np.sqrt(n / 0.55)))
        gy, gx = np.divmod(np.arange(side * side), side)
        u = np.stack([gx, gy], axis=1) / side
        blob = -((u[:, 0] - 0.5) ** 2 / rng.uniform(0.08, 0.2) + (u[:, 1] - 0.5) ** 2 / rng.uniform(0.08, 0.2))
        blob += 0.35 * _waves(u, rng, n_fields=1, n_waves=5, lo=1, hi=4)[:, 0]
        keep = np.sort(np.argpartition(-blob, n - 1)[:n])            # exactly n tissue tiles, grid order
        u, b = u[keep], blob[keep]
        xy = (np.stack([gx[keep], gy[keep]], axis=1) * TILE_PX).astype(np.int32)
        tissue = (0.5 + 0.5 * (b - b.min()) / (np.ptp(b) + 1e-9)).astype(np.float32)

        latent = _waves(u, rng, n_fields=N_LATENT, n_waves=6, lo=2, hi=25)     # smooth spatial state
        logits = latent @ self.comp_w + rng.normal(0, 0.7, size=len(self.cell_types))
        comp = np.exp(logits - logits.max(axis=1, keepdims=True))
        comp /= comp.sum(axis=1, keepdims=True)

        depth = rng.lognormal(0, 0.2)
        mean = (comp * depth).astype(np.float32) @ self.profiles.astype(np.float32)
        resid = latent.astype(np.float32) @ (self.resid_w + rng.normal(0, 0.05, self.resid_w.shape)).astype(np.float32)
        expr = np.log1p(mean, out=mean) + resid
        expr += rng.standard_normal(expr.shape, dtype=np.float32) * np.float32(0.2)
        expr = np.clip(expr, 0, 5, out=expr)

        emb = comp @ self.type_emb + latent @ self.latent_emb + rng.normal(0, 0.25 / np.sqrt(EMB_DIM) * 4, EMB_DIM)
        emb += rng.normal(0, 0.35 / np.sqrt(EMB_DIM) * 4, size=emb.shape)
        emb /= np.linalg.norm(emb, axis=1, keepdims=True)
        # the joint space mixes image and expression, as a contrastive projection does
        joint = 0.5 * emb + (expr - expr.mean(axis=0)) @ self.joint_w.astype(np.float32)
        joint /= np.linalg.norm(joint, axis=1, keepdims=True)
        return SlideData(xy, tissue, expr.astype(np.float32), emb.astype(np.float32), comp.astype(np.float32),
                         joint.astype(np.float32))


def _waves(u: np.ndarray, rng, *, n_fields: int, n_waves: int, lo: float, hi: float) -> np.ndarray:
    """[n, n_fields] smooth random fields: sums of plane waves with 1/lo..1/hi-slide wavelengths."""
    freq = rng.uniform(lo, hi, size=(n_fields * n_waves, 1)) * _unit2(rng, n_fields * n_waves)
    phase = rng.uniform(0, 2 * np.pi, size=n_fields * n_waves)
    w = np.cos(2 * np.pi * u @ freq.T + phase)
    return w.reshape(len(u), n_fields, n_waves).sum(axis=2) * np.sqrt(2 / n_waves)


def _unit2(rng, n: int) -> np.ndarray:
    a = rng.uniform(0, 2 * np.pi, size=n)
    return np.stack([np.cos(a), np.sin(a)], axis=1)


# -- measuring -----------------------------------------------------------------------------------
def _rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def _hwm_gb() -> float:
    """Peak RSS of this process image (Linux ``VmHWM``): unlike ``ru_maxrss``, which a child
    started by fork + exec inherits from its parent, it counts only what this process touched."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return _rss_gb()


def _dir_bytes(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.exists() else 0


def _timed(fn, args_list: list, budget_s: float) -> tuple[list[float], list]:
    """Call fn(*args) for each args (after one untimed warm-up); stop early past budget_s."""
    fn(*args_list[0])
    ms, outs, t_start = [], [], time.perf_counter()
    for args in args_list:
        t = time.perf_counter()
        outs.append(fn(*args))
        ms.append((time.perf_counter() - t) * 1000)
        if time.perf_counter() - t_start > budget_s and len(ms) >= 5:
            break
    return ms, outs


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}  (peak RSS {_rss_gb():.1f} GB)", flush=True)


# -- the steps ---------------------------------------------------------------------------------------
def fill(store_path: Path, cohort: Cohort, n_slides: int, *, reuse: bool, memory_limit: str,
         joint: bool = True) -> dict:
    from core.analysis.spatial import slide_summary
    from core.store.db import RunRecord, Store

    card = json.loads(CARD.read_text())
    if store_path.exists() and not reuse:
        store_path.unlink()
        Path(str(store_path) + ".wal").unlink(missing_ok=True)
    t_open = time.perf_counter()
    with Store(store_path, memory_limit=memory_limit) as store:
        open_s = time.perf_counter() - t_open
        _log(f"store open for writing in {open_s:.1f} s (a v3 store is upgraded to v4 here)")
        model_key = store.register_model(MODEL_ID, MODEL_VERSION, cohort.genes, cohort.cell_types, card)
        todo = [i for i in range(n_slides) if not (reuse and store.find_run(cohort.run_key(i)))]
        gen_s = write_s = 0.0
        window: list[float] = []
        rates = []
        for done, i in enumerate(todo, 1):
            t0 = time.perf_counter()
            s = cohort.slide(i)
            t1 = time.perf_counter()
            record = RunRecord(run_key=cohort.run_key(i), slide_fp=f"sim{i:06d}", model_key=model_key,
                               tiling_key="sim", tiling={"tile_px": TILE_PX}, slide_name=f"SIM-{i:05d}.svs",
                               slide_path=f"/sim/SIM-{i:05d}.svs", tile_size=TILE_PX,
                               width=int(s.xy[:, 0].max()) + TILE_PX, height=int(s.xy[:, 1].max()) + TILE_PX,
                               mpp=0.5, device="sim", seconds=0.0)
            # the summary as the engine's ingest computes it, inside the timed write as before
            store.write_run(record, s.xy, s.tissue, s.expression, s.embedding, s.composition,
                            summary=slide_summary(s.expression, s.xy, TILE_PX, cohort.genes),
                            joint=s.joint if joint else None)
            t2 = time.perf_counter()
            gen_s += t1 - t0
            write_s += t2 - t1
            window.append(t2 - t1)
            if done % 50 == 0 or done == len(todo):
                rate = len(window) / sum(window)
                rates.append((i + 1, rate))
                _log(f"fill: {i + 1}/{n_slides} slides, write_run {rate:.2f} slides/s over the last {len(window)}")
                window = []
        save_bench_cohort(store, n_slides)
    return {"model_key": model_key, "filled": len(todo), "gen_s": gen_s, "write_s": write_s, "rates": rates,
            "open_s": open_s}


BENCH_COHORT = "BENCH-SIM"


def save_bench_cohort(store, n_slides: int, seed: int = 0) -> None:
    """The slides as a cohort (one slide per patient, a few clinical columns), so that the
    Cross-modal page's :func:`core.analysis.retrieval.retrieve` can be timed on this store
    (``python -m benchmarks.retrieval --bench-store``). Idempotent; rewritten on every fill."""
    import pandas as pd

    rng = np.random.default_rng([seed, 7])
    names = [f"SIM-{i:05d}" for i in range(n_slides)]
    slides = pd.DataFrame({"slide_name": [f"{n}.svs" for n in names],
                           "slide_path": [f"/sim/{n}.svs" for n in names],
                           "patient": names, "sample_type": "Primary Tumor", "slide_type": "DX",
                           "fingerprint": [f"sim{i:06d}" for i in range(n_slides)], "status": "ok",
                           "message": "", "selected": True, "mpp": 0.5, "mpp_source": "simulated"})
    clinical = pd.DataFrame({"patient": names,
                             "er_status": rng.choice(["Positive", "Negative"], n_slides, p=[0.75, 0.25]),
                             "stage": rng.choice(["Stage I", "Stage II", "Stage III", "Stage IV"], n_slides),
                             "os_time": rng.exponential(1500, n_slides).round(),
                             "os_event": rng.integers(0, 2, n_slides)})
    store.save_cohort(BENCH_COHORT, slides, clinical, {"kind": "simulated", "by": "benchmarks.store_bench"})


def query_bench(store_path: Path, cohort: Cohort, n_slides: int, reps: int, budget_s: float, seed: int) -> dict:
    from core.store.db import Store

    rng = np.random.default_rng(seed)
    run_keys = [cohort.run_key(i) for i in range(n_slides)]
    genes = cohort.genes
    res = {}
    with Store(store_path, read_only=True) as store:
        model_key = store.models()["model_key"].iloc[0]

        args = [(model_key, run_keys[rng.integers(n_slides)], genes[rng.integers(len(genes))]) for _ in range(reps)]
        ms, outs = _timed(store.heatmap, args, budget_s)
        assert all(len(o) == cohort.n_tiles for o in outs), "heatmap returned the wrong number of tiles"
        res["heatmap (1 gene, 1 slide)"] = ms

        args = [(model_key, genes[rng.integers(len(genes))], run_keys, 24) for _ in range(reps)]
        ms, outs = _timed(store.top_tiles, args, budget_s)
        assert all(len(o) == 24 and o["value"].is_monotonic_decreasing for o in outs)
        res[f"top-24 (1 gene, {n_slides} runs)"] = ms

        args = [(model_key, list(rng.choice(genes, 5, replace=False)), run_keys) for _ in range(reps)]
        ms, outs = _timed(store.slide_summary, args, budget_s)
        assert all(len(o) == 5 * n_slides for o in outs)
        res[f"slide_summary (5 genes, {n_slides} runs)"] = ms

        if hasattr(store, "fraction_above"):   # cohort threshold + per-slide fraction (newer stores)
            args = [(model_key, genes[rng.integers(len(genes))], run_keys) for _ in range(reps)]
            ms, outs = _timed(store.fraction_above, args, budget_s)
            assert all(len(o) == n_slides for o in outs)
            res[f"fraction_above (1 gene, {n_slides} runs)"] = ms

        args = [([run_keys[rng.integers(n_slides)]],) for _ in range(reps)]
        ms, _ = _timed(store.tile_vectors, args, budget_s)
        res["tile_vectors (1 slide)"] = ms
    return res


def _child_build(store_path: Path, how: str, *, codec: str, seed: int, exact_max: int, batch_vectors: int,
                 rebuild: bool) -> dict:
    """Build the index in a fresh process and return what it printed: result, seconds and its peak
    RSS (:func:`_hwm_gb` of a process that did nothing else; ``baseline_gb`` is that peak after
    the imports, before the build)."""
    cmd = [sys.executable, "-m", "benchmarks.store_bench", "--build-child", how, "--path", str(store_path.parent),
           "--codec", codec, "--seed", str(seed), "--exact-max", str(exact_max),
           "--batch-vectors", str(batch_vectors)] + (["--rebuild"] if rebuild else [])
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"index build ({how}) failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def build_child(args) -> None:
    """``--build-child new|old``: one index build, then a JSON line on stdout. ``new`` is the
    product's :func:`core.store.tile_index.refresh` (streamed); ``old`` reads every embedding at
    once and calls :meth:`VectorIndex.build`, as the product did before, saving into ``DIR/old-index``."""
    from core.store.db import Store
    from core.store.tile_index import refresh
    from core.store.vector_index import VectorIndex

    store_path = args.path / "store.duckdb"
    baseline = _hwm_gb()
    t = time.perf_counter()
    kw = dict(codec=args.codec, seed=args.seed, exact_max=args.exact_max)
    if args.build_child == "new":
        with Store(store_path, read_only=True) as store:
            model_key = store.models()["model_key"].iloc[0]
        result = refresh(store_path, model_key, min_vectors=args.exact_max, rebuild_stale=-1.0 if args.rebuild else 0.25,
                         batch_vectors=args.batch_vectors, **kw)[model_key]
    else:
        with Store(store_path, read_only=True) as store:
            model_key = store.models()["model_key"].iloc[0]
            ids, emb = store.embeddings(list(store.model_runs(model_key)["run_id"]))
        index = VectorIndex.build(emb, ids, **kw)
        index.save(args.path / "old-index")
        result = f"built {len(index)} vectors"
    print(json.dumps({"result": result, "seconds": time.perf_counter() - t, "peak_rss_gb": _hwm_gb(),
                      "baseline_gb": baseline}), flush=True)


def _raw_recall(index, emb: np.ndarray, ids: np.ndarray, rows: np.ndarray, truth: np.ndarray) -> float:
    """recall@24 of ``index.search`` itself (no cohort filter), the query tile left out."""
    from core.store.vector_index import recall_at_k

    found = index.search(emb[rows], 25)[1]
    found = np.stack([f[f != ids[r]][:24] for f, r in zip(found, rows)])
    return recall_at_k(found, truth)


def index_bench(store_path: Path, cohort: Cohort, n_slides: int, *, reuse: bool, reps: int, budget_s: float,
                seed: int, codec: str, exact_max: int, batch_vectors: int, compare_old: bool,
                rebuild: bool = False) -> dict:
    """Build (or bring up to date) the model's similar-tiles index the way the product does
    (:func:`core.store.tile_index.refresh`), time the page's query end to end
    (:func:`core.analysis.crossmodal.similar_tiles`: run ids, query vector, index search, cohort filter,
    tile lookup) against exact numpy search over every embedding, and measure recall@24."""
    from core.analysis.crossmodal import similar_tiles
    from core.store.db import Store
    from core.store.tile_index import index_root, load, refresh
    from core.store.vector_index import VectorIndex, recall_at_k

    out: dict = {"batch_vectors": batch_vectors}
    kw = dict(codec=codec, seed=seed, exact_max=exact_max, batch_vectors=batch_vectors)
    new = _child_build(store_path, "new", rebuild=rebuild or not reuse, **kw)
    out.update(refresh=new["result"], refresh_s=new["seconds"], build_rss_gb=new["peak_rss_gb"],
               baseline_rss_gb=new["baseline_gb"])
    _log(f"index refresh (child process): {out['refresh']} ({out['refresh_s']:.0f} s, peak RSS "
         f"{new['peak_rss_gb']:.2f} GB, {new['baseline_gb']:.2f} GB of it after the imports)")
    if compare_old:
        old = _child_build(store_path, "old", rebuild=True, **kw)
        out.update(old_s=old["seconds"], old_rss_gb=old["peak_rss_gb"])
        _log(f"old in-memory build (child process): {old['result']} ({old['seconds']:.0f} s, peak RSS "
             f"{old['peak_rss_gb']:.2f} GB)")
    with Store(store_path, read_only=True) as store:
        model_key = store.models()["model_key"].iloc[0]
        table = store.model_info(model_key).pred_table
        runs = store.model_runs(model_key)
        t = time.perf_counter()
        ids, emb = store.embeddings(list(runs["run_id"]))
        out["export_s"] = time.perf_counter() - t
        _log(f"exported {len(ids):,} embeddings in {out['export_s']:.0f} s")
        loaded = load(store_path, table)
        ivf = loaded[0] if loaded else None
        if ivf is not None:
            out.update(kind=ivf.kind, nlist=ivf.nlist, nprobe=ivf.nprobe, codec=ivf.codec, quantizer=ivf.quantizer,
                       index_bytes=_dir_bytes(index_root(store_path) / table))
        else:
            out.update(kind="exact (no index file below the threshold)", nlist=0, nprobe=0, codec="-",
                       quantizer="-", index_bytes=0)
        exact = VectorIndex(EMB_DIM, kind="exact")
        exact.add(emb, ids)

        rng = np.random.default_rng(seed + 1)
        rows = rng.choice(len(ids), size=max(reps, 200), replace=False)
        run_keys = list(runs["run_key"])
        key_of = dict(zip(runs["run_id"], runs["run_key"]))
        calls = [(store, model_key, run_keys, key_of[int(ids[r] >> 32)], int(ids[r] & 0xFFFFFFFF), 24)
                 for r in rows[:reps]]
        ms, outs = _timed(lambda *a: similar_tiles(*a[:5], k=a[5]), calls, budget_s)
        assert all(len(o) == 24 for o in outs), "similar_tiles returned fewer than 24 tiles"
        out["query_ms"], out["method"] = ms, outs[0].attrs.get("method")
        out["exact_ms"], _ = _timed(exact.search, [(emb[r:r + 1], 25) for r in rows[:reps]], budget_s)

        # recall@24 of the page's query on 200 tiles, the query tile itself left out of both lists
        truth = exact.search(emb[rows], 25)[1]
        truth = np.stack([t[t != ids[r]][:24] for t, r in zip(truth, rows)])
        found = []
        for r in rows:
            got = similar_tiles(store, model_key, run_keys, key_of[int(ids[r] >> 32)], int(ids[r] & 0xFFFFFFFF), k=24)
            found.append((got["run_id"].to_numpy(np.int64) << 32) | got["tile_idx"].to_numpy(np.int64))
        out["recall"] = recall_at_k(np.stack(found), truth)
        if ivf is not None:
            out["raw_recall"] = _raw_recall(ivf, emb, ids, rows, truth)
        if compare_old:
            old_index = VectorIndex.load(store_path.parent / "old-index", mmap=True)
            out.update(old_raw_recall=_raw_recall(old_index, emb, ids, rows, truth), old_nprobe=old_index.nprobe)
        sims = exact.search(emb[rows[:20]], 25)[0]
        out["sim_top24_mean"] = float(sims[:, 1:].mean())
        out["sim_random_mean"] = float(np.mean(emb[rows[:20]] @ emb[rng.choice(len(emb), 2000)].T))
    return out


# -- the report ----------------------------------------------------------------------------------------
def _pct(ms: list[float], p: float) -> float:
    return float(np.percentile(ms, p))


def report(args, n_genes: int, fill_res: dict | None, queries: dict, idx: dict | None,
           store_bytes: int) -> str:
    n_tiles_total = args.slides * args.tiles
    lines = [f"store_bench: {args.slides} slides x {args.tiles} tiles = {n_tiles_total:,} tiles, "
             f"{n_genes} genes, {EMB_DIM}-d embeddings; store {args.path / 'store.duckdb'}"]
    if fill_res and fill_res["filled"]:
        f = fill_res
        first, last = f["rates"][0][1], f["rates"][-1][1]
        lines.append(f"fill: {f['filled']} slides in {f['gen_s'] + f['write_s']:.0f} s "
                     f"(write_run {f['write_s']:.0f} s = {f['filled'] / f['write_s']:.2f} slides/s; "
                     f"synthesis {f['gen_s']:.0f} s); write_run rate first window {first:.2f}/s, last {last:.2f}/s")
    else:
        lines.append("fill: reused the existing store")
    lines.append(f"store size on disk: {store_bytes / 2**30:.2f} GiB ({store_bytes / n_tiles_total:.0f} B/tile)")
    if fill_res and fill_res.get("open_s") is not None:
        lines.append(f"opening the store for writing (incl. any schema upgrade): {fill_res['open_s']:.1f} s")
    if idx:
        lines.append(f"embedding export via Store.embeddings: {idx['export_s']:.0f} s")
        lines.append(f"index (core.store.tile_index.refresh): {idx['refresh']} in {idx['refresh_s']:.0f} s; {idx['kind']} "
                     f"codec={idx['codec']} quantizer={idx['quantizer']} nlist={idx['nlist']} nprobe={idx['nprobe']}; "
                     f"size {idx['index_bytes'] / 2**20:.0f} MiB; similar_tiles searched by {idx['method']}; "
                     f"recall@24 vs exact {idx['recall']:.3f} "
                     f"(cos: top-24 {idx['sim_top24_mean']:.2f}, random pair {idx['sim_random_mean']:.2f})")
        raw = f", raw index recall@24 {idx['raw_recall']:.3f}" if "raw_recall" in idx else ""
        lines.append(f"index build, streamed in batches of {idx['batch_vectors']:,} vectors: peak RSS "
                     f"{idx['build_rss_gb']:.2f} GB ({idx['baseline_rss_gb']:.2f} GB after the imports), "
                     f"{idx['refresh_s']:.0f} s{raw}")
        if "old_rss_gb" in idx:
            lines.append(f"index build, old (every embedding in memory): peak RSS {idx['old_rss_gb']:.2f} GB, "
                         f"{idx['old_s']:.0f} s, nprobe {idx['old_nprobe']}, raw index recall@24 "
                         f"{idx['old_raw_recall']:.3f}")
    lines.append("")
    lines.append(f"{'query':44s} {'n':>4s} {'p50 ms':>9s} {'p95 ms':>9s} {'target':>8s}")
    rows = list(queries.items())
    if idx:
        rows += [(f"neighbours top-24, similar_tiles ({n_tiles_total:,})", idx["query_ms"]),
                 (f"neighbours top-24, exact numpy ({n_tiles_total:,})", idx["exact_ms"])]
    for name, ms in rows:
        target = next((v for k, v in TARGETS_MS.items() if name.startswith(k)), None)
        if name.startswith("neighbours") and "exact" in name:
            target = TARGETS_MS["neighbours"]
        p50 = _pct(ms, 50)
        mark = "" if target is None else (f"{target:>5d} {'ok' if p50 <= target else 'MISS'}")
        lines.append(f"{name:44s} {len(ms):4d} {p50:9.1f} {_pct(ms, 95):9.1f} {mark:>8s}")
    lines.append(f"\npeak RSS of this process {_rss_gb():.1f} GB")
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--slides", type=int, default=1000)
    ap.add_argument("--tiles", type=int, default=10_000, help="tiles per slide")
    ap.add_argument("--path", type=Path, default=Path("/tmp/tessera-bench"), help="directory for store + index")
    ap.add_argument("--reuse", action="store_true", help="keep (and complete) an existing store and index")
    ap.add_argument("--reps", type=int, default=50, help="timed repetitions per query")
    ap.add_argument("--budget", type=float, default=120.0, help="seconds at most per query kind")
    ap.add_argument("--memory-limit", default="4GB", help="DuckDB memory_limit while filling")
    ap.add_argument("--codec", default="flat", choices=["flat", "sq8"], help="IVF codec")
    ap.add_argument("--skip-index", action="store_true", help="measure the store only")
    ap.add_argument("--exact-max", type=int, default=None, help="vectors up to which the index is exact")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch-vectors", type=int, default=None, help="vectors read at once by the index build")
    ap.add_argument("--compare-old", action="store_true", help="also build the old in-memory way (peak RSS ~N x 1.3 kB)")
    ap.add_argument("--no-joint", action="store_true", help="write no joint-space embeddings (nor their index)")
    ap.add_argument("--build-child", choices=["new", "old"], help=argparse.SUPPRESS)
    ap.add_argument("--rebuild", action="store_true", help="rebuild the index even with --reuse")
    args = ap.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", str(os.cpu_count()))
    from core.store.tile_index import BATCH_VECTORS
    from core.store.vector_index import EXACT_MAX

    args.exact_max = EXACT_MAX if args.exact_max is None else args.exact_max
    args.batch_vectors = BATCH_VECTORS if args.batch_vectors is None else args.batch_vectors
    if args.build_child:
        build_child(args)
        return

    card = json.loads(CARD.read_text())
    cohort = Cohort(list(card["genes"]), list(card["cell_types"]), args.tiles, seed=args.seed)
    args.path.mkdir(parents=True, exist_ok=True)
    store_path = args.path / "store.duckdb"

    _log(f"fill {store_path}")
    fill_res = fill(store_path, cohort, args.slides, reuse=args.reuse, memory_limit=args.memory_limit,
                    joint=not args.no_joint)
    store_bytes = _dir_bytes(store_path) + _dir_bytes(Path(str(store_path) + ".wal"))
    _log(f"store {store_bytes / 2**30:.2f} GiB; queries")
    queries = query_bench(store_path, cohort, args.slides, args.reps, args.budget, args.seed)
    idx = None
    if not args.skip_index:
        _log("similar-tiles index")
        idx = index_bench(store_path, cohort, args.slides, reuse=args.reuse, reps=args.reps,
                          budget_s=args.budget, seed=args.seed, codec=args.codec, exact_max=args.exact_max,
                          batch_vectors=args.batch_vectors, compare_old=args.compare_old,
                          rebuild=args.rebuild)
    print()
    print(report(args, len(cohort.genes), fill_res, queries, idx, store_bytes), flush=True)


if __name__ == "__main__":
    main()
