"""What an export holds, gathered once from the store: the slides, their tiles, the chosen layers'
values per tile, and each tile's domain label. Every format (AnnData, GeoJSON, tables, figures)
is written from an :class:`ExportData`, so all of them agree on what a tile is.

Coordinates are level-0 pixels, ``(x, y)`` of each tile's top-left corner; centres are
``x + tile_size / 2``. Values are predicted log1p(CP10k) (signatures: the scoring of
:func:`core.analysis.maps.layer_tiles`; nuclei: counts per mm²).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import datetime, timezone

import numpy as np
import pandas as pd

from core.errors import TesseraError

UNITS = "predicted log1p(CP10k)"
UNASSIGNED = "unassigned"


@dataclass(frozen=True)
class Layer:
    """One exported value per tile: a gene of the panel, a signature or a nucleus density."""

    column: str    # the column / measurement name in every format: ``ERBB2``, ``sig:cytolytic``
    spec: str      # the layer string :func:`core.analysis.maps.layer_tiles` reads
    kind: str      # gene | sig | nuclei
    genes: tuple[str, ...] = ()

    @property
    def units(self) -> str:
        return {"nuclei": "nuclei per mm²", "sig": f"signature score of {UNITS}"}.get(self.kind, UNITS)

    @property
    def title(self) -> str:
        """What the layer shows (:func:`core.analysis.maps.layer_title`: a signature's set and method)."""
        from core.analysis.maps import layer_title

        try:
            return layer_title(self.spec)
        except TesseraError:
            return self.column


@dataclass
class SlideData:
    """One predicted slide: its tiles in tile order and the values of every layer."""

    slide_name: str
    patient: str
    slide_path: str
    run_key: str
    tile_size: int           # level-0 px of one tile side
    width: int
    height: int
    mpp: float               # level-0 µm/px
    tiles: pd.DataFrame      # tile_idx, x, y, tissue
    values: dict[str, np.ndarray]  # layer column → [N] float32
    domain: np.ndarray       # [N] str
    expression: np.ndarray | None = None  # [N, G] float32 of the whole panel (AnnData only)

    @property
    def centres(self) -> np.ndarray:
        """[N, 2] tile centres (x, y), level-0 px."""
        xy = self.tiles[["x", "y"]].to_numpy(np.float64)
        return xy + self.tile_size / 2.0


@dataclass
class ExportData:
    cohort: str
    model_key: str
    model_id: str
    version: str
    tile_um: float
    genes: list[str]          # the model's whole panel, in panel order
    layers: list[Layer]
    slides: list[SlideData]
    exported_at: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))

    @property
    def n_tiles(self) -> int:
        return int(sum(len(s.tiles) for s in self.slides))

    def provenance(self) -> dict:
        return {"cohort": self.cohort, "model_key": self.model_key, "model_id": self.model_id,
                "version": self.version, "tile_um": self.tile_um, "units": UNITS, "exported_at": self.exported_at}


# ---------------------------------------------------------------- layers

def split_layers(text: str | list[str] | None) -> list[str]:
    """``ERBB2,CD8A;sig:cytolytic`` → items. With a ``;`` anywhere, only ``;`` separates (so a
    custom signature may list genes with commas: ``ERBB2;sig:CD8A,CD3E``); otherwise ``,`` does,
    and a custom signature joins its genes with ``+`` (``sig:CD8A+CD3E``)."""
    if text is None:
        return []
    if isinstance(text, (list, tuple)):
        return [t.strip() for t in text if t and t.strip()]
    sep = ";" if ";" in text else ","
    return [t.strip() for t in text.split(sep) if t.strip()]


