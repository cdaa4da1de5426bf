"""Cells from nuclei: a reference cell type per nucleus and a profile per cell consistent with its
tile's predicted expression (GHIST's idea, in its simplest sound form).

Per tile, with the model's composition π (cell fractions over the reference types), its predicted
expression ŷ (log1p CP10k) and the reference profiles R (types × genes, log1p CP10k):

1. **Type.** Each nucleus has class probabilities p(c | x) over the nucleus classes
   (:data:`core.wsi.nuclei.CLASSES`); a type t looks like class c with likelihood M[t, c]
   (:func:`type_likelihood`, from which reference types each class stands for). The posterior is
   P(t | x, tile) ∝ π_t · Σ_c M[t, c] p(c | x); the type is its argmax, the confidence its maximum.
   A learned typer (:mod:`models.cellhead`) can replace this posterior.
2. **Refinement (NNLS).** In linear space the tile is a mixture of its cells:
   expm1(ŷ) ≈ Σ_t w_t P_t with P = expm1(R) and w ≥ 0 over the types present among its cells
   (scipy's non-negative least squares). ``w_t / n_t`` is the per-type scale factor: one cell of
   type t's share of the tile's mRNA. What the mixture misses per gene is the tile's residual
   ratio ρ_g = expm1(ŷ_g) / Σ_t w_t P_tg (clipped to [¼, 4]), shared by the tile's cells.
3. **Profile.** A cell of type t in the tile: P_t ⊙ ρ, normalised to 10⁴ and log1p-transformed, like
   the targets (``residual=False``: the reference profile P_t alone). Summed over a tile's cells
   with their shares, the profiles give back the tile's prediction wherever ρ is not clipped.

The cells table stores, per cell, the type and confidence; per tile, ``w`` and the normalisers
``z_t = Σ_g P_tg ρ_g``: a cell's value of any gene is then computed from the tile's stored
prediction (:func:`cell_values`), so no cells × genes matrix is stored (see the README's measured
layout figures).
"""
from __future__ import annotations

import re

import numpy as np

from core.wsi.nuclei import CLASSES

RHO_CLIP = (0.25, 4.0)
_EPS = 1e-3          # CP10k: far below one count in 10⁴
_MISMATCH = 0.05     # likelihood that a nucleus of one class is a type of another class

# keyword → nucleus class, for reference types not listed in a known mapping
_TYPE_WORDS = [
    ("neoplastic", r"malignant|tumou?r|cancer|carcinoma|neoplast|cycling"),
    ("inflammatory", r"^t$|^b$|t[_ ]?cell|b[_ ]?cell|plasma|macrophage|myeloid|monocyte|lymph|immune|nk|dendritic|mast"),
    ("connective", r"fibro|caf|endothel|stroma|pericyte|smooth|muscle|adipo|vascular"),
    ("epithelial", r"epithel|luminal|basal|myoepi|ductal|acinar"),
]


def type_classes(cell_types: list[str]) -> dict[str, str | None]:
    """The nucleus class each reference type looks like (None: no class, e.g. an unknown type)."""
    from core.wsi.nuclei_classes import SYNTH_MAPPING, XENIUM_BREAST_MAPPING

    known = {t: c for mapping in (SYNTH_MAPPING, XENIUM_BREAST_MAPPING) for c, ts in mapping.items() for t in ts}
    out = {}
    for t in cell_types:
        if t in known:
            out[t] = known[t]
            continue
        name = t.lower()
        out[t] = next((c for c, pattern in _TYPE_WORDS if re.search(pattern, name)), None)
    return out


def type_likelihood(cell_types: list[str]) -> np.ndarray:
    """M ``(T, C)``: P(nucleus class c | reference type t). A type's own class gets most of the
    mass; "other" (fragments, unclassifiable nuclei) is equally likely for every type, so it
    leaves the choice to the tile's composition; a type with no class is flat."""
    classes = type_classes(cell_types)
    other = CLASSES.index("other")
    m = np.full((len(cell_types), len(CLASSES)), _MISMATCH)
    for i, t in enumerate(cell_types):
        c = classes[t]
        if c is None:
            m[i] = 1.0
        else:
            m[i, CLASSES.index(c)] = 1.0
        m[i, other] = 1.0
    return m


