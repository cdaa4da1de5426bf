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


def _tqdm_progress(total_label: str):
    from tqdm import tqdm

    bar = {"bar": None}

    def update(done: int, total: int) -> None:
        if bar["bar"] is None:
            bar["bar"] = tqdm(total=total, desc=total_label, unit="slide")
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
    from core.predict import predict_slide
    from core.store import Store

    settings = load_settings(store_path=args.store, device=args.device)
    model = load_model(args.model or settings.default_model, settings.model_dirs)
    with Store(settings.store_path) as store:
        slides = store.cohort_slides(args.cohort)
        if slides.empty:
            raise TesseraError(f"Cohort {args.cohort!r} has no slides in {settings.store_path}.")
        progress = _tqdm_progress("slides")
        for i, path in enumerate(slides["slide_path"]):
            result = predict_slide(path, model, store, device=settings.device, batch_size=args.batch_size,
                                   workers=args.workers, force=args.force)
            log.info("%s: %s, %d tiles", result.slide_name, result.status, result.n_tiles)
            progress(i + 1, len(slides))
    return 0


def cmd_import(args) -> int:
    from core.cohort import find_slides, link_slides, load_cdr
    from core.predict import fingerprint
    from core.store import Store

    settings = load_settings(store_path=args.store)
    clinical = load_cdr(args.clinical)
    slides = link_slides(find_slides(args.slides), clinical)
    with Store(settings.store_path) as store:
        slides["fingerprint"] = [fingerprint(store, Path(p)) for p in slides["slide_path"]]
        store.save_cohort(args.name, slides, clinical, {"kind": "import", "slides": str(args.slides),
                                                          "clinical": str(args.clinical)})
    print(slides[["slide_name", "patient", "status", "message"]].to_string(index=False))
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
    r.set_defaults(func=cmd_predict)

    i = sub.add_parser("import", help="import a cohort: a folder of slides + a TCGA-CDR table")
    i.add_argument("--slides", type=Path, required=True)
    i.add_argument("--clinical", type=Path, required=True)
    i.add_argument("--name", default="cohort")
    i.add_argument("--store", type=Path, default=None)
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
