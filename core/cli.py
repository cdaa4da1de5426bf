"""Command line: ``python -m core.cli <command>`` (demo, train, predict, import)."""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from core.config import load_settings
from core.errors import TesseraError
from core.vocab import ENDPOINTS, MIN_TISSUE, STRIDES
from core.training.loso import METHODS

log = logging.getLogger("tessera")


def _tqdm_progress(label: str):
    """A progress callback for the engine's :class:`core.engine.plan.Progress`: one tqdm bar."""
    from tqdm import tqdm

    bar = {"bar": None}

    def update(p) -> None:
        if bar["bar"] is None:
            bar["bar"] = tqdm(total=p.total, desc=label, unit="tile")
        bar["bar"].n = p.done
        bar["bar"].set_postfix_str(p.slide, refresh=False)
        bar["bar"].refresh()
        if p.done >= p.total:
            bar["bar"].close()

    return update


def _cancel_on_sigterm():
    """SIGTERM/SIGINT → a clean stop after the current batch (finished chunks stay spooled)."""
    import signal
    import threading

    flag = threading.Event()

    def stop(*_):
        if flag.is_set():  # a second Ctrl-C stops at once
            raise KeyboardInterrupt
        flag.set()
        print("\nstopping after the current batch (finished chunks are kept; rerun to resume)…", file=sys.stderr)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    return flag.is_set


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
    progress, stop = _tqdm_progress("predict"), _cancel_on_sigterm()
    if not args.job_file:
        return _predict(args, progress, stop)[0]
    from core.engine.jobs import job_reporter  # started by the app: report to its status file, honour cancel

    report, cancel_requested, finish = job_reporter(args.job_file)
    try:
        code, message = _predict(args, lambda p: (progress(p), report(p)), lambda: stop() or cancel_requested())
    except Exception as exc:
        finish("failed", str(exc))
        raise
    finish("cancelled" if code == 130 else "done", message)
    return code


def _predict(args, progress, stop) -> tuple[int, str]:
    from core.engine.modelhub import load_model
    from core.engine.access import StoreAccess
    from core.engine.predict import predict_cohort

    settings = load_settings(store_path=args.store, device=args.device)
    model = load_model(args.model or settings.default_model, settings.model_dirs,
                       encoder_weights=getattr(args, "encoder_weights", None))
    if not settings.store_path.exists():
        raise TesseraError(f"No store at {settings.store_path}. Import a cohort first (python -m core.cli import).")
    with StoreAccess(settings.store_path).open(5.0, or_read_only=True) as store:  # brief: never held long
        cohorts = store.cohorts()
    if args.cohort not in cohorts:
        raise TesseraError(f"No cohort {args.cohort!r} in {settings.store_path}; "
                           f"known: {', '.join(cohorts) or 'none'}. Import it first.")
    options = dict(device=settings.device, batch_size=args.batch_size, workers=args.workers, force=args.force,
                   min_tissue=args.min_tissue, runtime=args.runtime, ingest_wait_s=args.ingest_wait,
                   nuclei=args.nuclei, cells=args.cells, stride=args.stride)
    if args.engine == "ray":
        from core.engine.distributed import predict_cohort_ray

        results = predict_cohort_ray(settings.store_path, args.cohort, model, address=args.ray_address, **options)
    else:
        results = predict_cohort(settings.store_path, args.cohort, model, progress=progress, cancel=stop, **options)
    computed = [r for r in results if r.status == "computed"]
    stopped = [r for r in results if r.status == "cancelled"]
    failed = [r for r in results if r.status == "failed"]
    busy = [r for r in results if r.status == "busy"]
    cached = len(results) - len(computed) - len(stopped) - len(failed) - len(busy)
    message = (f"{len(results)} slides: {len(computed)} predicted ({sum(r.n_tiles for r in computed)} tiles), "
               f"{cached} served from the cache"
               + (f", {len(stopped)} stopped early (rerun to resume)" if stopped else "")
               + (f", {len(busy)} being computed by another job" if busy else "")
               + (f", {len(failed)} failed" if failed else ""))
    for r in failed + busy:
        print(f"{r.status}: {r.slide_name}: {r.message}", file=sys.stderr)
    print(message)
    return (130 if stopped else 1 if failed else 0), message