def resolve_layers(items: list[str], panel: list[str]) -> list[Layer]:
    """Layer strings (``ERBB2``, ``gene:ERBB2``, ``sig:<library name>``, ``sig:<g1,g2|g1+g2>``,
    ``nuclei:<class>``) → :class:`Layer`, genes matched to the panel ignoring case. Unknown genes
    and signatures are one error that names them all."""
    from core.analysis.maps import nuclei_layers, parse_signature
    from core.analysis.signatures import library

    by_upper = {g.upper(): g for g in panel}
    lib = {name.lower(): (name, genes) for name, genes in library().items()}
    layers, unknown = [], []
    for item in items:
        kind, sep, what = item.partition(":")
        kind = kind.strip().lower()
        if not sep:
            kind, what = "gene", item
        what = what.strip()
        if kind == "gene":
            gene = by_upper.get(what.upper())
            if gene is None:
                unknown.append(what)
            else:
                layers.append(Layer(gene, f"gene:{gene}", "gene", (gene,)))
        elif kind in ("sig", "signature"):
            # the scoring is maps.layer_tiles'; here only the name or genes are checked and normalised
            spec, at, method = what.rpartition("@") if "@" in what else (what, "", "")
            spec, suffix = spec.strip(), f"@{method.strip()}" if at else ""
            if spec.lower() in lib:
                name, genes = lib[spec.lower()]
                present = tuple(g for g in genes if g in panel)
                if not present:
                    raise TesseraError(f"Signature {name!r} ({', '.join(genes)}) has no gene in the model's panel.")
                layers.append(Layer(f"sig:{name}{suffix}", f"sig:{name}{suffix}", "sig", present))
            elif re.fullmatch(r"[A-Za-z0-9_.\-]+", spec) and spec.upper() not in by_upper:
                names = list(library())
                unknown.append(f"sig:{spec} (not a signature of the library, which has "
                               f"{', '.join(names[:6])}{'…' if len(names) > 6 else ''})")
            else:
                genes = parse_signature(spec.replace("+", ","), panel)
                column = "sig:" + ",".join(genes) + suffix
                layers.append(Layer(column, column, "sig", tuple(genes)))
        elif kind == "nuclei":
            if f"nuclei:{what}" not in nuclei_layers():
                unknown.append(f"nuclei:{what} (known: {', '.join(nuclei_layers())})")
            else:
                layers.append(Layer(f"nuclei:{what}", f"nuclei:{what}", "nuclei"))
        else:
            unknown.append(item)
    if unknown:
        raise TesseraError(f"Unknown layer(s): {', '.join(unknown)}. A layer is a gene of the model's panel of "
                           f"{len(panel)} (e.g. {', '.join(panel[:8])}…), sig:<signature name or genes>, "
                           "or nuclei:<class>.")
    return list({layer.column: layer for layer in layers}.values())


# ---------------------------------------------------------------- slides

def select_slides(runs: pd.DataFrame, names: list[str] | None, cohort: str) -> pd.DataFrame:
    """The cohort's predicted slides named in ``names`` (full name, name without its extension, or
    a unique prefix such as the TCGA barcode), or all of them; unknown names are one error."""
    predicted = runs[runs["run_key"].notna()]
    if not names:
        if predicted.empty:
            raise TesseraError(f"No slide of cohort {cohort!r} is predicted with this model yet; "
                               f"run `python -m core.cli predict --cohort {cohort}` first.")
        return predicted.reset_index(drop=True)
    all_names = list(runs["slide_name"])
    chosen, unknown, unpredicted = [], [], []
    for name in dict.fromkeys(names):
        hits = [n for n in all_names if n == name] or [n for n in all_names if n.rsplit(".", 1)[0] == name] \
            or [n for n in all_names if n.startswith(name)]
        if len(hits) != 1:
            unknown.append(name + (f" (matches {len(hits)} slides)" if hits else ""))
        elif hits[0] not in set(predicted["slide_name"]):
            unpredicted.append(hits[0])
        else:
            chosen.append(hits[0])
    if unknown:
        raise TesseraError(f"No slide {', '.join(unknown)} in cohort {cohort!r}; known slides include "
                           f"{', '.join(all_names[:5]) or 'none'}{'…' if len(all_names) > 5 else ''}.")
    if unpredicted:
        raise TesseraError(f"Not predicted with this model yet: {', '.join(unpredicted)}. Predict the cohort first "
                           f"(python -m core.cli predict --cohort {cohort}).")
    return predicted[predicted["slide_name"].isin(chosen)].reset_index(drop=True)


