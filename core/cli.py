"""Command line: ``python -m core.cli <command>`` (demo, train, predict, import)."""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from core.config import load_settings
from core.errors import TesseraError

log = logging.getLogger("tessera")


def _tqdm_progress(label: str):
    """A progress callback ``(done, total, *_)`` drawing one tqdm bar."""
    from tqdm import tqdm

    bar = {"bar": None}

    def update(done: int, total: int, *_) -> None:
        if bar["bar"] is None:
            bar["bar"] = tqdm(total=total, desc=label, unit="slide")
        bar["bar"].n = done
        bar["bar"].refresh()
        if done >= total:
            bar["bar"].close()

    return update


def cmd_demo(args) -> int:
    from core.demo import build_demo

    settings = load_settings(demo_dir=args.dir, seed=args.seed, device=args.device)
    kwargs = {"n_patients": args.patients} if args.patients else {}
    summary = build_demo(settings, world_kwargs=kwargs, progress=_tqdm_progress("predict"))
    print(json.dumps(summary))
    if summary["computed"] == 0:
        print(f"Demo cohort ready: all {summary['slides']} slides served from the cache, no model work.")
    return 0


def cmd_train(args) -> int:
    import shutil

    from core.demo import ensure_model

    settings = load_settings(demo_dir=args.dir, seed=args.seed)
    manifest = json.loads((settings.demo_dir / "world.json").read_text())
    out = settings.demo_dir / "models" / "demo-synthetic"
    if out.exists() and args.force:
        shutil.rmtree(out)
    path = ensure_model(settings.demo_dir, manifest, seed=settings.seed, epochs=args.epochs)
    print((path / "card.json").read_text())
    return 0


def cmd_predict(args) -> int:
    from core.modelhub import load_model
    from core.predict import predict_cohort
    from core.store import Store

    settings = load_settings(store_path=args.store, device=args.device)
    model = load_model(args.model or settings.default_model, settings.model_dirs)
    with Store(settings.store_path) as store:
        if args.cohort not in store.cohorts():
            raise TesseraError(f"No cohort {args.cohort!r} in {settings.store_path}; "
                               f"known: {', '.join(store.cohorts()) or 'none'}. Import it first.")
        results = predict_cohort(store, args.cohort, model, device=settings.device, batch_size=args.batch_size,
                                 workers=args.workers, force=args.force, min_tissue=args.min_tissue,
                                 progress=_tqdm_progress("predict"))
    computed = [r for r in results if r.status == "computed"]
    print(f"{len(results)} slides: {len(computed)} predicted ({sum(r.n_tiles for r in computed)} tiles), "
          f"{len(results) - len(computed)} served from the cache")
    return 0


def _mapping(args):
    from core.clinical import ColumnMapping

    if not args.patient_col:
        return None
    endpoints = {}
    if args.time_col and args.event_col:
        endpoints[args.endpoint] = (args.time_col, args.event_col)
    return ColumnMapping(patient=args.patient_col, endpoints=endpoints, time_unit=args.time_unit)


def print_report(report) -> None:
    """The link report as plain text: slides by status, patients without slides, clinical issues."""
    cols = ["slide_name", "patient", "status", "link", "selected", "mpp", "mpp_source", "n_tiles", "message"]
    print(report.slides[cols].to_string(index=False, max_colwidth=90))
    missing = report.patients_without_slides
    print(f"\npatients without slides: {len(missing)}" + (f" (e.g. {', '.join(missing[:10])})" if missing else ""))
    for issue in report.issues:
        print(f"clinical {issue['severity']}: {issue['message']}")
    print("\nsummary:", ", ".join(f"{k}={v}" for k, v in report.counts().items()))


def cmd_import(args) -> int:
    from core.importer import import_cohort, read_mpp_overrides
    from core.slides import TilingParams
    from core.store import Store

    settings = load_settings(store_path=args.store)
    overrides = read_mpp_overrides(args.mpp) if args.mpp else None
    with Store(settings.store_path) as store:
        report = import_cohort(store, args.name, args.slides, args.clinical, mapping=_mapping(args),
                               fmt=args.format, mpp_overrides=overrides,
                               tiling=TilingParams(min_tissue=args.min_tissue))
    print_report(report)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m core.cli", description="Tessera command line")
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("demo", help="build the demo cohort (world, model, predictions); idempotent")
    d.add_argument("--dir", type=Path, default=None, help="demo folder (default data/demo)")
    d.add_argument("--seed", type=int, default=None)
    d.add_argument("--patients", type=int, default=None)
    d.add_argument("--device", default=None, choices=["auto", "cpu", "cuda"])
    d.set_defaults(func=cmd_demo)

    t = sub.add_parser("train", help="(re)train the demo model on the demo world's ST sections")
    t.add_argument("--dir", type=Path, default=None)
    t.add_argument("--seed", type=int, default=None)
    t.add_argument("--epochs", type=int, default=200)
    t.add_argument("--force", action="store_true", help="retrain even if a checkpoint exists")
    t.set_defaults(func=cmd_train)

    r = sub.add_parser("predict", help="predict every slide of a cohort (cached runs are skipped)")
    r.add_argument("--cohort", required=True)
    r.add_argument("--model", default=None)
    r.add_argument("--store", type=Path, default=None)
    r.add_argument("--device", default=None, choices=["auto", "cpu", "cuda"])
    r.add_argument("--workers", type=int, default=1)
    r.add_argument("--batch-size", type=int, default=64)
    r.add_argument("--force", action="store_true")
    r.add_argument("--min-tissue", type=float, default=0.3, help="tissue fraction a tile needs (0–1)")
    r.set_defaults(func=cmd_predict)

    i = sub.add_parser("import", help="import a cohort: a folder of slides + a clinical table; prints the link report")
    i.add_argument("--slides", type=Path, required=True, help="folder searched recursively")
    i.add_argument("--clinical", type=Path, required=True, help="TCGA-CDR xlsx/csv, GDC export, or any CSV/TSV/XLSX")
    i.add_argument("--name", default="cohort")
    i.add_argument("--store", type=Path, default=None)
    i.add_argument("--mpp", type=Path, default=None, help="CSV 'slide,mpp' of µm/px overrides")
    i.add_argument("--format", default=None, choices=["tcga-cdr", "gdc", "generic"], help="default: detected")
    i.add_argument("--patient-col", default=None, help="generic tables: the patient id column")
    i.add_argument("--time-col", default=None)
    i.add_argument("--event-col", default=None)
    i.add_argument("--endpoint", default="OS", choices=["OS", "DSS", "DFI", "PFI"])
    i.add_argument("--time-unit", default="days", choices=["days", "months", "years"])
    i.add_argument("--min-tissue", type=float, default=0.3, help="tissue fraction a tile needs (0–1)")
    i.set_defaults(func=cmd_import)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except TesseraError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
