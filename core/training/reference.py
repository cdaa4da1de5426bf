"""Single-cell references: reading them, and the per-type expression profiles the models use.

A reference is an AnnData of single cells (raw counts) with the cell type in ``obs[type_column]``,
read from an ``.h5ad`` or from a counts CSV plus a cell-type CSV. Every problem with the files
given is raised as :class:`core.errors.ReferenceFormatError`, naming the file and what to fix.

This module imports nothing from the rest of :mod:`core.training`, so both
:mod:`core.training.stdata` and :mod:`core.training.fit` can import it.
"""
from __future__ import annotations

import zlib
from pathlib import Path

import numpy as np
import pandas as pd

from core.errors import ReferenceFormatError

#: ``uns`` key under which :func:`read_reference` records the file it read (for error messages).
SOURCE_KEY = "reference_path"

_CSV_HELP = "a CSV of cells × genes counts whose first column is the cell id"
_TYPES_HELP = "a CSV with the cell id in the first column and the cell type in the second"


def log_normalize(counts: np.ndarray, *, target_sum: float = 1e4) -> np.ndarray:
    """Library-size normalise each row to ``target_sum`` over the given genes, then log1p."""
    counts = np.asarray(counts, dtype=np.float64)
    totals = counts.sum(axis=1, keepdims=True)
    return np.log1p(counts / np.maximum(totals, 1.0) * target_sum).astype(np.float32)


def read_reference(path: str | Path, types_path: str | Path | None = None, *, type_column: str = "cell_type"):
    """A single-cell reference as AnnData with ``obs[type_column]``.

    ``path`` is an ``.h5ad`` (with the type column in ``obs``) or a CSV (optionally gzipped) of
    cells × genes counts whose first column is the cell id, with ``types_path`` a CSV of
    ``cell_id, <type_column>`` (the column named ``type_column``, else the first after the id).
    The file read is recorded in ``uns['reference_path']``.

    Raises :class:`core.errors.ReferenceFormatError` for a missing or unreadable file, an empty
    or non-numeric counts table, a types table without a type column or sharing no cell id with
    the counts, and an ``.h5ad`` without ``obs[type_column]``.
    """
    import anndata as ad

    path = Path(path)
    _check_file(path, "single-cell reference", f"pass an .h5ad, or {_CSV_HELP} together with --types")
    if path.suffix.lower() == ".h5ad":
        adata = _read_h5ad(path)
        if type_column not in adata.obs:
            columns = ", ".join(map(str, adata.obs.columns)) or "none"
            raise ReferenceFormatError(f"{path}: no obs column {type_column!r} with the cell types (obs columns: "
                                       f"{columns}); add it, e.g. adata.obs[{type_column!r}] = labels.")
    else:
        if types_path is None:
            raise ReferenceFormatError(f"{path}: a counts CSV needs a cell-type table; pass --types with "
                                       f"{_TYPES_HELP} ({type_column}).")
        counts = _read_counts_csv(path)
        types_path = Path(types_path)
        labels = _read_types_csv(types_path, type_column)
        common = counts.index.intersection(labels.index)
        if len(common) == 0:
            raise ReferenceFormatError(
                f"{types_path}: no cell id is also in {path} (e.g. {_examples(labels.index)} vs "
                f"{_examples(counts.index)}); both tables must use the same cell ids in their first column.")
        adata = ad.AnnData(counts.loc[common].to_numpy(dtype=np.float32))
        adata.obs_names = common.astype(str)
        adata.var_names = counts.columns.astype(str)
        adata.obs[type_column] = labels.loc[common].astype(str).to_numpy()
    adata.uns[SOURCE_KEY] = str(path)
    return adata


def reference_profiles(reference, genes: list[str], cell_types: list[str] | None = None,
                       *, type_column: str = "cell_type") -> tuple[pd.DataFrame, list[str]]:
    """Mean counts per cell type over ``genes`` (AnnData of single cells), normalised like targets.

    Raises :class:`core.errors.ReferenceFormatError` when the reference lacks a panel gene, the
    type column, or a requested cell type.
    """
    import scipy.sparse as sp

    name = reference.uns.get(SOURCE_KEY, "the single-cell reference")
    if type_column not in reference.obs:
        raise ReferenceFormatError(f"{name}: no obs column {type_column!r} with the cell types; add it, "
                                   f"e.g. adata.obs[{type_column!r}] = labels.")
    missing = [g for g in genes if g not in reference.var_names]
    if missing:
        raise ReferenceFormatError(
            f"{name}: lacks {len(missing)} of the {len(genes)} panel genes, e.g. {missing[:5]}; use a reference "
            "with those genes (gene symbols, as in the sections) or restrict the panel with --panel.")
    labels = reference.obs[type_column].astype(str).to_numpy()
    types = cell_types or sorted(set(labels))
    absent = [t for t in types if not (labels == t).any()]
    if absent:
        raise ReferenceFormatError(f"{name}: no cell of type {absent[:5]} (types present: {sorted(set(labels))[:10]}); "
                                   "use a reference that covers the model's cell types.")
    sub = reference[:, genes]
    X = sub.X.toarray() if sp.issparse(sub.X) else np.asarray(sub.X)
    means = np.stack([X[labels == t].mean(axis=0) for t in types])
    return pd.DataFrame(log_normalize(means), index=types, columns=genes), types


