"""CLI commands: measured vs predicted on spatial-transcriptomics sections (registered by core.cli.build_parser).

``st-compare`` predicts a model at the measured spots of one section and prints the per-gene
Pearson r table (top rows) and the median r; ``--csv`` writes the full table (the bytes the page's
download offers), ``--json FILE`` (``-`` = stdout) the summary and every gene as strict JSON.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from core.config import load_settings
from core.errors import TesseraError


def _load(args):
    """The model as ``evaluate`` loads it: --model-dir first, then the configured model folders."""
    from core.engine.modelhub import load_model

    settings = load_settings()
    dirs = (args.model_dir, *settings.model_dirs) if args.model_dir else settings.model_dirs
    return load_model(args.model or settings.default_model, dirs, encoder_weights=args.encoder_weights)


def _genes(values: list[str] | None) -> list[str] | None:
    """``--genes A B,C`` → [A, B, C] (spaces or commas)."""
    if not values:
        return None
    return [g for v in values for g in v.replace(",", " ").split() if g]


def _text(comparison, rows, top: int) -> str:
    shown = rows.head(top)
    scored = int(comparison.table["pearson_r"].notna().sum())
    lines = [f"{comparison.section} ({comparison.layout}) vs {comparison.model}: {comparison.n_spots} spots"
             + (f" ({comparison.n_dropped} dropped: patch off the image)" if comparison.n_dropped else "")
             + f", {len(comparison.genes)} genes ({len(comparison.missing_genes)} of the panel not measured)",
             f"median Pearson r = {comparison.median_r:.3f} over {scored} genes"
             + (f" ({len(comparison.genes) - scored} with a constant column: r = NaN)" if scored < len(comparison.genes)
                else ""),
             shown.to_string(index=False, float_format=lambda v: f"{v:.3f}")]
    if comparison.training_notice:
        lines.insert(1, "warning: " + comparison.training_notice)
    if len(rows) > top:
        lines.append(f"… {len(rows) - top} more genes (--top N, --csv FILE for all)")
    return "\n".join(lines)


def cmd_st_compare(args) -> int:
    from core.analysis.measured_spatial import comparison_json, sorted_table, table_csv
    from core.cli_analysis import _emit
    from core.training.st_compare import compare_section
    from core.training.stdata import read_section

    if args.top < 1:
        raise TesseraError(f"--top must be at least 1; got {args.top}.")
    section = read_section(args.section, image=args.image)   # a bad path or layout fails before the model loads
    comparison = compare_section(_load(args), section, genes=_genes(args.genes))
    if args.csv:
        data = table_csv(comparison, args.sort)
        try:
            args.csv.parent.mkdir(parents=True, exist_ok=True)
            args.csv.write_bytes(data)
        except OSError as exc:
            raise TesseraError(f"Cannot write {args.csv}: {exc.strerror or exc}. Give a path in a writable folder.") from exc
    text = _text(comparison, sorted_table(comparison, args.sort), args.top)
    if args.csv:
        text += f"\nwritten {args.csv}"
    return _emit(args, comparison_json(comparison, args.sort), text)


def add_measured_commands(sub) -> None:
    """Registers this module's subcommands on ``sub`` (argparse subparsers)."""
    c = sub.add_parser("st-compare", help="measured vs predicted expression on one ST section: per-gene r table",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    c.add_argument("--section", type=Path, required=True,
                   help="an ST section: HER2ST/legacy ST folder, Space Ranger outs/ folder, or .h5ad beside its WSI")
    c.add_argument("--image", type=Path, default=None,
                   help="the H&E to use instead of the one found (Visium: the full-resolution TIFF)")
    c.add_argument("--model", default=None, help="model id (default: the configured default model)")
    c.add_argument("--model-dir", type=Path, default=None, help="extra folder of checkpoints")
    c.add_argument("--encoder-weights", type=Path, default=None,
                   help="local weights of a foundation encoder (as for predict)")
    c.add_argument("--genes", nargs="+", default=None, help="only these genes (default: all the model and section share)")
    c.add_argument("--sort", choices=["r", "gene"], default="r", help="table order: best r first, or by gene")
    c.add_argument("--top", type=int, default=20, help="rows printed")
    c.add_argument("--csv", type=Path, default=None, help="write the full per-gene table as CSV")
    c.add_argument("--json", type=Path, default=None, help="strict JSON (NaN → null) to FILE, - for stdout")
    c.set_defaults(func=cmd_st_compare)
