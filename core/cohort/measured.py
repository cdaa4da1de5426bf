"""Reading a measured expression matrix (bulk RNA) for a cohort, keyed to its patients.

Input is a CSV/TSV (gzipped or not) or Parquet table, genes × patients or patients × genes, with
one axis of ids in the first column and the other in the header. Ids may be TCGA sample/aliquot
barcodes (``TCGA-A2-A0CM-01A-11R-A034-07``), 12-character patient barcodes or the last 4
characters of the patient barcode (``A0CM``, as in mixOmics' ``breast.TCGA``). The axis whose
ids match the cohort's patients better is the patient axis. Every decision (orientation, key,
unmatched, ambiguous, extra samples, duplicate genes, non-numeric cells) becomes a
:class:`~core.cohort.clinical_values.ClinicalIssue`; what cannot be used raises
:class:`~core.errors.MeasuredFormatError`.
"""
from __future__ import annotations

import gzip
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from core.cohort.clinical_io import check_file_size, read_gzip_capped
from core.cohort.clinical_values import ClinicalIssue, Issues, is_missing, some
from core.errors import MeasuredFormatError
from core.vocab import MAX_MEASURED_FILE_BYTES, MAX_MEASURED_INFLATED_BYTES, TCGA_PATIENT

ORIENTATIONS = ("genes x patients", "patients x genes")
KEYS = ("barcode", "patient", "suffix4")
KEY_WORDS = {"barcode": "full TCGA sample barcodes", "patient": "12-character patient barcodes",
             "suffix4": "the last 4 characters of the barcode"}
_TEXT = (".csv", ".tsv", ".txt", ".tab", ".csv.gz", ".tsv.gz", ".txt.gz", ".tab.gz")
_PARQUET = (".parquet", ".pq", ".parq")
_BARCODE = re.compile(rf"^({TCGA_PATIENT})(?:-(\d{{2}}))?")
_SUFFIX4 = re.compile(r"^[A-Z0-9]{4}$")
_ID_FORMS = ("full TCGA sample/aliquot barcodes (TCGA-A2-A0CM-01A…), 12-character patient barcodes "
             "(TCGA-A2-A0CM) and the last 4 characters of the patient barcode (A0CM)")


@dataclass(frozen=True)
class MeasuredImport:
    """A measured matrix keyed to the cohort: ``matrix`` is patients × genes (float), index = patient barcode."""

    matrix: pd.DataFrame
    issues: tuple[ClinicalIssue, ...]
    orientation: str  # "genes x patients" | "patients x genes" (as found in the file)
    key: str          # "barcode" | "patient" | "suffix4"
    n_ids_read: int   # ids on the patient axis of the file
    n_matched: int    # of those, ids mapped to exactly one cohort patient

    def summary(self) -> str:
        n_genes, n_patients = self.matrix.shape[1], self.matrix.shape[0]
        return (f"{n_genes} genes × {n_patients} patients matched by {KEY_WORDS[self.key]}; "
                f"{self.n_ids_read - self.n_matched} unmatched")


@dataclass(frozen=True)
class _AxisMatch:
    """How the ids of one axis map to the cohort: ``patient`` per id ('' when none), form per id."""

    ids: tuple[str, ...]
    patient: tuple[str, ...]
    form: tuple[str, ...]        # "barcode" | "patient" | "suffix4" | "" (not an id form)
    sample: tuple[str, ...]      # two-digit TCGA sample type, '' when unknown
    ambiguous: dict              # suffix id → the cohort patients it could be

    @property
    def n_matched(self) -> int:
        return sum(bool(p) for p in self.patient)

    @property
    def score(self) -> tuple[float, int]:
        n = max(len(self.ids), 1)
        return ((self.n_matched + len(self.ambiguous)) / n, self.n_matched)

    @property
    def key(self) -> str:
        forms = pd.Series([f for f, p in zip(self.form, self.patient) if p])
        return str(forms.value_counts().idxmax()) if len(forms) else "patient"


# -- reading the file -----------------------------------------------------------------------------

