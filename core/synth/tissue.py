"""Tissue layout of a synthetic breast-cancer section: compartments, then cells.

Coordinates are micrometres with the origin at the top-left corner of the slide, ``x`` to the
right and ``y`` down. Compartment maps are rasters on a ``grid_um`` lattice indexed ``[y, x]``:
pixel ``[i, j]`` covers ``[j, j+1) × [i, i+1)`` grid units.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from scipy import ndimage

from core.synth.fields import single_threaded_blas, smooth_noise, upsample_linear
from core.synth.reference import SUBTYPE_PREVALENCE, SUBTYPES

log = logging.getLogger(__name__)

GLASS, STROMA, TUMOUR, LUMEN, VESSEL, ADIPOSE, LYMPHOID, DUCT = range(8)
COMPARTMENTS = ["glass", "stroma", "tumour", "lumen", "vessel", "adipose", "lymphoid", "duct"]


@dataclass(frozen=True)
class TissueParams:
    """A patient's (or section's) tissue recipe. Fractions are of the tissue area unless stated."""

    subtype: str = "LumA"
    tumour_frac: float = 0.4  # tumour nests (incl. lumens)
    immune: float = 0.3  # 0–1: density of TILs and of lymphoid aggregates
    cycling_frac: float = 0.15  # fraction of tumour cells in cycle
    stroma: float = 0.6  # 0–1: stromal cellularity (fibroblast density)
    adipose_frac: float = 0.1  # fat
    tissue_frac: float = 0.72  # fraction of the slide covered by tissue

    def as_dict(self) -> dict:
        return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in self.__dict__.items()}


def sample_params(rng: np.random.Generator, subtype: str | None = None) -> TissueParams:
    """Random patient-like parameters; immune and cycling drawn independently of each other."""
    if subtype is None:
        subtype = str(rng.choice(SUBTYPES, p=list(SUBTYPE_PREVALENCE.values())))
    grade = {"LumA": -0.04, "LumB": 0.03, "Her2": 0.04, "Basal": 0.06, "Normal": -0.05}[subtype]
    return TissueParams(
        subtype=subtype,
        tumour_frac=float(rng.uniform(0.25, 0.55)),
        immune=float(np.exp(rng.uniform(np.log(0.04), np.log(1.0)))),
        cycling_frac=float(np.clip(rng.uniform(0.03, 0.36) + grade, 0.02, 0.42)),
        stroma=float(rng.uniform(0.3, 1.0)),
        adipose_frac=float(rng.uniform(0.0, 0.25)),
        tissue_frac=float(rng.uniform(0.62, 0.82)),
    )


@dataclass
class Tissue:
    """A laid-out section: rasters on the ``grid_um`` lattice plus tables of cells and red cells."""

    params: TissueParams
    width_um: float
    height_um: float
    grid_um: float
    comp: np.ndarray  # uint8 [rows, cols] compartment codes (COMPARTMENTS)
    fibre: np.ndarray  # float32 [rows, cols] collagen density 0–1 (used in stroma)
    membrane: np.ndarray  # float32 [rows, cols] adipocyte membranes 0–1
    cells: pd.DataFrame  # x_um, y_um, cell_type, major_um, minor_um, angle (rad), darkness, mitotic, compartment
    rbc: pd.DataFrame = field(default_factory=pd.DataFrame)  # x_um, y_um, major_um, minor_um, angle

    def composition(self) -> pd.Series:
        """Fraction of every cell type over the whole section (CELL_TYPES order)."""
        from core.synth.reference import CELL_TYPES

        counts = self.cells["cell_type"].value_counts().reindex(CELL_TYPES, fill_value=0)
        return counts / max(int(counts.sum()), 1)


def layout_tissue(params: TissueParams, width_um: float, height_um: float, rng: np.random.Generator,
                  *, grid_um: float = 1.0) -> Tissue:
    """Lay out compartments and cells over a ``width_um`` × ``height_um`` rectangle (µm).

    Returns a :class:`Tissue` whose rasters sit on a ``grid_um`` lattice (``[y, x]``) and whose
    cell table is in µm (origin top-left, y down). Deterministic for a given ``rng`` state.
    """
    with single_threaded_blas():
        return _layout(params, width_um, height_um, rng, grid_um)


def _layout(params: TissueParams, width_um: float, height_um: float, rng, grid_um: float) -> Tissue:
    from core.synth.cells import populate

    shape = (int(np.ceil(height_um / grid_um)), int(np.ceil(width_um / grid_um)))
    g = 1.0 / grid_um  # grid px per µm
    comp = _base_compartments(rng, shape, params, g)
    glands = _paint_tumour(rng, comp, params, g)
    _paint_lymphoid(rng, comp, params, g)
    _paint_ducts(rng, comp, g)
    vessels = _paint_vessels(rng, comp, g)
    direction, fibre = _collagen(rng, shape, g)
    membrane = _adipocyte_membranes(rng, comp, g)
    cells, rbc = populate(rng, comp, params, grid_um=grid_um, glands=glands, vessels=vessels, direction=direction)
    log.debug("tissue %s: %d cells, %d red cells", params.subtype, len(cells), len(rbc))
    return Tissue(params, float(width_um), float(height_um), grid_um, comp, fibre, membrane, cells, rbc)


def _base_compartments(rng, shape, params: TissueParams, g: float) -> np.ndarray:
    """Glass / stroma / adipose: an irregular tissue piece, fat lobules inside it."""
    h, w = shape
    yy = (np.arange(h, dtype=np.float32)[:, None] - h / 2) / (h / 2)
    xx = (np.arange(w, dtype=np.float32)[None, :] - w / 2) / (w / 2)
    radial = np.sqrt(xx ** 2 + yy ** 2)
    score = -1.6 * radial + 0.5 * smooth_noise(rng, shape, 260 * g) + 0.06 * smooth_noise(rng, shape, 25 * g)
    score[[0, -1], :] = score[:, [0, -1]] = -1e3  # keep a rim of glass so the edge is visible
    tissue = ndimage.binary_fill_holes(score > np.quantile(score, 1.0 - params.tissue_frac))
    comp = np.where(tissue, STROMA, GLASS).astype(np.uint8)
    if params.adipose_frac > 0.01:
        fat = smooth_noise(rng, shape, 160 * g) + 0.8 * radial
        fat_thr = np.quantile(fat[tissue], 1.0 - params.adipose_frac)
        comp[tissue & (fat > fat_thr)] = ADIPOSE
    return comp


def _ellipse_box(comp, cx, cy, rx, ry, angle):
    """Bounding-box slices and the normalised elliptical radius² over the box (grid px)."""
    r = max(rx, ry) + 1
    y0, y1 = max(int(cy - r), 0), min(int(cy + r) + 2, comp.shape[0])
    x0, x1 = max(int(cx - r), 0), min(int(cx + r) + 2, comp.shape[1])
    y1, x1 = max(y1, y0), max(x1, x0)  # a shape entirely off the lattice gives an empty box
    yy, xx = np.mgrid[y0:y1, x0:x1]
    dx, dy = xx + 0.5 - cx, yy + 0.5 - cy
    c, s = np.cos(angle), np.sin(angle)
    u, v = dx * c + dy * s, -dx * s + dy * c
    return (slice(y0, y1), slice(x0, x1)), (u / rx) ** 2 + (v / ry) ** 2


def _paint_tumour(rng, comp, params: TissueParams, g: float) -> np.ndarray:
    """Tumour nests in the stroma; returns glands as an array of (x_um, y_um, radius_um)."""
    shape = comp.shape
    avail = comp == STROMA
    target = params.tumour_frac * np.count_nonzero(comp != GLASS)
    bed = smooth_noise(rng, shape, 300 * g)
    share_glands = {"LumA": 0.85, "LumB": 0.5, "Her2": 0.2, "Basal": 0.0, "Normal": 0.9}[params.subtype]
    nest_scale = {"LumA": 30, "LumB": 40, "Her2": 55, "Basal": 110, "Normal": 30}[params.subtype]
    if share_glands < 1:
        score = 0.9 * bed + smooth_noise(rng, shape, nest_scale * g) + 0.25 * smooth_noise(rng, shape, 12 * g)
        n_nest = int(target * (1 - share_glands))
        if n_nest > 0 and avail.any():
            thr = np.partition(score[avail], -min(n_nest, avail.sum()))[-min(n_nest, avail.sum())]
            comp[avail & (score >= thr)] = TUMOUR
    glands = _paint_glands(rng, comp, bed, target, params.subtype, g)
    return glands


def _paint_glands(rng, comp, bed, target, subtype, g) -> np.ndarray:
    """Tubules: rings of tumour around a lumen, clustered where the tumour bed field is high."""
    glands = []
    r_lo, r_hi = (22, 48) if subtype in ("LumA", "Normal") else (26, 65)
    area = np.count_nonzero(comp == TUMOUR)
    cand_y, cand_x = np.nonzero(comp[::3, ::3] == STROMA)
    cand_y, cand_x = cand_y * 3, cand_x * 3
    if len(cand_x) == 0:
        return np.zeros((0, 3))
    weight = np.exp(3.5 * bed[cand_y, cand_x]).astype(np.float64)
    picks = rng.choice(len(cand_x), size=4000, p=weight / weight.sum())
    for k in picks:
        if area >= target:
            break
        cx, cy = cand_x[k] + 0.5, cand_y[k] + 0.5
        if comp[cand_y[k], cand_x[k]] != STROMA:
            continue
        R = rng.uniform(r_lo, r_hi) * g
        ry, ang = R * rng.uniform(0.6, 1.0), rng.uniform(0, np.pi)
        sl, d = _ellipse_box(comp, cx, cy, R, ry, ang)
        box = comp[sl]
        ring = (d < 1) & (box == STROMA)
        box[ring] = TUMOUR
        lumen_scale = rng.uniform(0.15, 0.42)
        box[(d < lumen_scale ** 2) & ring] = LUMEN
        area += int(ring.sum())
        glands.append((cx / g, cy / g, R / g))
    return np.array(glands).reshape(-1, 3)


def _blob_centres(rng, comp, n, allowed, near=None, near_um=200.0, g=1.0):
    """Up to ``n`` random grid positions inside ``allowed`` (optionally within ``near_um`` of ``near``)."""
    mask = np.isin(comp, allowed)
    if near is not None and near.any():
        dist = ndimage.distance_transform_edt(~near[::8, ::8]) * 8
        close = upsample_linear(dist, 8, comp.shape) < near_um * g
        mask = mask & close if (mask & close).any() else mask
    ys, xs = np.nonzero(mask[::4, ::4])  # a 4-px sub-lattice is plenty for blob centres
    if len(xs) == 0 or n <= 0:
        return np.zeros((0, 2))
    k = rng.choice(len(xs), size=min(n, len(xs)), replace=False)
    return np.column_stack([xs[k] * 4 + 0.5, ys[k] * 4 + 0.5])


def _paint_lymphoid(rng, comp, params: TissueParams, g: float) -> None:
    """Lymphoid aggregates: irregular dense discs in the stroma, more of them when immune is high."""
    tissue_mm2 = np.count_nonzero(comp != GLASS) / g ** 2 / 1e6
    n = rng.poisson(params.immune * 4.5 * tissue_mm2)
    for cx, cy in _blob_centres(rng, comp, n, [STROMA], near=comp == TUMOUR, g=g):
        R = rng.uniform(35, 95) * g
        sl, d = _ellipse_box(comp, cx, cy, R, R * rng.uniform(0.6, 1.0), rng.uniform(0, np.pi))
        box = comp[sl]
        iy, ix = np.indices(d.shape)
        theta = np.arctan2(iy - d.shape[0] / 2, ix - d.shape[1] / 2)
        wobble = 0.2 * np.sin(3 * theta + rng.uniform(0, 6.3)) + 0.1 * np.sin(5 * theta + rng.uniform(0, 6.3))
        box[(d < 1 + wobble) & (box == STROMA)] = LYMPHOID


def _paint_ducts(rng, comp, g: float) -> None:
    """A few benign lobules: clusters of small acini (two cell layers around a tiny lumen)."""
    tissue_mm2 = np.count_nonzero(comp != GLASS) / g ** 2 / 1e6
    for lx, ly in _blob_centres(rng, comp, rng.poisson(0.8 * tissue_mm2), [STROMA], g=g):
        for _ in range(rng.integers(4, 11)):
            cx, cy = lx + rng.normal(0, 35 * g), ly + rng.normal(0, 35 * g)
            R = rng.uniform(11, 18) * g
            sl, d = _ellipse_box(comp, cx, cy, R, R * rng.uniform(0.7, 1.0), rng.uniform(0, np.pi))
            box = comp[sl]
            acinus = (d < 1) & (box == STROMA)
            box[acinus] = DUCT
            box[acinus & (d < 0.12)] = LUMEN


def _paint_vessels(rng, comp, g: float) -> np.ndarray:
    """Capillaries and venules; returns (x_um, y_um, rx_um, ry_um, angle) per vessel."""
    ok = [STROMA, ADIPOSE, LYMPHOID]
    area_mm2 = np.count_nonzero(np.isin(comp, ok)) / g ** 2 / 1e6
    out = []
    for cx, cy in _blob_centres(rng, comp, rng.poisson(55 * area_mm2), ok, g=g):
        rx = float(np.clip(rng.lognormal(np.log(9), 0.45), 4, 35))
        ry, ang = rx * rng.uniform(0.35, 1.0), rng.uniform(0, np.pi)
        sl, d = _ellipse_box(comp, cx, cy, rx * g, ry * g, ang)
        box = comp[sl]
        box[(d < 1) & np.isin(box, ok)] = VESSEL
        out.append((cx / g, cy / g, rx, ry, ang))
    return np.array(out).reshape(-1, 5)


def _collagen(rng, shape, g: float, *, n_dirs: int = 8, tile: int = 512) -> tuple[np.ndarray, np.ndarray]:
    """Collagen fibres: streak noise oriented along a slowly turning direction field.

    A periodic ``tile``² of white noise is low-pass filtered in Fourier space with an anisotropic
    Gaussian (long along the fibre, thin across it) for ``n_dirs`` directions; each lattice pixel
    blends the two textures nearest its local direction. Returns the fibre direction (radians,
    from +x towards +y) and the collagen density 0–1, both on the lattice.
    """
    h, w = shape
    import scipy.fft

    spec = scipy.fft.rfft2(rng.standard_normal((tile, tile)).astype(np.float32))
    ky = (np.fft.fftfreq(tile)[:, None] * g).astype(np.float32)  # cycles per µm
    kx = (np.fft.rfftfreq(tile)[None, :] * g).astype(np.float32)
    stack = np.empty((n_dirs + 1, tile, tile), np.float32)
    for k in range(n_dirs):
        t = np.pi * k / n_dirs
        along, across = kx * np.cos(t) + ky * np.sin(t), -kx * np.sin(t) + ky * np.cos(t)
        filt = np.exp(np.float32(-2 * np.pi ** 2) * ((along * 12.0) ** 2 + (across * 0.9) ** 2))
        tex = scipy.fft.irfft2(spec * filt, s=(tile, tile))
        stack[k] = tex / tex.std()
    stack[n_dirs] = stack[0]
    theta = np.mod(rng.uniform(0, np.pi) + 0.9 * smooth_noise(rng, shape, 160 * g), np.pi)
    pos = theta * (n_dirs / np.pi)
    k0 = np.minimum(pos.astype(np.int64), n_dirs - 1)  # float32 rounding can give pos == n_dirs
    wgt = np.clip(pos - k0, 0, 1).astype(np.float32)
    rows = (np.arange(h) % tile)[:, None]
    cols = (np.arange(w) % tile)[None, :]
    flat = stack.reshape(n_dirs + 1, -1)
    lin = rows * tile + cols
    tex = flat[k0, lin] * (1 - wgt) + flat[k0 + 1, lin] * wgt
    # bundles of fibres with thin pale clefts; looser and denser areas
    density = 1.0 / (1.0 + np.exp(-2.5 * (tex + 1.2)))
    density *= 0.8 + 0.2 * smooth_noise(rng, shape, 40 * g)
    return theta.astype(np.float32), np.clip(density, 0, 1).astype(np.float32)


def _adipocyte_membranes(rng, comp, g: float) -> np.ndarray:
    """Thin membranes between adipocytes: Voronoi edges of jittered seeds (within the fat's box)."""
    fat = comp == ADIPOSE
    out = np.zeros(comp.shape, np.float32)
    if not fat.any():
        return out
    rows, cols = np.flatnonzero(fat.any(axis=1)), np.flatnonzero(fat.any(axis=0))
    box = (slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1))
    small = fat[box]
    h, w = small.shape
    spacing = rng.uniform(50, 75) * g
    gy, gx = np.mgrid[0:h:spacing, 0:w:spacing]
    sy = np.clip(gy + rng.uniform(-0.4, 0.4, gy.shape) * spacing, 0, h - 1).astype(int).ravel()
    sx = np.clip(gx + rng.uniform(-0.4, 0.4, gx.shape) * spacing, 0, w - 1).astype(int).ravel()
    seeds = np.ones((h, w), bool)
    seeds[sy, sx] = False
    iy, ix = ndimage.distance_transform_edt(seeds, return_distances=False, return_indices=True)
    lab = iy * w + ix
    edge = np.zeros((h, w), np.float32)
    edge[:-1] += lab[:-1] != lab[1:]
    edge[:, :-1] += lab[:, :-1] != lab[:, 1:]
    # the fat lobule's own border also carries a membrane
    edge = np.maximum(np.minimum(edge, 1), small & ~ndimage.binary_erosion(small))
    out[box] = edge * small
    return out
