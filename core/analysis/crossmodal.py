"""Image ↔ gene queries over the store: top tiles for a gene or a signature score, a tile's
profile, similar tiles."""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from core.errors import TesseraError
from core.wsi.slide import Slide

if TYPE_CHECKING:
    from core.analysis.signature_scores import Scoring

MIN_PATCH_SHARE = 0.5   # an uploaded patch must cover at least half the model's tile width


def top_tiles(store, model_key: str, gene: str | list[str], run_keys: list[str], k: int = 24) -> pd.DataFrame:
    """The ``k`` tiles across the given runs with the highest predicted ``gene`` (or mean of a
    signature's genes)."""
    return store.top_tiles(model_key, gene, run_keys, k)


def signature_top_tiles(store, model_key: str, spec: str, run_keys: list[str], k: int = 24, *,
                        method: str = "score_genes") -> tuple[pd.DataFrame, Scoring]:
    """The ``k`` tiles across the given runs with the highest score of signature ``spec`` (a
    library name or typed genes) by ``method`` (:mod:`core.analysis.signature_scores`: the same
    linear score on every slide, ranked in SQL). Returns (tiles, the scoring: name, genes used,
    missing-gene notice, method description)."""
    from core.analysis.signature_scores import signature_scoring

    scoring = signature_scoring(store, model_key, spec, method)
    top = store.top_tiles(model_key, dict(scoring.weights), run_keys, k, offset=scoring.offset)
    return top, scoring


def tile_image(slide_path: str, x: int, y: int, size_level0: int, out_px: int = 224) -> np.ndarray:
    """The RGB pixels of one tile (level-0 px top-left ``x, y``), resized to ``out_px``."""
    with Slide(slide_path) as slide:
        return slide.read_region((x, y), size_level0, out_px)


def tile_profile(store, model_key: str, run_key: str, tile_idx: int, *, top: int = 20) -> pd.DataFrame:
    """The tile's predicted panel, sorted, with each gene's z-score against the whole slide."""
    profile = store.tile_profile(model_key, run_key, tile_idx).astype(float)
    summary = store.slide_summary(model_key, list(profile.index), [run_key]).set_index("gene")
    return _profile_table(profile, summary["mean"], top)


def _profile_table(expression: pd.Series, baseline: pd.Series, top: int) -> pd.DataFrame:
    """gene, predicted, slide_mean (the baseline), vs_slide; the ``top`` highest predicted."""
    df = pd.DataFrame({"gene": expression.index, "predicted": expression.to_numpy(dtype=float)})
    df["slide_mean"] = df["gene"].map(baseline)
    df["vs_slide"] = df["predicted"] - df["slide_mean"]
    return df.sort_values("predicted", ascending=False).head(top).reset_index(drop=True)


def ranked_profile(expression: pd.Series, stats: pd.DataFrame, top: int = 20) -> pd.DataFrame:
    """A predicted profile ranked against the cohort: gene, predicted, cohort_mean, cohort_sd,
    z = (predicted − cohort mean) / cohort sd over the cohort's tiles, log_fc = predicted − cohort
    mean (log1p units: the natural log of the ratio of CP10k + 1); the ``top`` highest z first.
    Ranking by the raw value would list the genes every tile expresses most (FTL, ACTB, …)."""
    stats = stats.reindex(expression.index)
    df = pd.DataFrame({"gene": expression.index, "predicted": expression.to_numpy(dtype=float),
                       "cohort_mean": stats["mean"].to_numpy(float), "cohort_sd": stats["sd"].to_numpy(float)})
    df["z"] = (df["predicted"] - df["cohort_mean"]) / df["cohort_sd"]
    df["log_fc"] = df["predicted"] - df["cohort_mean"]
    return df.sort_values("z", ascending=False, kind="stable").head(top).reset_index(drop=True)


def cohort_stats(store, model_key: str, run_keys: list[str], genes: list[str] | None = None) -> pd.DataFrame:
    """Per gene (index) the mean and sd of the prediction over the runs' tiles."""
    from core.analysis.retrieval import _cohort_stats

    return _cohort_stats(store, model_key, genes or list(store.model_info(model_key).genes), list(run_keys))


def tile_top_genes(store, model_key: str, run_keys: list[str], run_key: str, tile_idx: int, *,
                   top: int = 20) -> pd.DataFrame:
    """A tile's predicted profile ranked against the cohort (:func:`ranked_profile`)."""
    profile = store.tile_profile(model_key, run_key, tile_idx).astype(float)
    return ranked_profile(profile, cohort_stats(store, model_key, run_keys, list(profile.index)), top)


