"""The built-in demo world: a synthetic TCGA-BRCA cohort, ST sections and a single-cell reference.

Everything is deterministic under ``seed``: each slide and section draws from its own
``SeedSequence([seed, kind, index])``, so the output does not depend on the number of workers.
Slides are tiled pyramidal TIFFs at 0.5 µm/px; coordinates are level-0 px (x, y) unless a
column says ``_um``.
"""
from __future__ import annotations

import json
import logging
import multiprocessing
import os
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd

from core.synth.reference import CELL_TYPES, GENES, SUBTYPES

log = logging.getLogger(__name__)

MPP = 0.5
_SLIDE, _SECTION, _PATIENTS, _CLINICAL = 2, 4, 1, 3  # seed-sequence tags


def _rng(seed: int, kind: int, index: int = 0) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, kind, index]))


def _slide_job(job: dict) -> dict:
    """Lay out, render and write one patient slide; returns its cells and size."""
    from core.synth.render import render_he
    from core.synth.tiff import write_pyramidal_tiff
    from core.synth.tissue import TissueParams, layout_tissue

    t0 = time.perf_counter()
    rng = _rng(job["seed"], _SLIDE, job["index"])
    w, h = job["size"]
    tissue = layout_tissue(TissueParams(**job["params"]), w * MPP, h * MPP, rng)
    rgb = render_he(tissue, mpp=MPP, rng=rng)
    write_pyramidal_tiff(job["path"], rgb, mpp=MPP)
    cells = tissue.cells[["x_um", "y_um", "cell_type"]].copy()
    return {"index": job["index"], "cells": cells, "width": w, "height": h, "seconds": time.perf_counter() - t0}


def _section_job(job: dict) -> dict:
    """Lay out, render and write one ST section (he.tiff + section.h5ad)."""
    from core.synth.render import render_he
    from core.synth.st import make_section_adata
    from core.synth.tiff import write_pyramidal_tiff
    from core.synth.tissue import layout_tissue, sample_params

    t0 = time.perf_counter()
    rng = _rng(job["seed"], _SECTION, job["index"])
    w, h = job["size"]
    params = sample_params(rng)
    tissue = layout_tissue(params, w * MPP, h * MPP, rng)
    rgb = render_he(tissue, mpp=MPP, rng=rng)
    out = Path(job["dir"])
    out.mkdir(parents=True, exist_ok=True)
    write_pyramidal_tiff(out / "he.tiff", rgb, mpp=MPP)
    adata = make_section_adata(job["id"], tissue, rgb, rng, mpp=MPP)
    adata.write_h5ad(out / "section.h5ad")
    return {"index": job["index"], "id": job["id"], "cells": tissue.cells[["x_um", "y_um", "cell_type"]].copy(),
            "width": w, "height": h, "n_spots": int(adata.n_obs), "subtype": params.subtype,
            "params": params.as_dict(), "seconds": time.perf_counter() - t0}


def _run(fn_jobs: list[tuple], workers: int) -> list[dict]:
    """Run (function, job) pairs, in worker processes when ``workers > 1``; order is kept."""
    if workers <= 1:
        return [fn(job) for fn, job in fn_jobs]
    # import the heavy modules once here, so forked workers inherit them instead of re-importing
    import anndata  # noqa: F401
    import tifffile  # noqa: F401

    from core.synth import render, st, tiff, tissue  # noqa: F401
    # fork is fast but unsafe once threads exist (e.g. inside Streamlit): spawn there
    method = "fork" if threading.active_count() == 1 and os.name == "posix" else "spawn"
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context(method),
                             initializer=_single_threaded) as pool:
        futures = [pool.submit(fn, job) for fn, job in fn_jobs]
        return [f.result() for f in futures]


