"""Stain module: synthetic tiles rendered by hand with Beer–Lambert from known stain vectors and
known concentration maps, so every expected value comes from the rendering, not from the module.

Rendering (the module's documented OD convention, I0 = 255 with a +1 guard):
``I = 256 · exp(−(c_H · h + c_E · e)) − 1``, rounded and clipped to uint8.
"""
import numpy as np
import pytest

from core.wsi.stain import (REFERENCE_MAX_CONC, REFERENCE_STAINS, MacenkoNormalizer, StainError,
                            concentrations, from_od, lab_stats, macenko_stains, optical_density,
                            reinhard, stain_jitter)

# Ruifrok & Johnston, "Quantification of histochemical staining by color deconvolution",
# Anal. Quant. Cytol. Histol. 23(4):291–299, 2001, table 1: haematoxylin and eosin OD vectors.
RJ = np.array([[0.650, 0.704, 0.286], [0.072, 0.990, 0.105]])
RJ = RJ / np.linalg.norm(RJ, axis=1, keepdims=True)
N = 128


def _render(conc: np.ndarray, stains: np.ndarray) -> np.ndarray:
    """Beer–Lambert by hand: ``conc`` [H, W, 2], ``stains`` 2 × 3 → uint8 RGB."""
    od = conc[..., 0, None] * stains[0] + conc[..., 1, None] * stains[1]
    return np.clip(np.rint(256.0 * np.exp(-od) - 1.0), 0, 255).astype(np.uint8)


def _maps(h_scale: float = 1.0, e_scale: float = 0.8) -> np.ndarray:
    """Known concentrations [N, N, 2]: rows 0–7 pure H (ramp 0.2 → 2.0 along x), rows 8–15 pure E,
    rows 16–111 H × E mixtures (H along x, E along y), rows 112–127 bare glass (0, 0). Pure pixels
    are 7 % of the tissue each, so only robust extremes near the 1st/99th percentile find them."""
    ramp = np.linspace(0.2, 2.0, N)
    c = np.zeros((N, N, 2))
    c[:8, :, 0] = h_scale * ramp
    c[8:16, :, 1] = e_scale * ramp
    c[16:112, :, 0] = 0.7 * h_scale * ramp[None, :]
    c[16:112, :, 1] = 0.75 * e_scale * np.linspace(0.2, 2.0, 96)[:, None]
    return c


def _cos(a, b):
    return float(np.dot(a, b) / np.linalg.norm(a) / np.linalg.norm(b))


def test_od_round_trip_and_hand_values():
    """OD = −ln((I + 1) / 256): 255 → 0, 127 → ln 2, 0 → ln 256 (hand values); from_od inverts
    every uint8 exactly, on a tile and on a batch."""
    od = optical_density(np.array([[[255, 127, 0]]], np.uint8))
    assert od[0, 0] == pytest.approx([0.0, np.log(2.0), np.log(256.0)], abs=1e-6)
    assert od.dtype == np.float32
    every = np.arange(256, dtype=np.uint8).reshape(16, 16, 1).repeat(3, axis=2)
    assert np.array_equal(from_od(optical_density(every)), every)
    batch = np.random.default_rng(0).integers(0, 256, (3, 20, 20, 3)).astype(np.uint8)
    back = from_od(optical_density(batch))
    assert back.shape == batch.shape and back.dtype == np.uint8 and np.array_equal(back, batch)


@pytest.mark.parametrize("stains", [RJ, REFERENCE_STAINS], ids=["ruifrok", "reference"])
def test_macenko_recovers_known_stains_and_concentrations(stains):
    """A tile rendered from known unit stain vectors (Ruifrok & Johnston 2001; Veta's Macenko
    reference matrix) with known concentration maps: Macenko recovers each vector (cosine > 0.99,
    H first) and least squares recovers the maps, to within uint8 rounding (≈ 0.5 / I per pixel)."""
    conc = _maps()
    tile = _render(conc, stains)
    est = macenko_stains(tile)
    assert est.shape == (2, 3)
    assert np.allclose(np.linalg.norm(est, axis=1), 1.0)
    assert _cos(est[0], stains[0]) > 0.99 and _cos(est[1], stains[1]) > 0.99
    got = concentrations(tile, est)
    assert got.shape == (N, N, 2)
    assert np.abs(got - conc).mean() < 0.02 and np.abs(got - conc).max() < 0.1
    exact = concentrations(tile, stains)                # with the true vectors: rounding only
    assert np.abs(exact - conc).max() < 0.05