def _mapping(args):
    from core.cohort.clinical import ColumnMapping

    if not args.patient_col:
        return None
    endpoints = {}
    if args.time_col and args.event_col:
        endpoints[args.endpoint] = (args.time_col, args.event_col)
    return ColumnMapping(patient=args.patient_col, endpoints=endpoints, time_unit=args.time_unit)


def print_report(report) -> None:
    """The link report as plain text: slides by status, patients without slides, clinical issues."""
    cols = ["slide_name", "patient", "status", "link", "selected", "mpp", "mpp_source", "n_tiles", "message"]
    if report.slides.empty:
        print("no files found in the slides folder")
    else:
        print(report.slides[cols].to_string(index=False, max_colwidth=90))
    missing = report.patients_without_slides
    print(f"\npatients without slides: {len(missing)}" + (f" (e.g. {', '.join(missing[:10])})" if missing else ""))
    for issue in report.issues:
        print(f"{issue['kind']} {issue['severity']}: {issue['message']}")
    print("\nsummary:", ", ".join(f"{k}={v}" for k, v in report.counts().items()))


def cmd_import(args) -> int:
    from core.cohort.clinical import parse_event_coding
    from core.cohort.importer import import_cohort, read_mpp_overrides
    from core.wsi.tiling import TilingParams
    from core.store.db import Store

    if args.slides is None and args.clinical is None:
        raise TesseraError("Give --clinical FILE (a clinical-only cohort), --slides DIR (slides for an existing "
                           "cohort), or both.")
    settings = load_settings(store_path=args.store)
    overrides = read_mpp_overrides(args.mpp) if args.mpp else None
    coding = parse_event_coding(args.event_coding)
    with Store(settings.store_path) as store:
        report = import_cohort(store, args.name, args.slides, args.clinical, mapping=_mapping(args),
                               fmt=args.format, mpp_overrides=overrides, event_coding=coding,
                               tiling=TilingParams(min_tissue=args.min_tissue),
                               replace=getattr(args, "replace", False))
    print_report(report)
    return 0


def cmd_measured(args) -> int:
    from core.cohort.importer import import_measured
    from core.store.db import Store

    settings = load_settings(store_path=args.store)
    with Store(settings.store_path) as store:
        result = import_measured(store, args.cohort, args.matrix)
    for issue in result.issues:
        print(f"{issue.severity}: {issue.message}")
    print(result.summary())
    if args.json:
        _write_json(args.json, {"cohort": args.cohort, "summary": result.summary(), "orientation": result.orientation,
                                "key": result.key, "n_ids_read": result.n_ids_read, "n_matched": result.n_matched,
                                "n_genes": int(result.matrix.shape[1]),
                                "issues": [{"severity": i.severity, "message": i.message} for i in result.issues]})
    return 0


def _write_json(path: Path, payload: dict) -> None:
    """Strict JSON (NaN → null) to ``path``, or to stdout for ``-``."""
    from core.analysis.report import to_jsonable

    text = json.dumps(to_jsonable(payload), indent=1, allow_nan=False)
    if str(path) == "-":
        print(text)
    else:
        try:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            Path(path).write_text(text)
        except OSError as exc:
            raise TesseraError(f"Cannot write {path}: {exc.strerror or exc}. Give a path in a writable folder.") from exc
        print(f"written {path}", file=sys.stderr)


def cmd_migrate(args) -> int:
    from core.store.db import SCHEMA_VERSION, Store

    settings = load_settings(store_path=args.store)
    with Store(settings.store_path, wait_s=args.wait) as store:
        n = store.con.execute("SELECT count(*) FROM runs").fetchone()[0]
    print(f"{settings.store_path}: schema v{SCHEMA_VERSION}, {n} runs")
    return 0


def cmd_index(args) -> int:
    from core.store.db import Store
    from core.store.tile_index import refresh

    settings = load_settings(store_path=args.store)
    with Store(settings.store_path, read_only=True, wait_s=args.wait) as store:
        model_key = None
        if args.model:
            keys = [k for k in store.models()["model_key"] if k == args.model or k.split("@")[0] == args.model]
            if not keys:
                raise TesseraError(f"No predictions of model {args.model!r} in {settings.store_path}.")
            model_key = keys[-1]
    # by path: the store is opened only while vectors are read, not while the index is trained
    done = refresh(settings.store_path, model_key, rebuild_stale=-1.0 if args.rebuild else 0.25)
    for key, what in done.items():
        print(f"{key}: {what}")
    return 0


