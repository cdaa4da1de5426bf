"""Synthetic TCGA-BRCA clinical data with hazards planted on true tissue composition.

Tables follow the TCGA Pan-Cancer Clinical Data Resource (TCGA-CDR, Liu et al., Cell 2018):
times in days, events 0/1, ``DFI`` missing where the patient was never disease-free.
"""
from __future__ import annotations

import logging
import uuid

import numpy as np
import pandas as pd

log = logging.getLogger(__name__)

# Real tissue-source-site codes of TCGA-BRCA.
TSS_CODES = ["A1", "A2", "A7", "A8", "AC", "AN", "AO", "AQ", "AR", "B6", "BH", "C8", "D8", "E2", "E9",
             "EW", "GI", "GM", "LL", "OL", "PE", "S3", "W8", "WT"]
CDR_COLUMNS = ["bcr_patient_barcode", "type", "age_at_initial_pathologic_diagnosis", "gender",
               "ajcc_pathologic_tumor_stage", "histological_type", "OS", "OS.time", "DSS", "DSS.time",
               "DFI", "DFI.time", "PFI", "PFI.time"]
_STAGES = {"Stage I": 0.09, "Stage IA": 0.08, "Stage IIA": 0.33, "Stage IIB": 0.23, "Stage IIIA": 0.14,
           "Stage IIIB": 0.03, "Stage IIIC": 0.06, "Stage IV": 0.04}
_ALNUM = list("ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789")
BETAS = {"t_cell": 0.9, "cycling": 0.9, "age": 0.25, "stage": 0.35}
WEIBULL_SHAPE = 1.3


def make_barcodes(rng: np.random.Generator, n: int) -> list[str]:
    """Unique patient barcodes ``TCGA-<TSS>-<4 alphanumerics>`` (TCGA style, e.g. TCGA-A2-A0CM)."""
    out: list[str] = []
    seen: set[str] = set()
    while len(out) < n:
        code = "TCGA-{}-{}".format(rng.choice(TSS_CODES), "".join(rng.choice(_ALNUM, 4)))
        if code not in seen:
            seen.add(code)
            out.append(code)
    return out


def slide_uuid(rng: np.random.Generator) -> str:
    """A random (version 4) UUID drawn from ``rng``, lower case."""
    return str(uuid.UUID(bytes=rng.bytes(16), version=4))


def demographics(rng: np.random.Generator, n: int) -> pd.DataFrame:
    """Age, gender, AJCC stage and histology, distributed roughly as in TCGA-BRCA."""
    stage = rng.choice(list(_STAGES), n, p=np.array(list(_STAGES.values())) / sum(_STAGES.values()))
    return pd.DataFrame({
        "age_at_initial_pathologic_diagnosis": np.clip(np.rint(rng.normal(58, 13, n)), 26, 90).astype(int),
        "gender": np.where(rng.random(n) < 0.99, "FEMALE", "MALE"),
        "ajcc_pathologic_tumor_stage": stage,
        "histological_type": np.where(rng.random(n) < 0.82, "Infiltrating Ductal Carcinoma",
                                      "Infiltrating Lobular Carcinoma"),
    })


def _stage_number(stage: pd.Series) -> np.ndarray:
    roman = stage.str.extract(r"Stage (IV|I{1,3})")[0]
    return roman.map({"I": 1, "II": 2, "III": 3, "IV": 4}).to_numpy(float)


def _z(v: np.ndarray) -> np.ndarray:
    sd = v.std()
    return (v - v.mean()) / sd if sd > 0 else np.zeros_like(v)


def planted_terms(t_cell_frac: np.ndarray, cycling_frac: np.ndarray, age: np.ndarray,
                  stage_number: np.ndarray) -> pd.DataFrame:
    """Linear predictor of the log-hazard and its terms.

    ``lp = −β_T·z(T-cell fraction) + β_P·z(cycling-malignant fraction) + β_age·z(age) + β_stage·z(stage)``,
    z-scores over the cohort; fractions are of all cells on the patient's slide.
    """
    terms = pd.DataFrame({
        "z_t_cell": _z(np.asarray(t_cell_frac, float)), "z_cycling": _z(np.asarray(cycling_frac, float)),
        "z_age": _z(np.asarray(age, float)), "z_stage": _z(np.asarray(stage_number, float)),
    })
    terms["lp_t_cell"] = -BETAS["t_cell"] * terms["z_t_cell"]
    terms["lp_cycling"] = BETAS["cycling"] * terms["z_cycling"]
    terms["lp_age"] = BETAS["age"] * terms["z_age"]
    terms["lp_stage"] = BETAS["stage"] * terms["z_stage"]
    terms["lp"] = terms[["lp_t_cell", "lp_cycling", "lp_age", "lp_stage"]].sum(axis=1)
    for k, v in BETAS.items():
        terms[f"beta_{k}"] = v
    return terms


