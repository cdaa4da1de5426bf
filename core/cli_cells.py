"""CLI commands ``cells biomarkers|show`` (registered by core.cli.build_parser).

    python -m core.cli cells biomarkers --cohort N [--model M] --variable 'cell:malignant:ERBB2' [--slides] [--json -]
    python -m core.cli cells show --cohort N [--model M] --slide NAME [--json -]

``biomarkers`` prints one value per patient (the mean over the patient's slides with cells) of a
cell biomarker: ``cell:<type>:<gene>`` (mean of the gene in the type's cells), ``cellfrac:<type>``
(the type's fraction of the cells) or ``celldens:<A>@<B>[:<µm>]`` (A cells per mm² within the
distance, default 50 µm, of any B cell); :mod:`core.analysis.cell_biomarkers` defines them.
``show`` prints one slide's cells per type (count, fraction, mean confidence).

Evaluation (one command each):

    python -m core.cli cells evaluate-demo [--store S] [--demo-dir data/demo] [--model M] [--slides 6] [--typer PATH] [--json -]
    python -m core.cli cells train-typer [--model M] [--demo-dir data/demo] [--out PATH] [--force] [--json -]
    python -m core.cli cells her2st --st DIR --reference CSV [--types CSV] [--schemes patient section] [--max-sections N] [--max-spots N] [--json -] [--out F]

``evaluate-demo`` scores the demo cohort's cells runs against the demo world's true cells
(:func:`core.training.cell_eval.evaluate_demo`); ``train-typer`` fits the learned per-nucleus typer
on the world's ST sections (:func:`core.training.cell_eval.train_typer`) and writes it beside the
model (``cell_typer.json``, the file the engine's cells runs use); ``her2st`` is the held-out
spot-level table of cells on real ST (:mod:`core.training.cell_spots`).
"""
from __future__ import annotations

import argparse
from pathlib import Path

from core.errors import TesseraError


def _model(store, args) -> str:
    from core.cli_analysis import _model_key

    key = _model_key(store, args)
    if key is None:
        raise TesseraError(f"Cohort {args.cohort!r} has no predictions yet; predict it with cells first "
                           f"(python -m core.cli predict --cohort {args.cohort} --cells).")
    return key


def cmd_biomarkers(args) -> int:
    from core.analysis.cell_biomarkers import normalise, patient_means, slide_values
    from core.analysis.variables import CELL_SOURCES, parse_variable
    from core.cli_analysis import _emit, _open

    with _open(args) as store:
        key = _model(store, args)
        info = store.model_info(key)
        variable = parse_variable(args.variable, panel=list(info.genes), cell_types=list(info.cell_types))
        if variable.source not in CELL_SOURCES:
            raise TesseraError(f"{args.variable!r} is not a cell biomarker; use cell:<type>:<gene>, cellfrac:<type> "
                               "or celldens:<A>@<B>[:<µm>] (other variables: python -m core.cli km / associate).")
        measure = normalise(variable.cell_measure, list(info.cell_types), list(info.genes))
        slides = slide_values(store, args.cohort, key, measure)
    patients = patient_means(slides)
    payload = {"cohort": args.cohort, "model": key, "variable": measure.spec, "label": measure.label,
               "units": measure.units, "patient_rule": "mean over the patient's slides with a value",
               "n_slides": int(len(slides)), "n_patients": int(len(patients)),
               "patients": [{"patient": p, "value": float(v)} for p, v in patients.items()],
               "slides": slides.to_dict(orient="records")}
    head = (f"{measure.label} [{measure.units}]: {len(patients)} patients from {len(slides)} slides with cells "
            f"({args.cohort}, {key}); patient = mean over its slides")
    table = (slides if args.slides else patients.rename(measure.spec).to_frame())
    text = head + "\n" + (table.head(args.top).to_string(float_format=lambda v: f"{v:.4g}") if len(table) else "(none)")
    if len(table) > args.top:
        text += f"\n… {len(table) - args.top} more (--top, or --json for all)"
    return _emit(args, payload, text)


