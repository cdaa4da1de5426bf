"""Nuclei detection on the demo world: our classical detector vs HistomicsTK, against the truth.

``python -m benchmarks.nuclei_bench [--split eval|tune] [--slides 5] [--per-slide 8] [--json]``

Data  the demo world (``data/demo``; build it first with ``python -m core.cli demo``). Slides are taken in ``world.json`` order: ``eval`` (the default) uses
      the LAST ``--slides`` slides, ``tune`` the FIRST ones, so parameters chosen on ``tune`` are
      reported on slides they never saw. Per slide, the non-overlapping 112 µm windows of the
      level-0 grid holding ≥ 15 true cells are candidates and ``--per-slide`` of them, evenly spaced
      in reading order, are used (deterministic). Each window is read at 0.5 µm/px (224 px) and at
      1.0 µm/px (112 px) with :meth:`core.wsi.slide.Slide.read_region`.
Truth ``truth/cells.parquet``: every cell centre. All eight cell types of :mod:`core.synth` carry a
      nucleus (red cells are rendered but are not in the truth table); types listed in
      ``NO_NUCLEUS`` would be dropped.
Score greedy one-to-one matching of detected centroids to true centres, closest pairs first, within
      4 µm. Recall counts true cells, precision detections, both only away from the patch edge
      (8 µm margin, as in ``tests/unit/test_nuclei.py``: a nucleus cut by the edge has a shifted
      centroid); matching uses everything inside the patch. F1 from the pooled counts. Centroids
      are pixel indices (pixel i spans [i, i + 1)), so (x + 0.5) · mpp is their position in µm.
Speed ms per patch, one thread, detection only (the patch is already in memory), mean over
      patches after one warm-up call. Ours is :func:`core.wsi.nuclei.segment_nuclei` and includes
      its 12 morphology features; HistomicsTK's includes Reinhard normalisation, colour
      deconvolution, Al-Kofahi detection and the centroids.

Methods
  ours          :func:`core.wsi.nuclei.segment_nuclei`
  htk-default   HistomicsTK's NucleiDetection CLI defaults (its XML, at 20×): Reinhard to the CLI's
                reference LAB with per-slide source statistics, Ruifrok H&E(+null) deconvolution,
                foreground = H intensity < 60, ``detect_nuclei_kofahi`` with radii 6–20 px, local
                max search radius 10 px, min area 80 px; px sizes scaled by 0.5 / mpp
  htk-tuned     the same with foreground threshold, radii and search radius chosen on ``tune``
                (``HTK_TUNED`` below)
  deconvolution our :func:`core.wsi.nuclei.stain_density` vs HistomicsTK ``color_deconvolution``
                with the same Ruifrok vectors: speed, and the correlation of the H optical densities

HistomicsTK is optional and not in requirements.txt: ``pip install histomicstk`` from PyPI fails on
this platform (``large-image[sources]`` → ``large-image-source-gdal`` → ``gdal``, an sdist that
needs the system GDAL's ``gdal-config``). The wheel itself (cp311 manylinux) works when installed
with ``--no-deps`` plus ``large-image cachetools shapely ctk-cli girder-slicer-cli-web`` (all
``--no-deps``) into a side directory; point ``PYTHONPATH`` at it, e.g.
``PYTHONPATH=/tmp/htk python -m benchmarks.nuclei_bench``. Without it the HistomicsTK rows are
skipped and the reason printed.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "data" / "demo"
PATCH_UM, MATCH_UM, MARGIN_UM, MIN_CELLS = 112.0, 4.0, 8.0, 15
RESOLUTIONS = (0.5, 1.0)  # µm per patch pixel
NO_NUCLEUS: set[str] = {"red_cell", "erythrocyte", "rbc"}  # none of these is in the demo truth
# HistomicsTK NucleiDetection.xml defaults (pixels at analysis_mag 20, ≈ 0.5 µm/px)
HTK_REF_MU = (8.63234435, -0.11501964, 0.03868433)
HTK_REF_STD = (0.57506023, 0.10403329, 0.01364062)
HTK_DEFAULT = {"fg": 60.0, "rmin": 6.0, "rmax": 20.0, "search": 10.0, "area": 80.0}
# chosen on --split tune (first 5 slides × 8 patches, mean F1 of both resolutions) by a coordinate
# search over fg 60–210, rmin 2–8, rmax 8–20, search 4–14, area 20–80: F1 there 0.42 → 0.75 at
# 0.5 µm/px, 0.39 → 0.65 at 1.0
HTK_TUNED = {"fg": 120.0, "rmin": 2.0, "rmax": 8.0, "search": 10.0, "area": 40.0}


# --------------------------------------------------------------------------------------- data
def load_patches(split: str = "eval", n_slides: int = 5, per_slide: int = 8, root: Path = DEMO) -> list[dict]:
    """Patches (both resolutions) with their true nucleus centres, in patch px of each resolution."""
    from core.wsi.slide import Slide

    world = json.loads((root / "world.json").read_text())
    slides = world["slides"]
    chosen = slides[-n_slides:] if split == "eval" else slides[:n_slides]
    cells = pd.read_parquet(root / "truth" / "cells.parquet")
    cells = cells[~cells["cell_type"].astype(str).isin(NO_NUCLEUS)]
    by_slide = {k: g for k, g in cells.groupby("slide_file", observed=True)}
    out = []
    for s in chosen:
        name = s["file"].split("/", 1)[1]
        c = by_slide[name]
        with Slide(root / s["file"]) as slide:
            mpp0 = slide.mpp
            side = int(round(PATCH_UM / mpp0))
            w, h = slide.dimensions
            x_um, y_um = c["x_um"].to_numpy(), c["y_um"].to_numpy()
            cand = []
            for y0 in range(0, h - side + 1, side):
                for x0 in range(0, w - side + 1, side):
                    ux, uy = x_um - x0 * mpp0, y_um - y0 * mpp0
                    inside = (ux >= 0) & (ux < PATCH_UM) & (uy >= 0) & (uy < PATCH_UM)
                    if inside.sum() >= MIN_CELLS:
                        cand.append((x0, y0, np.column_stack([ux[inside], uy[inside]])))
            pick = np.unique(np.linspace(0, len(cand) - 1, min(per_slide, len(cand))).round().astype(int))
            for i in pick:
                x0, y0, xy_um = cand[i]
                p = {"slide": name, "patient": s["patient"], "x0": x0, "y0": y0, "xy_um": xy_um}
                for mpp in RESOLUTIONS:
                    p[mpp] = slide.read_region((x0, y0), side, int(round(PATCH_UM / mpp)))
                out.append(p)
    return out


# --------------------------------------------------------------------------------------- score
def match_counts(det_um: np.ndarray, true_um: np.ndarray) -> dict:
    """Greedy one-to-one matching within MATCH_UM (closest pairs first); counts away from the edge."""
    from scipy.spatial import cKDTree

    det_um, true_um = np.asarray(det_um, float).reshape(-1, 2), np.asarray(true_um, float).reshape(-1, 2)
    hit_d, hit_t = np.zeros(len(det_um), bool), np.zeros(len(true_um), bool)
    if len(det_um) and len(true_um):
        pairs = cKDTree(det_um).sparse_distance_matrix(cKDTree(true_um), MATCH_UM, output_type="ndarray")
        for k in np.argsort(pairs["v"], kind="stable"):
            i, j = pairs["i"][k], pairs["j"][k]
            if not hit_d[i] and not hit_t[j]:
                hit_d[i] = hit_t[j] = True
    inner = lambda xy: np.all((xy >= MARGIN_UM) & (xy < PATCH_UM - MARGIN_UM), axis=1)  # noqa: E731
    d_in, t_in = inner(det_um), inner(true_um)
    return {"tp_d": int((hit_d & d_in).sum()), "n_d": int(d_in.sum()),
            "tp_t": int((hit_t & t_in).sum()), "n_t": int(t_in.sum())}


def summarise(counts: list[dict], ms: list[float]) -> dict:
    tot = {k: sum(c[k] for c in counts) for k in ("tp_d", "n_d", "tp_t", "n_t")}
    precision, recall = tot["tp_d"] / max(tot["n_d"], 1), tot["tp_t"] / max(tot["n_t"], 1)
    f1 = 2 * precision * recall / max(precision + recall, 1e-12)
    return {"precision": round(precision, 4), "recall": round(recall, 4), "f1": round(f1, 4),
            "ms_per_patch": round(float(np.mean(ms)), 2), "detected": tot["n_d"], "true": tot["n_t"]}


# ------------------------------------------------------------------------------------ methods
def ours(rgb: np.ndarray, mpp: float) -> np.ndarray:
    """Centroids (patch px, x y) from :func:`core.wsi.nuclei.segment_nuclei`."""
    from core.wsi.nuclei import segment_nuclei

    return segment_nuclei(rgb, mpp=mpp)[1][["x", "y"]].to_numpy()


def htk_available() -> str | None:
    """None when HistomicsTK's detection imports, else why not."""
    try:
        import histomicstk.preprocessing.color_deconvolution  # noqa: F401
        import histomicstk.preprocessing.color_normalization  # noqa: F401
        import histomicstk.segmentation.nuclear  # noqa: F401
    except Exception as e:  # noqa: BLE001 - any import failure means "not usable here"
        return f"{type(e).__name__}: {e}"
    return None


