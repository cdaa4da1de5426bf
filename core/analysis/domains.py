"""Spatial domains consistent across a cohort: fitted once on a sample of every predicted slide of
the cohort, then assigned to every tile of any slide by the same rule, so that "D3 tumour–immune"
means the same on every slide and a slide predicted later gets labels without a refit.

The method (BANKSY-style neighbourhood features, Leiden or k-means, nearest-centroid assignment)
is described in :mod:`core.analysis.domain_fit`. Here: the cohort in the store.

- :func:`fit_domains` samples the cohort's predicted slides, fits, and saves the fit
  (:meth:`core.store.db.Store.save_domain_fit`; a refit replaces the cohort's fit for that model).
- :func:`tile_domains` labels one slide's tiles on demand from the stored fit (readers open the
  store read-only, so labels are never stored per tile).
- :func:`patient_fractions` gives patients × domains (the share of the patient's tiles in each
  domain) by the patient rule of :func:`core.analysis.biomarkers.patient_matrix`, and
  :func:`domain_fraction` one column of it: the values of a ``domain:<Dk or name>`` variable
  (:mod:`core.analysis.variables`).
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from core.analysis.domain_fit import (METHODS, N_PCS, DomainFit, SlideData, _fit_parts, _sample_slide, allocate,  # noqa: F401
                                      assign, check_options, fit_slides)
from core.errors import AnalysisError

_NO_FIT = ("Cohort {cohort!r} has no domain fit for {model}; fit one first: python -m core.cli domains fit "
           "--cohort {cohort!r}.")


def _slide(store, model_key: str, run_key: str, tile_size: int, *, composition: bool = False) -> SlideData:
    tiles, matrix, _ = store.run_expression(model_key, run_key)
    comp = None
    if composition:
        index, _, comp = store.tile_vectors([run_key])
        comp = comp[np.argsort(index["tile_idx"].to_numpy(), kind="stable")] if len(comp) == len(tiles) else None
    return SlideData(run_key, tiles[["x", "y"]].to_numpy(), int(tile_size), matrix, comp,
                     tiles["tile_idx"].to_numpy())


def predicted_runs(store, cohort: str, model_key: str) -> pd.DataFrame:
    """The cohort's slides predicted by the model (run_key, patient, slide_type, selected, n_tiles,
    tile_size), one row per run, in run-key order."""
    runs = store.cohort_runs(cohort, model_key).dropna(subset=["run_key"])
    return runs.drop_duplicates("run_key").sort_values("run_key").reset_index(drop=True)


def fit_domains(store, cohort: str, model_key: str, *, method: str = "auto", n_domains: int | None = None,
                resolution: float = 0.5, spatial_weight: float = 0.8, n_sample: int = 20000, seed: int = 0,
                save: bool = True) -> DomainFit:
    """Fit the cohort's domains on tiles sampled from ALL its slides predicted by ``model_key``
    (proportional per slide, fixed ``seed``) and, with ``save``, store the fit (the store must be
    open for writing; the CLI computes on a read-only store with ``save=False``, then
    :func:`save_fit`, so the write lock is held for a moment only).

    ``method``: ``auto`` (Leiden when leidenalg/igraph import, else k-means), ``leiden`` or
    ``kmeans``; ``n_domains``: the number wanted (Leiden: the resolution is searched for it;
    k-means: default 6); ``resolution``: Leiden's, when ``n_domains`` is not given;
    ``spatial_weight``: BANKSY's λ in [0, 1] (weight of the neighbourhood mean)."""
    if save and store.read_only:
        raise AnalysisError("Saving a domain fit needs the store open for writing (Store(path), not read-only).")
    check_options(method, n_domains, resolution, spatial_weight)
    if n_sample < 20:
        raise AnalysisError(f"n_sample must be at least 20 tiles; got {n_sample}.")
    runs = predicted_runs(store, cohort, model_key)
    if runs.empty:
        raise AnalysisError(f"No slide of cohort {cohort!r} has predictions from {model_key} yet; predict the "
                            "cohort first (Predictions page, or python -m core.cli predict).")
    info = store.model_info(model_key)
    takes = allocate(runs["n_tiles"].fillna(0).astype(int).to_numpy(), n_sample)
    parts = [_sample_slide(_slide(store, model_key, r.run_key, r.tile_size, composition=True), int(k), seed)
             for r, k in zip(runs.itertuples(), takes) if k > 0]
    fit = _fit_parts(parts, genes=info.genes, cell_types=info.cell_types, cohort=cohort, model_key=model_key,
                     method=method, n_domains=n_domains, resolution=resolution, spatial_weight=spatial_weight,
                     seed=seed, n_pcs=N_PCS, n_sample=n_sample, run_keys=list(runs["run_key"]))
    if save:
        save_fit(store, fit)
    return fit


