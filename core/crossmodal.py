"""Image ↔ gene queries over the store: top tiles for a gene, a tile's profile, similar tiles."""
from __future__ import annotations

import numpy as np
import pandas as pd

from core.slides import Slide


def top_tiles(store, model_key: str, gene: str, run_keys: list[str], k: int = 24) -> pd.DataFrame:
    """The ``k`` tiles across the given runs with the highest predicted ``gene``."""
    return store.top_tiles(model_key, gene, run_keys, k)


def tile_image(slide_path: str, x: int, y: int, size_level0: int, out_px: int = 224) -> np.ndarray:
    """The RGB pixels of one tile (level-0 px top-left ``x, y``), resized to ``out_px``."""
    with Slide(slide_path) as slide:
        return slide.read_region((x, y), size_level0, out_px)


def tile_profile(store, model_key: str, run_key: str, tile_idx: int, *, top: int = 20) -> pd.DataFrame:
    """The tile's predicted panel, sorted, with each gene's z-score against the whole slide."""
    profile = store.tile_profile(model_key, run_key, tile_idx).astype(float)
    summary = store.slide_summary(model_key, list(profile.index), [run_key]).set_index("gene")
    df = pd.DataFrame({"gene": profile.index, "predicted": profile.to_numpy()})
    df["slide_mean"] = df["gene"].map(summary["mean"])
    df["vs_slide"] = df["predicted"] - df["slide_mean"]
    return df.sort_values("predicted", ascending=False).head(top).reset_index(drop=True)


def similar_tiles(store, model_key: str, run_keys: list[str], run_key: str, tile_idx: int, *,
                  k: int = 12) -> pd.DataFrame:
    """Tiles whose embedding is closest (cosine) to the query tile, excluding the tile itself
    (through the model's vector index where one is kept: :mod:`core.tile_index`)."""
    from core.tile_index import similar_tiles as search

    return search(store, model_key, run_keys, run_key, tile_idx, k=k)