def cmd_evaluate(args) -> int:
    from core.training.evaluation import evaluate
    from core.engine.modelhub import load_model

    settings = load_settings()
    dirs = (args.model_dir, *settings.model_dirs) if args.model_dir else settings.model_dirs
    report = evaluate(load_model(args.model, dirs, encoder_weights=args.encoder_weights), args.st)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    for name, sec in report["sections"].items():
        print(f"{name}: {sec['n_spots']} spots, mean PCC {sec['mean_pcc']:.3f}, median {sec['median_pcc']:.3f}, "
              f"top-50 {sec['top50_pcc']:.3f}")
    print(f"written {args.out}")
    return 0


def cmd_loso(args) -> int:
    """The held-out table: per-patient and per-section folds, seeds, CIs, paired tests (one command)."""
    from core.training.loso import (attach_views, format_table, parse_groups, prepare, run_loso, views_needed,
                                    with_targets, write_report, DEFAULT_METHODS)
    from core.training.stdata import find_sections, panel_genes, read_gene_list
    from core.training.reference import read_reference, reference_profiles

    started = time.perf_counter()
    try:
        groups = parse_groups(args.groups)
    except ValueError as exc:
        raise TesseraError(str(exc)) from None
    sections = find_sections(args.st)
    if not sections:
        raise TesseraError(f"No spatial-transcriptomics section found under {args.st}.")
    genes = panel_genes(sections, args.panel)
    reference = read_reference(args.reference, args.types)
    profiles, types = reference_profiles(reference, genes)
    shares = reference.obs["cell_type"].astype(str).value_counts(normalize=True).to_dict()
    gene_sets = {}
    for item in args.gene_set or []:
        name, _, path = item.partition("=")
        if not path:
            raise TesseraError(f"--gene-set {item!r}: expected NAME=FILE")
        gene_sets[name] = read_gene_list(path)
    methods = args.methods or DEFAULT_METHODS
    prepared = prepare(sections, genes, encoder=args.encoder, tile_um=args.tile_um, mpp=args.mpp,
                       cache_dir=args.cache, encoder_weights=args.encoder_weights, groups=groups)
    attach_views(prepared, sections, views_needed(methods), tile_um=args.tile_um, cache_dir=args.cache)
    common = dict(epochs=args.epochs, cnn_epochs=args.cnn_epochs, seed=args.seed, n_seeds=args.seeds,
                  encoder=args.encoder, schemes=args.schemes, n_boot=args.boot,
                  scheme_methods={"section": args.section_methods} if args.section_methods else None,
                  scheme_seeds={"section": args.section_seeds} if args.section_seeds else None)
    report = run_loso(prepared, profiles.to_numpy(), genes, reference_types=types, type_shares=shares,
                      methods=methods, gene_sets=gene_sets, **common)
    report["protocols"] = {}
    for item in args.protocol or []:
        name, _, path = item.partition("=")
        if not path:
            raise TesseraError(f"--protocol {item!r}: expected NAME=GENE_FILE")
        pgenes = panel_genes(sections, path)
        sub = run_loso(with_targets(prepared, sections, pgenes), None, pgenes,
                       methods=[m for m in methods if m.startswith("ridge") and m != "ridge_prior"], **common)
        sub.pop("genes")
        report["protocols"][name] = {"gene_file": str(path), "n_genes": len(pgenes), **sub}
    report["setup"] = {"sections": [s.name for s in sections], "n_genes": len(genes), "encoder": args.encoder,
                       "tile_um": args.tile_um, "mpp": args.mpp, "epochs": args.epochs, "reference_types": types,
                       "mpp_sources": {s.name: f"{s.mpp:.4f} ({s.mpp_source})" for s in sections},
                       "wall_s": round(time.perf_counter() - started, 1)}
    write_report(report, args.out)
    print(format_table(report))
    for name, sub in report["protocols"].items():
        print(f"\n{name} ({sub['n_genes']} genes, reference-free methods):\n" + format_table(sub))
    print(f"\nwritten {args.out} in {time.perf_counter() - started:.0f} s")
    return 0


