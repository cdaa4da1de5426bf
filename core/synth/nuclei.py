"""Nuclei, cytoplasm and red cells for the H&E renderer, without any per-cell pixel loop.

Every lattice pixel is owned by its nearest object centre (a Euclidean feature transform);
full-resolution pixels inherit the owner of their lattice pixel, and the owner's ellipse,
chromatin and cytoplasm parameters are gathered per pixel. Positions are level-0 px, (x, y).
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage

from core.synth.reference import CELL_TYPES

RBC = len(CELL_TYPES)  # object kind of red cells, after the 8 cell types
_PLASMA = CELL_TYPES.index("b_plasma")

# Per kind (8 cell types + red cell): chromatin base, rim, granularity, contour irregularity,
# nucleolus strength, cytoplasm radius (× nuclear semi-major; 0 = none), cytoplasm E and H, bean notch.
_KIND = np.array([
    # base  rim   gran  irr   nucl  cyto  cytE  cytH  notch
    [0.34, 0.95, 0.10, 0.035, 0.80, 0.0, 0.00, 0.00, 0.0],  # malignant_epithelial: vesicular, nucleolus
    [0.62, 0.55, 0.16, 0.045, 0.55, 0.0, 0.00, 0.00, 0.0],  # cycling_malignant: hyperchromatic
    [0.70, 0.30, 0.10, 0.020, 0.00, 0.0, 0.00, 0.00, 0.0],  # normal_epithelial
    [0.85, 0.10, 0.08, 0.030, 0.00, 0.0, 0.00, 0.00, 0.0],  # fibroblast: thin, dark spindle
    [0.78, 0.10, 0.08, 0.020, 0.00, 0.0, 0.00, 0.00, 0.0],  # endothelial
    [1.00, 0.10, 0.08, 0.015, 0.00, 0.0, 0.00, 0.00, 0.0],  # t_cell: small, dark, round
    [0.70, 0.55, 0.22, 0.015, 0.00, 1.9, 0.30, 0.20, 0.0],  # b_plasma: clock-face, amphophilic
    [0.52, 0.40, 0.12, 0.030, 0.00, 2.2, 0.30, 0.05, 0.4],  # macrophage: bean, pale cytoplasm
    [0.00, 0.00, 0.00, 0.010, 0.00, 0.0, 0.00, 0.00, 0.0],  # red cell: no nucleus
], dtype=np.float32)
_MITOSIS = [1.25, 0.0, 0.45, 0.30, 0.0, 1.8, 0.10, 0.02, 0.0]  # ragged dark plate in a clear halo


def objects(tissue, mpp: float, rng: np.random.Generator) -> dict:
    """Per-object parameter arrays (cells then red cells); positions and sizes in level-0 px."""
    cells, rbc = tissue.cells, tissue.rbc
    kind = np.concatenate([cells["cell_type"].cat.codes.to_numpy(), np.full(len(rbc), RBC)]).astype(int)

    def col(name):
        extra = rbc[name].to_numpy(np.float32) if len(rbc) else np.zeros(0, np.float32)
        return np.concatenate([cells[name].to_numpy(np.float32), extra])

    x, y, ang = col("x_um") / mpp, col("y_um") / mpp, col("angle")
    a = np.maximum(col("major_um") / 2 / mpp, 0.8)
    b = np.maximum(col("minor_um") / 2 / mpp, 0.6)
    dark = np.concatenate([cells["darkness"].to_numpy(np.float32), np.ones(len(rbc), np.float32)])
    k = _KIND[kind].copy()
    k[np.concatenate([cells["mitotic"].to_numpy(bool), np.zeros(len(rbc), bool)])] = _MITOSIS
    n = len(kind)
    big = 1.35 if tissue.params.subtype in ("Her2", "Basal") else 1.0
    nucl_r = np.float32(0.9 * big / mpp) / a  # nucleolus radius, in units of the semi-major axis
    theta = rng.uniform(0, 2 * np.pi, n)
    off = np.where(kind == _PLASMA, 0.95 * a, 0.2 * a)  # eccentric plasma-cell nucleus
    f32 = lambda v: np.asarray(v, np.float32)  # noqa: E731
    return {
        "n": n, "kind": kind, "x": f32(x), "y": f32(y), "a": f32(a),
        "ca": f32(np.cos(ang) / a), "sa": f32(np.sin(ang) / a),
        "cb": f32(np.cos(ang) / b), "sb": f32(np.sin(ang) / b),
        "base": f32(dark * k[:, 0]), "rim": f32(dark * k[:, 1]), "gran": f32(dark * k[:, 2]),
        "irr": f32(k[:, 3]), "notch": f32(k[:, 8]), "rbc": f32(kind == RBC),
        "nucl": f32(dark * k[:, 4] * (kind <= 1)), "nucl_p": f32(rng.uniform(-0.3, 0.3, n)),
        "nucl_ir2": f32(1 / nucl_r ** 2),
        "reach": f32(a * (1.1 + 3.0 * k[:, 3]) + 1.0),
        "cyto_r": f32(k[:, 5] * a), "cyto_e": f32(k[:, 6]), "cyto_h": f32(k[:, 7]),
        "ox": f32(off * np.cos(theta)), "oy": f32(off * np.sin(theta)),
        "hof": f32((kind == _PLASMA) * 0.75),
    }


def owners(shape: tuple[int, int], o: dict, f: int) -> np.ndarray:
    """Index of the nearest object centre per lattice pixel (int32 [rows, cols]); -1 if no object.

    ``f`` is level-0 px per lattice pixel. Nucleated cells are seeded last so they win a lattice
    pixel shared with a red cell.
    """
    h, w = shape
    if o["n"] == 0:
        return np.full((h, w), -1, np.int32)
    gx = np.clip((o["x"] / f).astype(int), 0, w - 1)
    gy = np.clip((o["y"] / f).astype(int), 0, h - 1)
    ids = np.full((h, w), -1, np.int32)
    order = np.arange(o["n"])[::-1]
    ids[gy[order], gx[order]] = order
    iy, ix = ndimage.distance_transform_edt(ids < 0, return_distances=False, return_indices=True)
    return ids[iy, ix]


def lattice_layers(owner: np.ndarray, o: dict, f: int, bg_e: np.ndarray, bg_h: np.ndarray) -> np.ndarray:
    """Paint cytoplasm of macrophages, plasma cells and mitoses into the lattice backgrounds
    (in place) and return the lattice mask of pixels that may hold a nucleus or red cell."""
    h, w = owner.shape
    if o["n"] == 0:
        return np.zeros((h, w), bool)
    flat = owner.ravel()
    px = (np.arange(h * w) % w + 0.5) * f
    py = (np.arange(h * w) // w + 0.5) * f
    # lattice pixels whose centre lies within reach (+ half a lattice diagonal) of the owner
    dx, dy = px - o["x"][flat], py - o["y"][flat]
    active = (dx * dx + dy * dy) < (o["reach"][flat] + 0.75 * f) ** 2
    sel = np.flatnonzero(o["cyto_r"][flat] > 0)
    if sel.size:
        own = flat[sel]
        cx, cy = dx[sel] - o["ox"][own], dy[sel] - o["oy"][own]
        d2 = (cx * cx + cy * cy) / o["cyto_r"][own] ** 2
        cyto = np.clip((1.0 - d2) * 3.0, 0, 1)
        hof = np.clip(1.0 - d2 * 5.0, 0, 1) * o["hof"][own]  # pale Golgi zone beside the nucleus
        e, hh = bg_e.reshape(-1), bg_h.reshape(-1)
        e[sel] += (o["cyto_e"][own] * (1 - hof) - e[sel]) * cyto
        hh[sel] += (o["cyto_h"][own] * (1 - hof) - hh[sel]) * cyto
    return active.reshape(h, w)


def draw(r0: int, r1: int, width: int, f: int, o: dict, owner: np.ndarray, active: np.ndarray,
         c_e: np.ndarray, c_h: np.ndarray, strips: dict) -> None:
    """Composite nuclei and red cells over rows ``r0:r1`` of the concentration maps (in place).

    Only full-resolution pixels whose lattice pixel is ``active`` are computed, as flat arrays.
    """
    gy = np.minimum(np.arange(r0, r1) // f, owner.shape[0] - 1)
    gx = np.minimum(np.arange(width) // f, owner.shape[1] - 1)
    idx = np.flatnonzero(active[gy][:, gx])
    if idx.size == 0:
        return
    own = owner[gy][:, gx].ravel()[idx]
    dx = (idx % width).astype(np.float32) + np.float32(0.5) - o["x"][own]
    dy = (idx // width + r0).astype(np.float32) + np.float32(0.5) - o["y"][own]
    period = strips["gran"].size
    sidx = (idx + r0 * width) % period
    un = dx * o["ca"][own] + dy * o["sa"][own]
    vn = dy * o["cb"][own] - dx * o["sb"][own]
    r = np.sqrt(un * un + vn * vn)
    reff = r + o["irr"][own] * strips["edge"].ravel()[sidx]
    reff += o["notch"][own] * np.clip((0.2 - (un - 1.0) ** 2 - vn * vn) * 6.0, 0, 1)  # kidney-bean bite
    nuc = np.clip((1.0 - reff) * o["a"][own] + 0.5, 0, 1)
    keep = np.flatnonzero(nuc > 0)
    idx, own, r, un, vn, nuc, sidx = idx[keep], own[keep], r[keep], un[keep], vn[keep], nuc[keep], sidx[keep]
    rim = np.clip((r - 0.62) * 2.6, 0, 1)
    h_nuc = o["base"][own] + o["rim"][own] * rim * rim + o["gran"][own] * strips["gran"].ravel()[sidx]
    dn = (un - o["nucl_p"][own]) ** 2 + vn * vn
    h_nuc += o["nucl"][own] * np.clip(1.6 - dn * o["nucl_ir2"][own], 0, 1)
    e_flat, h_flat = c_e.reshape(-1), c_h.reshape(-1)
    e = e_flat[idx]
    is_rbc = o["rbc"][own]
    e_flat[idx] = e + nuc * (0.10 + is_rbc * (0.62 + 0.45 * r * r) - e)
    h_flat[idx] = h_flat[idx] * (1 - nuc) + nuc * np.float32(2.0) * np.maximum(h_nuc, 0)
