"""CLI command ``export`` (registered by core.cli.build_parser): predictions as AnnData, QuPath
GeoJSON, tile tables or map figures, and the cohort table (the former ``export`` of
core.cli_analysis, kept as ``--format table`` and chosen when ``--variables`` is given).

    python -m core.cli export --cohort N [--model M] [--slide NAME ...] --format h5ad|geojson|csv|parquet|png|svg
                              [--layers ERBB2,sig:NAME,...] --out PATH [--json -]
    python -m core.cli export --cohort N --variables 'CD8A;signature:cytolytic' --out cohort.xlsx
    python -m core.cli export --cohort N --level cells [--genes ERBB2,CD8A] --format h5ad|geojson|csv|parquet --out PATH

``--level cells`` writes the cells of cells runs (predict --cells): AnnData (X = the cells' gene
values, obsm['spatial'] = centroids), QuPath GeoJSON (one detection per cell, its ellipse,
classification = cell type) or one row per cell. ``--stride 0.5|0.25`` exports the high-resolution
runs (predict --stride) instead of the default grid.

Calls :func:`core.export.api.export`, the function behind the pages' download buttons.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def cmd_export(args) -> int:
    from core.cli_analysis import _model_key, _open
    from core.export.api import export

    with _open(args) as store:
        result = export(store, args.cohort, _model_key(store, args), args.format, args.out, slides=args.slide,
                        layers=args.layers, variables=args.variables, stat=args.stat, vmin=args.vmin, vmax=args.vmax,
                        cmap=args.cmap, opacity=args.opacity, hires_px=args.hires_px, level=args.level,
                        stride=args.stride, genes=args.genes)
    if args.json:
        from core.cli import _write_json

        print(result.summary(), file=sys.stderr if str(args.json) == "-" else sys.stdout)
        _write_json(args.json, result.to_json())
    else:
        print(result.summary())
    return 0


def add_export_commands(sub) -> None:
    """Registers ``export`` on ``sub`` (argparse subparsers)."""
    from core.analysis.overlay import COLORMAPS
    from core.cli_analysis import STATS
    from core.export.api import FORMATS

    e = sub.add_parser("export", help="predictions as .h5ad / QuPath GeoJSON / tile CSV, Parquet / PNG, SVG map; "
                                      "or the cohort table (patients × clinical × biomarkers)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    e.add_argument("--cohort", required=True)
    e.add_argument("--store", type=Path, default=None)
    e.add_argument("--model", default=None, help="model id or id@version (default: newest with predictions)")
    e.add_argument("--format", default=None, choices=list(FORMATS),
                   help="default: 'table' with --variables, else from --out's suffix (.h5ad, .geojson, .png, .svg; "
                        ".csv/.xlsx/.parquet = the cohort table, as the former export command)")
    e.add_argument("--slide", nargs="+", action="extend", default=None, metavar="NAME",
                   help="slides by name (full name, without extension, or a unique prefix such as the barcode); "
                        "default: every predicted slide of the cohort")
    e.add_argument("--layers", default=None,
                   help="genes (any case), sig:<library name>, sig:<g1+g2…>, nuclei:<class>; comma-separated, or "
                        "';'-separated so that a signature may list genes with commas (default: the whole panel; "
                        "figures need exactly one)")
    e.add_argument("--variables", default=None,
                   help="cohort table only: VARs separated by ';' (e.g. 'CD8A;signature:cytolytic;clinical:stage')")
    e.add_argument("--stat", default="mean", choices=STATS, help="cohort table only: slide statistic of predicted genes")
    e.add_argument("--out", type=Path, required=True,
                   help="file to write; for GeoJSON of several slides a folder (one <slide>.geojson each)")
    e.add_argument("--vmin", type=float, default=None, help="figures: low end of the colour scale (default: min)")
    e.add_argument("--vmax", type=float, default=None, help="figures: high end of the colour scale (default: max)")
    e.add_argument("--cmap", default="viridis", choices=list(COLORMAPS), help="figures: colour map")
    e.add_argument("--opacity", type=float, default=0.7, help="figures: opacity of the tiles over the tissue (0–1)")
    e.add_argument("--hires-px", type=int, default=None, help="h5ad: long side of each embedded thumbnail (default 2000 px for one slide, "
                        "1000 px each for several)")
    e.add_argument("--level", default="tiles", choices=["tiles", "cells"],
                   help="tiles (default) or cells (the cells of runs predicted with --cells; h5ad, geojson, csv, parquet)")
    e.add_argument("--stride", type=float, default=None,
                   help="1 (default grid), 0.5 or 0.25: export each slide's high-resolution run of that stride")
    e.add_argument("--genes", default=None,
                   help="cells only: genes to export (comma-separated, any case; default: the whole panel)")
    e.add_argument("--json", type=Path, default=None, help="write a summary as JSON (- for stdout)")
    e.set_defaults(func=cmd_export)