def cmd_train_st(args) -> int:
    """Train the release fusion model on every section found (no held-out: see `loso` for that)."""
    import time

    from core.training.loso import fusion_fit, prepare
    from core.training.stdata import find_sections, panel_genes
    from core.training.reference import read_reference, reference_profiles
    from models.scist import ModelCard, save_checkpoint

    started = time.perf_counter()
    sections = find_sections(args.st)
    genes = panel_genes(sections, args.panel)
    profiles, types = reference_profiles(read_reference(args.reference, args.types), genes)
    encoder, encoder_weights = args.encoder, args.encoder_weights
    if encoder.startswith("vit:"):  # vit:<path> is the generic ViT with its weights named inline
        encoder, encoder_weights = "vit", encoder_weights or Path(encoder.split(":", 1)[1])
    weights = _encoder_weights_record(encoder, encoder_weights)
    # features cached per weights file too: other weights under the same encoder name never reuse them
    cache = args.cache / f"weights-{weights['sha256'][:12]}" if weights else args.cache
    prepared = prepare(sections, genes, encoder=encoder, tile_um=args.tile_um, mpp=args.mpp,
                       cache_dir=cache, encoder_weights=encoder_weights)
    head = fusion_fit(prepared, profiles.to_numpy(), epochs=args.epochs, seed=args.seed)
    probe = None
    if args.head == "probe":
        head, probe = _with_probe(head, prepared)
    loso = _card_loso(args.loso, args.shipped_row) if args.loso else {}
    card = ModelCard(
        model_id=args.model_id, genes=genes, cell_types=types, encoder=encoder, tile_um=args.tile_um,
        mpp=args.mpp, input_px=int(round(args.tile_um / args.mpp)),
        training_data={"sections": [s.name for s in sections], "spots": int(sum(len(p.y) for p in prepared)),
                       "st_dir": str(args.st), "reference": args.reference.name, "epochs": args.epochs,
                       "seed": args.seed, "mpp_sources": {s.name: f"{s.mpp:.4f} ({s.mpp_source})" for s in sections},
                       **({"encoder_weights": weights} if weights else {})},
        metrics={**loso, **({"probe": probe} if probe else {}),
                 "train_seconds": round(time.perf_counter() - started, 1)},
        description=(f"Expression from a linear probe (standardise → PCA-256 → ridge, α {probe['alpha']:g} by inner "
                     f"leave-one-section-out, collapsed into one matrix) on pooled {_ENCODER_NAMES.get(encoder, encoder)} "
                     "features; composition over the reference types, reference prior and embedding from a SciSt-style "
                     "fusion head trained alongside (log1p CP10k over the panel)." if probe else
                     "SciSt-style fusion: learned composition over the reference types × reference profiles "
                     f"as a query token, two-way attention over {_ENCODER_NAMES.get(encoder, encoder)} "
                     "feature-map tokens, residual MLP to the panel (log1p CP10k over the panel)."))
    import numpy as np

    from core.training.joint import joint_fit

    joint = joint_fit(np.concatenate([p.tokens for p in prepared]), np.concatenate([p.y for p in prepared]),
                      epochs=args.epochs, seed=args.seed)
    card = save_checkpoint(args.out, head, card, joint=joint)
    print(f"saved {args.out} (version {card.version}) in {time.perf_counter() - started:.0f} s")
    return 0


def _with_probe(head, prepared):
    """The fusion head with its expression replaced by the release linear probe (see
    :class:`models.fusion.ProbeFusionHead`); returns (head, what the card records)."""
    import torch

    from core.training.loso import probe_fit
    from models.fusion import ProbeFusionHead

    w, b, info = probe_fit(prepared)
    probe = ProbeFusionHead(head.config, head.profiles.clone())
    missing, unexpected = probe.load_state_dict(head.state_dict(), strict=False)
    assert not unexpected and all(k.startswith("probe.") for k in missing)
    with torch.no_grad():
        probe.probe.weight.copy_(torch.from_numpy(w.T))
        probe.probe.bias.copy_(torch.from_numpy(b))
    return probe.eval(), {"alpha": info["alpha"], "inner": info["inner"], "inner_scores": info["inner_scores"],
                          "n_pca": 256}