def type_posterior(class_probs: np.ndarray, prior: np.ndarray, likelihood: np.ndarray) -> np.ndarray:
    """P(t | x, tile) ``(n, T)`` for ``n`` nuclei of one tile: ``prior`` ``(T,)`` is the tile's
    composition, ``likelihood`` from :func:`type_likelihood`."""
    post = (np.asarray(class_probs, np.float64) @ likelihood.T) * np.maximum(np.asarray(prior, np.float64), 1e-6)
    total = post.sum(axis=1, keepdims=True)
    return np.divide(post, total, out=np.full_like(post, 1.0 / post.shape[1]), where=total > 0)


def refine_tile(expression: np.ndarray, profiles_lin: np.ndarray, counts: np.ndarray, *,
                clip: tuple[float, float] | None = RHO_CLIP) -> tuple[np.ndarray, np.ndarray]:
    """NNLS mixture weights ``w`` ``(T,)`` of the types present (``counts > 0``) and the residual
    ratio ρ ``(G,)`` of one tile; ``expression`` is log1p CP10k, ``profiles_lin`` is expm1(R)."""
    from scipy.optimize import nnls

    target = np.maximum(np.expm1(np.asarray(expression, np.float64)), 0.0)
    present = np.flatnonzero(np.asarray(counts) > 0)
    w = np.zeros(profiles_lin.shape[0])
    if present.size:
        w[present] = nnls(profiles_lin[present].T, target, maxiter=50 * len(present))[0]
    mix = w @ profiles_lin
    rho = _clipped((target + _EPS) / (mix + _EPS), clip) if w.any() else np.ones_like(target)
    return w, rho


def _clipped(rho: np.ndarray, clip: tuple[float, float] | None) -> np.ndarray:
    return rho if clip is None else np.clip(rho, *clip)


def platform_factor(targets_log: np.ndarray, profiles_log: np.ndarray, *, min_mix: float = 1e-2) -> np.ndarray:
    """Per-gene platform factor f ``(G,)`` between measured tiles/spots and the reference profiles.

    A single-cell reference and a spot platform count genes differently (capture, probe design,
    normalisation over different panels), so even a perfect mixture of reference profiles misses
    some genes by a constant factor on every spot: the refinement's residual ρ then sits at its
    clip and carries no spot-to-spot signal. Per spot, the mixture of all reference types that best
    explains the spot (NNLS in linear CP10k, as :func:`refine_tile`) gives mix; f_g is the median
    over spots of expm1(y_g) / mix_g (spots with mix_g < ``min_mix`` CP10k skipped; 1 where no spot
    qualifies), clipped to [10⁻³, 10³]. Apply it with :func:`scaled_profiles`.

    Computed on training targets (measured spots), never on the spots it is tested on."""
    from scipy.optimize import nnls

    y = np.maximum(np.expm1(np.asarray(targets_log, np.float64)), 0.0)
    p_lin = np.expm1(np.asarray(profiles_log, np.float64))
    mix = np.stack([np.asarray(nnls(p_lin.T, row, maxiter=50 * len(p_lin))[0]) @ p_lin for row in y]) if len(y) else y
    ratio = np.where(mix >= min_mix, (y + _EPS) / np.maximum(mix, _EPS), np.nan)
    with np.errstate(all="ignore"):
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            f = np.nanmedian(ratio, axis=0) if len(ratio) else np.ones(p_lin.shape[1])
    return np.clip(np.where(np.isfinite(f), f, 1.0), 1e-3, 1e3)


def scaled_profiles(profiles_log: np.ndarray, factor: np.ndarray | None) -> np.ndarray:
    """Reference profiles (log1p CP10k) in the platform's units: log1p(expm1(R) ⊙ f), each type
    renormalised to 10⁴ over the panel, as the targets are."""
    if factor is None:
        return np.asarray(profiles_log, np.float64)
    lin = np.expm1(np.asarray(profiles_log, np.float64)) * np.asarray(factor, np.float64)[None, :]
    total = lin.sum(axis=1, keepdims=True)
    return np.log1p(np.divide(lin, total, out=np.zeros_like(lin), where=total > 0) * 1e4)


