"""H&E rendering of a laid-out :class:`~core.synth.tissue.Tissue` through a Beer–Lambert stain model.

Every pixel gets a hematoxylin and an eosin concentration; the colour is
``I_c = 255 · exp(-(C_H · OD_H[c] + C_E · OD_E[c] + OD_glass[c]))`` with the Ruifrok–Johnston
stain vectors. Backgrounds (stroma collagen, cytoplasm, fat, lumens) live on the tissue lattice
and are upsampled; nuclei are drawn at full resolution by :mod:`core.synth.nuclei`. The image is
processed in bands of rows to stay cache-friendly. Output pixels are level-0 px (x right, y down).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from core.synth import nuclei
from core.synth.fields import blur121, noise_strip, single_threaded_blas, smooth_noise, upsample_linear
from core.synth.tissue import ADIPOSE, DUCT, LUMEN, LYMPHOID, STROMA, TUMOUR, VESSEL, Tissue

# Ruifrok & Johnston (2001) optical-density vectors, normalised to unit length.
OD_H = np.array([0.650, 0.704, 0.286]) / np.linalg.norm([0.650, 0.704, 0.286])
OD_E = np.array([0.072, 0.990, 0.105]) / np.linalg.norm([0.072, 0.990, 0.105])

# Background stain per compartment: glass, stroma, tumour, lumen, vessel, adipose, lymphoid, duct.
_BG_E = np.array([0.0, 0.12, 0.40, 0.03, 0.08, 0.0, 0.24, 0.34], np.float32)
_BG_H = np.array([0.0, 0.0, 0.11, 0.01, 0.01, 0.0, 0.10, 0.10], np.float32)
_CYTO_E = {"LumA": 0.40, "LumB": 0.40, "Her2": 0.50, "Basal": 0.33, "Normal": 0.38}


@dataclass(frozen=True)
class Stain:
    """One slide's staining: stain vectors, concentration scales, glass tint (OD), sensor noise."""

    od_h: np.ndarray
    od_e: np.ndarray
    h_scale: float = 1.0
    e_scale: float = 1.0
    glass_od: tuple[float, float, float] = (0.022, 0.038, 0.034)
    noise_sd: float = 2.0


def random_stain(rng: np.random.Generator) -> Stain:
    """Per-slide stain variation: intensity jitter ±20 %, small hue rotations, glass tint."""
    def jitter(v):
        w = v * np.exp(rng.normal(0, 0.06, 3))
        return w / np.linalg.norm(w)
    tint = np.array([0.022, 0.038, 0.034]) * np.exp(rng.normal(0, 0.25, 3))
    return Stain(jitter(OD_H), jitter(OD_E), float(rng.uniform(0.82, 1.18)), float(rng.uniform(0.8, 1.2)),
                 tuple(float(t) for t in tint), float(rng.uniform(1.2, 2.6)))


def render_he(tissue: Tissue, *, mpp: float = 0.5, rng: np.random.Generator | None = None,
              stain: Stain | None = None, band: int = 256) -> np.ndarray:
    """RGB uint8 image [height_px, width_px, 3] of ``tissue`` at ``mpp`` µm/px (level 0).

    The tissue lattice must be an integer multiple of ``mpp`` (1 µm lattice at 0.5 µm/px → 2).
    """
    rng = rng or np.random.default_rng(0)
    stain = stain or random_stain(rng)
    f = int(round(tissue.grid_um / mpp))
    if f < 1 or abs(f * mpp - tissue.grid_um) > 1e-6:
        raise ValueError(f"grid {tissue.grid_um} µm is not an integer multiple of {mpp} µm/px")
    with single_threaded_blas():
        return _render(tissue, mpp, rng, stain, band, f)


def _render(tissue: Tissue, mpp: float, rng, stain: Stain, band: int, f: int) -> np.ndarray:
    width, height = int(round(tissue.width_um / mpp)), int(round(tissue.height_um / mpp))
    objs = nuclei.objects(tissue, mpp, rng)
    owner = nuclei.owners(tissue.comp.shape, objs, f)
    bg_e, bg_h = _backgrounds(tissue, owner, rng)
    active = nuclei.lattice_layers(owner, objs, f, bg_e, bg_h)
    strips = {"gran": noise_strip(rng, width, 0.7), "edge": noise_strip(rng, width, 3.0),
              "sensor": [noise_strip(rng, width, 0.0) for _ in range(3)]}
    out = np.empty((height, width, 3), np.uint8)
    for y0 in range(0, height, band):
        y1 = min(y0 + band, height)
        r0, r1 = max(y0 - 1, 0), min(y1 + 1, height)  # 1-row halo for the optical blur
        c_e, c_h = _rows(bg_e, r0, r1, f, width), _rows(bg_h, r0, r1, f, width)
        nuclei.draw(r0, r1, width, f, objs, owner, active, c_e, c_h, strips)
        out[y0:y1] = _colour(blur121(c_e)[y0 - r0: y1 - r0], blur121(c_h)[y0 - r0: y1 - r0], y0, strips, stain)
    return out


