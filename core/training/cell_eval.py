"""Cells measured on known truth (the demo world) and the learned typer's training.

:func:`train_typer` fits :class:`core.analysis.cell_typer.CellTyper` on the world's ST sections
(their true cell centres and types; the slides are never used), and :func:`evaluate_demo` scores
the cells of a cohort's cells runs against the truth of those slides, in one table:

- nucleus detection precision / recall (greedy one-to-one matching of detected to true centres
  within :data:`MATCH_UM`, closest first);
- on the matched cells: type accuracy and macro-F1 over the reference types; per-cell PCC (over
  the panel's genes) of the predicted profile with the cell's true profile (its type's expected
  profile for the patient's subtype, log1p CP10k, :func:`core.synth.reference.expected_profiles`),
  averaged over cells, and per-gene PCC (over cells), averaged over genes;
- per-tile composition r: the typed cells' type fractions per tile against the true fractions
  (all tiles × types pooled).

Methods (rows): (a) every cell gets its tile's prediction; (b) the rule posterior's type ×
reference profile, with and without the NNLS tile refinement (residual ρ); (c) the learned
typer's type × the same refinement. All come from the same detected nuclei and tile outputs
as stored in the run (the rules classifier's one-hot class probabilities are exact from the
stored nucleus class).
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd

log = logging.getLogger(__name__)
MATCH_UM = 4.0


def match(detected: np.ndarray, truth: np.ndarray, radius: float) -> tuple[np.ndarray, np.ndarray]:
    """Greedy one-to-one matches (closest pairs first) within ``radius``: (detected idx, truth idx)."""
    from scipy.spatial import cKDTree

    if len(detected) == 0 or len(truth) == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    pairs = cKDTree(detected).sparse_distance_matrix(cKDTree(truth), radius, output_type="ndarray")
    order = np.argsort(pairs["v"], kind="stable")
    used_d, used_t, di, ti = set(), set(), [], []
    for i, j in zip(pairs["i"][order], pairs["j"][order]):
        if i not in used_d and j not in used_t:
            used_d.add(i)
            used_t.add(j)
            di.append(i)
            ti.append(j)
    return np.array(di, np.int64), np.array(ti, np.int64)


def _records_from_store(frame: pd.DataFrame, xy: np.ndarray) -> np.ndarray:
    """Cell records (:data:`core.wsi.cells.CELL_FIELDS`) rebuilt from stored cells: centroids back
    to tile offsets, the nucleus class one-hot (exact for the rules classifier the engine uses)."""
    from core.wsi.cells import CELL_FIELDS
    from core.wsi.nuclei import CLASSES

    rec = np.zeros((len(frame), len(CELL_FIELDS)), np.float32)
    tile = frame["tile_idx"].to_numpy(np.int64)
    for i, name in enumerate(CELL_FIELDS):
        if name == "cx":
            rec[:, i] = frame["x"].to_numpy() - xy[tile, 0]
        elif name == "cy":
            rec[:, i] = frame["y"].to_numpy() - xy[tile, 1]
        elif name in frame:
            rec[:, i] = frame[name].to_numpy()
    p0 = CELL_FIELDS.index(f"p_{CLASSES[0]}")
    rec[np.arange(len(frame)), p0 + frame["nucleus_class"].to_numpy(np.int64)] = 1.0
    return rec


def _pcc_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a - a.mean(axis=1, keepdims=True)
    b = b - b.mean(axis=1, keepdims=True)
    den = np.sqrt((a * a).sum(axis=1) * (b * b).sum(axis=1))
    return np.divide((a * b).sum(axis=1), den, out=np.full(len(a), np.nan), where=den > 0)


def _macro_f1(true: np.ndarray, pred: np.ndarray, n: int) -> float:
    f1 = []
    for t in range(n):
        tp = np.sum((pred == t) & (true == t))
        fp, fn = np.sum((pred == t) & (true != t)), np.sum((pred != t) & (true == t))
        if tp + fp + fn:
            f1.append(2 * tp / (2 * tp + fp + fn))
    return float(np.mean(f1)) if f1 else float("nan")


def _slide_methods(store, model_key: str, run_key: str, typer, profiles_log: np.ndarray, types: list[str]):
    """Per detected cell: (type, profile) per method, plus tile outputs."""
    from core.analysis.cells import cell_profiles, chunk_cells

    frame = store.run_cells(run_key)
    tiles, expr, _ = store.run_expression(model_key, run_key)
    xy = tiles[["x", "y"]].to_numpy(np.int64)
    comp = store.con.execute("SELECT composition FROM tile_vectors WHERE run_id = ? ORDER BY tile_idx",
                             [store._run_id(run_key)]).df()["composition"]
    comp = np.stack([np.asarray(c, np.float64) for c in comp])
    rec = _records_from_store(frame, xy)
    tile_of = frame["tile_idx"].to_numpy(np.int64)
    per_tile = [rec[tile_of == i] for i in range(len(xy))]
    p_lin = np.expm1(profiles_log)
    out = {"tile": tile_of, "xy": frame[["x", "y"]].to_numpy(np.float64), "tile_expr": expr, "comp": comp,
           "tile_xy": xy}
    for name, ty in (("rules", None), ("learned", typer)):
        if name == "learned" and typer is None:
            continue
        typed = chunk_cells(per_tile, comp, expr, profiles_log, types, typer=ty)
        # per tile again, to get ρ: recompute with the stored outputs (cheap)
        prof = np.zeros((len(rec), len(p_lin[0])), np.float32)
        prof_ref = np.zeros_like(prof)
        from core.analysis.cells import refine_tile

        order = np.argsort(tile_of, kind="stable")
        t_sorted = typed["cell_type"].astype(np.int64)
        # chunk_cells returns cells grouped by tile in tile order; map back to frame order
        cell_types = np.empty(len(rec), np.int64)
        cell_types[order] = t_sorted
        for i in np.unique(tile_of):
            rows = np.flatnonzero(tile_of == i)
            counts = np.bincount(cell_types[rows], minlength=len(types))
            _, rho = refine_tile(expr[i], p_lin, counts)
            prof[rows] = cell_profiles(cell_types[rows], p_lin, rho)
            prof_ref[rows] = cell_profiles(cell_types[rows], p_lin, None)
        out[name] = (cell_types, prof, prof_ref)
    return out


def evaluate_demo(store, cohort: str, model_key: str, demo_dir: Path, *, slides: int = 6,
                  typer=None) -> dict:
    """The table of the module docstring over the last ``slides`` slides of the demo world that
    have a cells run in ``store``. Returns ``{"rows": [...], "per_gene": DataFrame, "n_cells": …}``."""
    from core.errors import TesseraError
    from core.synth.reference import expected_profiles

    world = json.loads((Path(demo_dir) / "world.json").read_text())
    truth = pd.read_parquet(Path(demo_dir) / "truth" / "cells.parquet")
    info = store.model_info(model_key)
    types, genes = list(info.cell_types), list(info.genes)
    profiles = store.model_profiles(model_key)
    runs = store.cohort_runs(cohort, model_key)
    runs = runs[runs["run_key"].notna()]
    runs = runs[[store.has_cells(k) for k in runs["run_key"]]]
    if runs.empty or profiles is None:
        raise TesseraError(f"No cells runs of {model_key} in cohort {cohort!r}: predict with --cells first.")
    by_name = {Path(s["file"]).name: s for s in world["slides"]}
    runs = runs[runs["slide_name"].isin(by_name)].tail(slides)
    mpp = float(world["mpp"])
    acc = {k: [] for k in ("pcc_cell", "true_type", "true_prof", "det", "comp_true", "comp_pred", "comp_model")}
    rows_by_method: dict[str, dict[str, list]] = {}
    n_det = n_true = n_match = 0
    for row in runs.itertuples(index=False):
        meta = by_name[row.slide_name]
        t = truth[truth["slide_file"] == row.slide_name]
        m = _slide_methods(store, model_key, row.run_key, typer, profiles.loc[types, genes].to_numpy(), types)
        true_xy = t[["x_um", "y_um"]].to_numpy() / mpp
        # only truth cells inside the run's tiles count (tiles cover the tissue the model saw)
        size = int(row.tile_size)
        inside = np.zeros(len(true_xy), bool)
        tile_of_truth = np.full(len(true_xy), -1)
        lookup = {(int(x), int(y)): i for i, (x, y) in enumerate(m["tile_xy"])}
        corner = (np.floor(true_xy / size) * size).astype(np.int64)
        for j, (cx, cy) in enumerate(corner):
            k = lookup.get((int(cx), int(cy)))
            if k is not None:
                inside[j], tile_of_truth[j] = True, k
        true_xy, t = true_xy[inside], t[inside]
        tile_of_truth = tile_of_truth[inside]
        di, ti = match(m["xy"], true_xy, MATCH_UM / mpp)
        n_det, n_true, n_match = n_det + len(m["xy"]), n_true + len(true_xy), n_match + len(di)
        exp = expected_profiles(meta["subtype"]).reindex(index=types, columns=genes).to_numpy(np.float64)
        exp = np.log1p(exp / exp.sum(axis=1, keepdims=True) * 1e4)
        true_type = pd.Categorical(t["cell_type"].astype(str), categories=types).codes[ti].astype(np.int64)
        acc["true_type"].append(true_type)
        acc["true_prof"].append(exp[true_type])
        methods = {"(a) tile prediction for every cell": (None, m["tile_expr"][m["tile"][di]])}
        for name, label in (("rules", "(b) rule type × reference"), ("learned", "(c) learned type × reference")):
            if name in m:
                ct, prof, prof_ref = m[name]
                methods[label + " + NNLS refinement"] = (ct[di], prof[di])
                methods[label + " (no refinement)"] = (ct[di], prof_ref[di])
        for label, (ct, prof) in methods.items():
            r = rows_by_method.setdefault(label, {"type": [], "prof": [], "comp": []})
            r["type"].append(ct)
            r["prof"].append(prof)
        # per-tile composition: true fractions per tile vs typed detected cells per tile
        true_all = pd.Categorical(t["cell_type"].astype(str), categories=types).codes.astype(np.int64)
        n_tiles = len(m["tile_xy"])
        tc = np.zeros((n_tiles, len(types)))
        np.add.at(tc, (tile_of_truth, true_all), 1)
        acc["comp_true"].append(tc)
        acc["comp_model"].append(m["comp"])
        for label, key in (("(b)", "rules"), ("(c)", "learned")):
            if key in m:
                pc = np.zeros((n_tiles, len(types)))
                np.add.at(pc, (m["tile"], m[key][0]), 1)
                rows_by_method.setdefault(label, {"comp": []})["comp"].append(pc)
    true_type = np.concatenate(acc["true_type"])
    true_prof = np.concatenate(acc["true_prof"])
    ct_true = np.concatenate(acc["comp_true"])
    frac = lambda c: c / np.maximum(c.sum(axis=1, keepdims=True), 1)  # noqa: E731
    has = ct_true.sum(axis=1) > 0

    def comp_r(pred):
        return float(np.corrcoef(frac(pred)[has].ravel(), frac(ct_true)[has].ravel())[0, 1])

    detection = {"precision": n_match / max(n_det, 1), "recall": n_match / max(n_true, 1)}
    table, per_gene = [], {}
    for label, r in rows_by_method.items():
        if label in ("(b)", "(c)"):
            continue
        prof = np.concatenate(r["prof"])
        gene_r = [float(np.corrcoef(prof[:, g], true_prof[:, g])[0, 1]) if prof[:, g].std() > 0
                  and true_prof[:, g].std() > 0 else np.nan for g in range(len(genes))]
        per_gene[label] = gene_r
        row = {"method": label, "cells": int(len(prof)),
               "per_cell_pcc": float(np.nanmean(_pcc_rows(prof, true_prof))),
               "per_gene_pcc": float(np.nanmean(gene_r))}
        if r["type"][0] is not None:
            ty = np.concatenate(r["type"])
            row["type_accuracy"] = float(np.mean(ty == true_type))
            row["type_macro_f1"] = _macro_f1(true_type, ty, len(types))
            key = label[:3]
            if key in rows_by_method:
                row["composition_r"] = comp_r(np.concatenate(rows_by_method[key]["comp"]))
        else:
            row["composition_r"] = comp_r(np.concatenate(acc["comp_model"]))   # the model's composition head
        row.update(detection)
        table.append(row)
    return {"rows": table, "per_gene": pd.DataFrame(per_gene, index=genes),
            "slides": list(runs["slide_name"]), "matched_cells": n_match, "detected": n_det, "true_cells": n_true}


def section_cells(model, he_path: Path, truth: pd.DataFrame, *, mpp_um: float, batch: int = 64):
    """Detected cells of one ST section's H&E with the model's tile composition and the true type
    of each matched cell: (records, compositions per cell, labels). Unmatched nuclei are left out."""
    import torch

    from core.wsi.cells import CELL_MPP, detect_cells
    from core.wsi.slide import Slide
    from core.wsi.tiling import tile_grid

    tiling = model.tiling()
    types = list(model.cell_types)
    recs, comps, labels = [], [], []
    with Slide(he_path, mpp_override=mpp_um) as slide:
        grid = tile_grid(slide, tiling)
        size = grid.size_level0
        px = int(round(tiling.tile_um / min(CELL_MPP, tiling.mpp)))
        true_xy = truth[["x_um", "y_um"]].to_numpy() / mpp_um
        true_type = pd.Categorical(truth["cell_type"].astype(str), categories=types).codes.astype(np.int64)
        for start in range(0, len(grid.xy), batch):
            xy = grid.xy[start:start + batch]
            tiles = np.stack([slide.read_region((int(x), int(y)), size, tiling.out_px) for x, y in xy])
            with torch.no_grad():
                comp = model.module(torch.from_numpy(tiles))["composition"].float().numpy()
            for (x, y), c in zip(xy, comp):
                patch = slide.read_region((int(x), int(y)), size, px)
                rec = detect_cells(patch, mpp=tiling.tile_um / px, scale=size / px)
                if not len(rec):
                    continue
                di, ti = match(rec[:, :2] + [x, y], true_xy, MATCH_UM / mpp_um)
                recs.append(rec[di])
                comps.append(np.repeat(c[None, :], len(di), axis=0))
                labels.append(true_type[ti])
    return np.concatenate(recs), np.concatenate(comps), np.concatenate(labels)


def train_typer(model, demo_dir: Path, *, seed: int = 0):
    """Fit the learned typer on every ST section of the demo world (true cell centres and types
    in ``truth/section_cells.parquet``); the slides, on which it is evaluated, are not used."""
    from core.analysis.cell_typer import CellTyper

    demo_dir = Path(demo_dir)
    world = json.loads((demo_dir / "world.json").read_text())
    truth = pd.read_parquet(demo_dir / "truth" / "section_cells.parquet")
    parts = []
    for sid in sorted(truth["section_id"].astype(str).unique()):
        he = demo_dir / "st" / sid / "he.tiff"
        if he.is_file():
            parts.append(section_cells(model, he, truth[truth["section_id"].astype(str) == sid],
                                       mpp_um=float(world["mpp"])))
    if not parts:
        from core.errors import TesseraError

        raise TesseraError(f"No ST sections with H&E under {demo_dir / 'st'}: the typer needs cells of known type.")
    rec, comp, lab = (np.concatenate(p) for p in zip(*parts))
    return CellTyper.fit(rec, comp, lab, list(model.cell_types), seed=seed), len(lab)