def cell_profiles(types: np.ndarray, profiles_lin: np.ndarray, rho: np.ndarray | None) -> np.ndarray:
    """Profiles ``(n, G)`` (log1p CP10k) of cells of ``types`` in one tile with residual ``rho``."""
    lin = profiles_lin[types] * (1.0 if rho is None else rho[None, :])
    total = lin.sum(axis=1, keepdims=True)
    return np.log1p(np.divide(lin, total, out=np.zeros_like(lin), where=total > 0) * 1e4)


def chunk_cells(records: list[np.ndarray], composition: np.ndarray, expression: np.ndarray, profiles_log: np.ndarray,
                cell_types: list[str], *, typer=None, clip: tuple[float, float] | None = RHO_CLIP) -> dict[str, np.ndarray]:
    """Type and refine the cells of many tiles (one list entry of records per tile, rows of
    :data:`core.wsi.cells.CELL_FIELDS`). Returns flat per-cell arrays (``tile`` = position in the
    list, ``cell_type``, ``confidence``) and per-tile ``w`` and ``z`` ``(N, T)``.

    ``typer``: an object with ``posterior(records, composition) -> (n, T)`` (the learned head);
    the default is :func:`type_posterior`.
    """
    from core.wsi.cells import class_probs

    profiles_lin = np.expm1(np.asarray(profiles_log, np.float64))
    likelihood = type_likelihood(list(cell_types))
    n_tiles, n_types = len(records), len(cell_types)
    w_all, z_all = np.zeros((n_tiles, n_types), np.float32), np.zeros((n_tiles, n_types), np.float32)
    tiles, types, conf = [], [], []
    for i, rec in enumerate(records):
        if len(rec) == 0:
            continue
        post = (typer.posterior(rec, composition[i]) if typer is not None
                else type_posterior(class_probs(rec), composition[i], likelihood))
        t = post.argmax(axis=1)
        counts = np.bincount(t, minlength=n_types)
        w, rho = refine_tile(expression[i], profiles_lin, counts, clip=clip)
        w_all[i], z_all[i] = w, profiles_lin @ rho
        tiles.append(np.full(len(rec), i, np.int32))
        types.append(t.astype(np.int16))
        conf.append(post.max(axis=1).astype(np.float32))
    cat = (lambda parts, dtype: np.concatenate(parts) if parts else np.zeros(0, dtype))  # noqa: E731
    return {"tile": cat(tiles, np.int32), "cell_type": cat(types, np.int16), "confidence": cat(conf, np.float32),
            "w": w_all, "z": z_all}


def cell_values(gene_index: int | np.ndarray, cell_type: np.ndarray, cell_tile: np.ndarray, w: np.ndarray,
                z: np.ndarray, tile_expression: np.ndarray, profiles_log: np.ndarray, *,
                residual: bool = True, clip: tuple[float, float] | None = RHO_CLIP) -> np.ndarray:
    """Per-cell values (log1p CP10k) of one gene (``gene_index`` int → ``(n,)``) or several
    (an index array → ``(n, k)``), from the stored factors: the cells' ``cell_type`` and
    ``cell_tile`` (row into ``w``, ``z`` and ``tile_expression``, the tiles' predictions of those
    genes ``(N,)`` or ``(N, k)``). ``residual=False`` gives the reference profile alone."""
    gi = np.atleast_1d(gene_index)
    p_lin = np.expm1(np.asarray(profiles_log, np.float64))
    y = np.asarray(tile_expression, np.float64).reshape(len(w), -1)
    t, k = np.asarray(cell_type, np.int64), np.asarray(cell_tile, np.int64)
    if residual:
        mix = np.asarray(w, np.float64) @ p_lin[:, gi]                       # (N, k)
        target = np.maximum(np.expm1(y), 0.0)
        rho = np.where(np.asarray(w).any(axis=1, keepdims=True),
                       _clipped((target + _EPS) / (mix + _EPS), clip), 1.0)
        lin = p_lin[t][:, gi] * rho[k]
        norm = np.asarray(z, np.float64)[k, t]
    else:
        lin = p_lin[t][:, gi]
        norm = p_lin.sum(axis=1)[t]
    out = np.log1p(np.divide(lin, norm[:, None], out=np.zeros_like(lin), where=norm[:, None] > 0) * 1e4)
    return out[:, 0] if np.ndim(gene_index) == 0 else out