def _kind(path: Path) -> str:
    name = path.name.lower()
    return next((s for s in (*_TEXT, *_PARQUET) if name.endswith(s)), path.suffix.lower())


def _read_text(path: Path) -> tuple[list[str], pd.DataFrame]:
    """Header cells (raw, not de-duplicated) and the body with positional columns."""
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    if opener is gzip.open:  # counted while streaming, before pandas inflates it for real
        read_gzip_capped(path, MAX_MEASURED_INFLATED_BYTES, error=MeasuredFormatError,
                         what="measured expression matrix", keep=False)
    try:
        with opener(path, "rb") as fh:
            head = fh.read(65536)
    except OSError as e:
        raise MeasuredFormatError(f"{path.name} cannot be read ({e}); give an uncompressed or gzipped "
                                  "CSV/TSV, or a Parquet file.") from e
    if head.startswith(b"PK\x03\x04"):
        raise MeasuredFormatError(f"{path.name} is a zip/Excel file; export the matrix as CSV or TSV.")
    if b"\x00" in head:
        raise MeasuredFormatError(f"{path.name} is a binary file, not a text table; give a CSV, TSV or Parquet file.")
    lines = head.decode("latin-1").splitlines()
    if not lines or not head.strip():
        raise MeasuredFormatError(f"{path.name} is empty; export the expression matrix again.")
    first = lines[0]
    sep = "\t" if "\t" in first else (";" if first.count(";") > first.count(",") else ",")
    options = dict(sep=sep, header=None, encoding="latin-1", quotechar='"')
    try:
        header = pd.read_csv(path, nrows=1, dtype=str, keep_default_na=False, **options).iloc[0].tolist()
        body = pd.read_csv(path, skiprows=1, low_memory=False, dtype={0: str}, **options)
    except pd.errors.EmptyDataError as e:
        raise MeasuredFormatError(f"{path.name} has a header but no rows; export the matrix again.") from e
    except (pd.errors.ParserError, ValueError) as e:
        raise MeasuredFormatError(f"{path.name} could not be parsed as a table ({e}). It needs one header row, "
                                  "ids in the first column and the same number of fields on every line.") from e
    if len(header) == body.shape[1] - 1:  # R write.table: no header cell above the row names
        header = ["", *header]
    return [str(h).strip() for h in header], body


def _parquet_inflated_bytes(path: Path) -> int:
    """The uncompressed size of a Parquet file's data, from its footer (nothing decoded)."""
    import pyarrow.parquet as pq

    meta = pq.ParquetFile(path).metadata
    return sum(meta.row_group(i).total_byte_size for i in range(meta.num_row_groups))


def _read_parquet(path: Path) -> tuple[list[str], pd.DataFrame]:
    try:
        inflated = _parquet_inflated_bytes(path)
    except Exception as e:  # not a Parquet file, or a damaged footer
        raise MeasuredFormatError(f"{path.name} cannot be read as Parquet ({e}); write it again, or give a "
                                  "CSV/TSV.") from e
    if inflated > MAX_MEASURED_INFLATED_BYTES:
        raise MeasuredFormatError(f"{path.name} holds {inflated / 2**20:,.0f} MB of uncompressed data, more than "
                                  f"the {MAX_MEASURED_INFLATED_BYTES / 2**20:,.0f} MB a measured expression matrix "
                                  "may have. Keep only the cohort's samples and the genes needed.")
    try:
        df = pd.read_parquet(path)
    except Exception as e:  # pyarrow raises many types for a damaged or foreign file
        raise MeasuredFormatError(f"{path.name} cannot be read as Parquet ({e}); write it again, or give a "
                                  "CSV/TSV.") from e
    if not isinstance(df.index, pd.RangeIndex) or df.index.name is not None:
        df = df.reset_index()  # ids written as the frame's index
    header = [str(c).strip() for c in df.columns]
    df.columns = range(df.shape[1])
    return header, df


