"""Cell-type-specific biomarkers of cells runs (``predict --cells``), per slide and per patient.

Three measures, each computed on one slide's cells (:func:`core.analysis.cell_layers.run_cells`)
and named by a variable string of :mod:`core.analysis.variables`:

- ``cell:<type>:<gene>`` — **mean of a gene in one cell type**: the arithmetic mean, over the
  slide's cells of ``<type>``, of each cell's predicted value of ``<gene>`` (log1p CP10k, the
  ``gene:<g>`` column of :func:`run_cells`). No cell of the type → missing.
- ``cellfrac:<type>`` — **cell-type fraction**: cells of ``<type>`` / all the slide's cells.
  No cells → missing.
- ``celldens:<A>@<B>[:<d>]`` — **density of A near B** (``d`` in µm, default 50): with centroids
  in µm (level-0 px × the run's µm/px) and N = the union of the discs of radius d around every
  B cell, the number of A cells whose centroid lies in N (distance to the nearest B centroid ≤ d,
  :class:`scipy.spatial.cKDTree`) divided by the area of N in mm². A cell of both A and B (A = B)
  counts (it is at distance 0 of itself). N is not clipped to the tissue or the slide's border.
  No B cell → missing (no neighbourhood); B cells but no A cell near them → 0.

  The area of N is measured on a raster: a square grid of step ``raster_um`` (default d / 20)
  anchored at (0, 0) µm; a grid square belongs to N when its centre is within d of a B centroid
  (a cKDTree query), and area = squares in N × step². Only squares of the d-sized blocks next to a
  block holding a B cell are tested (no other square can be within d), so the cost grows with N's
  area, not the slide's. The error is of the order of N's perimeter × step / 4 (under 1 % for one
  disc at the default step).

Patient value = the **mean over the patient's slides** that have a value (slides without a cells
run, or with a missing value, are left out). Per-slide values are cached in-process by (store
file, run key, run finish time, measure), so the Survival and Associations pages and repeated CLI
calls read each slide's cells once per measure.
"""
from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import pandas as pd

from core.errors import AnalysisError

DEFAULT_DISTANCE_UM = 50.0
RASTER_FRACTION = 20.0          # default raster step = d / 20
MAX_DISTANCE_UM = 1000.0


# ---------------------------------------------------------------- the three measures on one table

def type_mean(cell_type: np.ndarray, values: np.ndarray, kind: str) -> float:
    """Mean of ``values`` over the cells with ``cell_type == kind``; NaN when there is none."""
    mask = np.asarray(cell_type).astype(str) == kind
    return float(np.mean(np.asarray(values, np.float64)[mask])) if mask.any() else math.nan


def type_fraction(cell_type: np.ndarray, kind: str) -> float:
    """Cells of ``kind`` / all cells; NaN when there are no cells."""
    types = np.asarray(cell_type).astype(str)
    return float(np.mean(types == kind)) if len(types) else math.nan


