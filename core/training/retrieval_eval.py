"""Retrieval quality on the demo world, where every tile's truth is known.

Each figure goes through :func:`core.analysis.retrieval.retrieve` (the page's and the CLI's
function) and sits next to what chance gives:

- **gene → tiles, precision@k**: the share of the k returned tiles whose *true* expression of the
  gene is in the cohort's top decile (over all tiles with cells). Chance ≈ 0.10.
- **image → image, compartment agreement**: for a query tile, the share of the k returned tiles
  whose dominant true compartment (tumour: malignant, cycling and normal epithelium; immune: T,
  B/plasma, macrophages; stroma: fibroblasts, endothelium) is the query's. Chance = Σ_c p_c²,
  p_c the compartments' shares of tiles.
- **profile → tile, top-k accuracy**: the true profile of a tile (log1p CP10k over the panel;
  the demo model never saw the cohort's slides) as the query; the share of queries whose own
  tile is among the k returned. Chance = k / N tiles.

The truth per tile is :func:`core.synth.truth.tile_truth` on the tiles the store holds for each
slide (the world's cells, the patient's subtype profiles).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

COMPARTMENTS = {"tumour": ["malignant_epithelial", "cycling_malignant", "normal_epithelial"],
                "immune": ["t_cell", "b_plasma", "macrophage"], "stroma": ["fibroblast", "endothelial"]}
QUERY_GENES = ["CD8A", "MKI67", "ESR1", "ERBB2", "KRT5", "COL1A1", "CD79A", "PECAM1", "CD68", "EPCAM"]


@dataclass
class Truth:
    tiles: pd.DataFrame        # run_key, tile_idx, patient, compartment (tiles with cells only)
    expression: pd.DataFrame   # the same rows × genes, true log1p CP10k


def demo_truth(store, cohort: str, model_key: str, demo_dir: Path) -> Truth:
    """The true expression and dominant compartment of every stored tile that holds cells."""
    from core.synth.reference import expected_profiles
    from core.synth.truth import tile_truth

    demo_dir = Path(demo_dir)
    manifest = json.loads((demo_dir / "world.json").read_text())
    mpp = float(manifest.get("mpp", 0.5))
    cells = pd.read_parquet(demo_dir / manifest["paths"]["cells"], columns=["slide_file", "x_um", "y_um", "cell_type"])
    by_file = dict(tuple(cells.groupby("slide_file", observed=True)))
    slides = {Path(s["file"]).name: s for s in manifest["slides"]}
    runs = store.cohort_runs(cohort, model_key).dropna(subset=["run_key"])
    rows, exprs, profiles = [], [], {}
    for r in runs.itertuples(index=False):
        s = slides.get(Path(r.slide_path).name)
        mine = by_file.get(Path(r.slide_path).name)
        if s is None or mine is None:
            continue
        tiles = store.heatmap(model_key, r.run_key, store.model_info(model_key).genes[0])
        prof = profiles.setdefault(s["subtype"], expected_profiles(s["subtype"]))
        comp, expr = tile_truth(mine, tiles[["x", "y"]].to_numpy(), int(r.tile_size), mpp, prof)
        occupied = comp.sum(axis=1).to_numpy() > 0
        groups = pd.DataFrame({g: comp[types].sum(axis=1) for g, types in COMPARTMENTS.items()})
        rows.append(pd.DataFrame({"run_key": r.run_key, "tile_idx": tiles["tile_idx"].to_numpy()[occupied],
                                  "patient": r.patient,
                                  "compartment": groups.idxmax(axis=1).to_numpy()[occupied]}))
        exprs.append(expr[occupied].reset_index(drop=True))
    return Truth(pd.concat(rows, ignore_index=True), pd.concat(exprs, ignore_index=True))


def _keys(df: pd.DataFrame) -> pd.Series:
    return df["run_key"].astype(str) + ":" + df["tile_idx"].astype(int).astype(str)


def gene_precision(store, cohort, model_key, truth: Truth, *, genes=QUERY_GENES, k: int = 24,
                   space: str = "predicted", joint=None) -> dict:
    """Mean precision@k over ``genes`` (those in the panel) and chance (the top decile's share)."""
    from core.analysis.retrieval import Query, retrieve

    index = pd.Series(np.arange(len(truth.tiles)), index=_keys(truth.tiles))
    panel = set(store.model_info(model_key).genes)
    out = {}
    for g in [g for g in genes if g in panel and g in truth.expression.columns]:
        values = truth.expression[g].to_numpy()
        cut = np.quantile(values, 0.9)
        res = retrieve(store, cohort, model_key, Query("gene", genes=[g]), space=space, k=k, joint=joint)
        hit = index.reindex(res.results["run_key"].astype(str) + ":" + res.results["tile"].astype(str))
        found = values[hit.dropna().astype(int).to_numpy()]
        out[g] = float(np.mean(found >= cut)) if len(found) else float("nan")
    chance = float(np.mean([np.mean(truth.expression[g].to_numpy() >= np.quantile(truth.expression[g], 0.9))
                            for g in out])) if out else float("nan")
    return {"precision": float(np.nanmean(list(out.values()))), "chance": chance, "per_gene": out, "k": k}


def compartment_agreement(store, cohort, model_key, truth: Truth, *, n_queries: int = 60, k: int = 12,
                          space: str = "image", seed: int = 0) -> dict:
    """Mean share of same-compartment tiles among the k nearest to sampled query tiles."""
    from core.analysis.retrieval import Query, retrieve

    rng = np.random.default_rng(seed)
    comp = pd.Series(truth.tiles["compartment"].to_numpy(), index=_keys(truth.tiles))
    slide_of = dict(zip(store.cohort_runs(cohort, model_key)["run_key"], store.cohort_runs(cohort, model_key)["slide_name"]))
    picks = rng.choice(len(truth.tiles), size=min(n_queries, len(truth.tiles)), replace=False)
    shares = []
    for i in picks:
        row = truth.tiles.iloc[i]
        res = retrieve(store, cohort, model_key, Query("tile", slide=slide_of[row["run_key"]], tile=int(row["tile_idx"])),
                       space=space, k=k)
        got = comp.reindex(res.results["run_key"].astype(str) + ":" + res.results["tile"].astype(str)).dropna()
        if len(got):
            shares.append(float(np.mean(got.to_numpy() == row["compartment"])))
    p = truth.tiles["compartment"].value_counts(normalize=True)
    return {"agreement": float(np.mean(shares)), "chance": float((p ** 2).sum()), "n_queries": len(shares), "k": k}


def profile_retrieval(store, cohort, model_key, truth: Truth, *, n_queries: int = 60, ks=(1, 5, 50),
                      space: str = "joint", joint=None, seed: int = 0) -> dict:
    """Top-k accuracy of finding a tile from its true profile, and chance k / N."""
    from core.analysis.retrieval import Query, retrieve

    rng = np.random.default_rng(seed)
    picks = rng.choice(len(truth.tiles), size=min(n_queries, len(truth.tiles)), replace=False)
    n_tiles = int(store.cohort_runs(cohort, model_key)["n_tiles"].sum())
    ranks = []
    kmax = max(ks)
    for i in picks:
        row = truth.tiles.iloc[i]
        profile = truth.expression.iloc[i].to_dict()
        res = retrieve(store, cohort, model_key, Query("profile", profile=profile), space=space, k=kmax, joint=joint)
        own = (res.results["run_key"].astype(str) == row["run_key"]) & (res.results["tile"] == int(row["tile_idx"]))
        ranks.append(int(np.flatnonzero(own.to_numpy())[0]) if own.any() else kmax)
    ranks = np.asarray(ranks)
    return {**{f"top{k}": float(np.mean(ranks < k)) for k in ks},
            **{f"random{k}": float(k / max(n_tiles, 1)) for k in ks}, "n_queries": len(ranks), "n_tiles": n_tiles}
