"""Tiles as QuPath objects: a GeoJSON FeatureCollection (File → Import objects in QuPath ≥ 0.4).

The shape follows what QuPath itself writes (``qupath.lib.io.PathObjectTypeAdapters``, v0.4+):
each Feature has a UUID ``id``, a ``geometry`` in level-0 pixels with the origin at the image's
top-left (QuPath docs, "Exporting annotations": GeoJSON), and ``properties`` with ``objectType``
(``tile``: a detection that QuPath shows as a tile), ``name``, ``measurements`` (an object
name → number), and ``classification`` ``{"name", "color": [r, g, b]}`` when domains were fit.

One slide per file: QuPath imports objects into one image at a time.
"""
from __future__ import annotations

import json
import math
import uuid
from pathlib import Path

from core.export.collect import UNASSIGNED, ExportData, SlideData, domain_colors


def _number(v: float) -> float | None:
    f = float(v)
    return f if math.isfinite(f) else None   # strict JSON: a missing value is null


def features(data: ExportData, slide: SlideData) -> dict:
    """The FeatureCollection of one slide's tiles."""
    colors = domain_colors(list(slide.domain))
    has_domains = any(lab != UNASSIGNED for lab in slide.domain)
    # a stable UUID per (run, tile): exporting the same slide again gives the same object ids
    namespace = uuid.uuid5(uuid.NAMESPACE_URL, f"tessera:{data.model_key}:{slide.run_key}")
    ts = slide.tile_size
    cols = [layer.column for layer in data.layers]
    feats = []
    for i, (idx, x, y) in enumerate(slide.tiles[["tile_idx", "x", "y"]].itertuples(index=False)):
        x, y = int(x), int(y)
        props = {"objectType": "tile", "name": f"{slide.slide_name} {int(idx)}",
                 "measurements": {c: _number(slide.values[c][i]) for c in cols}}
        if has_domains:
            props["classification"] = {"name": str(slide.domain[i]), "color": colors[str(slide.domain[i])]}
        feats.append({"type": "Feature", "id": str(uuid.uuid5(namespace, str(int(idx)))),
                      "geometry": {"type": "Polygon",
                                   "coordinates": [[[x, y], [x + ts, y], [x + ts, y + ts], [x, y + ts], [x, y]]]},
                      "properties": props})
    return {"type": "FeatureCollection", "features": feats}


def write_geojson(data: ExportData, slide: SlideData, path: Path) -> None:
    Path(path).write_text(json.dumps(features(data, slide), allow_nan=False, separators=(",", ":")))


def file_name(slide: SlideData) -> str:
    """``<slide name without extension>.geojson`` (the name QuPath shows for the image)."""
    stem = slide.slide_name.rsplit(".", 1)[0] if "." in slide.slide_name else slide.slide_name
    return f"{stem}.geojson"