def _backgrounds(tissue: Tissue, owner: np.ndarray, rng) -> tuple[np.ndarray, np.ndarray]:
    """Eosin and hematoxylin of everything that is not a nucleus, on the tissue lattice."""
    comp, g = tissue.comp, 1.0 / tissue.grid_um
    bg_e, bg_h = _BG_E[comp], _BG_H[comp]
    tumour = comp == TUMOUR
    texture = smooth_noise(rng, comp.shape, 5 * g)
    cyto_e = _CYTO_E[tissue.params.subtype] * (0.88 + 0.12 * texture)
    bg_e = np.where(tumour, cyto_e, bg_e)
    stroma = comp == STROMA
    bg_e = np.where(stroma, 0.06 + 0.46 * tissue.fibre, bg_e)
    # retraction clefts: a thin clear gap between nests and the surrounding stroma
    cleft = stroma & ndimage.binary_dilation(tumour, iterations=2)
    bg_e[cleft] *= 0.25
    bg_h[cleft] *= 0.25
    fat = comp == ADIPOSE
    bg_e = np.where(fat, 0.6 * tissue.membrane, bg_e)
    bg_h = np.where(fat, 0.03 * tissue.membrane, bg_h)
    # secretions: some lumens hold pale pink material
    lumen = comp == LUMEN
    bg_e[lumen] += 0.15 * np.clip(smooth_noise(rng, comp.shape, 40 * g)[lumen] - 0.6, 0, 1)
    bg_e[comp == VESSEL] += 0.04
    # faint cell borders between epithelial cells (owner changes inside nests and ducts)
    epi = tumour | (comp == DUCT)
    border = np.zeros(comp.shape, bool)
    border[:, 1:] |= owner[:, 1:] != owner[:, :-1]
    border[1:, :] |= owner[1:, :] != owner[:-1, :]
    border &= epi
    bg_e[border] += 0.10
    bg_h[border] += 0.03
    bg_h = np.where(comp == LYMPHOID, bg_h * (0.8 + 0.2 * texture), bg_h)
    # soften lattice steps at compartment borders (the tissue edge, lumens, fat)
    return blur121(bg_e.astype(np.float32)), blur121(bg_h.astype(np.float32))


def _rows(a: np.ndarray, r0: int, r1: int, f: int, width: int) -> np.ndarray:
    """Full-res rows ``r0:r1`` of lattice map ``a`` upsampled ×f (linear)."""
    g0, g1 = r0 // f, min((r1 - 1) // f + 2, a.shape[0])
    up = upsample_linear(a[g0:g1], f) if f > 1 else a[g0:g1]
    up = up[r0 - g0 * f: r1 - g0 * f, :width]
    if up.shape[0] < r1 - r0:  # bottom edge: repeat the last row
        up = np.concatenate([up, np.repeat(up[-1:], r1 - r0 - up.shape[0], axis=0)])
    return np.ascontiguousarray(up)


def _colour(c_e: np.ndarray, c_h: np.ndarray, y0: int, strips: dict, stain: Stain) -> np.ndarray:
    """Beer–Lambert: stain concentrations → RGB uint8, plus sensor noise."""
    srow = np.arange(y0, y0 + c_e.shape[0]) % strips["gran"].shape[0]
    c_e *= np.float32(stain.e_scale)
    c_h *= np.float32(stain.h_scale)
    rgb = np.empty(c_e.shape + (3,), np.uint8)
    for ch in range(3):
        od = c_h * np.float32(stain.od_h[ch]) + c_e * np.float32(stain.od_e[ch])
        val = np.exp(-(od + np.float32(stain.glass_od[ch])))
        val *= np.float32(255.0)
        val += strips["sensor"][ch][srow] * np.float32(stain.noise_sd)
        rgb[..., ch] = np.clip(val, 0, 255)
    return rgb
