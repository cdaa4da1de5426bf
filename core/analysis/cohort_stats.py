"""Cohort analyses as users ask for them: one function per question, shared by the CLI and the pages.

Each function takes the store, a cohort and variable names (:mod:`core.analysis.variables`),
gathers the patients who have what the question needs, and hands plain arrays to the statistics
modules (:mod:`core.analysis.km`, :mod:`core.analysis.cox`, :mod:`core.analysis.associations`).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from core.analysis.survival import survival_frame
from core.analysis.variables import (Variable, clinical_column, clinical_variables, is_categorical, parse_variable,
                                     variable_values, zscore)
from core.errors import AnalysisError

# Short names for common covariates, resolved against the clinical table's columns in this order.
COVARIATE_ALIASES = {
    "age": ("age_at_initial_pathologic_diagnosis", "age_at_diagnosis", "age", "diagnoses.age_at_diagnosis"),
    "stage": ("ajcc_pathologic_tumor_stage", "ajcc_pathologic_stage", "stage", "tumor_stage"),
    "subtype": ("PAM50", "pam50", "subtype", "Subtype", "BRCA_Subtype_PAM50"),
    "gender": ("gender", "sex"),
}
_STAGE = re.compile(r"stage\s*(IV|I{1,3})", re.IGNORECASE)


def collapse_stage(values: pd.Series) -> pd.Series:
    """AJCC sub-stages merged to the main stage ('Stage IIA' → 'Stage II'); other text kept as missing."""
    main = values.astype("string").str.extract(_STAGE)[0].str.upper()
    return ("Stage " + main).where(main.notna())


# ---------------------------------------------------------------- gathering data

def _panel(store, model_key: str | None) -> list[str] | None:
    return None if model_key is None else store.model_info(model_key).genes


def resolve(store, cohort: str, spec: str, *, model_key: str | None = None, stat: str = "mean",
            signatures: dict | None = None) -> tuple[Variable, pd.Series]:
    """Parse ``spec`` and return the variable with its value per patient."""
    from core.analysis.signatures import library

    variable = parse_variable(spec, panel=_panel(store, model_key) if not spec.startswith(("clinical:", "measured:"))
                              else None, signatures=signatures or library())
    return variable, variable_values(store, cohort, variable, model_key=model_key, stat=stat)


def survival_data(store, cohort: str, endpoint: str, values: pd.Series) -> pd.DataFrame:
    """patient, time (days), event (0/1), value: the patients with both the endpoint and a value."""
    surv = survival_frame(store.clinical(cohort), endpoint)
    df = surv.merge(values.rename("value"), left_on="patient", right_index=True)
    if df.empty:
        raise AnalysisError(f"No patient of cohort {cohort!r} has both {endpoint} data and a value of "
                            f"{values.name}; check that the slides are predicted and linked to the clinical table.")
    return df.reset_index(drop=True)


# ---------------------------------------------------------------- Kaplan–Meier

def km_by(store, cohort: str, endpoint: str, spec: str, *, model_key: str | None = None, stat: str = "mean",
          split="median", unit: str = "days", horizon_days: float | None = None, reference: str | None = None,
          ci: str = "log-log"):
    """KM curves of ``spec``: a categorical variable gives one curve per group; a continuous one is
    split (median, tertile, quartile, optimal or a value). Returns a :class:`core.analysis.km.KMAnalysis`."""
    from core.analysis.km import kaplan_meier, split_groups

    variable, values = resolve(store, cohort, spec, model_key=model_key, stat=stat)
    if variable.source == "clinical" and "stage" in variable.name.lower():
        values = collapse_stage(values).dropna().rename(values.name)
    data = survival_data(store, cohort, endpoint, values)
    if horizon_days is not None:  # before the split too, so an optimal cut sees the same follow-up
        data = censor_at(data, horizon_days)
    if variable.source == "clinical" and is_categorical(data["value"]):
        groups = pd.Categorical(data["value"].astype(str))
    else:
        numeric = pd.to_numeric(data["value"], errors="coerce")
        data = data[numeric.notna()].reset_index(drop=True)
        groups = split_groups(pd.to_numeric(data["value"]), split, time=data["time"].to_numpy(float),
                              event=data["event"].to_numpy(int))
    return kaplan_meier(data["time"].to_numpy(float), data["event"].to_numpy(int), groups,
                        reference=reference, horizon_days=horizon_days, unit=unit, ci=ci,
                        endpoint=endpoint, variable=variable.spec)


def censor_at(data: pd.DataFrame, horizon_days: float) -> pd.DataFrame:
    """Administrative censoring: follow-up beyond ``horizon_days`` is censored there."""
    if not horizon_days or horizon_days <= 0:
        raise AnalysisError(f"The time horizon must be a positive number of days; got {horizon_days}.")
    late = data["time"] > horizon_days
    return data.assign(time=data["time"].where(~late, float(horizon_days)),
                       event=data["event"].where(~late, 0))


# ---------------------------------------------------------------- Cox screen

@dataclass(frozen=True)
class Screen:
    """A univariate Cox screen: one row per variable (HR per SD, CI, Wald p, BH q over the screen, C)."""

    endpoint: str
    n: int
    events: int
    rows: pd.DataFrame
    stat: str = "mean"
    notes: tuple[str, ...] = ()

    def to_json(self) -> dict:
        cols = ["variable", "source", "n", "events", "hr", "ci_lower", "ci_upper", "p", "q", "c_index"]
        return {"endpoint": self.endpoint, "n": self.n, "events": self.events, "stat": self.stat,
                "multiple_testing": "Benjamini–Hochberg over every variable of the screen",
                "notes": list(self.notes), "rows": self.rows[cols].to_dict("records")}


def screen_matrix(store, cohort: str, variables: str = "predicted", *, model_key: str | None = None,
                  stat: str = "mean", signatures: dict | None = None) -> tuple[pd.DataFrame, dict[str, str]]:
    """Patients × variables of a screen and each column's source: ``predicted`` = every panel gene and
    every library signature; ``measured`` = every measured gene; ``all`` = both."""
    from core.analysis.biomarkers import patient_matrix
    from core.analysis.signatures import library

    if variables not in ("predicted", "measured", "all"):
        raise AnalysisError(f"--variables must be predicted, measured or all; got {variables!r}.")
    parts, sources = [], {}
    if variables in ("predicted", "all"):
        if model_key is None:
            raise AnalysisError("A screen of predicted genes needs a model; choose one (--model).")
        genes = store.model_info(model_key).genes
        pred = patient_matrix(store, cohort, model_key, genes, stat=stat)
        parts.append(pred)
        sources.update({g: "predicted" for g in genes})
        z = zscore(pred)
        for name, sig_genes in (signatures or library()).items():
            inside = [g for g in sig_genes if g in pred.columns]
            if len(inside) >= 2:
                col = f"signature:{name}"
                parts.append(z[inside].mean(axis=1).rename(col).to_frame())
                sources[col] = "signature"
    if variables in ("measured", "all"):
        meas = store.measured(cohort)
        if meas.empty:
            if variables == "measured":
                raise AnalysisError(f"Cohort {cohort!r} has no measured expression; import a matrix first.")
        else:
            meas = meas.add_prefix("measured:")
            parts.append(meas)
            sources.update({c: "measured" for c in meas.columns})
    matrix = pd.concat(parts, axis=1) if parts else pd.DataFrame()
    return matrix, sources


def cox_screen_cohort(store, cohort: str, endpoint: str, *, variables: str = "predicted",
                      model_key: str | None = None, stat: str = "mean", signatures: dict | None = None) -> Screen:
    """Univariate Cox of every variable of the screen (vectorised, :func:`core.analysis.cox.cox_screen`)."""
    from core.analysis.cox import benjamini_hochberg, cox_screen

    matrix, sources = screen_matrix(store, cohort, variables, model_key=model_key, stat=stat, signatures=signatures)
    surv = survival_frame(store.clinical(cohort), endpoint).set_index("patient")
    surv = surv[~surv.index.duplicated()]
    data = surv.join(matrix, how="inner")
    if len(data) < 10 or data["event"].sum() < 3:
        raise AnalysisError(f"{endpoint}: {len(data)} patients with {int(data['event'].sum())} events have both "
                            "the endpoint and the variables — too few for a Cox screen (need ≥ 10 and ≥ 3 events).")
    cols = list(matrix.columns)
    rows = cox_screen(data["time"].to_numpy(float), data["event"].to_numpy(float),
                      data[cols].to_numpy(float), cols)
    rows.insert(1, "source", [sources[c] for c in cols])
    rows["q"] = benjamini_hochberg(rows["p"].to_numpy(float))
    rows = rows.sort_values("p", na_position="last").reset_index(drop=True)
    notes = (f"HR per SD of each variable over the patients analysed (SD with ddof = 1); predicted genes "
             f"summarised per slide by the {stat}.",)
    return Screen(endpoint, int(len(data)), int(data["event"].sum()), rows, stat, notes)


# ---------------------------------------------------------------- multivariable Cox

@dataclass(frozen=True)
class MultiCox:
    """A multivariable Cox model: the biomarker (per SD when continuous) plus covariates."""

    endpoint: str
    variable: str
    n: int
    events: int
    terms: pd.DataFrame          # term, covariate, hr, ci_lower, ci_upper, p
    ph_test: pd.DataFrame        # term, chisq, df, p: R cox.zph score test (core.analysis.cox.ph_test)
    concordance: float
    penalizer: float
    references: dict = field(default_factory=dict)   # categorical covariate → reference level
    notes: tuple[str, ...] = ()

    @property
    def ph_violations(self) -> list[str]:
        bad = self.ph_test[(self.ph_test["p"] < 0.05)]
        return list(bad["term"])

    def to_json(self) -> dict:
        return {"endpoint": self.endpoint, "variable": self.variable, "n": self.n, "events": self.events,
                "concordance": self.concordance, "penalizer": self.penalizer, "references": self.references,
                "terms": self.terms.to_dict("records"), "ph_test": self.ph_test.to_dict("records"),
                "ph_violations": self.ph_violations, "notes": list(self.notes)}


def covariate_column(clinical: pd.DataFrame, name: str) -> tuple[str, pd.Series]:
    """A covariate by alias (age, stage, subtype, gender) or column name; stage collapsed to I–IV."""
    key = name.strip()
    cols = {c.lower(): c for c in clinical.columns}
    for alias in COVARIATE_ALIASES.get(key.lower(), ()):
        if alias.lower() in cols:
            col = cols[alias.lower()]
            values = clinical_column(clinical, col)
            if key.lower() == "stage":
                values = collapse_stage(values).rename(col)
            return key.lower(), values
    if key.lower() in COVARIATE_ALIASES and key.lower() not in cols:
        raise AnalysisError(f"No column for {key!r} in the clinical table (looked for "
                            f"{', '.join(COVARIATE_ALIASES[key.lower()])}); give the column name instead.")
    return key, clinical_column(clinical, key)


def _fit_cox(frame: pd.DataFrame, penalizer: float):
    """lifelines' Cox fit; when its Newton steps fail (a sparse level that separates, collinear
    terms), once more with shorter steps, then a message that says what to change."""
    import warnings

    from lifelines import CoxPHFitter
    from lifelines.exceptions import ConvergenceError

    for options in (None, {"step_size": 0.2, "max_steps": 500}):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return CoxPHFitter(penalizer=penalizer).fit(frame, duration_col="time", event_col="event",
                                                            fit_options=options)
        except (ConvergenceError, np.linalg.LinAlgError):
            continue
    sparse = [c for c in frame.columns if "[" in c and frame[c].sum() < 5]
    raise AnalysisError("The Cox model does not converge" + (f": level(s) {', '.join(sparse)} have fewer than 5 "
                        "patients" if sparse else " (collinear or separating terms)") +
                        ". Add a penaliser (e.g. 0.1), drop a covariate, or merge rare levels.")


def cox_multivariable(store, cohort: str, endpoint: str, spec: str, covariates: list[str], *,
                      model_key: str | None = None, stat: str = "mean", penalizer: float = 0.0,
                      references: dict | None = None) -> MultiCox:
    """Cox model of the biomarker adjusted for clinical covariates (lifelines ``CoxPHFitter``, Efron ties).

    Continuous variables are z-scored over the analysed patients (HR per SD). Categorical covariates
    are dummy-coded against a reference level: ``references[covariate]`` when given, else the most
    frequent level (stated in the result). Patients missing any term are left out (complete cases).
    ``penalizer`` > 0 adds a ridge penalty (lifelines' ``penalizer``; for small cohorts). The
    proportional-hazards check is :func:`core.analysis.cox.ph_test` (R ``cox.zph``, KM transform).
    """
    from core.analysis.cox import ph_test

    variable, values = resolve(store, cohort, spec, model_key=model_key, stat=stat)
    clinical = store.clinical(cohort)
    data = survival_frame(clinical, endpoint).set_index("patient")
    data = data[~data.index.duplicated()]
    data = data.join(values.rename("biomarker"), how="inner")
    design = pd.DataFrame(index=data.index)
    refs, notes, term_of = {}, [], {}
    columns = [("biomarker", data["biomarker"])]
    for cov in covariates:
        name, col = covariate_column(clinical, cov)
        columns.append((name, col.reindex(data.index)))
    for name, col in columns:
        if is_categorical(col.dropna()) and not (name == "biomarker" and pd.api.types.is_numeric_dtype(col)):
            levels = col.dropna().astype(str)
            ref = (references or {}).get(name) or levels.value_counts().idxmax()
            if ref not in set(levels):
                raise AnalysisError(f"Reference level {ref!r} of {name} is not among its values "
                                    f"({', '.join(sorted(set(levels)))}).")
            refs[name] = ref
            for level in sorted(set(levels) - {ref}):
                term = f"{name}[{level}]"
                design[term] = (levels.reindex(data.index) == level).astype(float).where(col.notna())
                term_of[term] = name
        else:
            num = pd.to_numeric(col, errors="coerce")
            design[name] = num
            term_of[name] = name
    frame = pd.concat([data[["time", "event"]], design], axis=1).dropna()
    for term in design.columns:  # z-score continuous terms over the complete cases
        if "[" not in term:
            sd = frame[term].std(ddof=1)
            if not sd or not np.isfinite(sd):
                raise AnalysisError(f"{term} does not vary over the {len(frame)} complete cases.")
            frame[term] = (frame[term] - frame[term].mean()) / sd
    dropped = [t for t in design.columns if "[" in t and frame[t].sum() == 0]
    if dropped:
        frame = frame.drop(columns=dropped)
        notes.append(f"Levels with no complete case were dropped: {', '.join(dropped)}.")
    n, events = len(frame), int(frame["event"].sum())
    if n < 10 or events < max(3, len(frame.columns) - 2):
        raise AnalysisError(f"{endpoint}: {n} complete cases with {events} events for {len(frame.columns) - 2} "
                            "terms — too few for this model. Drop covariates or add a penaliser.")
    fit = _fit_cox(frame, penalizer)
    s = fit.summary
    terms = pd.DataFrame({"term": s.index, "covariate": [term_of[t] for t in s.index],
                          "hr": s["exp(coef)"].to_numpy(), "ci_lower": s["exp(coef) lower 95%"].to_numpy(),
                          "ci_upper": s["exp(coef) upper 95%"].to_numpy(), "p": s["p"].to_numpy()})
    huge = terms.loc[np.abs(np.log(terms["hr"])) > 10, "term"].tolist()
    if huge:
        notes.append(f"{', '.join(huge)}: HR not estimable (the level's patients separate by outcome); merge rare "
                     "levels or add a penaliser.")
    try:
        ph = ph_test(frame, "time", "event", [c for c in frame.columns if c not in ("time", "event")])
    except AnalysisError as exc:
        ph = pd.DataFrame(columns=["term", "chisq", "df", "p"])
        notes.append(f"No proportional-hazards check: {exc}")
    notes.append("Continuous terms are per SD over the complete cases; categorical covariates are against "
                 "their reference level.")
    if len(values) > n:
        notes.append(f"{len(data) - n} patients with the endpoint and biomarker lack a covariate and are left out.")
    return MultiCox(endpoint, variable.spec, n, events, terms, ph, float(fit.concordance_index_), penalizer,
                    refs, tuple(notes))


# ---------------------------------------------------------------- associations and validation

def associate_cohort(store, cohort: str, spec: str, with_spec: str, *, model_key: str | None = None,
                     stat: str = "mean"):
    """The biomarker ``spec`` against a clinical (or any) variable ``with_spec``."""
    from core.analysis.associations import associate

    variable, values = resolve(store, cohort, spec, model_key=model_key, stat=stat)
    other = association_other(store, cohort, with_spec, model_key=model_key, stat=stat)
    kind = "categorical" if is_categorical(other) else "continuous"
    return associate(values.rename(variable.spec), other.rename(with_spec), kind=kind)


def associate_screen(store, cohort: str, with_spec: str, *, variables: str = "predicted",
                     model_key: str | None = None, stat: str = "mean") -> pd.DataFrame:
    """Every variable of a screen against one clinical variable, with BH q over the screen."""
    from core.analysis.associations import associate_many

    matrix, sources = screen_matrix(store, cohort, variables, model_key=model_key, stat=stat)
    other = association_other(store, cohort, with_spec, model_key=model_key, stat=stat).rename(with_spec)
    kind = "categorical" if is_categorical(other) else "continuous"
    out = associate_many(matrix, other, kind=kind)
    out.insert(1, "source", out["variable"].map(sources))
    return out


def validate_cohort(store, cohort: str, model_key: str, *, stat: str = "mean") -> pd.DataFrame:
    """Per gene: Pearson and Spearman of the slide-level predictions with the measured matrix."""
    from core.analysis.associations import validate
    from core.analysis.biomarkers import patient_matrix

    measured = store.measured(cohort)
    if measured.empty:
        raise AnalysisError(f"Cohort {cohort!r} has no measured expression to validate against; import a "
                            "matrix (python -m core.cli measured, or on the Import page).")
    genes = store.model_info(model_key).genes
    predicted = patient_matrix(store, cohort, model_key, genes, stat=stat)
    return validate(predicted, measured)


def cohort_table(store, cohort: str, specs: list[str], *, model_key: str | None = None,
                 stat: str = "mean") -> pd.DataFrame:
    """Patients × (clinical columns, then one column per chosen variable)."""
    clinical = store.clinical(cohort).drop_duplicates("bcr_patient_barcode").set_index("bcr_patient_barcode")
    out = clinical.copy()
    for spec in specs:
        variable, values = resolve(store, cohort, spec, model_key=model_key, stat=stat)
        if variable.source == "clinical":
            continue
        name = variable.spec if variable.source in ("measured", "domain") else f"{variable.spec} (predicted {stat})"
        out[name] = values.reindex(out.index)
    return out.rename_axis("bcr_patient_barcode").reset_index()


def usable_clinical(store, cohort: str) -> dict[str, str]:
    """Clinical columns offered as variables, with their kind."""
    return clinical_variables(store.clinical(cohort))


def usable_measured(store, cohort: str) -> bool:
    return bool(store.measured_genes(cohort))


def has_covariate(store, cohort: str, alias: str) -> bool:
    """Whether the clinical table has a column for a covariate alias (age, stage, subtype, gender)."""
    cols = {c.lower() for c in store.clinical(cohort).columns}
    return any(a.lower() in cols for a in COVARIATE_ALIASES.get(alias, ()))


def usable_measured_genes(store, cohort: str) -> list[str]:
    return store.measured_genes(cohort)


def association_other(store, cohort: str, spec: str, *, model_key: str | None = None, stat: str = "mean") -> pd.Series:
    """The 'against' variable as the association uses it (stage collapsed to I–IV)."""
    variable, values = resolve(store, cohort, spec, model_key=model_key, stat=stat)
    if variable.source == "clinical" and "stage" in variable.name.lower():
        values = collapse_stage(values).dropna().rename(values.name)
    return values
