"""Cells on real ST, held out: does aggregating typed, refined cells give back the measured spots?

For every fold of :func:`core.training.loso.folds_for` (per patient, per section) a fusion head is
fitted on the training sections' cached tokens (:func:`core.training.loso.fusion_fit`, as the
``full`` row of ``loso``). On each held-out section, per spot:

- the head's prediction ŷ (log1p CP10k) and composition π over the reference types;
- the nuclei of the spot's square read at :data:`core.wsi.cells.CELL_MPP` (the engine's cells
  resolution; :func:`core.training.stdata.section_patches`), detected with
  :func:`core.wsi.cells.detect_cells`; only nuclei whose centre lies within the spot's diameter
  count (the measured spot is a disc);
- typed against π and refined against ŷ (:func:`core.analysis.cells.chunk_cells`), each cell's
  profile from the stored factors (:func:`core.analysis.cells.cell_values`, log1p CP10k, the
  targets' units);
- the spot's cell aggregate: the mean of its cells' profiles.

Rows (mean PCC over genes, per gene over the spots of a section, against the measured spots):
(a) the tile/spot model ŷ; (b) the cell aggregate with NNLS refinement; (c) the cell aggregate
without refinement (reference profile of each cell's type: the typed composition × reference);
(b′) and (c′) the same with the reference first put in the spots' units by the per-gene platform
factor (:func:`core.analysis.cells.platform_factor`, fitted on the fold's *training* spots only).
All rows are scored on the same spots: those with at least one nucleus in the disc. A fold's
figure is the mean over its test sections, a scheme's the mean over its folds (as ``loso``).
The report also gives the typed cells' type shares over every held-out section against the
head's mean composition π over the scored spots and the reference's cell-type shares.
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np

from core.errors import TesseraError

log = logging.getLogger(__name__)
REPORT_FORMAT = "tessera-cell-spots/1"
ROWS = {"tile": "(a) tile/spot model", "refined": "(b) cells aggregate + NNLS refinement",
        "plain": "(c) cells aggregate, no refinement",
        "refined_pf": "(b′) cells aggregate + platform factor + NNLS refinement (ρ in [¼, 4])",
        "refined_pf16": "(b″) cells aggregate + platform factor + NNLS refinement (ρ in [1/16, 16])",
        "refined_free": "(b‴) cells aggregate + platform factor + NNLS refinement (ρ unclipped)",
        "plain_pf": "(c′) cells aggregate + platform factor, no refinement"}


def _types_beside(reference: Path) -> Path | None:
    """``…_counts.csv[.gz]`` → ``…_types.csv`` beside it, if that file exists (the Xenium layout)."""
    name = reference.name
    for suffix in (".gz", ".csv"):
        name = name[: -len(suffix)] if name.endswith(suffix) else name
    candidate = reference.with_name(name.replace("counts", "types") + ".csv")
    return candidate if "counts" in name and candidate.is_file() else None


def spot_cells(section, keep: np.ndarray, *, tile_um: float, spots: np.ndarray | None = None) -> list[np.ndarray]:
    """Cell records (:data:`core.wsi.cells.CELL_FIELDS`, ``cx, cy`` in patch px from the square's
    corner) of the nuclei within the spot disc, for the kept spots ``spots`` (indices into the
    kept spots; default all), read at :data:`core.wsi.cells.CELL_MPP`."""
    from dataclasses import replace

    from core.training.stdata import section_patches
    from core.wsi.cells import CELL_MPP, detect_cells

    kept = np.flatnonzero(keep)
    chosen = kept if spots is None else kept[spots]
    sub = replace(section, xy=section.xy[chosen])
    patches, inside = section_patches(sub, tile_um=tile_um, mpp=CELL_MPP)
    if not inside.all():
        raise TesseraError(f"{section.name}: spot patches differ from the cached ones; clear the feature cache.")
    radius = section.spot_diameter_um / 2 / CELL_MPP
    centre = patches.shape[1] / 2
    out = []
    for patch in patches:
        rec = detect_cells(patch, mpp=CELL_MPP)
        d = np.hypot(rec[:, 0] - centre, rec[:, 1] - centre)
        out.append(rec[d <= radius])
    return out


def spot_aggregates(records: list[np.ndarray], composition: np.ndarray, expression: np.ndarray,
                    profiles_log: np.ndarray, cell_types: list[str], *, typer=None,
                    clip: tuple[float, float] | None = None) -> dict[str, np.ndarray]:
    """Per spot (one ``records`` entry each): the mean of its cells' profiles with refinement
    (``refined``) and without (``plain``), ``(N, G)`` log1p CP10k (NaN rows for spots without
    cells), ``n_cells`` ``(N,)``, the cells' ``cell_type`` and ``clipped`` ``(N,)``: the share of
    genes whose residual ratio ρ hit :data:`core.analysis.cells.RHO_CLIP` (the refinement's limit)."""
    from core.analysis.cells import RHO_CLIP, cell_values, chunk_cells, refine_tile

    clip = RHO_CLIP if clip is None else (None if clip == "none" else clip)
    typed = chunk_cells(records, composition, expression, profiles_log, cell_types, typer=typer, clip=clip)
    n_spots, genes = len(records), np.arange(profiles_log.shape[1])
    counts = np.bincount(typed["tile"], minlength=n_spots)
    out = {"n_cells": counts, "cell_type": typed["cell_type"].astype(np.int64), "clipped": np.full(n_spots, np.nan)}
    p_lin = np.expm1(np.asarray(profiles_log, np.float64))
    for i in np.flatnonzero(counts):
        present = np.bincount(out["cell_type"][typed["tile"] == i], minlength=len(cell_types))
        rho = refine_tile(expression[i], p_lin, present, clip=clip)[1]
        out["clipped"][i] = 0.0 if clip is None else float(np.mean((rho <= clip[0]) | (rho >= clip[1])))
    for name, residual in (("refined", True), ("plain", False)):
        values = cell_values(genes, typed["cell_type"], typed["tile"], typed["w"], typed["z"], expression,
                             profiles_log, residual=residual, clip=clip)
        total = np.zeros((n_spots, len(genes)))
        np.add.at(total, typed["tile"], values)
        out[name] = np.divide(total, counts[:, None], out=np.full_like(total, np.nan), where=counts[:, None] > 0)
    return out


def _composition(head, tokens: np.ndarray) -> np.ndarray:
    """The fitted head's composition π ``(N, T)`` on cached tokens."""
    import torch

    with torch.inference_mode():
        return np.concatenate([head(torch.from_numpy(tokens[i:i + 256]).float())["composition"].numpy()
                               for i in range(0, len(tokens), 256)])


def _choose(n: int, limit: int | None) -> np.ndarray:
    """Spots scored: all, or ``limit`` spread evenly over the section's spot order."""
    if limit is None or limit >= n:
        return np.arange(n)
    return np.unique(np.linspace(0, n - 1, limit).round().astype(np.int64))


def evaluate_her2st(st, reference_path, types_path=None, *, panel=None, schemes=("patient", "section"),
                    sections=None, max_sections: int | None = None, max_spots: int | None = None,
                    epochs: int = 30, seed: int = 0, tile_um: float = 112.0,
                    cache_dir: Path = Path("data/cache/features"), encoder: str = "efficientnet_lite0") -> dict:
    """The report of the module docstring (``format`` :data:`REPORT_FORMAT`)."""
    from core.analysis.cells import platform_factor, scaled_profiles
    from core.training.loso import folds_for, fusion_fit, fusion_predict, prepare
    from core.training.reference import read_reference, reference_profiles
    from core.training.stdata import find_sections, panel_genes
    from core.wsi.cells import CELL_MPP
    from models.evaluate import per_gene_pearson

    started = time.perf_counter()
    reference_path = Path(reference_path)
    types_path = types_path or (_types_beside(reference_path) if reference_path.suffix != ".h5ad" else None)
    reference = read_reference(reference_path, types_path)
    found = find_sections(st)
    if sections:
        unknown = sorted(set(sections) - {s.name for s in found})
        if unknown:
            raise TesseraError(f"--sections: no section {', '.join(unknown)} under {st}; "
                               f"found {', '.join(s.name for s in found)}.")
        found = [s for s in found if s.name in set(sections)]
    if len(found) < 2:
        raise TesseraError(f"{st}: {len(found)} section(s); held-out folds need at least two.")
    genes = [g for g in panel_genes(found, panel) if g in set(reference.var_names)]
    if not genes:
        raise TesseraError(f"No gene is measured in every section and in the reference {reference_path}.")
    profiles, types = reference_profiles(reference, genes)
    profiles_log = profiles.to_numpy(np.float64)
    shares = reference.obs["cell_type"].astype(str).value_counts(normalize=True)
    prepared = prepare(found, genes, encoder=encoder, tile_um=tile_um, mpp=CELL_MPP, cache_dir=Path(cache_dir))
    by_name = {s.name: s for s in found}
    cells_cache: dict[str, tuple[np.ndarray, list[np.ndarray]]] = {}

    def cells_of(p):
        if p.name not in cells_cache:
            t = time.perf_counter()
            chosen = _choose(len(p.y), max_spots)
            cells_cache[p.name] = (chosen, spot_cells(by_name[p.name], p.keep, tile_um=tile_um, spots=chosen))
            log.info("%s: nuclei of %d spots in %.0f s", p.name, len(chosen), time.perf_counter() - t)
        return cells_cache[p.name]

    out_schemes, notes = {}, []
    for scheme in schemes:
        folds = folds_for(prepared, scheme)
        if scheme == "patient" and len(folds) < 2:
            notes.append("one patient only: no per-patient folds")
            continue
        fold_out, tested, type_counts = {}, 0, np.zeros(len(types), np.int64)
        comp_sum, n_comp = np.zeros(len(types)), 0
        for fold, (train, tests) in folds.items():
            if max_sections is not None and tested >= max_sections:
                break
            tests = tests[: max_sections - tested] if max_sections is not None else tests
            tested += len(tests)
            t0 = time.perf_counter()
            head = fusion_fit(train, profiles_log.astype(np.float32), epochs=epochs, seed=seed)
            factor = platform_factor(np.concatenate([p.y for p in train]), profiles_log)
            scaled = scaled_profiles(profiles_log, factor)
            per_section = {}
            for t in tests:
                chosen, records = cells_of(t)
                expr = fusion_predict(head, t)[0][chosen]
                comp = _composition(head, t.tokens[chosen])
                agg = spot_aggregates(records, comp, expr, profiles_log, types)
                agg_pf = spot_aggregates(records, comp, expr, scaled, types)
                agg_16 = spot_aggregates(records, comp, expr, scaled, types, clip=(1 / 16, 16.0))
                agg_free = spot_aggregates(records, comp, expr, scaled, types, clip="none")
                scored = agg["n_cells"] > 0
                type_counts += np.bincount(agg["cell_type"], minlength=len(types))
                comp_sum, n_comp = comp_sum + comp[scored].sum(axis=0), n_comp + int(scored.sum())
                y = t.y[chosen][scored]
                preds = {"tile": expr[scored], "refined": agg["refined"][scored], "plain": agg["plain"][scored],
                         "refined_pf": agg_pf["refined"][scored], "refined_pf16": agg_16["refined"][scored],
                         "refined_free": agg_free["refined"][scored], "plain_pf": agg_pf["plain"][scored]}
                r = {k: per_gene_pearson(v, y) for k, v in preds.items()}
                per_section[t.name] = {"n_spots": int(len(chosen)), "n_scored": int(scored.sum()),
                                       "cells_per_spot": float(agg["n_cells"][scored].mean()) if scored.any() else 0.0,
                                       "rho_clipped": float(np.mean(agg["clipped"][scored])) if scored.any() else None,
                                       "rho_clipped_pf": (float(np.mean(agg_pf["clipped"][scored]))
                                                          if scored.any() else None),
                                       "mean_pcc": {k: float(np.nanmean(v)) for k, v in r.items()},
                                       "median_pcc": {k: float(np.nanmedian(v)) for k, v in r.items()},
                                       "per_gene": {k: {g: (None if not np.isfinite(x) else round(float(x), 4))
                                                        for g, x in zip(genes, v)} for k, v in r.items()}}
            fold_out[fold] = {"train_sections": [p.name for p in train], "test_sections": [t.name for t in tests],
                              "sections": per_section,
                              "mean_pcc": {k: float(np.mean([s["mean_pcc"][k] for s in per_section.values()]))
                                           for k in ROWS},
                              "wall_s": round(time.perf_counter() - t0, 1)}
            log.info("cells %s fold %s: %s", scheme, fold, {k: round(v, 3) for k, v in fold_out[fold]["mean_pcc"].items()})
        table = {k: {"mean_pcc": float(np.mean([f["mean_pcc"][k] for f in fold_out.values()])),
                     "median_pcc": float(np.mean([np.mean([s["median_pcc"][k] for s in f["sections"].values()])
                                                  for f in fold_out.values()]))} for k in ROWS}
        frac = type_counts / max(type_counts.sum(), 1)
        out_schemes[scheme] = {"folds": fold_out, "table": table,
                               "composition": {"n_cells": int(type_counts.sum()),
                                               "cells": dict(zip(types, map(int, type_counts))),
                                               "typed_share": dict(zip(types, map(float, frac))),
                                               "model_share": dict(zip(types, map(float, comp_sum / max(n_comp, 1)))),
                                               "reference_share": {t: float(shares.get(t, 0.0)) for t in types}}}
    if not out_schemes:
        raise TesseraError("No fold to run: " + "; ".join(notes))
    headline = "patient" if "patient" in out_schemes else next(iter(out_schemes))
    return {"format": REPORT_FORMAT, "rows": ROWS, "genes": genes, "cell_types": types, "headline": headline,
            "schemes": out_schemes, "notes": notes,
            "setup": {"sections": [s.name for s in found], "n_genes": len(genes), "encoder": encoder,
                      "tile_um": tile_um, "cell_mpp": CELL_MPP, "epochs": epochs, "seed": seed,
                      "max_spots": max_spots, "max_sections": max_sections, "reference": str(reference_path),
                      "spot_diameter_um": {s.name: s.spot_diameter_um for s in found},
                      "wall_s": round(time.perf_counter() - started, 1)}}


def format_report(report: dict) -> str:
    """Every scheme's table (Markdown, headline first, one column per fold and per test section) and
    the headline scheme's typed-cell composition against the reference's shares."""
    blocks = []
    for sc in sorted(report["schemes"], key=lambda s: s != report["headline"]):
        data = report["schemes"][sc]
        folds = data["folds"]
        secs = [(f, s) for f, v in folds.items() for s in v["sections"]]
        head = ["method", "mean PCC", "median (genes)", *[f"fold {f}" for f in folds], *[s for _, s in secs]]
        lines = [f"**{'per patient' if sc == 'patient' else 'per section'}** ({len(folds)} folds: "
                 + "; ".join(f"test {f} = {', '.join(v['test_sections'])}" for f, v in folds.items()) + ")",
                 "", "| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
        for k, label in report["rows"].items():
            row = data["table"][k]
            cells = [label, f"{row['mean_pcc']:.3f}", f"{row['median_pcc']:.3f}",
                     *[f"{folds[f]['mean_pcc'][k]:.3f}" for f in folds],
                     *[f"{folds[f]['sections'][s]['mean_pcc'][k]:.3f}" for f, s in secs]]
            lines.append("| " + " | ".join(cells) + " |")
        scored = ", ".join(f"{s} {v['n_scored']}/{v['n_spots']} ({v['cells_per_spot']:.1f} cells, ρ clipped "
                           f"{v['rho_clipped'] or 0:.0%}, with the platform factor {v.get('rho_clipped_pf') or 0:.0%})"
                           for f, s in secs for v in [folds[f]['sections'][s]])
        lines.append("\nspots scored (≥ 1 nucleus in the disc) / spots (mean cells per scored spot, share of genes "
                     f"whose NNLS residual ρ hit its clip): {scored}")
        blocks.append("\n".join(lines))
    comp = report["schemes"][report["headline"]]["composition"]
    lines = [f"**typed cells vs the reference** ({report['headline']} folds, {comp['n_cells']} cells)", "",
             "| type | cells | typed share | model composition π (mean over spots) | reference share |",
             "|---|---|---|---|---|"]
    lines += [f"| {t} | {comp['cells'][t]} | {comp['typed_share'][t]:.3f} | {comp['model_share'][t]:.3f} | "
              f"{comp['reference_share'][t]:.3f} |" for t in report["cell_types"]]
    blocks.append("\n".join(lines))
    s = report["setup"]
    blocks.append(f"{len(s['sections'])} sections, {s['n_genes']} genes, {s['epochs']} epochs, "
                  f"nuclei at {s['cell_mpp']} µm/px, {s['wall_s']:.0f} s")
    return "\n\n".join(blocks)


def write_report(report: dict, path: Path) -> None:
    """The report as strict JSON (NaN → null)."""
    from core.analysis.report import to_jsonable

    try:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(to_jsonable(report), indent=1, allow_nan=False))
    except OSError as exc:
        raise TesseraError(f"Cannot write {path}: {exc.strerror or exc}. Give --out a path in a writable folder.") from None
