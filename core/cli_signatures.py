"""CLI commands: ``signatures list`` (the library against a model's panel) and ``signatures score``
(per-slide mean and q90 of a signature's tile score, by the function the pages use:
:func:`core.analysis.signature_scores.slide_scores`). ``--json FILE`` (``-`` = stdout) writes
strict JSON."""
from __future__ import annotations

from pathlib import Path

from core.errors import TesseraError


def _panel(args) -> tuple[str | None, list[str] | None]:
    """(model key, its panel) from --cohort/--model, or (None, None) without either."""
    from core.cli_analysis import _model_key, _open

    if args.cohort:
        with _open(args) as store:
            key = _model_key(store, args)
            return (key, list(store.model_info(key).genes)) if key else (None, None)
    if not args.model:
        return None, None
    from core.config import load_settings
    from core.store.db import Store

    settings = load_settings(store_path=args.store)
    if not settings.store_path.exists():
        raise TesseraError(f"No store at {settings.store_path}; give --store, or drop --model to list the library.")
    with Store(settings.store_path, read_only=True, wait_s=10.0) as store:
        keys = list(store.models()["model_key"])
        match = [k for k in keys if k == args.model or k.split("@")[0] == args.model]
        if not match:
            raise TesseraError(f"No model {args.model!r} in {settings.store_path}; known: {', '.join(keys) or 'none'}.")
        return match[-1], list(store.model_info(match[-1]).genes)


def cmd_list(args) -> int:
    from core.analysis.signatures import CATEGORIES, SIGNATURES
    from core.cli_analysis import _emit

    key, panel = _panel(args)
    upper = {g.upper() for g in panel} if panel is not None else None
    rows = []
    for name, sig in SIGNATURES.items():
        missing = None if upper is None else [g for g in sig.genes if g.upper() not in upper]
        rows.append({"name": name, "category": sig.category, "category_label": CATEGORIES[sig.category],
                     "n_genes": len(sig.genes),
                     "n_in_panel": None if missing is None else len(sig.genes) - len(missing),
                     "missing": missing, "source": sig.source, "description": sig.description,
                     "genes": list(sig.genes)})
    lines = [f"{len(rows)} signatures" + (f"; panel of {key} ({len(panel)} genes)" if key else "")]
    for r in rows:
        inside = "" if r["n_in_panel"] is None else f" {r['n_in_panel']:>3} in panel"
        lines.append(f"  {r['name']:<24} {r['category']:<13} {r['n_genes']:>3} genes{inside}  {r['source'][:70]}")
    return _emit(args, {"model": key, "panel_size": None if panel is None else len(panel), "signatures": rows},
                 "\n".join(lines))


def cmd_score(args) -> int:
    from core.analysis.signature_scores import slide_scores
    from core.cli_analysis import _emit, _model_key, _open

    with _open(args) as store:
        key = _model_key(store, args)
        if key is None:
            raise TesseraError(f"Cohort {args.cohort!r} has no predictions yet; predict it first "
                               f"(python -m core.cli predict --cohort {args.cohort}).")
        table, scoring = slide_scores(store, args.cohort, key, args.signature, args.method, slides=args.slide)
    text = [f"{scoring.name} on {len(table)} slides of {args.cohort} ({key})", f"  {scoring.describe()}",
            f"  reference: {scoring.n_tiles} tiles of {scoring.n_runs} slides (every slide of the model in the store)"]
    if scoring.notice:
        text.append(f"  note: {scoring.notice}")
    text.append(table.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    payload = {"cohort": args.cohort, "model": key, "scoring": scoring.to_json(), "slides": table}
    return _emit(args, payload, "\n".join(text))


def add_signatures_commands(sub) -> None:
    """Registers this module's subcommands on ``sub`` (argparse subparsers)."""
    from core.analysis.signature_scores import DEFAULT_METHOD, METHODS

    s = sub.add_parser("signatures", help="the gene signature library; per-slide signature scores")
    ss = s.add_subparsers(dest="signatures_command", required=True)
    ls = ss.add_parser("list", help="every library signature: category, genes, how many are in a model's panel, source")
    ls.add_argument("--cohort", default=None, help="count genes in the panel of the cohort's model")
    ls.add_argument("--model", default=None,
                    help="model id or id@version (default with --cohort: the newest with predictions)")
    ls.add_argument("--store", type=Path, default=None)
    ls.add_argument("--json", type=Path, default=None, help="write the result as JSON (- for stdout)")
    ls.set_defaults(func=cmd_list)
    sc = ss.add_parser("score", help="per-slide mean and 90th percentile of a signature's tile score")
    sc.add_argument("--cohort", required=True)
    sc.add_argument("--signature", required=True, help="a library name (see `signatures list`) or genes: CD8A,CD3E")
    sc.add_argument("--method", default=DEFAULT_METHOD, choices=list(METHODS),
                    help="score_genes: mean minus expression-matched control genes (scanpy); mean_z: mean z-score")
    sc.add_argument("--slide", action="append", default=None, metavar="SLIDE_NAME",
                    help="only this slide (repeatable; default: every predicted slide of the cohort)")
    sc.add_argument("--model", default=None, help="model id or id@version (default: newest with predictions)")
    sc.add_argument("--store", type=Path, default=None)
    sc.add_argument("--json", type=Path, default=None, help="write the result as JSON (- for stdout)")
    sc.set_defaults(func=cmd_score)

