"""CLI commands: ``domains fit|show|fractions`` (registered by core.cli.build_parser).

Each calls the function the pages use (:mod:`core.analysis.domains`) and, with ``--json FILE``
(``-`` = stdout), writes the result as strict JSON. ``fit`` computes on a read-only view of the
store, then opens it for writing only to save the fit (a refit replaces the cohort's fit).
"""
from __future__ import annotations

import argparse
from pathlib import Path

from core.errors import StoreBusyError, TesseraError


def _fit_model(store, args) -> str:
    """--model, else the newest model with a domain fit for the cohort, else the newest with predictions."""
    from core.cli_analysis import _model_key

    if not args.model:
        fits = store.domain_fits(args.cohort)
        if len(fits):
            return str(fits["model_key"].iloc[-1])
    key = _model_key(store, args)
    if key is None:
        raise TesseraError(f"Cohort {args.cohort!r} has no predictions yet; predict it first (python -m core.cli predict).")
    return key


def cmd_fit(args) -> int:
    from core.analysis.domains import fit_domains, load_fit, save_fit
    from core.cli_analysis import _emit, _model_key, _open
    from core.store.db import Store

    with _open(args) as store:
        key = _model_key(store, args)
        if key is None:
            raise TesseraError(f"Cohort {args.cohort!r} has no predictions yet; predict it first "
                               "(python -m core.cli predict).")
        fit = fit_domains(store, args.cohort, key, method=args.method, n_domains=args.n_domains,
                          resolution=args.resolution, spatial_weight=args.spatial_weight, n_sample=args.n_sample,
                          seed=args.seed, save=False)
        path = store.path
    try:
        with Store(path, wait_s=args.wait) as store:
            save_fit(store, fit)
            fit = load_fit(store, args.cohort, key)
    except StoreBusyError as exc:
        raise StoreBusyError(f"{exc} The domain fit was computed but NOT saved: the store is open elsewhere (a "
                             "prediction job, or the app reading it); run `domains fit` again when it is free.") from exc
    return _emit(args, fit, _show_text(fit, saved=True))


def _show_text(fit, *, saved: bool = False) -> str:
    p = fit.params
    how = (f"Leiden (resolution {p['resolution']:.3g})" if fit.method == "leiden" else "k-means")
    head = (f"{'saved: ' if saved else ''}{len(fit.labels)} domains of cohort {fit.cohort!r} ({fit.model_key}) by "
            f"{how}, spatial weight {p['spatial_weight']:g}, on {len(fit.sample)} tiles of {len(fit.run_keys)} slides"
            + (f", fitted {fit.fitted_at}" if fit.fitted_at else ""))
    lines = [head]
    for d in fit.domains.itertuples():
        comp = fit.composition.loc[d.domain] if fit.composition.shape[1] else None
        top = "" if comp is None else ", ".join(f"{t} {v:.0%}" for t, v in comp.sort_values(ascending=False)[:3].items())
        lines.append(f"  {d.title}: {d.share:.1%} of tiles" + (f"; {top}" if top else ""))
    return "\n".join(lines)


def cmd_show(args) -> int:
    from core.analysis.domains import load_fit
    from core.cli_analysis import _emit, _open

    with _open(args) as store:
        key = _fit_model(store, args)
        fit = load_fit(store, args.cohort, key)
    if fit is None:
        raise TesseraError(f"Cohort {args.cohort!r} has no domain fit for {key}; run python -m core.cli domains fit "
                           f"--cohort {args.cohort!r} first.")
    return _emit(args, fit, _show_text(fit))


def cmd_fractions(args) -> int:
    from core.analysis.domains import load_fit, patient_fractions
    from core.cli_analysis import _emit, _open

    with _open(args) as store:
        key = _fit_model(store, args)
        table = patient_fractions(store, args.cohort, key)
        fit = load_fit(store, args.cohort, key)
    names = dict(zip(fit.domains["domain"], fit.domains["name"]))
    payload = {"cohort": args.cohort, "model": key, "domains": [{"domain": d, "name": names[d]} for d in table.columns],
               "rows": table.reset_index()}
    text = (f"{len(table)} patients × {table.shape[1]} domains (fraction of each patient's tiles)\n"
            + table.head(args.top).to_string(float_format=lambda v: f"{v:.3f}"))
    return _emit(args, payload, text)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cohort", required=True)
    p.add_argument("--store", type=Path, default=None)
    p.add_argument("--model", default=None, help="model id or id@version (default: newest with a fit / predictions)")
    p.add_argument("--json", type=Path, default=None, help="write the result as JSON (- for stdout)")


def add_domains_commands(sub) -> None:
    """Registers this module's subcommands on ``sub`` (argparse subparsers)."""
    d = sub.add_parser("domains", help="spatial domains consistent across a cohort: fit, show, fractions")
    ds = d.add_subparsers(dest="domains_command", required=True)
    f = ds.add_parser("fit", help="fit the cohort's domains on a sample of all its predicted slides (replaces a fit)")
    _common(f)
    f.add_argument("--method", default="auto", choices=["auto", "leiden", "kmeans"],
                   help="auto: Leiden when leidenalg is installed, else k-means")
    f.add_argument("--n-domains", type=int, default=None, help="domains wanted (Leiden: resolution searched)")
    f.add_argument("--resolution", type=float, default=0.5, help="Leiden resolution when --n-domains is not given")
    f.add_argument("--spatial-weight", type=float, default=0.8,
                   help="BANKSY λ in [0, 1]: weight of the neighbourhood mean (0 = expression only)")
    f.add_argument("--n-sample", type=int, default=20000, help="tiles sampled over the cohort's slides")
    f.add_argument("--seed", type=int, default=0)
    f.add_argument("--wait", type=float, default=10.0, help="seconds to wait for the store's write lock")
    f.set_defaults(func=cmd_fit)
    s = ds.add_parser("show", help="the cohort's domains: names, shares, marker genes, cell-type composition")
    _common(s)
    s.set_defaults(func=cmd_show)
    fr = ds.add_parser("fractions", help="patients × domains: the fraction of each patient's tiles per domain")
    _common(fr)
    fr.add_argument("--top", type=int, default=20, help="rows printed (the JSON has all)")
    fr.set_defaults(func=cmd_fractions)