def _card_loso(path: Path, shipped_row: str | None) -> dict:
    """What a card carries of a loso report: every scheme's table, the folds without per-gene
    values (those stay in loso.json beside the card), and the row this model is."""
    try:
        report = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise TesseraError(f"--loso {path}: not a readable loso JSON report ({exc})") from None
    if report.get("format") != "tessera-loso/2":
        raise TesseraError(f"--loso {path}: format {report.get('format')!r}; rerun `loso` (tessera-loso/2)")
    folds = {sc: {f: {m: {k: v for k, v in row.items() if k not in ("per_gene", "inner_scores")}
                      for m, row in fd["methods"].items()} for f, fd in data["folds"].items()}
             for sc, data in report["schemes"].items()}
    return {"loso_format": report["format"], "loso_headline": report["headline"],
            "loso": {sc: data["table"] for sc, data in report["schemes"].items()}, "loso_folds": folds,
            "loso_protocols": {n: {sc: d["table"] for sc, d in p["schemes"].items()}
                               for n, p in report.get("protocols", {}).items()},
            "shipped_row": shipped_row}


_ENCODER_NAMES = {"efficientnet_lite0": "EfficientNet-Lite0", "efficientnet_lite2": "EfficientNet-Lite2", "vit_large_patch16": "ViT-L/16 (UNI-class)"}