def _read_table(path: Path) -> tuple[list[str], pd.DataFrame]:
    if not path.is_file():
        raise MeasuredFormatError(f"No expression matrix at {path}; check the path.")
    check_file_size(path, MAX_MEASURED_FILE_BYTES, error=MeasuredFormatError, what="measured expression matrix")
    kind = _kind(path)
    if kind in _PARQUET:
        header, body = _read_parquet(path)
    elif kind in _TEXT:
        header, body = _read_text(path)
    else:
        raise MeasuredFormatError(f"{path.name}: unsupported file type {kind or '(none)'}; give CSV, TSV "
                                  "(gzipped or not) or Parquet.")
    if body.shape[1] < 2 or body.shape[0] < 1:
        raise MeasuredFormatError(f"{path.name} has {body.shape[0]} row(s) and {body.shape[1]} column(s): not an "
                                  "expression matrix. It needs ids in the first column, ids in the header row and "
                                  "values separated by commas or tabs.")
    return header, body


# -- matching ids to the cohort ------------------------------------------------------------------

def _match_axis(ids: Sequence, patients: list[str], suffixes: dict[str, list[str]]) -> _AxisMatch:
    text = [("" if v is None or (isinstance(v, float) and np.isnan(v)) else str(v)).strip() for v in ids]
    known = set(patients)
    patient, form, sample, ambiguous = [], [], [], {}
    for raw in text:
        up = raw.upper()
        if up.startswith("TCGA.") or up.startswith("TCGA_"):  # R's make.names, or underscores
            up = up.replace(".", "-").replace("_", "-")
        m = _BARCODE.match(up)
        if m:
            kind = "patient" if len(up) == 12 else "barcode"
            patient.append(m[1] if m[1] in known else "")
            form.append(kind)
            sample.append(m[2] or "")
        elif _SUFFIX4.match(up):
            hits = suffixes.get(up, [])
            if len(hits) > 1:
                ambiguous[raw] = hits
            patient.append(hits[0] if len(hits) == 1 else "")
            form.append("suffix4")
            sample.append("")
        else:
            patient.append("")
            form.append("")
            sample.append("")
    return _AxisMatch(tuple(text), tuple(patient), tuple(form), tuple(sample), ambiguous)


def _no_match_error(name: str, rows: _AxisMatch, cols: _AxisMatch, patients: list[str]) -> MeasuredFormatError:
    return MeasuredFormatError(
        f"No id of {name} matches a patient of the cohort. Tried {_ID_FORMS} on the first column and on the "
        f"header. First column: {some(rows.ids, 5)}; header: {some(cols.ids, 5)}; cohort patients: "
        f"{some(patients, 5)}. Check that the matrix belongs to this cohort and that one axis holds TCGA "
        "barcodes (or their last 4 characters).")


def _pick_samples(match: _AxisMatch, keep: np.ndarray, issues: Issues) -> np.ndarray:
    """One column per patient: the primary tumour (01) when there is one, else the first tumour
    sample (type < 10), else the first; extras are dropped and reported."""
    pos = np.flatnonzero(keep)
    groups = pd.Series(pos).groupby([match.patient[i] for i in pos], sort=False)
    chosen, dropped, unclear = [], [], []
    for patient, idx in groups:
        idx = list(idx)
        if len(idx) == 1:
            chosen.append(idx[0])
            continue
        types = [match.sample[i] for i in idx]
        rank = [0 if t == "01" else 1 if t and int(t) < 10 else 2 for t in types]
        best = idx[int(np.argmin(rank))]
        chosen.append(best)
        dropped += [i for i in idx if i != best]
        if rank.count(0) != 1:
            unclear.append(patient)
    if dropped:
        severity = "warning" if unclear else "info"
        how = ("kept the primary-tumour sample (01) of each" if not unclear else
               f"kept the primary-tumour sample (01) where there is exactly one, else the first tumour sample; "
               f"no single primary-tumour sample for {some(unclear, 5)}: check which sample to use")
        issues.add(severity, f"{len(set(match.patient[i] for i in dropped))} patient(s) have several samples "
                   f"({some(match.ids[i] for i in dropped)} besides the one kept); {how}. Dropped "
                   f"{len(dropped)} extra sample(s).", patients=[match.patient[i] for i in dropped])
    out = np.zeros(len(match.ids), bool)
    out[chosen] = True
    return out