def save_fit(store, fit: DomainFit) -> None:
    """Store ``fit`` as the cohort's domain fit for its model (replacing the previous one)."""
    description = {"domains": fit.domains.to_dict("records"), "markers": fit.markers.to_dict("records"),
                   "cell_types": list(fit.composition.columns),
                   "composition": {d: [float(v) for v in row] for d, row in zip(fit.composition.index,
                                                                                 fit.composition.to_numpy())}}
    record = {"method": fit.method, "params": fit.params, "run_keys": list(fit.run_keys), "genes": list(fit.genes),
              "labels": list(fit.labels), "description": _plain(description), "center": fit.center,
              "scale": fit.scale, "components": fit.components, "centroids": fit.centroids}
    store.save_domain_fit(fit.cohort, fit.model_key, record, fit.sample)


def _plain(value):
    from core.analysis.report import to_jsonable

    return to_jsonable(value)


def load_fit(store, cohort: str, model_key: str, *, sample: bool = True) -> DomainFit | None:
    """The cohort's stored domain fit for the model, or None; ``sample=False`` leaves the fitted
    sample's table out (empty), which labelling does not need."""
    row = store.domain_fit(cohort, model_key)
    if row is None:
        return None
    desc = row["description"]
    comp = pd.DataFrame.from_dict(desc["composition"], orient="index", columns=desc["cell_types"])
    comp = comp.reindex(row["labels"]).rename_axis("domain")
    markers = pd.DataFrame(desc["markers"], columns=["domain", "rank", "gene", "score", "logfoldchange", "pval_adj"])
    rows = (store.domain_sample(cohort, model_key) if sample
            else pd.DataFrame(columns=["run_key", "tile_idx", "domain"]))
    return DomainFit(cohort, model_key, row["method"], row["params"], tuple(row["run_keys"]), tuple(row["genes"]),
                     row["center"], row["scale"], row["components"], row["centroids"], tuple(row["labels"]),
                     pd.DataFrame(desc["domains"]), comp, markers, rows, row["fitted_at"])


def slide_labels(store, fit: DomainFit, run_key: str, tile_size: int | None = None) -> np.ndarray:
    """The domain of every tile of run ``run_key`` (tile order) by ``fit`` (see :func:`tile_domains`)."""
    if tile_size is None:
        run = store.find_run(run_key)
        if run is None:
            raise AnalysisError(f"No complete run {run_key} in this store (it may have been re-predicted).")
        tile_size = int(run["tile_size"])
    slide = _slide(store, fit.model_key, run_key, tile_size)
    return assign(fit, slide.expression, slide.xy, slide.tile_size)


def tile_domains(store, cohort: str, model_key: str, run_key: str) -> np.ndarray | None:
    """The domain label (``D1``, ``D2``, …) of every tile of run ``run_key``, in tile order, by the
    cohort's stored fit; None when the cohort has no fit for that model. Any run of the model is
    labelled, also one predicted after the fit."""
    fit = load_fit(store, cohort, model_key, sample=False)
    return None if fit is None else slide_labels(store, fit, run_key)


def slide_fractions(store, cohort: str, model_key: str, fit: DomainFit | None = None) -> pd.DataFrame:
    """Predicted slides (index run_key) × domains: the fraction of the slide's tiles in each."""
    fit = fit or load_fit(store, cohort, model_key, sample=False)
    if fit is None:
        raise AnalysisError(_NO_FIT.format(cohort=cohort, model=model_key))
    runs = predicted_runs(store, cohort, model_key)
    rows = {}
    for r in runs.itertuples():
        labels = slide_labels(store, fit, r.run_key, int(r.tile_size))
        counts = pd.Series(labels).value_counts().reindex(list(fit.labels), fill_value=0)
        rows[r.run_key] = counts.to_numpy(float) / max(len(labels), 1)
    return pd.DataFrame.from_dict(rows, orient="index", columns=list(fit.labels)).rename_axis("run_key")


