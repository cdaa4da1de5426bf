"""CLI commands ``cells biomarkers|show`` (registered by core.cli.build_parser).

    python -m core.cli cells biomarkers --cohort N [--model M] --variable 'cell:malignant:ERBB2' [--slides] [--json -]
    python -m core.cli cells show --cohort N [--model M] --slide NAME [--json -]

``biomarkers`` prints one value per patient (the mean over the patient's slides with cells) of a
cell biomarker: ``cell:<type>:<gene>`` (mean of the gene in the type's cells), ``cellfrac:<type>``
(the type's fraction of the cells) or ``celldens:<A>@<B>[:<µm>]`` (A cells per mm² within the
distance, default 50 µm, of any B cell); :mod:`core.analysis.cell_biomarkers` defines them.
``show`` prints one slide's cells per type (count, fraction, mean confidence).
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


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cohort", required=True)
    p.add_argument("--store", type=Path, default=None)
    p.add_argument("--model", default=None, help="model id or id@version (default: newest with predictions)")
    p.add_argument("--json", type=Path, default=None, help="write the result as JSON (- for stdout)")


def add_cells_commands(sub) -> None:
    """Registers this module's subcommands on ``sub`` (argparse subparsers)."""
    c = sub.add_parser("cells", help="cells runs: cell-type biomarkers per patient, one slide's cells per type")
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
