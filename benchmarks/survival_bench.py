"""P4: survival statistics at cohort scale.

``python -m benchmarks.survival_bench [--patients 1100] [--genes 250] [--seed 0] [--json FILE]``

Screen  a synthetic cohort (seeded): predicted expression of ``--genes`` genes for ``--patients``
        patients, ~1/8 of the genes associated with survival, times rounded to days (so tied
        times), ~3 % missing values spread over the genes and ~25 % in a tenth of them. Times the
        vectorised :func:`core.analysis.cox.cox_screen` (best of 3) against a lifelines
        ``CoxPHFitter`` loop over the same genes (each z-scored over its complete cases, ddof = 1,
        run to full convergence, timed once), and checks |Δ log HR| ≤ 1e-4 and |Δ p| ≤ 1e-4 for every gene.

Targets: the screen in ≤ 1 s and ≥ 10× faster than the loop. Exits non-zero when the two disagree
(a failed target is reported, not fatal). ``main()`` runs every P4 section; add new ones there.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd

TARGET_S, TARGET_RATIO, TOL = 1.0, 10.0, 1e-4
# lifelines' defaults stop on a 1e-9 relative log-likelihood change after a damped (0.95) step, which
# leaves |Δ coef| up to ~1e-5 (|Δ p| ~3e-4 on this cohort); converge it fully for the comparison
# (its Newton-decrement rule also stops at |Δ coef| ~ 4e-7 unless precision is tiny).
LIFELINES_FIT = {"precision": 1e-14, "r_precision": 1e-15}


@dataclass(frozen=True)
class ScreenFigures:
    patients: int
    genes: int
    events: int
    vectorised_s: float
    lifelines_s: float
    ratio: float
    max_dlog_hr: float
    max_dp: float
    equal: bool
    meets_time: bool
    meets_ratio: bool


def synth_cohort(n_patients: int, n_genes: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str]]:
    """Time (days), event (0/1), expression (patients × genes, NaN = missing) and gene names."""
    rng = np.random.default_rng(seed)
    latent = rng.normal(size=(n_patients, 6))
    load = rng.normal(0, 0.6, size=(6, n_genes))
    expr = 4 + latent @ load + rng.normal(0, 1, size=(n_patients, n_genes))
    effect = np.zeros(n_genes)
    hot = rng.choice(n_genes, size=max(1, n_genes // 8), replace=False)
    effect[hot] = rng.choice([-1, 1], size=hot.size) * rng.uniform(0.1, 0.35, size=hot.size)
    z = (expr - expr.mean(0)) / expr.std(0)
    hazard = np.exp(z @ effect) / 900.0
    death = rng.exponential(1 / hazard)
    censor = rng.uniform(60, 3650, size=n_patients)
    time_days = np.maximum(np.round(np.minimum(death, censor)), 1.0)
    event = (death <= censor).astype(int)
    expr[rng.random(expr.shape) < 0.03] = np.nan
    sparse = rng.choice(n_genes, size=max(1, n_genes // 10), replace=False)
    expr[:, sparse] = np.where(rng.random((n_patients, sparse.size)) < 0.25, np.nan, expr[:, sparse])
    return time_days, event, expr, [f"G{i:04d}" for i in range(n_genes)]


def lifelines_loop(time_days, event, expr, names) -> pd.DataFrame:
    """The straightforward way: one CoxPHFitter per gene on its complete cases, z-scored (ddof = 1)."""
    from lifelines import CoxPHFitter

    rows = []
    base = pd.DataFrame({"time": time_days, "event": event})
    for j, name in enumerate(names):
        d = base.assign(x=expr[:, j]).dropna()
        d["x"] = (d["x"] - d["x"].mean()) / d["x"].std()
        s = CoxPHFitter().fit(d, "time", "event", fit_options=LIFELINES_FIT).summary.loc["x"]
        rows.append((name, float(s["coef"]), float(s["p"])))
    return pd.DataFrame(rows, columns=["variable", "coef", "p"])


def bench_screen(n_patients: int = 1100, n_genes: int = 250, seed: int = 0) -> ScreenFigures:
    from core.analysis.cox import cox_screen

    t, e, x, names = synth_cohort(n_patients, n_genes, seed)
    cox_screen(t, e, x, names)                                   # warm-up
    best = np.inf
    for _ in range(3):
        t0 = time.perf_counter()
        res = cox_screen(t, e, x, names)
        best = min(best, time.perf_counter() - t0)
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = lifelines_loop(t, e, x, names)
    loop_s = time.perf_counter() - t0
    d_log_hr = np.abs(np.log(res["hr"].to_numpy()) - ref["coef"].to_numpy())
    d_p = np.abs(res["p"].to_numpy() - ref["p"].to_numpy())
    equal = bool(np.isfinite(d_log_hr).all() and np.isfinite(d_p).all()
                 and d_log_hr.max() <= TOL and d_p.max() <= TOL and (res["variable"] == ref["variable"]).all())
    ratio = loop_s / best
    return ScreenFigures(patients=n_patients, genes=n_genes, events=int(e.sum()), vectorised_s=best,
                         lifelines_s=loop_s, ratio=ratio, max_dlog_hr=float(np.nanmax(d_log_hr)),
                         max_dp=float(np.nanmax(d_p)), equal=equal, meets_time=best <= TARGET_S,
                         meets_ratio=ratio >= TARGET_RATIO)


def print_screen(f: ScreenFigures) -> None:
    print(f"P4 Cox screen: {f.patients} patients × {f.genes} genes, {f.events} events")
    print(f"  {'':<28}{'seconds':>10}  target")
    print(f"  {'vectorised cox_screen':<28}{f.vectorised_s:>10.3f}  ≤ {TARGET_S:g} s  "
          f"{'ok' if f.meets_time else 'MISSED'}")
    print(f"  {'lifelines CoxPHFitter loop':<28}{f.lifelines_s:>10.3f}")
    print(f"  {'ratio (loop / vectorised)':<28}{f.ratio:>10.1f}  ≥ {TARGET_RATIO:g}×  "
          f"{'ok' if f.meets_ratio else 'MISSED'}")
    print(f"  max |Δ log HR| {f.max_dlog_hr:.2e}, max |Δ p| {f.max_dp:.2e} (tolerance {TOL:g}): "
          f"{'equal' if f.equal else 'NOT EQUAL'}")


def bench_page(repeats: int = 5) -> dict:
    """The Survival page on the demo cohort through Streamlit's AppTest (the app's own script run, no
    browser): the first render (cold caches), a plain rerun (p50 of ``repeats``) and a control change
    that needs new numbers (a split not computed before, then back to a cached one)."""
    import time

    import streamlit as st
    from streamlit.testing.v1 import AppTest

    from core.config import load_settings
    from core.demo import build_demo

    build_demo(load_settings())          # idempotent: served from the cache after the first time
    root = Path(__file__).resolve().parents[1]
    st.cache_data.clear()
    at = AppTest.from_file(str(root / "app.py"), default_timeout=300)
    at.run()
    at.switch_page("pages/survival.py")
    t = time.perf_counter()
    at.run()
    first = time.perf_counter() - t
    if at.exception or any("Something went wrong" in e.value for e in at.error):
        raise SystemExit(f"survival page failed: {[e.value for e in at.exception] or [e.value for e in at.error]}")
    reruns = []
    for _ in range(repeats):
        t = time.perf_counter()
        at.run()
        reruns.append(time.perf_counter() - t)
    t = time.perf_counter()
    at.selectbox(key="sv_km_split").select("tertile").run()
    new_split = time.perf_counter() - t
    t = time.perf_counter()
    at.selectbox(key="sv_km_split").select("median").run()
    back = time.perf_counter() - t
    return {"first_render_s": first, "rerun_p50_s": float(np.median(reruns)), "new_split_s": new_split,
            "cached_split_s": back}


def print_page(f: dict) -> None:
    print("P4 Survival page on the demo cohort (AppTest script runs; KM, Cox screen and multivariable tabs)")
    for k, label in [("first_render_s", "first render (cold caches)"), ("rerun_p50_s", "rerun, p50"),
                     ("new_split_s", "split changed (new numbers)"), ("cached_split_s", "split changed back")]:
        flag = "" if k == "first_render_s" else ("  ok" if f[k] <= PAGE_TARGET_S else "  MISSED")
        print(f"  {label:<32}{f[k]:>8.3f} s  target ≤ {PAGE_TARGET_S:g} s{flag}" if k != "first_render_s"
              else f"  {label:<32}{f[k]:>8.3f} s")


PAGE_TARGET_S = 1.0


def main(argv=None) -> int:
    """Run the P4 sections; returns the exit status (1 when the vectorised and lifelines results differ)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--patients", type=int, default=1100)
    ap.add_argument("--genes", type=int, default=250)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, help="write the figures to this file")
    ap.add_argument("--no-page", action="store_true", help="skip the Survival page timing (needs the demo)")
    args = ap.parse_args(argv)

    figures: dict[str, dict] = {}
    screen = bench_screen(args.patients, args.genes, args.seed)
    print_screen(screen)
    figures["cox_screen"] = asdict(screen)
    ok = screen.equal
    if not args.no_page:
        page = bench_page()
        print_page(page)
        figures["survival_page"] = page

    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
