"""Variables of cohort analyses, one value per patient, from any of three sources.

A variable is named by a string that the CLI and the pages share:

- ``CD8A`` (or ``predicted:CD8A``): a gene predicted from the slides, summarised per slide by a
  statistic (:data:`core.analysis.biomarkers.STATS`) and per patient by the patient rule of
  :func:`core.analysis.biomarkers.patient_matrix`;
- ``signature:<name>`` or ``signature:g1,g2,…``: a predicted signature. Its score is the mean over
  its genes of the per-gene patient values z-scored over the cohort (mean 0, SD 1, ddof = 1), so
  that each gene weighs the same whatever its level (a mean z-score, as in GEPIA2's signature
  score on log expression);
- ``clinical:<column>``: a column of the imported clinical table (numeric columns are continuous,
  others categorical);
- ``measured:<gene>``: a gene of the measured expression matrix imported for the cohort;
- ``domain:<Dk or name>``: the fraction of the patient's tiles in a spatial domain of the cohort's
  domain fit for the model (:func:`core.analysis.domains.domain_fraction`; e.g. ``domain:D3`` or
  ``domain:tumour–immune``), per patient by the same patient rule;
- cell biomarkers of cells runs (``predict --cells``; :mod:`core.analysis.cell_biomarkers`, where
  each is defined exactly), per patient the mean over the patient's slides:
  ``cell:<type>:<gene>`` (mean of the gene in the type's cells, e.g. ``cell:malignant:ERBB2``),
  ``cellfrac:<type>`` (the type's fraction of the slide's cells) and ``celldens:<A>@<B>[:<µm>]``
  (A cells per mm² within the distance, default 50 µm, of any B cell, e.g. ``celldens:t_cell@malignant:50``).
  Types are the model's cell types, matched ignoring case or by a unique prefix.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from core.analysis.biomarkers import STATS, patient_matrix
from core.errors import AnalysisError
from core.vocab import ENDPOINTS

SOURCES = ("predicted", "signature", "clinical", "measured", "domain", "cell", "cellfrac", "celldens")
CELL_SOURCES = ("cell", "cellfrac", "celldens")
# Columns of the normalised clinical table that are not variables (ids and the endpoints).
_NOT_VARIABLES = {"bcr_patient_barcode", *ENDPOINTS, *(f"{e}.time" for e in ENDPOINTS)}


@dataclass(frozen=True)
class Variable:
    """A parsed variable name: ``source`` (see :data:`SOURCES`) and what it names."""

    source: str
    name: str                      # gene, column or signature label
    genes: tuple[str, ...] = ()    # the genes of a signature; the gene of ``cell:<type>:<gene>``
    near: str = ""                 # ``celldens``: the B type of A@B
    distance_um: float = 0.0       # ``celldens``: the distance

    @property
    def cell_measure(self):
        """The :class:`core.analysis.cell_biomarkers.CellMeasure` of a cell variable (else None)."""
        from core.analysis.cell_biomarkers import CellMeasure

        if self.source not in CELL_SOURCES:
            return None
        kind = {"cell": "mean", "cellfrac": "frac", "celldens": "dens"}[self.source]
        return CellMeasure(kind, self.name, self.genes[0] if self.genes else None, self.near or None,
                           self.distance_um or 50.0)

    @property
    def label(self) -> str:
        if self.source == "predicted":
            return f"{self.name} (predicted)"
        if self.source == "signature":
            return f"{self.name} signature (predicted)"
        if self.source == "domain":
            return f"{self.name} (domain fraction)"
        if self.source in CELL_SOURCES:
            return self.cell_measure.label
        return f"{self.name} ({self.source})"

    @property
    def spec(self) -> str:
        if self.source == "predicted":
            return self.name
        if self.source in CELL_SOURCES:
            return self.cell_measure.spec
        return f"{self.source}:{self.name}"


def parse_variable(text: str, *, panel: list[str] | None = None, signatures: dict[str, list[str]] | None = None,
                   cell_types: list[str] | None = None) -> Variable:
    """``clinical:<col>``, ``measured:<gene>``, ``signature:<name or g1,g2>``, ``domain:<Dk or name>``,
    ``cell:<type>:<gene>``, ``cellfrac:<type>``, ``celldens:<A>@<B>[:<µm>]``, ``predicted:<gene>`` or a
    bare gene symbol (predicted). Gene symbols are matched to ``panel`` ignoring case when it is
    given; cell types to ``cell_types`` (ignoring case, or a unique prefix) when it is given (else
    :func:`variable_values` matches them to the model)."""
    text = (text or "").strip()
    if not text:
        raise AnalysisError("Name a variable: a predicted gene (e.g. CD8A), signature:<name or genes>, "
                            "clinical:<column> or measured:<gene>.")
    source, sep, what = text.partition(":")
    if not sep:
        source, what = "predicted", text
    source = source.strip().lower()
    what = what.strip()
    if source not in SOURCES:
        raise AnalysisError(f"Unknown variable kind {source!r} in {text!r}; use a gene symbol, "
                            f"{', '.join(s + ':…' for s in SOURCES)}.")
    if not what:
        raise AnalysisError(f"{text!r} names no {source} variable.")
    if source == "predicted":
        return Variable("predicted", _match_gene(what, panel))
    if source in CELL_SOURCES:
        return _parse_cell(source, what, text, panel, cell_types)
    if source == "signature":
        library = {k.lower(): (k, v) for k, v in (signatures or {}).items()}
        if what.lower() in library:
            name, genes = library[what.lower()]
            genes = [_match_gene(g, panel, quiet=True) for g in genes]
            genes = [g for g in genes if g]
            if not genes:
                raise AnalysisError(f"No gene of the {name} signature is in the model's panel.")
            return Variable("signature", name, tuple(genes))
        genes = [g for g in (t.strip() for t in what.replace(";", ",").replace(" ", ",").split(",")) if g]
        genes = list(dict.fromkeys(_match_gene(g, panel) for g in genes))
        return Variable("signature", ",".join(genes), tuple(genes))
    return Variable(source, what)


_CELL_FORMS = {"cell": "cell:<type>:<gene> (e.g. cell:malignant_epithelial:ERBB2)",
               "cellfrac": "cellfrac:<type> (e.g. cellfrac:t_cell)",
               "celldens": "celldens:<A>@<B>[:<µm>] (e.g. celldens:t_cell@malignant_epithelial:50)"}


def _parse_cell(source: str, what: str, text: str, panel, cell_types) -> Variable:
    from core.analysis.cell_biomarkers import DEFAULT_DISTANCE_UM, MAX_DISTANCE_UM, resolve_type

    def bad(why: str) -> AnalysisError:
        return AnalysisError(f"{text!r}: {why}; write {_CELL_FORMS[source]}.")

    def kind(name: str) -> str:
        name = name.strip()
        if not name:
            raise bad("a cell type is missing")
        return resolve_type(name, cell_types) if cell_types else name

    if source == "cell":
        typ, sep, gene = what.partition(":")
        if not sep or not gene.strip():
            raise bad("name a cell type and a gene")
        return Variable("cell", kind(typ), (_match_gene(gene.strip(), panel),))
    if source == "cellfrac":
        if ":" in what or "@" in what:
            raise bad("name one cell type")
        return Variable("cellfrac", kind(what))
    pair, sep, dist = what.partition(":")
    a, at, b = pair.partition("@")
    if not at:
        raise bad("name two cell types as A@B")
    d = DEFAULT_DISTANCE_UM
    if sep:
        try:
            d = float(dist.strip().removesuffix("µm").removesuffix("um"))
        except ValueError:
            raise bad(f"the distance {dist.strip()!r} is not a number of µm") from None
        if not (0 < d <= MAX_DISTANCE_UM) or not np.isfinite(d):
            raise bad(f"the distance must be in (0, {MAX_DISTANCE_UM:g}] µm")
    return Variable("celldens", kind(a), near=kind(b), distance_um=d)


def _match_gene(symbol: str, panel: list[str] | None, *, quiet: bool = False,
                what: str = "the model's panel") -> str | None:
    if panel is None:
        return symbol
    by_upper = {g.upper(): g for g in panel}
    if symbol.upper() in by_upper:
        return by_upper[symbol.upper()]
    if quiet:
        return None
    raise AnalysisError(f"{symbol} is not in {what} of {len(panel)} genes (e.g. {', '.join(panel[:10])}).")


def zscore(frame: pd.DataFrame) -> pd.DataFrame:
    """Columns z-scored over their non-missing values (SD with ddof = 1); constant columns → 0."""
    sd = frame.std(ddof=1).replace(0, np.nan)
    return ((frame - frame.mean()) / sd).fillna(0.0).where(frame.notna())


def clinical_variables(clinical: pd.DataFrame) -> dict[str, str]:
    """Column → ``continuous`` or ``categorical`` for the columns usable as variables: numeric with
    > 5 distinct values are continuous; others with 2–30 groups categorical; ids and free text
    (a distinct value on most rows) are left out."""
    out = {}
    for col in clinical.columns:
        if col in _NOT_VARIABLES:
            continue
        values = clinical[col].dropna()
        distinct = values.nunique()
        if distinct < 2:
            continue
        if pd.api.types.is_numeric_dtype(values) and distinct > 5:
            out[col] = "continuous"
        elif distinct <= 30 and distinct < max(0.8 * len(values), 3):
            out[col] = "categorical"
    return out


def clinical_column(clinical: pd.DataFrame, column: str) -> pd.Series:
    """One clinical column per patient; the column is matched ignoring case."""
    cols = {c.lower(): c for c in clinical.columns}
    col = column if column in clinical.columns else cols.get(column.lower())
    if col is None or col in ("bcr_patient_barcode",):
        usable = ", ".join(list(clinical_variables(clinical))[:20])
        raise AnalysisError(f"The clinical table has no column {column!r}. Usable columns: {usable}.")
    return clinical.set_index("bcr_patient_barcode")[col].rename(col)


def variable_values(store, cohort: str, variable: Variable, *, model_key: str | None = None,
                    stat: str = "mean") -> pd.Series:
    """The variable's value per patient (index ``patient``), missing values dropped."""
    if variable.source == "clinical":
        out = clinical_column(store.clinical(cohort), variable.name)
    elif variable.source == "measured":
        genes = store.measured_genes(cohort)
        if not genes:
            raise AnalysisError(f"Cohort {cohort!r} has no measured expression; import a matrix first "
                                "(python -m core.cli measured --cohort N --matrix FILE, or on the Import page).")
        gene = _match_gene(variable.name, genes, what="the cohort's measured matrix")
        out = store.measured(cohort, [gene])[gene]
    elif variable.source == "domain":
        from core.analysis.domains import domain_fraction

        if model_key is None:
            raise AnalysisError("Domain fractions need the model whose domains were fitted; choose one (--model).")
        out = domain_fraction(store, cohort, model_key, variable.name)
    elif variable.source in CELL_SOURCES:
        from core.analysis.cell_biomarkers import normalise, patient_values

        if model_key is None:
            raise AnalysisError("Cell biomarkers need the model whose cells were predicted; choose one (--model).")
        info = store.model_info(model_key)
        measure = normalise(variable.cell_measure, list(info.cell_types), list(info.genes))
        variable = Variable(variable.source, measure.cell_type, (measure.gene,) if measure.gene else (),
                            measure.near or "", measure.distance_um if measure.kind == "dens" else 0.0)
        out = patient_values(store, cohort, model_key, measure)
    else:
        if model_key is None:
            raise AnalysisError("Predicted variables need a model; choose one (--model).")
        if stat not in STATS:
            raise AnalysisError(f"Unknown statistic {stat}; choose one of {', '.join(STATS)}.")
        genes = list(variable.genes) if variable.source == "signature" else [variable.name]
        matrix = patient_matrix(store, cohort, model_key, genes, stat=stat)
        out = matrix[genes[0]] if variable.source == "predicted" else zscore(matrix).mean(axis=1, skipna=True)
    out = out.dropna()
    out.index = out.index.astype(str).rename("patient")
    return out.rename(variable.label)


def is_categorical(values: pd.Series) -> bool:
    """Numeric with > 5 distinct values is continuous; everything else is a grouping."""
    return not (pd.api.types.is_numeric_dtype(values) and values.nunique() > 5)