def _single_threaded() -> None:
    """Worker initialiser: one BLAS thread per process (the pool already uses every core)."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # optional: only a speed matter
        return
    threadpool_limits(1)


def _remove_stale_slides(out: Path, slides: list[dict]) -> None:
    """Drop slide files of an earlier, different build in the same folder (they would join the cohort)."""
    keep = {Path(s["file"]).name for s in slides}
    for path in (out / "slides").iterdir():
        if path.name not in keep and (path.suffix == ".tiff" or path.name.endswith(".partial")):
            log.warning("world: removing stale slide %s", path.name)
            path.unlink()


def _section_ids(n: int) -> list[str]:
    return [f"SYN-{chr(65 + j % 26)}{j // 26 + 1}" for j in range(n)]


def build_world(out_dir, *, seed: int = 0, n_patients: int = 60, slide_size_px: tuple[int, int] = (3072, 2048),
                n_sections: int = 4, section_size_px: tuple[int, int] = (4000, 4000), workers: int = 2) -> dict:
    """Build the whole demo world under ``out_dir``; returns the manifest (also ``world.json``).

    ``slide_size_px`` / ``section_size_px`` are (width, height) at level 0 (0.5 µm/px); slide
    sizes jitter by up to ±15 % per patient. ``world.json`` is written last, so its presence
    means the world is complete.
    """
    from core.synth.clinical import clinical_table, demographics, make_barcodes, slide_uuid
    from core.synth.reference import make_reference
    from core.synth.tissue import sample_params

    t0 = time.perf_counter()
    out = Path(out_dir)
    for sub in ("slides", "clinical", "st", "reference", "truth"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    rng = _rng(seed, _PATIENTS)
    barcodes = make_barcodes(rng, n_patients)
    params = [sample_params(rng) for _ in range(n_patients)]
    demo = demographics(rng, n_patients)
    slides = []
    for i, barcode in enumerate(barcodes):
        w, h = (2 * int(round(s * rng.uniform(0.85, 1.15) / 2)) for s in slide_size_px)
        name = f"{barcode}-01Z-00-DX1.{slide_uuid(rng)}.tiff"
        slides.append({"patient": barcode, "file": f"slides/{name}", "width": w, "height": h,
                       "subtype": params[i].subtype})
    section_ids = _section_ids(n_sections)
    jobs = [(_section_job, {"seed": seed, "index": j, "id": sid, "size": tuple(section_size_px),
                            "dir": str(out / "st" / sid)}) for j, sid in enumerate(section_ids)]
    jobs += [(_slide_job, {"seed": seed, "index": i, "params": params[i].as_dict(), "size": (s["width"], s["height"]),
                           "path": str(out / s["file"])}) for i, s in enumerate(slides)]
    results = _run(jobs, workers)
    sections, slide_results = results[:n_sections], results[n_sections:]
    log.info("world: %d slides (%.2f s each) and %d sections (%.2f s each) rendered in %.1f s with %d workers",
             n_patients, np.mean([r["seconds"] for r in slide_results] or [0]), n_sections,
             np.mean([r["seconds"] for r in sections] or [0]), time.perf_counter() - t0, workers)

    reference = make_reference(seed)
    reference.write_h5ad(out / "reference" / "reference.h5ad")
    patients = _write_truth(out, slides, slide_results, params, sections)
    clinical, terms = clinical_table(_rng(seed, _CLINICAL), barcodes, demo, [p.subtype for p in params],
                                     patients["frac_t_cell"].to_numpy(), patients["frac_cycling_malignant"].to_numpy())
    clinical.to_csv(out / "clinical" / "clinical.csv", index=False)
    patients = pd.concat([patients, terms], axis=1)
    patients.to_csv(out / "truth" / "patients.csv", index=False)
    manifest = _manifest(seed, n_patients, slide_size_px, n_sections, section_size_px, slides, sections, terms)
    _remove_stale_slides(out, slides)
    tmp = out / ".world.json.partial"
    tmp.write_text(json.dumps(manifest, indent=1))
    os.replace(tmp, out / "world.json")
    log.info("world: built %s in %.1f s", out, time.perf_counter() - t0)
    return manifest


def _write_truth(out: Path, slides: list[dict], results: list[dict], params: list, sections: list[dict]) -> pd.DataFrame:
    """``truth/cells.parquet``, ``truth/section_cells.parquet``; returns per-patient composition."""
    frames, rows = [], []
    for s, r, p in zip(slides, results, params):
        cells = r["cells"]
        frames.append(cells.assign(slide_file=s["file"].split("/", 1)[1], patient=s["patient"]))
        counts = cells["cell_type"].value_counts().reindex(CELL_TYPES, fill_value=0)
        n = max(int(counts.sum()), 1)
        malignant = counts["malignant_epithelial"] + counts["cycling_malignant"]
        rows.append({"bcr_patient_barcode": s["patient"], "slide_file": s["file"], "subtype": p.subtype,
                     **{f"frac_{t}": counts[t] / n for t in CELL_TYPES}, "n_cells": int(counts.sum()),
                     "cycling_of_tumour": counts["cycling_malignant"] / max(malignant, 1),
                     **{f"param_{k}": v for k, v in p.as_dict().items() if k != "subtype"}})
    cols = ["slide_file", "patient", "x_um", "y_um", "cell_type"]
    cells = pd.concat(frames, ignore_index=True)[cols] if frames else pd.DataFrame(columns=cols)
    for c in ("slide_file", "patient"):
        cells[c] = cells[c].astype("category")
    cells.to_parquet(out / "truth" / "cells.parquet", index=False)
    sec = [r["cells"].assign(section_id=r["id"]) for r in sections]
    if sec:
        sec_cells = pd.concat(sec, ignore_index=True)[["section_id", "x_um", "y_um", "cell_type"]]
        sec_cells["section_id"] = sec_cells["section_id"].astype("category")
        sec_cells.to_parquet(out / "truth" / "section_cells.parquet", index=False)
    return pd.DataFrame(rows)


def _manifest(seed, n_patients, slide_size_px, n_sections, section_size_px, slides, sections, terms) -> dict:
    from core.synth.clinical import BETAS, WEIBULL_SHAPE

    return {
        "generator": "tessera.synth", "version": 1, "seed": seed, "mpp": MPP,
        "parameters": {"n_patients": n_patients, "slide_size_px": list(slide_size_px), "n_sections": n_sections,
                       "section_size_px": list(section_size_px)},
        "genes": list(GENES), "cell_types": list(CELL_TYPES), "subtypes": list(SUBTYPES),
        "slides": slides,
        "sections": [{"id": s["id"], "he": f"st/{s['id']}/he.tiff", "adata": f"st/{s['id']}/section.h5ad",
                      "width": s["width"], "height": s["height"], "n_spots": s["n_spots"], "subtype": s["subtype"],
                      "params": s["params"]} for s in sections],
        "planted": {"log_hazard": "-beta_t_cell*z(frac_t_cell) + beta_cycling*z(frac_cycling_malignant) "
                                  "+ beta_age*z(age) + beta_stage*z(stage)",
                    "betas": dict(BETAS), "weibull_shape": WEIBULL_SHAPE,
                    "weibull_log_rate": float(terms["weibull_log_rate"].iloc[0]) if len(terms) else None},
        "paths": {"slides": "slides", "clinical": "clinical/clinical.csv", "reference": "reference/reference.h5ad",
                  "st": "st", "cells": "truth/cells.parquet", "section_cells": "truth/section_cells.parquet",
                  "patients": "truth/patients.csv"},
    }
