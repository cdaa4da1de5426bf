"""What a slide heatmap can show: a predicted gene, a signature (mean of several predicted genes,
log1p(CP10k)), or the density of one class of nuclei counted by the engine (``predict --nuclei``).

Layers are strings so that pages can cache them: ``gene:ERBB2``, ``sig:CD8A,CD3E,GZMB``,
``nuclei:inflammatory`` or ``nuclei:all``.
"""
from __future__ import annotations

import re

import pandas as pd

from core.errors import TesseraError
from core.wsi.nuclei_classes import CLASSES


def parse_signature(text: str, panel: list[str]) -> list[str]:
    """Gene symbols from free text (commas, spaces, semicolons), matched to the panel ignoring
    case; an unknown symbol is an error that names it and what the panel offers."""
    wanted = [t for t in re.split(r"[\s,;]+", text or "") if t]
    if not wanted:
        raise TesseraError("Type the signature's genes, separated by commas (e.g. CD8A, CD3E, GZMB).")
    by_upper = {g.upper(): g for g in panel}
    unknown = [t for t in wanted if t.upper() not in by_upper]
    if unknown:
        raise TesseraError(f"Not in the model's panel of {len(panel)} genes: {', '.join(unknown)}. "
                           f"Panel genes include {', '.join(panel[:12])}…")
    return list(dict.fromkeys(by_upper[t.upper()] for t in wanted))


def layer_title(layer: str) -> str:
    kind, _, what = layer.partition(":")
    return {"gene": what, "sig": f"signature ({what.replace(',', ', ')})",
            "nuclei": f"{what} nuclei / mm²"}.get(kind, layer)


def layer_tiles(store, model_key: str, run_key: str, layer: str, tile_um: float) -> pd.DataFrame:
    """tile_idx, x, y, value of a layer on one slide."""
    kind, _, what = layer.partition(":")
    if kind == "gene":
        return store.heatmap(model_key, run_key, what)
    if kind == "sig":
        return store.heatmap(model_key, run_key, what.split(","))
    if kind == "nuclei":
        nuc = store.tile_nuclei(run_key)
        if nuc is None:
            raise TesseraError("This slide's predictions have no nucleus counts: predict it with "
                               "`--nuclei` (or tick “Also count nuclei” on the Predictions page).")
        cols = [f"n{i}" for i in range(len(CLASSES))] if what == "all" else [f"n{CLASSES.index(what)}"]
        area_mm2 = (tile_um / 1000.0) ** 2
        return nuc[["tile_idx", "x", "y"]].assign(value=nuc[cols].sum(axis=1) / area_mm2)
    raise TesseraError(f"Unknown heatmap layer {layer!r}.")


def nuclei_layers() -> list[str]:
    return [f"nuclei:{c}" for c in CLASSES if c != "other"] + ["nuclei:all"]