def htk_source_stats(rgbs: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Reinhard source mean / std (LAB) over a slide's patches (the CLI samples the slide's tissue)."""
    from histomicstk.preprocessing.color_conversion import lab_mean_std

    pix = np.concatenate([r.reshape(-1, 3) for r in rgbs])[None]
    return lab_mean_std(pix)


def htk(rgb: np.ndarray, mpp: float, params: dict, src: tuple) -> np.ndarray:
    """Centroids (patch px, x y): HistomicsTK's NucleiDetection pipeline, px sizes scaled to ``mpp``."""
    from histomicstk.preprocessing.color_deconvolution import color_deconvolution, stain_color_map
    from histomicstk.preprocessing.color_normalization import reinhard
    from histomicstk.segmentation.nuclear import detect_nuclei_kofahi

    import warnings

    k = 0.5 / mpp
    warnings.filterwarnings("ignore", category=FutureWarning, module="histomicstk")  # skimage 0.26 renames
    im = reinhard(rgb, HTK_REF_MU, HTK_REF_STD, src_mu=src[0], src_sigma=src[1])
    w = np.array([stain_color_map[s] for s in ("hematoxylin", "eosin", "null")]).T
    h = color_deconvolution(im, w).Stains[..., 0].astype(float)
    labels = detect_nuclei_kofahi(h, h < params["fg"], params["rmin"] * k, params["rmax"] * k,
                                  int(round(params["area"] * k * k)), params["search"] * k)
    labels = np.asarray(labels, np.int64)
    n = int(labels.max()) if labels.size else 0
    if n == 0:
        return np.zeros((0, 2))
    idx = np.flatnonzero(labels)
    lab = labels.ravel()[idx]
    area = np.bincount(lab, minlength=n + 1)
    ok = area[1:] > 0
    cx = np.bincount(lab, idx % labels.shape[1], n + 1)[1:][ok] / area[1:][ok]
    cy = np.bincount(lab, idx // labels.shape[1], n + 1)[1:][ok] / area[1:][ok]
    return np.column_stack([cx, cy])


def run_method(patches: list[dict], mpp: float, fn) -> dict:
    fn(patches[0][mpp], mpp)  # warm-up (imports, caches)
    counts, ms = [], []
    for p in patches:
        t = time.perf_counter()
        xy = fn(p[mpp], mpp)
        ms.append(1e3 * (time.perf_counter() - t))
        # a centroid is in pixel indices (pixel i spans [i, i + 1)), the truth in continuous µm
        counts.append(match_counts((np.asarray(xy, float).reshape(-1, 2) + 0.5) * mpp, p["xy_um"]))
    return summarise(counts, ms)


def deconvolution_check(patches: list[dict], mpp: float = 0.5) -> dict:
    """Our stain_density vs HistomicsTK color_deconvolution (same Ruifrok vectors): ms and r(H OD)."""
    from histomicstk.preprocessing.color_deconvolution import color_deconvolution, stain_color_map

    from core.wsi.nuclei import stain_density

    w = np.array([stain_color_map[s] for s in ("hematoxylin", "eosin", "null")]).T
    t_ours = t_htk = 0.0
    rs = []
    for p in patches:
        t = time.perf_counter()
        h, _ = stain_density(p[mpp])
        t_ours += time.perf_counter() - t
        t = time.perf_counter()
        s = color_deconvolution(p[mpp], w).Stains[..., 0].astype(np.float32)
        t_htk += time.perf_counter() - t
        rs.append(np.corrcoef(h.ravel(), -np.log((s.ravel() + 1) / 256))[0, 1])
    n = len(patches)
    return {"ours_ms": round(1e3 * t_ours / n, 2), "htk_ms": round(1e3 * t_htk / n, 2),
            "r_h_od_median": round(float(np.median(rs)), 4), "r_h_od_min": round(float(np.min(rs)), 4)}


def bench(split: str = "eval", n_slides: int = 5, per_slide: int = 8, htk_params: dict | None = None) -> dict:
    from threadpoolctl import threadpool_limits

    t0 = time.perf_counter()
    patches = load_patches(split, n_slides, per_slide)
    result = {"split": split, "slides": sorted({p["slide"] for p in patches}), "patches": len(patches),
              "match_um": MATCH_UM, "margin_um": MARGIN_UM, "rows": [], "htk": htk_available()}
    with threadpool_limits(1):
        for mpp in RESOLUTIONS:
            result["rows"].append({"method": "ours", "mpp": mpp, **run_method(patches, mpp, ours)})
        if result["htk"] is None:
            for mpp in RESOLUTIONS:
                stats = {}
                for p in patches:
                    stats.setdefault(p["slide"], []).append(p[mpp])
                stats = {k: htk_source_stats(v) for k, v in stats.items()}
                for name, params in [("htk-default", HTK_DEFAULT), ("htk-tuned", htk_params or HTK_TUNED)]:
                    if name == "htk-tuned" and params == HTK_DEFAULT:
                        continue  # tuning kept the defaults
                    srcs = {id(p[mpp]): stats[p["slide"]] for p in patches}
                    fn = lambda rgb, m, _p=params, _s=srcs: htk(rgb, m, _p, _s[id(rgb)])  # noqa: E731
                    result["rows"].append({"method": name, "mpp": mpp, **run_method(patches, mpp, fn)})
            result["deconvolution"] = deconvolution_check(patches)
    result["seconds"] = round(time.perf_counter() - t0, 1)
    return result


def table(result: dict) -> str:
    lines = [f"nuclei detection, split={result['split']}: {result['patches']} patches of 112 µm from "
             f"{len(result['slides'])} slides; match ≤ {result['match_um']} µm, edge margin {result['margin_um']} µm",
             f"{'method':<12} {'µm/px':>5} {'precision':>9} {'recall':>7} {'F1':>6} {'ms/patch':>9} {'found':>6} {'true':>6}"]
    for r in result["rows"]:
        lines.append(f"{r['method']:<12} {r['mpp']:>5.1f} {r['precision']:>9.3f} {r['recall']:>7.3f} {r['f1']:>6.3f} "
                     f"{r['ms_per_patch']:>9.1f} {r['detected']:>6} {r['true']:>6}")
    if result["htk"] is not None:
        lines.append(f"HistomicsTK skipped: {result['htk']}")
    if "deconvolution" in result:
        d = result["deconvolution"]
        lines.append(f"deconvolution (224 px): ours {d['ours_ms']:.2f} ms, HistomicsTK {d['htk_ms']:.2f} ms; "
                     f"r(H OD) median {d['r_h_od_median']:.4f}, min {d['r_h_od_min']:.4f}")
    lines.append(f"({result['seconds']} s)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--split", choices=("eval", "tune"), default="eval")
    ap.add_argument("--slides", type=int, default=5)
    ap.add_argument("--per-slide", type=int, default=8)
    ap.add_argument("--json", action="store_true", help="print JSON instead of the table")
    args = ap.parse_args(argv)
    if not (DEMO / "world.json").exists():
        print(f"no demo world at {DEMO}: build it with `python -m core.cli demo`", file=sys.stderr)
        return 1
    result = bench(args.split, args.slides, args.per_slide)
    print(json.dumps(result, indent=1) if args.json else table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