def test_h_is_the_vector_with_more_red_od_even_when_eosin_dominates():
    """Order rule (documented): H is the vector with the larger red OD component, whatever the
    amounts: here eosin is twice as dense as haematoxylin and H still comes first."""
    tile = _render(_maps(h_scale=0.6, e_scale=1.6), RJ)
    est = macenko_stains(tile)
    assert est[0, 0] > est[1, 0]
    assert _cos(est[0], RJ[0]) > 0.99 and _cos(est[1], RJ[1]) > 0.99


def test_normalising_a_into_b_reproduces_the_b_rendering():
    """The same concentration maps rendered with stain matrix A (Ruifrok & Johnston) and B (the
    reference matrix): fitting on the B tile and transforming the A tile gives the B tile back
    (same concentrations, so the 99th percentiles match and only the stain vectors change)."""
    conc = _maps()
    tile_a, tile_b = _render(conc, RJ), _render(conc, REFERENCE_STAINS)
    norm = MacenkoNormalizer().fit(tile_b)
    assert _cos(norm.stains[0], REFERENCE_STAINS[0]) > 0.99
    out = norm.transform(tile_a)
    assert out.shape == tile_a.shape and out.dtype == np.uint8
    err = np.abs(out.astype(int) - tile_b.astype(int))
    assert err.mean() < 1.0 and np.percentile(err, 99) <= 4
    assert np.abs(tile_a.astype(int) - tile_b.astype(int)).mean() > 10   # the change was real
    batch = norm.transform(np.stack([tile_a, tile_a]))                   # batch: tile by tile
    assert batch.shape == (2, N, N, 3) and np.array_equal(batch[1], out)


def test_default_target_is_veta_reference():
    """Without fit: Veta's normalizeStaining.m defaults (HERef, maxCRef). Expected by hand: each
    stain's map rescaled so its 99th percentile over tissue (H + E > 0.15) is maxCRef, rendered
    with HERef."""
    conc = _maps()
    tissue = conc.sum(axis=-1) > 0.15
    p99 = np.percentile(conc[tissue], 99, axis=0)
    expected = _render(conc * (REFERENCE_MAX_CONC / p99), REFERENCE_STAINS)
    norm = MacenkoNormalizer()
    assert np.allclose(norm.stains, REFERENCE_STAINS) and np.allclose(norm.max_conc, [1.9705, 1.0308])
    err = np.abs(norm.transform(_render(conc, RJ)).astype(int) - expected.astype(int))
    assert err.mean() < 1.5 and np.percentile(err, 99) <= 6


def test_too_little_tissue_raises_stain_error_and_transform_falls_back():
    """Glass with 40 stained pixels (< 100) and a one-stain tile: StainError, a ValueError.
    transform falls back to the reference matrix (glass stays glass, unchanged with the default
    target) unless fallback=False."""
    rng = np.random.default_rng(1)
    glass = np.clip(rng.normal(240, 2, (N, N, 3)), 0, 255).astype(np.uint8)
    conc = np.zeros((N, N, 2))
    conc[:4, :10] = (1.0, 0.5)
    tile = np.minimum(glass, _render(conc, RJ))
    with pytest.raises(StainError, match="tissue pixels"):
        macenko_stains(tile)
    assert issubclass(StainError, ValueError)
    with pytest.raises(StainError):
        macenko_stains(np.full((N, N, 3), 255, np.uint8))
    one = np.zeros((N, N, 2))
    one[..., 1] = rng.gamma(2.0, 0.4, (N, N))             # eosin only
    with pytest.raises(StainError, match="single stain"):
        macenko_stains(_render(one, RJ))
    norm = MacenkoNormalizer()
    assert np.abs(norm.transform(tile).astype(int) - tile.astype(int)).max() <= 1
    with pytest.raises(StainError):
        norm.transform(tile, fallback=False)