def _report_unmatched(match: _AxisMatch, issues: Issues) -> None:
    unmatched = [i or "(blank)" for i, p in zip(match.ids, match.patient) if not p and i not in match.ambiguous]
    if match.ambiguous:
        pairs = [f"{s} → {' or '.join(p)}" for s, p in match.ambiguous.items()]
        issues.add("warning", f"{len(match.ambiguous)} 4-character id(s) match two or more cohort patients "
                   f"({some(pairs, 4)}); dropped. Use full patient barcodes in the matrix to keep them.",
                   patients=[p for ps in match.ambiguous.values() for p in ps])
    if unmatched:
        issues.add("warning", f"{len(unmatched)} of {len(match.ids)} id(s) match no patient of the cohort "
                   f"({some(unmatched, 6)}); dropped. Check that they belong to this cohort, or import its "
                   "clinical table with them.")


# -- values --------------------------------------------------------------------------------------

def _numeric(values: pd.DataFrame, issues: Issues) -> pd.DataFrame:
    """Every column as float: non-numeric cells → NaN, reported once with examples."""
    out, bad_cells, examples = {}, 0, []
    for c in values.columns:
        col = values[c]
        if pd.api.types.is_numeric_dtype(col) and not pd.api.types.is_bool_dtype(col):
            out[c] = col.to_numpy(float)
            continue
        num = pd.to_numeric(col, errors="coerce").astype(float)
        odd = num.isna() & ~is_missing(col)
        if odd.any():
            bad_cells += int(odd.sum())
            examples += [repr(v) for v in col[odd].astype(str).head(3)]
        out[c] = num.to_numpy(float)
    if bad_cells:
        issues.add("warning", f"{bad_cells} cell(s) are not numbers ({some(examples, 5)}); set to missing. Fix them "
                   "in the file, or leave them missing.")
    return pd.DataFrame(out, index=values.index)


def _clean_genes(genes: list[str], issues: Issues) -> np.ndarray:
    """Mask of gene positions to keep: named, first of each name. Names that differ only by case
    (``TP53``/``tp53``) are refused: the store and the analyses match genes case-insensitively,
    so which one is meant cannot be told."""
    s = pd.Series(genes, dtype=object)
    blank = s.isna() | (s.astype(str).str.strip() == "")
    if blank.any():
        issues.add("warning", f"Dropped {int(blank.sum())} gene(s) without a name.")
    named = s[~blank].astype(str).str.strip()
    spellings = named.drop_duplicates().groupby(named.drop_duplicates().str.lower()).agg(list)
    clash = spellings[spellings.map(len) > 1]
    if len(clash):
        raise MeasuredFormatError(
            f"{len(clash)} gene name(s) differ only by case ({some(' / '.join(v) for v in clash)}); which one is "
            "meant cannot be told, since genes are matched without regard to case. Rename or remove one of "
            "each pair in the file.")
    dup = s.duplicated(keep="first") & ~blank
    if dup.any():
        issues.add("warning", f"{int(dup.sum())} duplicate gene name(s) ({some(s[dup])}); kept the first of each, "
                   "dropped the others.")
    return (~blank & ~dup).to_numpy()