# ------------------------------------------------------------------------------------ readers


def _anndata_errors() -> tuple[type[BaseException], ...]:
    """What reading a file that is not a valid AnnData raises (h5py: OSError; anndata: the rest)."""
    errors: tuple[type[BaseException], ...] = (OSError, EOFError, KeyError, TypeError, ValueError, IndexError)
    try:
        from anndata._io.specs.registry import IORegistryError
    except ImportError:  # a private module: it may move between anndata versions
        return errors
    return errors + (IORegistryError,)


def _read_h5ad(path: Path):
    import anndata as ad

    try:
        return ad.read_h5ad(path)
    except _anndata_errors() as exc:
        raise ReferenceFormatError(f"{path}: not a readable .h5ad ({_reason(exc)}); write the reference with "
                                   "adata.write_h5ad(), or pass a counts CSV with --types.") from exc


def _read_csv(path: Path, what: str, expected: str) -> pd.DataFrame:
    try:
        return pd.read_csv(path, index_col=0)
    except pd.errors.EmptyDataError as exc:
        raise ReferenceFormatError(f"{path}: the {what} file is empty; expected {expected}.") from exc
    except (pd.errors.ParserError, UnicodeDecodeError, OSError, EOFError, zlib.error) as exc:
        raise ReferenceFormatError(f"{path}: not a readable CSV ({_reason(exc)}); expected {expected}"
                                   " (plain or .gz).") from exc


def _read_counts_csv(path: Path) -> pd.DataFrame:
    counts = _read_csv(path, "counts", _CSV_HELP)
    if counts.shape[1] == 0 or counts.shape[0] == 0:
        raise ReferenceFormatError(f"{path}: the counts table has {counts.shape[0]} cells × {counts.shape[1]} "
                                   f"genes; expected {_CSV_HELP}, one comma-separated row per cell.")
    text = [str(c) for c in counts.columns if not pd.api.types.is_numeric_dtype(counts[c])]
    if text:
        bad = counts[text[0]]
        value = bad[pd.to_numeric(bad, errors="coerce").isna() & bad.notna()]
        example = f" ({value.iloc[0]!r} for cell {value.index[0]!r})" if len(value) else ""
        raise ReferenceFormatError(f"{path}: non-numeric counts in {len(text)} gene column(s) {text[:5]}{example}; "
                                   "the counts must be numbers, with the cell id only in the first column.")
    if counts.isna().to_numpy().any():
        raise ReferenceFormatError(f"{path}: {int(counts.isna().to_numpy().sum())} empty count value(s); "
                                   "fill them (0 for no count).")
    if not counts.index.is_unique:
        raise ReferenceFormatError(f"{path}: cell ids occur more than once, e.g. "
                                   f"{_examples(counts.index[counts.index.duplicated()])}; give each cell one row.")
    return counts


def _read_types_csv(path: Path, type_column: str) -> pd.Series:
    _check_file(path, "cell-type table", f"pass --types with {_TYPES_HELP}")
    types = _read_csv(path, "cell-type", _TYPES_HELP)
    if types.shape[1] == 0:
        raise ReferenceFormatError(f"{path}: no cell-type column, only the cell ids; expected {_TYPES_HELP} "
                                   f"(e.g. header 'cell_id,{type_column}').")
    if not types.index.is_unique:
        raise ReferenceFormatError(f"{path}: cell ids occur more than once, e.g. "
                                   f"{_examples(types.index[types.index.duplicated()])}; give each cell one type.")
    labels = types[type_column] if type_column in types.columns else types.iloc[:, 0]
    if labels.isna().any():
        raise ReferenceFormatError(f"{path}: {int(labels.isna().sum())} cells have no type in column "
                                   f"{labels.name!r}; give every cell a type or drop those rows.")
    return labels


def _check_file(path: Path, what: str, fix: str) -> None:
    if path.is_dir():
        raise ReferenceFormatError(f"{path}: is a folder, not a {what} file; {fix}.")
    if not path.is_file():
        raise ReferenceFormatError(f"{path}: no such {what} file; {fix}.")


def _reason(exc: BaseException) -> str:
    """The first line of a low-level error, short enough for a one-line message."""
    text = (str(exc).splitlines() or [""])[0].strip()
    text = text if len(text) <= 100 else text[:97] + "..."
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _examples(index: pd.Index, n: int = 3) -> str:
    return ", ".join(repr(str(v)) for v in list(index[:n])) or "none"
