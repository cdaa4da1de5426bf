"""What a slide heatmap can show: a predicted gene, a signature score, or the density of one
class of nuclei counted by the engine (``predict --nuclei``).

Layers are strings so that pages can cache them::

    gene:<SYMBOL>                      gene:ERBB2
    sig:<signature>[@<method>]         sig:LumA_SC   sig:pam50_proliferation@mean_z   sig:CD8A,CD3E,GZMB
    nuclei:<class> | nuclei:all        nuclei:inflammatory

``<signature>`` is a library name (:mod:`core.analysis.signatures`, matched ignoring case) or gene
symbols separated by commas; ``<method>`` is ``score_genes`` (the default) or ``mean_z``
(:mod:`core.analysis.signature_scores`: a fixed linear combination of the predicted
log1p(CP10k), the same on every slide). ``@`` never occurs in a gene symbol, so the last ``@``
splits the method off. Before signature scoring a ``sig:`` layer was the plain mean of its genes;
the default is now ``score_genes``.
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


def split_sig(what: str) -> tuple[str, str]:
    """``LumA_SC@mean_z`` → (``LumA_SC``, ``mean_z``); no ``@`` → the default method."""
    from core.analysis.signature_scores import DEFAULT_METHOD, check_method

    spec, sep, method = what.rpartition("@")
    return (spec, check_method(method.strip())) if sep else (what, DEFAULT_METHOD)


def layer_title(layer: str) -> str:
    """What a layer shows, naming a signature's set and scoring method."""
    from core.analysis.signatures import lookup

    kind, _, what = layer.partition(":")
    if kind == "sig":
        try:
            spec, method = split_sig(what)
        except TesseraError:
            return layer
        name = lookup(spec)
        if name is not None:
            return f"{name} signature by {method}"
        genes = [g for g in re.split(r"[\s,;]+", spec) if g]
        return f"signature ({', '.join(genes)}) by {method}"
    return {"gene": what, "nuclei": f"{what} nuclei / mm²"}.get(kind, layer)


def layer_tiles(store, model_key: str, run_key: str, layer: str, tile_um: float) -> pd.DataFrame:
    """tile_idx, x, y, value of a layer on one slide. A signature layer's frame carries
    ``attrs`` notice (library genes missing from the panel, or None), description and method."""
    kind, _, what = layer.partition(":")
    if kind == "gene":
        return store.heatmap(model_key, run_key, what)
    if kind == "sig":
        from core.analysis.signature_scores import signature_scoring, tile_scores

        spec, method = split_sig(what)
        scoring = signature_scoring(store, model_key, spec, method)
        tiles = tile_scores(store, model_key, run_key, scoring)
        tiles.attrs.update(notice=scoring.notice, description=scoring.describe(), method=method)
        return tiles
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