def cmd_show(args) -> int:
    from core.analysis.cell_biomarkers import slide_summary
    from core.analysis.cell_layers import no_cells_message
    from core.cli_analysis import _emit, _open
    from core.export.collect import select_slides

    with _open(args) as store:
        key = _model(store, args)
        row = select_slides(store.cohort_runs(args.cohort, key), [args.slide], args.cohort).iloc[0]
        if not store.has_cells(row["run_key"]):
            raise TesseraError(no_cells_message(str(row["slide_name"])))
        table = slide_summary(store, key, row["run_key"])
    n = int(table["n"].sum())
    conf = float((table["n"] * table["mean_confidence"].fillna(0)).sum() / n) if n else float("nan")
    payload = {"cohort": args.cohort, "model": key, "slide": str(row["slide_name"]), "patient": str(row["patient"]),
               "run_key": str(row["run_key"]), "n_cells": n, "mean_confidence": conf if n else None,
               "types": table.to_dict(orient="records")}
    text = (f"{row['slide_name']} ({row['patient']}, {key}): {n} cells, mean confidence {conf:.3f}\n"
            + table.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    return _emit(args, payload, text)


# ----------------------------------------------------------------------------- evaluation

def _table(rows: list[dict], columns: list[tuple[str, str]]) -> str:
    """A Markdown table of ``rows`` over ``columns`` ((key, header)); floats with 3 decimals, — when absent."""
    def cell(v):
        if v is None or (isinstance(v, float) and v != v):
            return "—"
        return f"{v:.3f}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(h for _, h in columns) + " |", "|---" * len(columns) + "|"]
    lines += ["| " + " | ".join(cell(r.get(k)) for k, _ in columns) + " |" for r in rows]
    return "\n".join(lines)


DEMO_COLUMNS = [("method", "method"), ("cells", "cells"), ("per_cell_pcc", "per-cell PCC"),
                ("per_gene_pcc", "per-gene PCC"), ("type_accuracy", "type acc"), ("type_macro_f1", "macro-F1"),
                ("composition_r", "composition r"), ("precision", "det. precision"), ("recall", "det. recall")]


def _demo_world(demo_dir: Path) -> Path:
    missing = [p for p in ("world.json", "truth/cells.parquet") if not (demo_dir / p).is_file()]
    if missing:
        raise TesseraError(f"{demo_dir} is not a demo world (no {', '.join(missing)}); build it with "
                           f"python -m core.cli demo --dir {demo_dir}.")
    return demo_dir


def _model_folder(model_id: str, model_dirs) -> Path | None:
    from core.engine.modelhub import list_models

    return list_models(model_dirs).get(model_id)


def _load_typer(path: Path, cell_types: list[str]):
    from core.analysis.cell_typer import CellTyper

    if not Path(path).is_file():
        raise TesseraError(f"--typer {path}: no such file (train one: python -m core.cli cells train-typer).")
    try:
        typer = CellTyper.load(path)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise TesseraError(f"--typer {path}: not a cell typer written by Tessera ({exc}).") from None
    if typer.cell_types != list(cell_types):
        raise TesseraError(f"--typer {path}: its cell types {typer.cell_types} are not the model's {list(cell_types)}.")
    return typer


def cmd_evaluate_demo(args) -> int:
    from core.config import load_settings
    from core.cli_analysis import _emit, _open
    from core.training.cell_eval import MATCH_UM, evaluate_demo

    settings = load_settings(demo_dir=args.demo_dir) if args.demo_dir else load_settings()
    demo_dir = _demo_world(Path(args.demo_dir or settings.demo_dir))
    if args.slides < 1:
        raise TesseraError(f"--slides must be at least 1, not {args.slides}.")
    if args.store is None:
        args.store = settings.store_path
    with _open(args) as store:
        key = _model(store, args)
        runs = store.cohort_runs(args.cohort, key)
        if not any(store.has_cells(k) for k in runs["run_key"].dropna()):
            raise TesseraError(f"Cohort {args.cohort!r} has no cells runs of {key}; run "
                               f"python -m core.cli predict --cohort {args.cohort} --cells --store {args.store}.")
        cell_types = list(store.model_info(key).cell_types)
        typer_path = args.typer
        if typer_path is None:
            folder = _model_folder(key.split("@")[0], settings.model_dirs)
            typer_path = None if folder is None or not (folder / "cell_typer.json").is_file() else folder / "cell_typer.json"
        typer = None if typer_path is None else _load_typer(typer_path, cell_types)
        result = evaluate_demo(store, args.cohort, key, demo_dir, slides=args.slides, typer=typer)
    rows = result["rows"]
    payload = {"cohort": args.cohort, "model": key, "demo_dir": str(demo_dir),
               "typer": None if typer_path is None else str(typer_path), "slides": result["slides"],
               "detected": result["detected"], "true_cells": result["true_cells"],
               "matched_cells": result["matched_cells"], "rows": rows,
               "per_gene": {m: dict(zip(result["per_gene"].index, map(float, result["per_gene"][m])))
                            for m in result["per_gene"].columns}}
    head = (f"cells vs the demo truth: {len(result['slides'])} slides of {args.cohort} ({key}); "
            f"{result['detected']} nuclei detected, {result['true_cells']} true cells, {result['matched_cells']} matched"
            f" (≤ {MATCH_UM:g} µm); typer: {typer_path or 'none (rows (c) left out)'}")
    return _emit(args, payload, head + "\n" + _table(rows, DEMO_COLUMNS))


def cmd_train_typer(args) -> int:
    import time

    from core.cli_analysis import _emit
    from core.config import load_settings
    from core.engine.modelhub import load_model
    from core.training.cell_eval import train_typer

    settings = load_settings(demo_dir=args.demo_dir) if args.demo_dir else load_settings()
    demo_dir = Path(args.demo_dir or settings.demo_dir)
    if not (demo_dir / "world.json").is_file() or not (demo_dir / "truth" / "section_cells.parquet").is_file():
        raise TesseraError(f"{demo_dir} is not a demo world with ST section truth (world.json, "
                           f"truth/section_cells.parquet); build it with python -m core.cli demo --dir {demo_dir}.")
    model_id = args.model or settings.default_model
    folder = _model_folder(model_id, settings.model_dirs)
    out = Path(args.out) if args.out else None if folder is None else folder / "cell_typer.json"
    if out is not None and out.exists() and not args.force:
        raise TesseraError(f"{out} exists; pass --force to replace it (cells runs made with the old typer are "
                           "then no longer served from the cache) or --out another path.")
    model = load_model(model_id, settings.model_dirs)
    out = out or Path(model.directory) / "cell_typer.json"
    started = time.perf_counter()
    typer, n = train_typer(model, demo_dir, seed=args.seed)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(out.name + ".tmp")
        typer.save(tmp)
        tmp.replace(out)
    except OSError as exc:
        raise TesseraError(f"Cannot write {out}: {exc.strerror or exc}. Give --out a path in a writable folder.") from None
    wall = time.perf_counter() - started
    payload = {"model": model.key, "demo_dir": str(demo_dir), "out": str(out), "n_cells": int(n),
               "cell_types": list(model.cell_types), "seed": args.seed, "wall_s": round(wall, 1)}
    return _emit(args, payload, f"cell typer of {model.key} trained on {n} cells of the ST sections of {demo_dir} "
                                f"in {wall:.0f} s; written {out}")


def cmd_her2st(args) -> int:
    from core.cli_analysis import _emit
    from core.training.cell_spots import evaluate_her2st, format_report, write_report

    report = evaluate_her2st(args.st, args.reference, args.types, panel=args.panel, schemes=args.schemes,
                             sections=args.sections, max_sections=args.max_sections, max_spots=args.max_spots,
                             epochs=args.epochs, seed=args.seed, tile_um=args.tile_um, cache_dir=args.cache)
    if args.out:
        write_report(report, args.out)
    text = format_report(report) + (f"\nwritten {args.out}" if args.out else "")
    return _emit(args, report, text)


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def _add_evaluation_commands(cs) -> None:
    d = cs.add_parser("evaluate-demo", help="cells of the demo cohort's cells runs vs the demo world's true cells",
                      description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    d.add_argument("--cohort", default="demo")
    d.add_argument("--store", type=Path, default=None, help="default: the demo dir's store")
    d.add_argument("--demo-dir", type=Path, default=None, help="the demo world (default: the setting demo_dir, data/demo)")
    d.add_argument("--model", default=None, help="model id or id@version (default: newest with predictions)")
    d.add_argument("--slides", type=_positive, default=6, help="the last N demo slides with a cells run")
    d.add_argument("--typer", type=Path, default=None,
                   help="learned typer JSON for rows (c) (default: cell_typer.json beside the model, if any)")
    d.add_argument("--json", type=Path, default=None, help="write the result as JSON (- for stdout)")
    d.set_defaults(func=cmd_evaluate_demo)

    t = cs.add_parser("train-typer", help="fit the learned per-nucleus cell typer on the demo world's ST sections")
    t.add_argument("--model", default=None, help="model id (default: the setting default_model)")
    t.add_argument("--demo-dir", type=Path, default=None)
    t.add_argument("--out", type=Path, default=None, help="default: cell_typer.json beside the model (used by cells runs)")
    t.add_argument("--force", action="store_true", help="replace an existing typer file")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--json", type=Path, default=None, help="write the summary as JSON (- for stdout)")
    t.set_defaults(func=cmd_train_typer)

    h = cs.add_parser("her2st", help="held-out spot table on real ST: tile model vs aggregated cells (± NNLS)",
                      description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    h.add_argument("--st", type=Path, required=True, help="folder of ST sections (HER2ST layout, or any st layout)")
    h.add_argument("--reference", type=Path, required=True, help="single cells: .h5ad, or counts CSV + --types")
    h.add_argument("--types", type=Path, default=None,
                   help="cell types CSV of a counts-CSV reference (default: *_types.csv beside it, if one)")
    h.add_argument("--panel", type=Path, default=None, help="gene list (default: genes in every section and the reference)")
    h.add_argument("--schemes", nargs="+", default=["patient"], choices=["patient", "section"])
    h.add_argument("--sections", nargs="+", default=None, metavar="NAME", help="only these sections (train and test)")
    h.add_argument("--max-sections", type=_positive, default=None, help="test at most N held-out sections per scheme")
    h.add_argument("--max-spots", type=_positive, default=None, help="score at most N spots per held-out section")
    h.add_argument("--epochs", type=_positive, default=30, help="fusion-head epochs per fold (as loso)")
    h.add_argument("--seed", type=int, default=0)
    h.add_argument("--tile-um", type=float, default=112.0)
    h.add_argument("--cache", type=Path, default=Path("data/cache/features"), help="loso's feature cache")
    h.add_argument("--out", type=Path, default=None, help="also write the report JSON here")
    h.add_argument("--json", type=Path, default=None, help="write the report as JSON (- for stdout)")
    h.set_defaults(func=cmd_her2st)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cohort", required=True)
    p.add_argument("--store", type=Path, default=None)
    p.add_argument("--model", default=None, help="model id or id@version (default: newest with predictions)")
    p.add_argument("--json", type=Path, default=None, help="write the result as JSON (- for stdout)")


def add_cells_commands(sub) -> None:
    """Registers this module's subcommands on ``sub`` (argparse subparsers)."""
    c = sub.add_parser("cells", help="cells runs: cell-type biomarkers per patient, one slide's cells per type; cells evaluation")
    cs = c.add_subparsers(dest="cells_command", required=True)
    b = cs.add_parser("biomarkers", help="a cell biomarker per patient (mean over the patient's slides with cells)",
                      description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _common(b)
    b.add_argument("--variable", required=True,
                   help="cell:<type>:<gene> | cellfrac:<type> | celldens:<A>@<B>[:<µm>] (types: any case or a "
                        "unique prefix, e.g. cell:malignant:ERBB2, celldens:t_cell@malignant:50)")
    b.add_argument("--slides", action="store_true", help="print the per-slide values instead of per patient")
    b.add_argument("--top", type=int, default=20, help="rows printed (the JSON has all)")
    b.set_defaults(func=cmd_biomarkers)
    s = cs.add_parser("show", help="one slide's cells per type: count, fraction, mean confidence")
    _common(s)
    s.add_argument("--slide", required=True, metavar="NAME",
                   help="slide by name (full name, without extension, or a unique prefix such as the barcode)")
    s.set_defaults(func=cmd_show)
    _add_evaluation_commands(cs)