def union_area_um2(centres_um: np.ndarray, d: float, raster_um: float | None = None) -> float:
    """Area (µm²) of the union of the discs of radius ``d`` around ``centres_um`` (n, 2), on the
    raster described in the module docstring."""
    from scipy.spatial import cKDTree

    pts = np.asarray(centres_um, np.float64).reshape(-1, 2)
    if not len(pts):
        return 0.0
    step = float(raster_um) if raster_um else d / RASTER_FRACTION
    per = max(1, int(math.ceil(d / step)))          # raster squares per block side
    block = per * step                               # block side ≥ d
    tree = cKDTree(pts)
    occupied = np.unique(np.floor(pts / block).astype(np.int64), axis=0)
    offsets = np.array([(i, j) for i in (-1, 0, 1) for j in (-1, 0, 1)], np.int64)
    blocks = np.unique((occupied[:, None, :] + offsets[None]).reshape(-1, 2), axis=0)
    local = (np.stack(np.meshgrid(np.arange(per), np.arange(per), indexing="ij"), -1).reshape(-1, 2) + 0.5) * step
    inside = 0
    chunk = max(1, 2_000_000 // len(local))
    for k in range(0, len(blocks), chunk):
        centres = (blocks[k:k + chunk, None, :] * block + local[None]).reshape(-1, 2)
        dist, _ = tree.query(centres, k=1, distance_upper_bound=d * (1 + 1e-12))
        inside += int(np.count_nonzero(np.isfinite(dist)))
    return inside * step * step


def density_near(xy_um: np.ndarray, cell_type: np.ndarray, kind_a: str, kind_b: str, d: float = DEFAULT_DISTANCE_UM,
                 *, raster_um: float | None = None) -> tuple[float, int, float]:
    """(A cells per mm² of N, A cells in N, area of N in µm²) with N the union of the radius-``d``
    discs around the B cells (module docstring); density NaN when there is no B cell."""
    from scipy.spatial import cKDTree

    xy = np.asarray(xy_um, np.float64).reshape(-1, 2)
    types = np.asarray(cell_type).astype(str)
    b = xy[types == kind_b]
    if not len(b):
        return math.nan, 0, 0.0
    a = xy[types == kind_a]
    n_near = 0
    if len(a):
        dist, _ = cKDTree(b).query(a, k=1, distance_upper_bound=d * (1 + 1e-12))
        n_near = int(np.count_nonzero(np.isfinite(dist)))
    area = union_area_um2(b, d, raster_um)
    return (n_near / (area / 1e6) if area > 0 else math.nan), n_near, area


# ---------------------------------------------------------------- measures by name

@dataclass(frozen=True)
class CellMeasure:
    """One cell biomarker: ``kind`` mean | frac | dens; ``cell_type`` (A), ``gene`` (mean),
    ``near`` (B) and ``distance_um`` (dens). Names are the model's own (see :func:`resolve_type`)."""

    kind: str
    cell_type: str
    gene: str | None = None
    near: str | None = None
    distance_um: float = DEFAULT_DISTANCE_UM

    @property
    def spec(self) -> str:
        if self.kind == "mean":
            return f"cell:{self.cell_type}:{self.gene}"
        if self.kind == "frac":
            return f"cellfrac:{self.cell_type}"
        return f"celldens:{self.cell_type}@{self.near}:{self.distance_um:g}"

    @property
    def label(self) -> str:
        if self.kind == "mean":
            return f"{self.gene} in {self.cell_type} cells (predicted)"
        if self.kind == "frac":
            return f"{self.cell_type} fraction of cells"
        return f"{self.cell_type} per mm² within {self.distance_um:g} µm of {self.near}"

    @property
    def units(self) -> str:
        return {"mean": "predicted log1p(CP10k)", "frac": "fraction of the slide's cells"}.get(
            self.kind, f"cells per mm² of the {self.distance_um:g} µm neighbourhood")


def resolve_type(name: str, cell_types: list[str]) -> str:
    """A cell type as typed (any case; or a unique prefix, e.g. ``malignant`` → ``malignant_epithelial``,
    ``t`` → ``t_cell``) → the model's name; anything else is an :class:`AnalysisError` listing the types."""
    text = (name or "").strip().lower().replace(" ", "_").replace("-", "_")
    by_lower = {t.lower(): t for t in cell_types}
    if text in by_lower:
        return by_lower[text]
    hits = [t for t in cell_types if text and t.lower().startswith(text)]
    if len(hits) == 1:
        return hits[0]
    what = f"matches {', '.join(hits)}" if hits else "is not a cell type of the model"
    raise AnalysisError(f"{name!r} {what}; the model's cell types are {', '.join(cell_types)}.")


def normalise(measure: CellMeasure, cell_types: list[str], panel: list[str]) -> CellMeasure:
    """``measure`` with its names matched to the model (types by :func:`resolve_type`, the gene
    ignoring case); unknown names and a bad distance are an :class:`AnalysisError`."""
    a = resolve_type(measure.cell_type, cell_types)
    gene = measure.gene
    if measure.kind == "mean":
        by_upper = {g.upper(): g for g in panel}
        gene = by_upper.get(str(gene).upper())
        if gene is None:
            raise AnalysisError(f"{measure.gene} is not in the model's panel of {len(panel)} genes "
                                f"(e.g. {', '.join(panel[:8])}).")
    near = resolve_type(measure.near, cell_types) if measure.kind == "dens" else None
    d = float(measure.distance_um)
    if measure.kind == "dens" and not (0 < d <= MAX_DISTANCE_UM):
        raise AnalysisError(f"The distance of {measure.spec} must be in (0, {MAX_DISTANCE_UM:g}] µm; got {d:g}.")
    return CellMeasure(measure.kind, a, gene, near, d)


def slide_value(frame: pd.DataFrame, measure: CellMeasure, mpp: float, *, raster_um: float | None = None) -> float:
    """The measure on one slide's cell table (``x``, ``y`` level-0 px, ``cell_type`` names and, for
    a mean, ``gene:<g>``); ``mpp`` = level-0 µm/px."""
    types = frame["cell_type"].astype(str).to_numpy()
    if measure.kind == "mean":
        return type_mean(types, frame[f"gene:{measure.gene}"].to_numpy(), measure.cell_type)
    if measure.kind == "frac":
        return type_fraction(types, measure.cell_type)
    xy = frame[["x", "y"]].to_numpy(np.float64) * float(mpp)
    return density_near(xy, types, measure.cell_type, measure.near, measure.distance_um, raster_um=raster_um)[0]


def patient_means(slides: pd.DataFrame) -> pd.Series:
    """Per-slide values (``patient``, ``value``) → the mean over each patient's slides with a value."""
    have = slides.dropna(subset=["value"])
    out = have.groupby(have["patient"].astype(str))["value"].mean() if len(have) else pd.Series(dtype=float)
    out.index = out.index.rename("patient")
    return out.astype(float)


# ---------------------------------------------------------------- a cohort

_CACHE: OrderedDict = OrderedDict()
_CACHE_SIZE = 4096


def cells_runs(store, cohort: str, model_key: str) -> pd.DataFrame:
    """The cohort's latest runs (slide_name, patient, run_key, mpp, finished_at) that have cells."""
    runs = store.cohort_runs(cohort, model_key)
    runs = runs[runs["run_key"].notna()]
    keep = [bool(store.has_cells(k)) for k in runs["run_key"]]
    return runs[keep].reset_index(drop=True)


def no_cells_error(cohort: str) -> AnalysisError:
    return AnalysisError(f"No slide of cohort {cohort!r} has cells for this model: predict with cells first "
                         f"(python -m core.cli predict --cohort {cohort} --cells, or tick 'Find cells' on the "
                         "Predictions page).")


def slide_values(store, cohort: str, model_key: str, measure: CellMeasure) -> pd.DataFrame:
    """slide_name, patient, run_key, n_cells, value: one row per slide of the cohort with cells."""
    from core.analysis.cell_layers import run_cells

    info = store.model_info(model_key)
    measure = normalise(measure, list(info.cell_types), list(info.genes))
    runs = cells_runs(store, cohort, model_key)
    if runs.empty:
        raise no_cells_error(cohort)
    rows = []
    for r in runs.itertuples(index=False):
        key = (str(store.path), str(r.run_key), str(r.finished_at), measure.spec)
        hit = _CACHE.get(key)
        if hit is None:
            cols = ["x", "y", "cell_type"]
            rc = run_cells(store, model_key, r.run_key, [measure.gene] if measure.kind == "mean" else [], columns=cols)
            hit = (len(rc.frame), slide_value(rc.frame, measure, float(r.mpp)))
            _CACHE[key] = hit
            while len(_CACHE) > _CACHE_SIZE:
                _CACHE.popitem(last=False)
        else:
            _CACHE.move_to_end(key)
        rows.append({"slide_name": r.slide_name, "patient": str(r.patient), "run_key": r.run_key,
                     "n_cells": int(hit[0]), "value": hit[1]})
    return pd.DataFrame(rows)


def patient_values(store, cohort: str, model_key: str, measure: CellMeasure) -> pd.Series:
    """The measure per patient (index ``patient``): the mean over the patient's slides with a value."""
    return patient_means(slide_values(store, cohort, model_key, measure))


def slide_summary(store, model_key: str, run_key: str) -> pd.DataFrame:
    """One slide's cells per type: cell_type, n, fraction, mean_confidence (every type of the model)."""
    from core.analysis.cell_layers import run_cells

    rc = run_cells(store, model_key, run_key, columns=["cell_type", "confidence"])
    f = rc.frame
    g = f.groupby("cell_type", observed=False)["confidence"]
    out = pd.DataFrame({"n": g.size(), "mean_confidence": g.mean()}).reindex(rc.cell_types)
    out["n"] = out["n"].fillna(0).astype(int)
    out["fraction"] = out["n"] / max(len(f), 1)
    return out.rename_axis("cell_type").reset_index()[["cell_type", "n", "fraction", "mean_confidence"]]


def cohort_cell_types(store, cohort: str, model_key: str) -> list[str]:
    """The model's cell types when at least one of the cohort's latest runs has cells, else []
    (what the pages' variable picker asks before offering cell biomarkers)."""
    runs = store.cohort_runs(cohort, model_key)
    if not any(store.has_cells(k) for k in runs["run_key"].dropna()):
        return []
    return list(store.model_info(model_key).cell_types)