def test_stain_jitter_identity_change_white_and_determinism():
    """Tellez et al. 2018 HED jitter: sigma = bias = 0 is the identity (within rounding); nonzero
    jitter changes tissue, leaves white exactly white and glass (240) within a few levels; the
    same seed gives the same output; a batch draws per tile, equal to single calls in turn."""
    tile = _render(_maps(), REFERENCE_STAINS)
    tile[-8:, -32:] = 240                                   # glass; the other glass rows are 255
    same = stain_jitter(tile, np.random.default_rng(0), sigma=0.0, bias=0.0)
    assert same.dtype == np.uint8 and same.shape == tile.shape
    assert np.abs(same.astype(int) - tile.astype(int)).max() <= 1

    out = stain_jitter(tile, np.random.default_rng(0), sigma=0.1, bias=0.1)
    tissue = _maps().sum(axis=-1) > 0.5
    assert np.abs(out[tissue].astype(int) - tile[tissue].astype(int)).mean() > 2
    white = (tile == 255).all(axis=-1)
    assert white.sum() > 500 and (out[white] == 255).all()
    assert np.abs(out[-8:, -32:].astype(int) - 240).max() <= 4

    again = stain_jitter(tile, np.random.default_rng(0), sigma=0.1, bias=0.1)
    assert np.array_equal(out, again)
    assert not np.array_equal(out, stain_jitter(tile, np.random.default_rng(1), sigma=0.1, bias=0.1))

    batch = stain_jitter(np.stack([tile, tile, tile]), np.random.default_rng(5))
    assert batch.shape == (3, N, N, 3) and not np.array_equal(batch[0], batch[1])
    rng = np.random.default_rng(5)
    singles = [stain_jitter(tile, rng) for _ in range(3)]
    assert all(np.array_equal(b, s) for b, s in zip(batch, singles))


def test_reinhard_matches_target_lab_statistics():
    """Reinhard et al. 2001 colour transfer: after the transfer the output's L*a*b* per-channel
    mean and std equal the target's. Source and target share the stain vectors and differ in
    the amounts of H and E, so the target stays inside the sRGB gamut and the residue is uint8
    rounding (a strongly saturated source, e.g. Ruifrok eosin, loses ≈ 0.5 L*a*b* units to clipping)."""
    src = _render(_maps(h_scale=1.2, e_scale=0.6), REFERENCE_STAINS)
    tgt = _render(_maps(h_scale=0.8, e_scale=1.0), REFERENCE_STAINS)
    means, stds = lab_stats(tgt)
    out = reinhard(src, means, stds)
    assert out.shape == src.shape and out.dtype == np.uint8
    got_m, got_s = lab_stats(out)
    assert np.abs(got_m - means).max() < 0.2
    assert np.abs(got_s / stds - 1).max() < 0.01
    src_m, src_s = lab_stats(src)
    assert np.abs(src_m - means).max() > 2 and np.abs(src_s / stds - 1).max() > 0.15  # really different
    batch = reinhard(np.stack([src, tgt]), means, stds)     # batch: tile by tile
    assert np.array_equal(batch[0], out)
    assert np.abs(batch[1].astype(int) - tgt.astype(int)).max() <= 1   # already on target: unchanged


def test_bad_shapes_are_rejected():
    """Not an RGB array: a clear ValueError, not a broadcasting accident."""
    with pytest.raises(ValueError, match="RGB"):
        optical_density(np.zeros((8, 8), np.uint8))
    with pytest.raises(ValueError, match=r"2 × 3"):
        concentrations(np.zeros((8, 8, 3), np.uint8), np.eye(3))
