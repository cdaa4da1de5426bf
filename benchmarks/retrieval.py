"""Retrieval quality and speed, in one table: ``python -m benchmarks.retrieval``.

1. **Demo world** (truth known; :mod:`core.training.retrieval_eval`), through the page's and the
   CLI's function :func:`core.analysis.retrieval.retrieve`:
   gene → tiles precision@24 (true top decile), image → image compartment agreement@12, and
   profile → tile top-1/5/50 with a tile's true profile as the query; each next to chance and,
   where it applies, the plain image embedding.
2. **HER2ST, leave one section out** (``--st``; :func:`core.training.joint.st_loso`): expression
   → spot retrieval top-1/5/50 within the held-out section, and spot → expression by retrieval
   (BLEEP-style k-NN in the joint space) next to k-NN on plain pooled features and the fusion model.
3. **Speed** (``--bench-store``, the simulated 1,000-slide store of ``benchmarks.store_bench``):
   median and 95th-percentile ms per query kind through ``retrieve``.

    python -m benchmarks.retrieval [--store data/demo/tessera.duckdb] [--demo-dir data/demo]
        [--st ../shared/data/her2st --reference …/xenium_breast_cells_counts.csv.gz --types …/xenium_breast_cells_types.csv]
        [--bench-store /tmp/tessera-bench/store.duckdb] [--json F]
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np


def demo_rows(store_path: Path, demo_dir: Path, n_queries: int) -> dict:
    from core.config import load_settings
    from core.engine.modelhub import load_model
    from core.store.db import Store
    from core.training import retrieval_eval as E

    model = load_model("demo-synthetic", load_settings(demo_dir=demo_dir).model_dirs)
    joint = model.module.joint
    with Store(store_path, read_only=True) as store:
        truth = E.demo_truth(store, "demo", model.key, demo_dir)
        out = {"n_tiles": int(len(truth.tiles)),
               "gene": {s: E.gene_precision(store, "demo", model.key, truth, space=s, joint=joint, k=24)
                        for s in ("predicted", "joint")},
               "image": {s: E.compartment_agreement(store, "demo", model.key, truth, space=s, n_queries=n_queries,
                                                    k=12) for s in ("image", "joint", "predicted")},
               "profile": {s: E.profile_retrieval(store, "demo", model.key, truth, space=s, joint=joint,
                                                  n_queries=n_queries) for s in ("joint", "predicted")}}
    return out


def speed_rows(store_path: Path, reps: int, seed: int = 0) -> dict:
    from core.analysis.retrieval import Query, retrieve
    from core.store.db import Store

    rng = np.random.default_rng(seed)
    out = {}
    with Store(store_path, read_only=True) as store:
        cohort = store.cohorts()[0]
        key = store.model_coverage(cohort)["model_key"].iloc[-1]
        genes = list(store.model_info(key).genes)
        runs = store.cohort_runs(cohort, key).dropna(subset=["run_key"])
        out["slides"], out["tiles"] = int(len(runs)), int(runs["n_tiles"].sum())
        queries = {"gene → tiles (predicted)": lambda: Query("gene", genes=[genes[rng.integers(len(genes))]]),
                   "profile → tiles (predicted, 10 genes)": lambda: Query(
                       "profile", profile={g: float(rng.normal(2, 1)) for g in rng.choice(genes, 10, replace=False)}),
                   "tile → tiles (image)": lambda: Query("tile", slide=str(runs["slide_name"].iloc[
                       rng.integers(len(runs))]), tile=0)}
        spaces = {"gene → tiles (predicted)": "predicted", "profile → tiles (predicted, 10 genes)": "predicted",
                  "tile → tiles (image)": "image"}
        if store.has_joint(list(runs["run_key"].iloc[:5])):
            queries["tile → tiles (joint)"] = queries["tile → tiles (image)"]
            spaces["tile → tiles (joint)"] = "joint"
        for name, make in queries.items():
            ms = []
            for _ in range(reps):
                t = time.perf_counter()
                retrieve(store, cohort, key, make(), space=spaces[name], k=24)
                ms.append((time.perf_counter() - t) * 1e3)
            out[name] = {"median_ms": float(np.median(ms)), "p95_ms": float(np.percentile(ms, 95)), "reps": reps}
    return out


def report(res: dict) -> str:
    lines = []
    if "demo" in res:
        d = res["demo"]
        lines += [f"## Demo world ({d['n_tiles']} tiles with cells; truth known)", "",
                  "| query | space | figure | value | chance |", "|---|---|---|---|---|"]
        for s, r in d["gene"].items():
            lines.append(f"| gene → tiles | {s} | precision@{r['k']} (true top decile) | {r['precision']:.3f} | "
                         f"{r['chance']:.3f} |")
        for s, r in d["image"].items():
            lines.append(f"| tile → tiles | {s} | compartment agreement@{r['k']} | {r['agreement']:.3f} | "
                         f"{r['chance']:.3f} |")
        for s, r in d["profile"].items():
            for k in (1, 5, 50):
                lines.append(f"| true profile → its tile | {s} | top-{k} | {r[f'top{k}']:.3f} | "
                             f"{r[f'random{k}']:.4f} |")
    if "her2st" in res:
        h = res["her2st"]
        lines += ["", f"## HER2ST, leave one section out ({len(h['sections'])} folds, {h['genes']} genes, "
                      f"{h['encoder']} at {h['mpp']} µm/px)", "",
                  "| section | spots | expr → spot top-1 | top-5 | top-50 | chance top-50 | "
                  + " | ".join(f"{m} PCC" for m in h["mean"]["mean_pcc"]) + " |",
                  "|---" * (6 + len(h["mean"]["mean_pcc"])) + "|"]
        for name, r in {**h["sections"], "mean": {**h["mean"], "n_spots": "—"}}.items():
            t = r["retrieval"]
            lines.append(f"| {name} | {r['n_spots']} | {t['top1']:.3f} | {t['top5']:.3f} | {t['top50']:.3f} | "
                         f"{t['random50']:.3f} | " + " | ".join(f"{v:.3f}" for v in r["mean_pcc"].values()) + " |")
    if "speed" in res:
        s = res["speed"]
        lines += ["", f"## Speed: {s['slides']} slides, {s['tiles']:,} tiles, through retrieve()", "",
                  "| query | median ms | p95 ms |", "|---|---|---|"]
        lines += [f"| {k} | {v['median_ms']:.0f} | {v['p95_ms']:.0f} |" for k, v in s.items() if isinstance(v, dict)]
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--store", type=Path, default=Path("data/demo/tessera.duckdb"))
    ap.add_argument("--demo-dir", type=Path, default=Path("data/demo"))
    ap.add_argument("--queries", type=int, default=100)
    ap.add_argument("--st", type=Path, default=None, help="ST sections for the leave-one-section-out rows")
    ap.add_argument("--reference", type=Path, default=None, help="single-cell reference (adds the fusion row)")
    ap.add_argument("--types", type=Path, default=None, help="cell types of a counts-CSV reference (cell id, type)")
    ap.add_argument("--bench-store", type=Path, default=Path("/tmp/tessera-bench/store.duckdb"))
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    res: dict = {}
    if args.store.exists():
        res["demo"] = demo_rows(args.store, args.demo_dir, args.queries)
    else:
        print(f"(no demo store at {args.store}: run `make demo` for the demo rows)")
    if args.st is not None:
        from core.training.joint import st_loso

        from core.errors import TesseraError

        try:
            res["her2st"] = st_loso(args.st, reference=args.reference, reference_types=args.types)
        except TesseraError as exc:
            raise SystemExit(f"benchmarks.retrieval: {exc}") from None
    if args.bench_store.exists():
        from core.store.db import Store

        with Store(args.bench_store, read_only=True) as store:
            has_cohort = bool(store.cohorts())
        if has_cohort:
            res["speed"] = speed_rows(args.bench_store, args.reps)
        else:
            print(f"({args.bench_store} holds no cohort: rebuild it with `python -m benchmarks.store_bench` "
                  "for the speed rows)")
    else:
        print(f"(no simulated store at {args.bench_store}: run `python -m benchmarks.store_bench` for the speed rows)")
    print(report(res))
    if args.json:
        from core.analysis.report import to_jsonable

        args.json.write_text(json.dumps(to_jsonable(res), indent=1))


if __name__ == "__main__":
    main()
