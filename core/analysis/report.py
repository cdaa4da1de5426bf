"""Results as files: strict JSON, tables as CSV / XLSX / Parquet (the same bytes from CLI and pages)."""
from __future__ import annotations

import io
import math
from dataclasses import asdict, is_dataclass

import numpy as np
import pandas as pd

from core.errors import AnalysisError

TABLE_FORMATS = {"csv": "text/csv",
                 "xlsx": "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet",
                 "parquet": "application/vnd.apache.parquet"}
FIGURE_FORMATS = {"png": "image/png", "svg": "image/svg+xml"}


def to_jsonable(value):
    """Plain Python for ``json.dumps(..., allow_nan=False)``: NaN/inf → None, numpy → Python,
    frames → lists of records, dataclasses → dicts."""
    if hasattr(value, "to_json") and callable(value.to_json) and not isinstance(value, (pd.DataFrame, pd.Series)):
        return to_jsonable(value.to_json())
    if is_dataclass(value) and not isinstance(value, type):
        return to_jsonable(asdict(value))
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, pd.DataFrame):
        return [to_jsonable(r) for r in value.to_dict("records")]
    if isinstance(value, pd.Series):
        return to_jsonable(value.to_dict())
    if isinstance(value, np.ndarray):
        return to_jsonable(value.tolist())
    if isinstance(value, (np.bool_, bool)):
        return bool(value)
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        f = float(value)
        return f if math.isfinite(f) else None
    if value is pd.NA or value is pd.NaT:
        return None
    if isinstance(value, pd.Timestamp):
        return value.isoformat()
    return value


def table_bytes(df: pd.DataFrame, fmt: str) -> bytes:
    """``df`` as CSV (UTF-8), XLSX (one sheet) or Parquet."""
    if fmt not in TABLE_FORMATS:
        raise AnalysisError(f"Unknown table format {fmt!r}; use {', '.join(TABLE_FORMATS)}.")
    if fmt == "csv":
        return df.to_csv(index=False).encode("utf-8")
    buf = io.BytesIO()
    if fmt == "xlsx":
        with pd.ExcelWriter(buf, engine="openpyxl") as xl:
            df.to_excel(xl, index=False, sheet_name="tessera")
    else:
        out = df.copy()
        for c in out.columns:  # object columns of mixed types are not valid Parquet columns
            if out[c].dtype == object:
                out[c] = out[c].astype("string")
        out.to_parquet(buf, index=False)
    return buf.getvalue()


def write_table(df: pd.DataFrame, path) -> str:
    """Write by the file's suffix (.csv, .xlsx, .parquet); returns the format."""
    from pathlib import Path

    path = Path(path)
    fmt = path.suffix.lower().lstrip(".")
    data = table_bytes(df, fmt)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    except OSError as exc:
        raise AnalysisError(f"Cannot write {path}: {exc.strerror or exc}. Give a path in a writable folder.") from exc
    return fmt
