"""Tiles as a table (CSV or Parquet), one row per tile of every exported slide, and the cohort
table (patients × clinical × chosen biomarkers, :func:`core.analysis.cohort_stats.cohort_table`)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from core.export.collect import ExportData

TILE_COLUMNS = ("slide", "patient", "tile_idx", "x", "y", "x_center", "y_center", "tissue", "domain")


def tile_table(data: ExportData) -> pd.DataFrame:
    """slide, patient, tile_idx, x, y (level-0 top-left px), x_center, y_center, tissue, domain,
    then one float32 column per layer."""
    parts = []
    for s in data.slides:
        centres = s.centres
        df = pd.DataFrame({"slide": s.slide_name, "patient": s.patient,
                           "tile_idx": s.tiles["tile_idx"].to_numpy(np.int64),
                           "x": s.tiles["x"].to_numpy(np.int64), "y": s.tiles["y"].to_numpy(np.int64),
                           "x_center": centres[:, 0], "y_center": centres[:, 1],
                           "tissue": s.tiles["tissue"].to_numpy(np.float32), "domain": s.domain.astype(str)})
        values = pd.DataFrame({la.column: s.values[la.column] for la in data.layers}, index=df.index)
        parts.append(pd.concat([df, values], axis=1))
    if not parts:
        return pd.DataFrame(columns=[*TILE_COLUMNS, *(la.column for la in data.layers)])
    return pd.concat(parts, ignore_index=True)


def write_tiles(data: ExportData, path: Path, fmt: str) -> None:
    """CSV (UTF-8, float32 values written with their shortest exact repr) or Parquet."""
    write_frame(tile_table(data), path, fmt, data.provenance())


def write_frame(table: pd.DataFrame, path: Path, fmt: str, provenance: dict) -> None:
    """``table`` as CSV (no index) or Parquet, the latter with ``provenance`` in its schema
    metadata (keys ``tessera.<name>``); shared by the tile and the cell tables."""
    if fmt == "csv":
        table.to_csv(path, index=False)
        return
    import pyarrow as pa
    import pyarrow.parquet as pq

    meta = {f"tessera.{k}": str(v) for k, v in provenance.items()}
    tbl = pa.Table.from_pandas(table, preserve_index=False)
    pq.write_table(tbl.replace_schema_metadata({**(tbl.schema.metadata or {}), **meta}), path)


def write_cohort_table(store, cohort: str, variables: list[str], path: Path, *, model_key: str | None,
                       stat: str = "mean") -> pd.DataFrame:
    """The legacy ``export``: the cohort table, written by :func:`core.analysis.report.write_table`
    (format by ``path``'s suffix: .csv, .xlsx, .parquet)."""
    from core.analysis.cohort_stats import cohort_table
    from core.analysis.report import write_table

    table = cohort_table(store, cohort, variables, model_key=model_key, stat=stat)
    write_table(table, path)
    return table