def patch_top_genes(store, model_key: str, run_keys: list[str], expression: pd.Series, *,
                    top: int = 20) -> pd.DataFrame:
    """A patch's predicted profile ranked against the cohort (:func:`ranked_profile`)."""
    return ranked_profile(expression, cohort_stats(store, model_key, run_keys, list(expression.index)), top)


def similar_tiles(store, model_key: str, run_keys: list[str], run_key: str, tile_idx: int, *,
                  k: int = 12) -> pd.DataFrame:
    """Tiles whose embedding is closest (cosine) to the query tile, excluding the tile itself
    (through the model's vector index where one is kept: :mod:`core.store.tile_index`)."""
    from core.store.tile_index import similar_tiles as search

    return search(store, model_key, run_keys, run_key, tile_idx, k=k)


def patch_tile(image: np.ndarray, patch_mpp: float, tile_um: float, out_px: int) -> tuple[np.ndarray, str]:
    """An uploaded RGB patch as the model sees a tile: the centre ``tile_um`` µm (the whole patch
    when it is smaller), resized to ``out_px``. Returns (tile, a note on what was done)."""
    from PIL import Image

    if image.ndim != 3 or image.shape[2] not in (3, 4):
        raise TesseraError("The image must be RGB (or RGBA): got an array of shape "
                           f"{tuple(image.shape)}. Upload a colour H&E patch (PNG, JPEG or TIFF).")
    if not patch_mpp or patch_mpp <= 0:
        raise TesseraError("State the patch's µm per pixel (e.g. 0.5 for a 20× scan).")
    rgb = np.ascontiguousarray(image[..., :3])
    h, w = rgb.shape[:2]
    side_px = tile_um / patch_mpp                        # the model's tile in the patch's pixels
    shortest = min(h, w)
    if shortest < MIN_PATCH_SHARE * side_px:
        raise TesseraError(
            f"The patch covers {shortest * patch_mpp:.0f} µm but the model looks at {tile_um:.0f} µm tiles: "
            f"upload at least {MIN_PATCH_SHARE * tile_um:.0f} µm ({int(np.ceil(MIN_PATCH_SHARE * side_px))} px "
            f"at {patch_mpp:g} µm/px), or check the µm/px.")
    crop = int(round(min(side_px, shortest)))
    top, left = (h - crop) // 2, (w - crop) // 2
    tile = rgb[top:top + crop, left:left + crop]
    note = (f"centre {crop * patch_mpp:.0f} µm of {w * patch_mpp:.0f} × {h * patch_mpp:.0f} µm"
            if crop < max(h, w) else f"whole patch ({crop * patch_mpp:.0f} µm)")
    if crop < side_px - 0.5:
        note += f"; smaller than the model's {tile_um:.0f} µm tile, so it is magnified"
    resized = np.asarray(Image.fromarray(tile).resize((out_px, out_px), Image.Resampling.BILINEAR))
    return resized, note


def predict_patch(model, tile: np.ndarray) -> dict:
    """One tile (uint8 [px, px, 3]) through the model: expression (Series by gene), embedding,
    composition (Series by cell type)."""
    import torch

    with torch.inference_mode():
        out = model.module(torch.from_numpy(np.array(tile, dtype=np.uint8, copy=True))[None])
    return {"expression": pd.Series(out["expression"][0].float().numpy(), index=model.genes),
            "embedding": out["embedding"][0].float().numpy(),
            "joint": out["joint"][0].float().numpy() if "joint" in out else None,
            "composition": pd.Series(out["composition"][0].float().numpy(), index=model.cell_types)}


def patch_profile(store, model_key: str, run_keys: list[str], expression: pd.Series, *,
                  top: int = 20) -> pd.DataFrame:
    """A patch's predicted panel, sorted, against the cohort (mean over slides of slide means)."""
    summary = store.slide_summary(model_key, list(expression.index), run_keys)
    return _profile_table(expression, summary.groupby("gene")["mean"].mean(), top)


def similar_to_embedding(store, model_key: str, run_keys: list[str], embedding: np.ndarray, *,
                         k: int = 12) -> pd.DataFrame:
    """The ``k`` tiles of the cohort closest to an embedding (e.g. of an uploaded patch)."""
    from core.store.tile_index import nearest

    return nearest(store, model_key, list(run_keys), embedding, k=k)