def patient_rule(runs: pd.DataFrame, values: pd.DataFrame) -> pd.DataFrame:
    """Patients × columns of ``values`` (one row per run, index run_key) by the patient rule of
    :func:`core.analysis.biomarkers.patient_matrix`: the patient's selected slide; patients whose
    selected slide has no value get the mean over their diagnostic slides, else over all their slides."""
    cols = list(values.columns)
    runs = runs.dropna(subset=["run_key", "patient"]).set_index("run_key")[["patient", "slide_type", "selected"]]
    runs = runs[~runs.index.duplicated()].join(values, how="inner")
    chosen = runs[runs["selected"].eq(True).fillna(False).astype(bool)]
    rest = runs[~runs["patient"].isin(chosen["patient"])]
    dx = rest[rest["slide_type"].fillna("").str.startswith("diagnostic")]
    rest = pd.concat([dx, rest[~rest["patient"].isin(dx["patient"])]])
    out = pd.concat([chosen, rest]).groupby("patient")[cols].mean()
    return out.rename_axis(index="patient", columns=None)


def patient_fractions(store, cohort: str, model_key: str) -> pd.DataFrame:
    """Patients × domains: the fraction of the patient's slide tiles in each domain (the patient's
    slide chosen as in :func:`core.analysis.biomarkers.patient_matrix`; several slides averaged).
    Rows sum to 1."""
    fit = load_fit(store, cohort, model_key, sample=False)
    if fit is None:
        raise AnalysisError(_NO_FIT.format(cohort=cohort, model=model_key))
    return patient_rule(store.cohort_runs(cohort, model_key), slide_fractions(store, cohort, model_key, fit))


def match_domain(fit: DomainFit, text: str) -> str:
    """The label (``D3``) named by ``text``: the label, the full name ("D3 tumour–immune") or a name
    without its label ("tumour–immune", when one domain has it); case and -/– ignored."""
    def norm(s: str) -> str:
        return " ".join(str(s).lower().replace("–", "-").replace("—", "-").split())

    want = norm(text)
    names = dict(zip(fit.domains["domain"], fit.domains["name"]))
    for label in fit.labels:
        if want in (norm(label), norm(names.get(label, label))):
            return label
    bare = [label for label in fit.labels if norm(names.get(label, label)).partition(" ")[2] == want]
    if len(bare) == 1:
        return bare[0]
    shown = "; ".join(f"{d} = {n}" for d, n in names.items())
    why = f"several domains are called {text!r}: give the label" if bare else f"no domain {text!r}"
    raise AnalysisError(f"{why} (cohort {fit.cohort!r}, model {fit.model_key}: {shown}).")


def domain_fraction(store, cohort: str, model_key: str, text: str) -> pd.Series:
    """Per patient, the fraction of tiles in the domain ``text`` names (:func:`match_domain`)."""
    fit = load_fit(store, cohort, model_key, sample=False)
    if fit is None:
        raise AnalysisError(_NO_FIT.format(cohort=cohort, model=model_key))
    label = match_domain(fit, text)
    return patient_rule(store.cohort_runs(cohort, model_key), slide_fractions(store, cohort, model_key, fit))[label]


def has_fit(store, cohort: str, model_key: str) -> bool:
    """Whether the cohort has domains fitted for this model (cheap: the fit's row, not its sample)."""
    return load_fit(store, cohort, model_key, sample=False) is not None


def domain_titles(store, cohort: str, model_key: str) -> list[tuple[str, str]]:
    """(label, title) of every domain of the cohort's fit in label order (D1, D2, …), e.g.
    ("D3", "D3 stroma–immune (FTL, CXCL13, CD68)"); empty without a fit."""
    fit = load_fit(store, cohort, model_key, sample=False)
    if fit is None:
        return []
    titles = dict(zip(fit.domains["domain"], fit.domains.get("title", fit.domains["domain"])))
    return [(lab, str(titles.get(lab, lab))) for lab in fit.labels]
