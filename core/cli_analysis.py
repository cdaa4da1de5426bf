"""CLI commands for cohort analyses: ``survival km|screen|cox``, ``associate``, ``validate`` (the cohort
table's ``export`` lives in :mod:`core.cli_export`, ``--format table``).

Each command calls the same function as the page (:mod:`core.analysis.cohort_stats`) and, with
``--json FILE`` (``-`` = stdout), writes the result as strict JSON. ``VAR`` is ``clinical:<column>``,
``measured:<gene>``, a predicted gene symbol, or ``signature:<name or g1,g2,…>``.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from core.config import load_settings
from core.errors import TesseraError
from core.vocab import ENDPOINTS

STATS = ("mean", "median", "q90", "morans_i", "frac_high")
UNITS = ("days", "months", "years")


def _open(args):
    from core.store.db import Store

    settings = load_settings(store_path=args.store)
    if not settings.store_path.exists():
        raise TesseraError(f"No store at {settings.store_path}. Import a cohort first (python -m core.cli import).")
    store = Store(settings.store_path, read_only=True, wait_s=10.0)
    if args.cohort not in store.cohorts():
        known = ", ".join(store.cohorts()) or "none"
        store.close()
        raise TesseraError(f"No cohort {args.cohort!r} in {settings.store_path}; known: {known}.")
    return store


def _model_key(store, args) -> str | None:
    """The model's key in the store: --model (id or id@version), else the newest model with
    predictions for the cohort, else None (clinical/measured-only analyses)."""
    coverage = store.model_coverage(args.cohort)
    keys = list(coverage["model_key"])
    if args.model:
        match = [k for k in keys if k == args.model or k.split("@")[0] == args.model]
        if not match:
            raise TesseraError(f"No predictions of model {args.model!r} in the store; known: {', '.join(keys) or 'none'}.")
        return match[-1]
    predicted = coverage[coverage["predicted"] > 0]["model_key"].tolist()
    return predicted[-1] if predicted else None


def _emit(args, result, text: str) -> int:
    import sys

    from core.cli import _write_json

    # with --json - the JSON is stdout's only content (for pipes); the table goes to stderr
    print(text, file=sys.stderr if str(args.json) == "-" else sys.stdout)
    if args.json:
        _write_json(args.json, result.to_json() if hasattr(result, "to_json") else result)
    return 0


def _split(text: str):
    if text in ("median", "tertile", "quartile", "optimal"):
        return text
    try:
        return float(text)
    except ValueError:
        raise TesseraError(f"--split must be median, tertile, quartile, optimal or a number; got {text!r}.") from None


def cmd_km(args) -> int:
    from core.analysis.cohort_stats import km_by

    with _open(args) as store:
        res = km_by(store, args.cohort, args.endpoint, args.by, model_key=_model_key(store, args), stat=args.stat,
                    split=_split(args.split), unit=args.unit, horizon_days=args.horizon, reference=args.reference)
    out = res.to_json()
    lines = [f"{args.endpoint} by {args.by}: {out['n']} patients, {out['events']} events; log-rank "
             f"chi2 = {out['logrank_stat']:.3f}, p = {out['logrank_p']:.3g}"]
    split = out.get("split") or {}
    if split.get("method") == "optimal":
        lines.append(f"  optimal cut {split['cutpoints'][0]:.4g}: p corrected for the search = {split['p']:.3g} "
                     "(Lausen–Schumacher 1992); the log-rank p above is that of the chosen cut and overstates "
                     "the evidence")
    for g in out["groups"]:
        hr = "reference" if g.get("hr") in (None, 1.0) and g is out["groups"][0] else (
            f"HR {g['hr']:.2f} ({g['hr_ci'][0]:.2f}–{g['hr_ci'][1]:.2f})" if g.get("hr") is not None else "HR n/a")
        median = "not reached" if g["median"] is None else f"{g['median']:.0f} {out.get('unit', 'days')}"
        lines.append(f"  {g['label']}: n = {g['n']}, events = {g['events']}, median {median}, {hr}")
    return _emit(args, res, "\n".join(lines))


def cmd_screen(args) -> int:
    from core.analysis.cohort_stats import cox_screen_cohort

    with _open(args) as store:
        res = cox_screen_cohort(store, args.cohort, args.endpoint, variables=args.variables,
                                model_key=_model_key(store, args), stat=args.stat)
    top = res.rows.head(args.top)
    text = (f"{args.endpoint}: {res.n} patients, {res.events} events, {len(res.rows)} variables "
            f"({int((res.rows['q'] < 0.05).sum())} with BH q < 0.05)\n"
            + top.to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    return _emit(args, res, text)


def cmd_cox(args) -> int:
    from core.analysis.cohort_stats import cox_multivariable

    covariates = [c.strip() for c in (args.covariates or "").split(",") if c.strip()]
    bad = [r for r in (args.reference or []) if "=" not in r]
    if bad:
        raise TesseraError(f"--reference takes COVARIATE=LEVEL (e.g. stage='Stage I'); got {', '.join(bad)}.")
    refs = dict(r.split("=", 1) for r in args.reference) if args.reference else None
    with _open(args) as store:
        res = cox_multivariable(store, args.cohort, args.endpoint, args.by, covariates,
                                model_key=_model_key(store, args), stat=args.stat, penalizer=args.penalizer,
                                references=refs)
    text = (f"{args.endpoint} ~ {args.by} + {', '.join(covariates) or '(no covariates)'}: {res.n} patients, "
            f"{res.events} events, C = {res.concordance:.3f}\n"
            + res.terms.to_string(index=False, float_format=lambda v: f"{v:.4g}")
            + "\nproportional hazards (R cox.zph score test, KM transform):\n"
            + res.ph_test.to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    if res.ph_violations:
        text += f"\nwarning: proportional hazards rejected (p < 0.05) for {', '.join(res.ph_violations)}"
    return _emit(args, res, text)


def cmd_associate(args) -> int:
    from core.analysis.cohort_stats import associate_cohort, associate_screen

    with _open(args) as store:
        key = _model_key(store, args)
        if args.by:
            res = associate_cohort(store, args.cohort, args.by, args.with_, model_key=key, stat=args.stat)
            out = res.to_json()
            return _emit(args, res, f"{args.by} vs {args.with_}: {out['test']}, n = {out['n']}, "
                                    f"statistic = {out['statistic']:.4g}, p = {out['p']:.3g}")
        table = associate_screen(store, args.cohort, args.with_, variables=args.variables, model_key=key,
                                 stat=args.stat)
    payload = {"against": args.with_, "variables": args.variables, "rows": table}
    return _emit(args, payload, table.head(args.top).to_string(index=False, float_format=lambda v: f"{v:.4g}"))


def cmd_validate(args) -> int:
    from core.analysis.associations import validation_summary
    from core.analysis.cohort_stats import validate_cohort

    with _open(args) as store:
        key = _model_key(store, args)
        if key is None:
            raise TesseraError(f"Cohort {args.cohort!r} has no predictions yet; predict it first.")
        table = validate_cohort(store, args.cohort, key, stat=args.stat)
    summary = validation_summary(table)
    payload = {"cohort": args.cohort, "model": key, "stat": args.stat, "summary": summary, "rows": table}
    text = (f"{summary.get('n_genes')} genes: median Pearson r = {summary.get('median_r', float('nan')):.3f}\n"
            + table.head(args.top).to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    return _emit(args, payload, text)


def _common(p: argparse.ArgumentParser, *, endpoint: bool = True) -> None:
    p.add_argument("--cohort", required=True)
    p.add_argument("--store", type=Path, default=None)
    p.add_argument("--model", default=None, help="model id or id@version (default: newest with predictions)")
    p.add_argument("--stat", default="mean", choices=STATS, help="slide statistic of predicted genes")
    if endpoint:
        p.add_argument("--endpoint", default="OS", choices=list(ENDPOINTS))
    p.add_argument("--json", type=Path, default=None, help="write the result as JSON (- for stdout)")


def add_analysis_commands(sub) -> None:
    s = sub.add_parser("survival", help="survival analyses: km, screen, cox")
    ss = s.add_subparsers(dest="survival_command", required=True)
    km = ss.add_parser("km", help="Kaplan–Meier curves by a variable, log-rank test, HR per group")
    _common(km)
    km.add_argument("--by", required=True, help="VAR: gene, signature:…, clinical:<column>, measured:<gene>")
    km.add_argument("--split", default="median", help="median, tertile, quartile, optimal, or a cut value")
    km.add_argument("--unit", default="months", choices=UNITS, help="time unit of medians and risk table")
    km.add_argument("--horizon", type=float, default=None, help="administrative censoring at this many days")
    km.add_argument("--reference", default=None, help="reference group label for the HRs (default: first)")
    km.set_defaults(func=cmd_km)
    sc = ss.add_parser("screen", help="univariate Cox of every gene and signature: HR per SD, p, BH q, C")
    _common(sc)
    sc.add_argument("--variables", default="predicted", choices=["predicted", "measured", "all"])
    sc.add_argument("--top", type=int, default=20, help="rows printed (the JSON has all)")
    sc.set_defaults(func=cmd_screen)
    cx = ss.add_parser("cox", help="multivariable Cox: a biomarker plus clinical covariates, with a PH check")
    _common(cx)
    cx.add_argument("--by", required=True)
    cx.add_argument("--covariates", default="", help="comma-separated: age, stage, subtype, or column names")
    cx.add_argument("--reference", action="append", default=None, metavar="COV=LEVEL",
                    help="reference level of a categorical covariate (default: its most frequent level)")
    cx.add_argument("--penalizer", type=float, default=0.0, help="ridge penalty for small cohorts (lifelines)")
    cx.set_defaults(func=cmd_cox)

    a = sub.add_parser("associate", help="a biomarker (or every gene) against a clinical variable")
    _common(a, endpoint=False)
    a.add_argument("--by", default=None, help="VAR; omit to screen every variable of --variables")
    a.add_argument("--with", dest="with_", required=True, help="clinical:<column> (or any VAR)")
    a.add_argument("--variables", default="predicted", choices=["predicted", "measured", "all"])
    a.add_argument("--top", type=int, default=20)
    a.set_defaults(func=cmd_associate)

    v = sub.add_parser("validate", help="per-gene correlation of slide-level predictions with measured RNA")
    _common(v, endpoint=False)
    v.add_argument("--top", type=int, default=20)
    v.set_defaults(func=cmd_validate)