def _event_rate(log_scale, e_death, lp, censor):
    t = (e_death / np.exp(log_scale + lp)) ** (1 / WEIBULL_SHAPE)
    return float(np.mean(t <= censor))


def survival(rng: np.random.Generator, lp: np.ndarray, stage_number: np.ndarray, *,
             target_os_events: float = 0.38) -> tuple[pd.DataFrame, float]:
    """OS / DSS / DFI / PFI in TCGA-CDR form from Weibull proportional hazards on ``lp``.

    Death and progression times share ``lp``; censoring is administrative (follow-up between 1
    and 12 years) plus random loss to follow-up. The baseline scale is tuned so that about
    ``target_os_events`` of patients die. Guarantees: DSS events ⊂ OS events, PFI.time ≤ OS.time.
    Returns the table and the baseline log-rate.
    """
    n = len(lp)
    e_death, e_prog = rng.exponential(1.0, n), rng.exponential(1.0, n)
    censor = np.minimum(rng.uniform(365, 4400, n), rng.exponential(9000, n))
    lo, hi = -40.0, 0.0  # bisection on the log baseline rate (per day^shape)
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if _event_rate(mid, e_death, lp, censor) < target_os_events else (lo, mid)
    log_scale = (lo + hi) / 2
    t_death = (e_death / np.exp(log_scale + lp)) ** (1 / WEIBULL_SHAPE)
    t_prog = (e_prog / np.exp(log_scale + np.log(2.2) + lp)) ** (1 / WEIBULL_SHAPE)
    os_event = t_death <= censor
    os_time = np.minimum(t_death, censor)
    pfi_time = np.minimum(np.minimum(t_prog, t_death), censor)
    pfi_event = np.minimum(t_prog, t_death) <= censor
    progressed = t_prog < t_death
    dss_event = os_event & (progressed | (rng.random(n) < 0.35))
    dfi_event = (t_prog <= np.minimum(t_death, censor)).astype(float)
    dfi_time = pfi_time.copy()
    never_free = (stage_number >= 4) | (rng.random(n) < 0.08)
    dfi_event[never_free], dfi_time[never_free] = np.nan, np.nan
    days = lambda t: np.maximum(np.rint(t), 1.0)  # noqa: E731
    table = pd.DataFrame({
        "OS": os_event.astype(int), "OS.time": days(os_time),
        "DSS": dss_event.astype(int), "DSS.time": days(os_time),
        "DFI": dfi_event, "DFI.time": np.where(np.isnan(dfi_time), np.nan, days(np.nan_to_num(dfi_time))),
        "PFI": pfi_event.astype(int), "PFI.time": np.minimum(days(pfi_time), days(os_time)),
    })
    return table, log_scale


def clinical_table(rng: np.random.Generator, barcodes: list[str], demo: pd.DataFrame, subtypes: list[str],
                   t_cell_frac: np.ndarray, cycling_frac: np.ndarray) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The CDR table (``CDR_COLUMNS`` then ``PAM50``) and the planted terms per patient."""
    stage_number = _stage_number(demo["ajcc_pathologic_tumor_stage"])
    terms = planted_terms(t_cell_frac, cycling_frac, demo["age_at_initial_pathologic_diagnosis"].to_numpy(),
                          stage_number)
    surv, log_scale = survival(rng, terms["lp"].to_numpy(), stage_number)
    terms["weibull_shape"], terms["weibull_log_rate"] = WEIBULL_SHAPE, log_scale
    table = pd.concat([pd.DataFrame({"bcr_patient_barcode": barcodes, "type": "BRCA"}),
                       demo.reset_index(drop=True), surv], axis=1)
    table["PAM50"] = subtypes
    log.info("clinical: %d patients, %.0f%% OS events", len(table), 100 * table["OS"].mean())
    return table[CDR_COLUMNS + ["PAM50"]], terms