def domains_for(store, cohort: str, model_key: str, run_keys: list[str]) -> dict[str, np.ndarray] | None:
    """Each run's domain label per tile from :func:`core.analysis.domains.tile_domains`, or None
    when that module is not there (labels are then ``unassigned``)."""
    try:
        from core.analysis.domains import tile_domains
    except ImportError:
        return None
    out = {}
    for run_key in run_keys:
        labels = tile_domains(store, cohort, model_key, run_key)
        if labels is not None:
            out[run_key] = np.asarray(labels).astype(str)
    return out or None


# ---------------------------------------------------------------- gathering

def collect(store, cohort: str, model_key: str, *, slides: list[str] | None = None, layers: list[Layer] | None = None,
            domains: dict[str, np.ndarray] | None = None, expression: bool = False, stride: float = 1.0) -> ExportData:
    """Everything an export writes. ``layers`` default to the whole panel; ``expression`` also
    loads each slide's whole [N, G] panel matrix (for AnnData's ``X``); ``stride`` ½ / ¼ reads
    each slide's high-resolution run instead of the default grid."""
    from core.analysis.maps import layer_tiles

    info = store.model_info(model_key)
    tile_um, _ = info.tiling
    layers = layers if layers is not None else [Layer(g, f"gene:{g}", "gene", (g,)) for g in info.genes]
    chosen = select_slides(store.cohort_runs(cohort, model_key, stride=stride), slides, cohort)
    gene_cols = [la.column for la in layers if la.kind == "gene"]
    out = []
    for row in chosen.itertuples(index=False):
        tiles, matrix, genes = store.run_expression(model_key, row.run_key, None if expression else gene_cols)
        col = {g: i for i, g in enumerate(genes)}
        values = {}
        for layer in layers:
            if layer.kind == "gene":
                values[layer.column] = matrix[:, col[layer.column]].astype(np.float32)
            else:
                lt = layer_tiles(store, model_key, row.run_key, layer.spec, tile_um)
                s = pd.Series(lt["value"].to_numpy(np.float32), index=lt["tile_idx"].to_numpy())
                values[layer.column] = s.reindex(tiles["tile_idx"].to_numpy()).to_numpy(np.float32)
        labels = (domains or {}).get(row.run_key)
        if labels is None:
            labels = np.full(len(tiles), UNASSIGNED, dtype=object)
        elif len(labels) != len(tiles):
            raise TesseraError(f"The domain fit of {row.slide_name} has {len(labels)} labels for {len(tiles)} tiles "
                               "(the slide was predicted again since): fit the domains again.")
        out.append(SlideData(str(row.slide_name), str(row.patient), str(row.slide_path), str(row.run_key),
                             int(row.tile_size), int(row.width), int(row.height), float(row.mpp), tiles, values,
                             np.asarray(labels, dtype=object), matrix if expression else None))
    model_id, _, version = model_key.partition("@")
    return ExportData(cohort, model_key, model_id, str(info.card.get("version", version)), float(tile_um),
                      list(info.genes), layers, out)


def domain_colors(labels: list[str]) -> dict[str, list[int]]:
    """A fixed colour per domain label, grey for ``unassigned``; the same in GeoJSON
    classifications, AnnData's ``domain_colors`` and the viewer: domain ``Dk`` always gets colour
    k − 1 of :func:`core.analysis.overlay.categorical_colors` (the fit's label order), whichever
    domains a slide happens to contain."""
    import re

    from core.analysis.overlay import categorical_colors

    named = [lab for lab in dict.fromkeys(labels) if lab != UNASSIGNED]
    numbered = {lab: int(m.group(1)) - 1 for lab in named if (m := re.fullmatch(r"D(\d+)", str(lab)))}
    others = sorted(lab for lab in named if lab not in numbered)
    index = {**numbered, **{lab: max(numbered.values(), default=-1) + 1 + i for i, lab in enumerate(others)}}
    colors = categorical_colors(max(index.values(), default=-1) + 1)
    out = {lab: [int(c) for c in colors[index[lab]]] for lab in named}
    if UNASSIGNED in labels:
        out[UNASSIGNED] = [160, 160, 160]
    return out