def _encoder_weights_record(encoder: str, weights: Path | None) -> dict | None:
    """What the card records about local encoder weights (path + SHA-256), checked before any work;
    a foundation encoder without weights is a one-line error here, not after encoding."""
    from models.encoders import EncoderError, requires_weights

    if weights is None:
        if requires_weights(encoder):
            raise TesseraError(f"--encoder {encoder} needs --encoder-weights: the folder holding its "
                               "pytorch_model.bin (+ config.json); nothing is downloaded.")
        return None
    from models.encoder_weights import weights_record

    try:
        return weights_record(weights, encoder=encoder)
    except (EncoderError, OSError) as exc:
        raise TesseraError(f"--encoder-weights {weights}: {exc}") from None


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
    t.add_argument("--epochs", type=int, default=40)
    t.add_argument("--force", action="store_true", help="retrain even if a checkpoint exists")
    t.set_defaults(func=cmd_train)

    r = sub.add_parser("predict", help="predict every slide of a cohort (cached runs are skipped)")
    r.add_argument("--cohort", required=True)
    r.add_argument("--model", default=None)
    r.add_argument("--store", type=Path, default=None)
    r.add_argument("--device", default=None, choices=["auto", "cpu", "cuda"])
    r.add_argument("--workers", type=int, default=None, help="tile-reading processes (default: by core count)")
    r.add_argument("--batch-size", type=int, default=None, help="default: 64 on CPU, the largest that fits on a GPU")
    r.add_argument("--runtime", default="auto", choices=["auto", "torch", "onnx"],
                   help="auto: ONNX Runtime on CPU (verified against PyTorch), PyTorch + AMP on CUDA")
    r.add_argument("--engine", default="local", choices=["local", "ray"])
    r.add_argument("--job-file", type=Path, default=None, help=argparse.SUPPRESS)  # set by the app's job runner
    r.add_argument("--ingest-wait", type=float, default=30.0,
                   help="seconds to wait for the store's lock at the end; finished runs left in the spool "
                        "are ingested by the next writer (the app on its next page load)")
    r.add_argument("--ray-address", default=None, help="a Ray cluster (default: $RAY_ADDRESS or a local instance)")
    r.add_argument("--force", action="store_true")
    r.add_argument("--nuclei", action="store_true",
                   help="also count nuclei per class in every tile (in the loader workers; ~10-20 ms per tile)")
    r.add_argument("--cells", action="store_true",
                   help="find every nucleus as a cell: centroid, outline, morphology, a reference cell type with a "
                        "confidence and a profile refined against its tile (implies --nuclei; default grid only)")
    r.add_argument("--stride", type=float, default=1.0, choices=list(STRIDES),
                   help="tile stride as a fraction of the tile: 0.5 or 0.25 make a high-resolution run of "
                        "overlapping tiles (stride⁻² as many tiles), cached apart from the default grid (1)")
    r.add_argument("--min-tissue", type=float, default=MIN_TISSUE, help="tissue fraction a tile needs (0–1)")
    r.add_argument("--encoder-weights", type=Path, default=None,
                   help="local weights of a foundation encoder (default: $TESSERA_ENCODER_WEIGHTS, then the path "
                        "the model's card records); refused unless their SHA-256 is the recorded one")
    r.set_defaults(func=cmd_predict)

    e = sub.add_parser("evaluate", help="per-gene PCC of a model on ST sections (HER2ST, Visium, HEST layouts)")
    e.add_argument("--model", required=True)
    e.add_argument("--st", type=Path, required=True, help="a folder holding one or more sections")
    e.add_argument("--out", type=Path, required=True, help="JSON report")
    e.add_argument("--model-dir", type=Path, default=None, help="extra folder of checkpoints")
    e.add_argument("--encoder-weights", type=Path, default=None,
                   help="local weights of a foundation encoder (as for predict)")
    e.set_defaults(func=cmd_evaluate)

    lo = sub.add_parser("loso", help="leave-one-section-out table: ridge, reference prior, full model")
    lo.add_argument("--st", type=Path, required=True)
    lo.add_argument("--reference", type=Path, required=True, help="single cells: .h5ad, or counts CSV + --types")
    lo.add_argument("--types", type=Path, default=None)
    lo.add_argument("--panel", type=Path, default=None, help="gene list file (default: all shared genes)")
    lo.add_argument("--encoder", default="efficientnet_lite0")
    lo.add_argument("--encoder-weights", type=Path, default=None, help="local weights of the encoder (foundation models)")
    lo.add_argument("--tile-um", type=float, default=112.0)
    lo.add_argument("--mpp", type=float, default=0.5)
    lo.add_argument("--epochs", type=int, default=30, help="fusion-model epochs (fixed, never tuned on the test section)")
    lo.add_argument("--cnn-epochs", type=int, default=4, help="epochs of the end-to-end CNN baseline")
    lo.add_argument("--methods", nargs="+", default=None, choices=list(METHODS),
                    help="rows of the table (default: every method but the slow cnn and full_nuclei)")
    lo.add_argument("--seed", type=int, default=0, help="first seed")
    lo.add_argument("--seeds", type=int, default=3, help="seeds per trained method (≥ 3 for a reported table)")
    lo.add_argument("--schemes", nargs="+", default=["patient", "section"], choices=["patient", "section"])
    lo.add_argument("--groups", default=None,
                    help="section → patient: B4=B,C2=C,… or a CSV of section,patient (default: HER2ST names, C2 → C)")
    lo.add_argument("--gene-set", action="append", default=None, metavar="NAME=FILE",
                    help="also score the targets' genes listed in FILE (repeatable)")
    lo.add_argument("--protocol", action="append", default=None, metavar="NAME=GENE_FILE",
                    help="also run the reference-free rows with targets over another gene list, e.g. "
                         "her2st785=…/her2st_hvg_785.txt (SciSt's protocol)")
    lo.add_argument("--section-methods", nargs="+", default=None, choices=list(METHODS),
                    help="rows of the per-section scheme when fewer than --methods (CPU budget)")
    lo.add_argument("--section-seeds", type=int, default=None, help="seeds of the per-section scheme (default --seeds)")
    lo.add_argument("--boot", type=int, default=200, help="bootstrap resamples of spots for the 95 %% CIs")
    lo.add_argument("--cache", type=Path, default=Path("data/cache/features"))
    lo.add_argument("--out", type=Path, required=True)
    lo.set_defaults(func=cmd_loso)

    ts = sub.add_parser("train-st", help="train a release fusion model on every ST section of a folder")
    for flag, kw in [("--st", dict(type=Path, required=True)), ("--reference", dict(type=Path, required=True)),
                     ("--types", dict(type=Path, default=None)), ("--panel", dict(type=Path, default=None)),
                     ("--encoder", dict(default="efficientnet_lite0")),
                     ("--encoder-weights", dict(type=Path, default=None, help="local weights of the encoder")),
                     ("--tile-um", dict(type=float, default=112.0)),
                     ("--mpp", dict(type=float, default=0.5)), ("--epochs", dict(type=int, default=30)),
                     ("--seed", dict(type=int, default=0)), ("--cache", dict(type=Path, default=Path("data/cache/features"))),
                     ("--model-id", dict(required=True)), ("--out", dict(type=Path, required=True)),
                     ("--loso", dict(type=Path, default=None, help="LOSO report JSON to put in the card")),
                     ("--head", dict(default="fusion", choices=["fusion", "probe"],
                                     help="probe: expression from the tuned linear probe (ridge) on pooled features")),
                     ("--shipped-row", dict(default=None, help="the loso table's row this model is (for the card)"))]:
        ts.add_argument(flag, **kw)
    ts.set_defaults(func=cmd_train_st)

    m = sub.add_parser("migrate", help="upgrade the store's schema in place (any write access does it too)")
    m.add_argument("--store", type=Path, default=None)
    m.add_argument("--wait", type=float, default=60.0, help="seconds to wait for the store's write lock")
    m.set_defaults(func=cmd_migrate)

    x = sub.add_parser("index", help="build or update the similar-tiles vector index of a model (or all)")
    x.add_argument("--store", type=Path, default=None)
    x.add_argument("--model", default=None, help="model id or model_id@version; default: every model")
    x.add_argument("--rebuild", action="store_true", help="rebuild from scratch instead of adding new runs")
    x.add_argument("--wait", type=float, default=60.0)
    x.set_defaults(func=cmd_index)

    i = sub.add_parser("import", help="import a cohort: a folder of slides and/or a clinical table; prints the link report")
    i.add_argument("--slides", type=Path, default=None,
                   help="folder searched recursively; omit for a clinical-only cohort (slides can be added later)")
    i.add_argument("--clinical", type=Path, default=None,
                   help="TCGA-CDR xlsx/csv, GDC export, or any CSV/TSV/XLSX; omit to add slides to an existing cohort")
    i.add_argument("--event-coding", default="auto",
                   help="how numeric event columns are coded: auto (detect per column), 0/1 (1 = event), "
                        "1/2 (R Surv: 2 = event, 1 = censored), or per endpoint, e.g. OS=1/2,PFI=0/1")
    i.add_argument("--name", default="cohort")
    i.add_argument("--store", type=Path, default=None)
    i.add_argument("--mpp", type=Path, default=None, help="CSV 'slide,mpp' of µm/px overrides")
    i.add_argument("--format", default=None, choices=["tcga-cdr", "gdc", "generic"], help="default: detected")
    i.add_argument("--patient-col", default=None, help="generic tables: the patient id column")
    i.add_argument("--time-col", default=None)
    i.add_argument("--event-col", default=None)
    i.add_argument("--endpoint", default="OS", choices=list(ENDPOINTS))
    i.add_argument("--time-unit", default="days", choices=["days", "months", "years"])
    i.add_argument("--min-tissue", type=float, default=MIN_TISSUE, help="tissue fraction a tile needs (0–1)")
    i.add_argument("--replace", action="store_true",
                   help="replace the cohort --name if it exists (needed with --clinical; without it, an existing "
                        "name is refused)")
    i.set_defaults(func=cmd_import)

    me = sub.add_parser("measured", help="import a measured expression matrix (genes × patients) for a cohort")
    me.add_argument("--cohort", required=True)
    me.add_argument("--matrix", type=Path, required=True,
                    help="CSV/TSV/Parquet keyed by barcode, patient id or the barcode's last 4 characters")
    me.add_argument("--store", type=Path, default=None)
    me.add_argument("--json", type=Path, default=None, help="write the import summary as JSON (- for stdout)")
    me.set_defaults(func=cmd_measured)

    from core.cli_analysis import add_analysis_commands
    from core.cli_cells import add_cells_commands
    from core.cli_domains import add_domains_commands
    from core.cli_export import add_export_commands
    from core.cli_measured import add_measured_commands
    from core.cli_query import add_query_commands
    from core.cli_signatures import add_signatures_commands
    add_analysis_commands(sub)
    add_export_commands(sub)
    add_domains_commands(sub)
    add_measured_commands(sub)
    add_signatures_commands(sub)
    add_cells_commands(sub)
    add_query_commands(sub)
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
    except ValueError as exc:  # an encoder that cannot be built as asked (models/ raises no TesseraError)
        encoders = sys.modules.get("models.encoders")
        if encoders is None or not isinstance(exc, encoders.EncoderError):
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