def read_measured(path: str | Path, patients: Sequence[str]) -> MeasuredImport:
    """The matrix at ``path`` as patients × genes for the cohort's ``patients`` (12-char barcodes)."""
    path = Path(path)
    cohort = list(dict.fromkeys(str(p).strip().upper() for p in patients if str(p).strip()))
    if not cohort:
        raise MeasuredFormatError("The cohort has no patients to match the matrix to; import its clinical table first.")
    suffixes: dict[str, list[str]] = {}
    for p in cohort:
        suffixes.setdefault(p[-4:], []).append(p)
    header, body = _read_table(path)
    issues = Issues()
    rows = _match_axis(body.iloc[:, 0].tolist(), cohort, suffixes)
    cols = _match_axis(header[1:], cohort, suffixes)
    if rows.n_matched == 0 and cols.n_matched == 0:
        if rows.ambiguous or cols.ambiguous:
            amb = rows.ambiguous or cols.ambiguous
            raise MeasuredFormatError(
                f"Every id of {path.name} that matches the cohort is an ambiguous 4-character suffix "
                f"({some(amb, 5)} each match two or more patients); use full patient barcodes.")
        raise _no_match_error(path.name, rows, cols, cohort)
    values = body.iloc[:, 1:]
    values.columns = range(values.shape[1])
    if rows.score >= cols.score:
        orientation, match, other, genes, where = "patients x genes", rows, cols, list(header[1:]), "first column"
    else:
        orientation, match, other, genes, where = "genes x patients", cols, rows, list(rows.ids), "header"
    key = match.key
    issues.add("info", f"Read as {orientation}: the {where} holds the patient ids ({match.n_matched} of "
               f"{len(match.ids)} match the cohort, by {KEY_WORDS[key]}; the other axis: {other.n_matched} of "
               f"{len(other.ids)}).")
    mixed = {f for f, p in zip(match.form, match.patient) if p} - {key}
    if mixed:
        issues.add("info", f"Some ids were matched by {some(KEY_WORDS[f] for f in sorted(mixed))} too.")
    _report_unmatched(match, issues)
    keep = _pick_samples(match, np.array([bool(p) for p in match.patient]), issues)
    gene_keep = _clean_genes(genes, issues)
    # select in the file's orientation, convert to numbers, then turn patients into rows
    values = values.loc[keep, gene_keep] if orientation == "patients x genes" else values.loc[gene_keep, keep]
    matrix = _numeric(values, issues)
    if orientation == "genes x patients":
        matrix = matrix.T
    matrix.index = pd.Index([match.patient[i] for i in np.flatnonzero(keep)], name="patient")
    matrix.columns = pd.Index([str(g).strip() for g, k in zip(genes, gene_keep) if k], name="gene")
    if not matrix.notna().any(axis=None):
        raise MeasuredFormatError(f"{path.name} holds no numeric expression value for the matched patients; check "
                                  "that it is a matrix of numbers with ids in the first column and the header.")
    empty = matrix.columns[matrix.isna().all()]
    if len(empty):
        issues.add("warning", f"{len(empty)} gene(s) hold no numeric value ({some(empty, 5)}); dropped "
                   "(annotation columns, or values that are not numbers).")
        matrix = matrix.drop(columns=empty)
    return MeasuredImport(matrix=matrix, issues=tuple(issues), orientation=orientation, key=key,
                          n_ids_read=len(match.ids), n_matched=match.n_matched)


# -- storage -------------------------------------------------------------------------------------

def to_long(matrix: pd.DataFrame) -> pd.DataFrame:
    """Patients × genes → rows ``patient, gene, value`` (missing values left out)."""
    values = matrix.to_numpy(dtype=float).ravel()
    keep = ~np.isnan(values)
    patients = np.repeat(matrix.index.astype(str).to_numpy(dtype=object), matrix.shape[1])
    genes = np.tile(matrix.columns.astype(str).to_numpy(dtype=object), matrix.shape[0])
    return pd.DataFrame({"patient": patients[keep], "gene": genes[keep], "value": values[keep]})


def from_long(df: pd.DataFrame) -> pd.DataFrame:
    """Rows ``patient, gene, value`` → patients × genes (first value per pair; order of first appearance)."""
    missing = {"patient", "gene", "value"} - set(df.columns)
    if missing:
        raise MeasuredFormatError(f"A long expression table needs columns patient, gene, value; "
                                  f"{', '.join(sorted(missing))} missing.")
    pc, patients = pd.factorize(df["patient"].astype(str))
    gc, genes = pd.factorize(df["gene"].astype(str))
    first = ~pd.Series(pc.astype(np.int64) * max(len(genes), 1) + gc).duplicated(keep="first").to_numpy()
    out = np.full((len(patients), len(genes)), np.nan)
    out[pc[first], gc[first]] = pd.to_numeric(df["value"], errors="coerce").to_numpy(float)[first]
    return pd.DataFrame(out, index=pd.Index(patients, name="patient"), columns=pd.Index(genes, name="gene"))
