"""One entry point for every export, shared by ``python -m core.cli export`` and the pages:
:func:`export` writes files (checked, atomic) and :func:`export_bytes` returns the same file's
bytes for a download button.

Formats: ``h5ad`` (AnnData, scanpy-ready), ``geojson`` (QuPath objects, one file per slide),
``csv``/``parquet`` (one row per tile), ``png``/``svg`` (a map of one layer on one slide) and
``table`` (the cohort table: patients × clinical × biomarkers, .csv/.xlsx/.parquet by suffix).

``level="cells"`` exports the cells of cells runs instead of tiles (h5ad, geojson, csv, parquet;
:mod:`core.export.cells`); ``stride`` ½ or ¼ exports each slide's high-resolution run
(``predict --stride``) instead of the default grid, at either level.
"""
from __future__ import annotations

import tempfile
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from core.errors import TesseraError
from core.export.collect import (ExportData, collect, domains_for, resolve_layers, select_slides, split_layers)
from core.export.files import atomic_paths, atomic_write, check_out

SUFFIXES = {"h5ad": (".h5ad",), "geojson": (".geojson", ".json"), "csv": (".csv",), "parquet": (".parquet",),
            "png": (".png",), "svg": (".svg",), "table": (".csv", ".xlsx", ".parquet")}
FORMATS = tuple(SUFFIXES)
MIMES = {"h5ad": "application/x-hdf5", "geojson": "application/geo+json", "csv": "text/csv",
         "parquet": "application/vnd.apache.parquet", "png": "image/png", "svg": "image/svg+xml",
         "zip": "application/zip", "xlsx": "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet"}
_BY_SUFFIX = {".h5ad": "h5ad", ".geojson": "geojson", ".png": "png", ".svg": "svg", ".xlsx": "table"}


@dataclass(frozen=True)
class ExportResult:
    format: str
    files: list[str]
    cohort: str
    model_key: str | None
    slides: list[str] = field(default_factory=list)
    layers: list[str] = field(default_factory=list)
    n_tiles: int = 0
    n_rows: int = 0
    vmin: float | None = None
    vmax: float | None = None
    columns: list[str] = field(default_factory=list)   # the cohort table's
    level: str = "tiles"
    n_cells: int = 0
    stride: float = 1.0

    def to_json(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        what = (f"{self.n_rows} patients × {len(self.columns)} columns" if self.format == "table" else
                f"{self.n_cells} cells of {len(self.slides)} slide(s), {len(self.layers)} gene(s)"
                if self.level == "cells" else
                f"{self.n_tiles} tiles of {len(self.slides)} slide(s), {len(self.layers)} layer(s)")
        if self.stride != 1.0:
            what += f", stride {self.stride:g}"
        scale = f", colour scale {self.vmin:.4g}–{self.vmax:.4g}" if self.vmin is not None else ""
        return f"written {', '.join(self.files)} ({self.format}): {what}{scale}"


def infer_format(fmt: str | None, out: str | Path, variables: str | None) -> str:
    """``fmt`` if given; else the cohort table when ``--variables`` is given (the legacy command),
    else by ``out``'s suffix (.h5ad, .geojson, .png, .svg; .csv/.xlsx/.parquet = the cohort table)."""
    if fmt:
        if fmt not in SUFFIXES:
            raise TesseraError(f"Unknown export format {fmt!r}; use one of {', '.join(FORMATS)}.")
        return fmt
    if variables:
        return "table"
    suffix = Path(out).suffix.lower()
    if suffix in _BY_SUFFIX:
        return _BY_SUFFIX[suffix]
    if suffix in SUFFIXES["table"]:
        return "table"
    raise TesseraError(f"Cannot tell the format from --out {out}; give --format ({', '.join(FORMATS)}).")


def export(store, cohort: str, model_key: str | None, fmt: str, out: str | Path, *, slides: list[str] | None = None,
           layers: str | list[str] | None = None, variables: str | list[str] | None = None, stat: str = "mean",
           domains="auto", vmin: float | None = None, vmax: float | None = None, cmap: str = "viridis",
           opacity: float = 0.7, hires_px: int | None = None, level: str = "tiles", stride: float | None = None,
           genes: str | list[str] | None = None) -> ExportResult:
    """Write one export of ``cohort`` and return what was written. ``domains``: ``"auto"`` (each
    slide's domain fit, if any), None, or ``{run_key: labels}``. ``level`` tiles | cells; ``stride``
    1 (default grid), 0.5 or 0.25 (high-resolution runs); ``genes`` (cells: a subset of the panel,
    also accepted as gene ``layers``). Bad input is a :class:`TesseraError` raised before anything
    is written; files appear only when complete."""
    if not fmt and (level or "").strip().lower() == "cells":   # .csv / .parquet of cells: a cell table
        fmt = {".csv": "csv", ".parquet": "parquet"}.get(Path(out).suffix.lower())
    fmt = infer_format(fmt, out, variables if isinstance(variables, str) else ";".join(variables or []))
    level, stride = _check_level(level, stride, fmt, genes)
    if fmt == "table":
        if stride != 1.0 or level != "tiles":
            raise TesseraError("The cohort table has one row per patient: --level and --stride do not apply.")
        return _cohort_table(store, cohort, model_key, out, slides, layers, variables, stat)
    if variables:
        raise TesseraError(f"--variables is for the cohort table (--format table); for {fmt} give --layers.")
    _check_options(cmap, opacity, hires_px)
    if level == "cells":
        return _export_cells(store, cohort, model_key, fmt, out, slides, layers, genes, stride, hires_px)
    chosen, chosen_layers, many = _prepare(store, cohort, model_key, fmt, out, slides, layers, stride=stride)
    out = check_out(out, SUFFIXES[fmt], folder=many)
    if domains == "auto":
        domains = domains_for(store, cohort, model_key, list(chosen["run_key"])) if stride == 1.0 else None
    data = collect(store, cohort, model_key, slides=list(chosen["slide_name"]), layers=chosen_layers,
                   domains=domains, expression=fmt == "h5ad", stride=stride)
    result = _write(data, fmt, out, many, vmin=vmin, vmax=vmax, cmap=cmap, opacity=opacity, hires_px=hires_px)
    return replace(result, stride=stride)


LEVELS = ("tiles", "cells")
STRIDES = (1.0, 0.5, 0.25)
CELL_FORMATS = ("h5ad", "geojson", "csv", "parquet")


def _check_level(level: str | None, stride, fmt: str, genes) -> tuple[str, float]:
    level = (level or "tiles").strip().lower()
    if level not in LEVELS:
        raise TesseraError(f"Unknown --level {level!r}; use tiles or cells.")
    try:
        stride = 1.0 if stride is None else float(stride)
    except (TypeError, ValueError):
        raise TesseraError(f"--stride must be 1, 0.5 or 0.25; got {stride!r}.") from None
    if stride not in STRIDES:
        raise TesseraError(f"--stride must be 1 (the default grid), 0.5 or 0.25 (high-resolution runs); got {stride:g}.")
    if level == "cells" and fmt not in CELL_FORMATS:
        raise TesseraError(f"Cells export as {', '.join(CELL_FORMATS)}; {fmt} is tiles only (drop --level cells).")
    if genes and level != "cells":
        raise TesseraError("--genes chooses the genes of a cells export (--level cells); for tiles give --layers.")
    return level, stride


def _runs(store, cohort: str, model_key: str, stride: float):
    """The cohort's runs on the default grid, or its high-resolution runs of ``stride`` (one error
    when no slide has one)."""
    runs = store.cohort_runs(cohort, model_key, stride=stride)
    if stride != 1.0 and runs["run_key"].isna().all():
        raise TesseraError(f"No slide of cohort {cohort!r} has a high-resolution run at stride {stride:g} for this "
                           f"model: predict one first (python -m core.cli predict --cohort {cohort} --stride {stride:g}).")
    return runs


def _export_cells(store, cohort, model_key, fmt, out, slides, layers, genes, stride, hires_px) -> ExportResult:
    from core.export import cells as cx

    if model_key is None:
        raise TesseraError(f"Cohort {cohort!r} has no predictions yet: predict it with cells first "
                           f"(python -m core.cli predict --cohort {cohort} --cells).")
    panel = list(store.model_info(model_key).genes)
    items = split_layers(genes) + split_layers(layers)
    chosen_genes = cx.resolve_genes(items, panel) if items else None
    chosen = select_slides(_runs(store, cohort, model_key, stride), slides, cohort)
    many = fmt == "geojson" and Path(out).suffix.lower() not in SUFFIXES["geojson"]
    if fmt == "geojson" and not many and len(chosen) > 1:
        raise TesseraError(f"GeoJSON is one file per slide and {len(chosen)} slides are chosen: give --out a "
                           "folder (one <slide>.geojson each is written into it), or one --slide.")
    cx.check_cells(store, chosen, cohort)
    out = check_out(out, SUFFIXES[fmt], folder=many)
    data = cx.collect_cells(store, cohort, model_key, chosen, chosen_genes, stride=stride)
    from core.export import anndata_io, geojson

    files = [out]
    if fmt == "h5ad":
        px = hires_px or (anndata_io.HIRES_PX if len(data.slides) == 1 else anndata_io.HIRES_PX_MANY)
        atomic_write(out, lambda tmp: cx.write_h5ad(data, tmp, hires_px=px))
    elif fmt == "geojson":
        files = [out / geojson.file_name(s) for s in data.slides] if many else [out]
        with atomic_paths(files) as temps:
            for slide, tmp in zip(data.slides, temps):
                cx.write_geojson(data, slide, tmp)
    else:
        atomic_write(out, lambda tmp: cx.write_cells_table(data, tmp, fmt))
    return ExportResult(fmt, [str(f) for f in files], cohort, model_key, [s.slide_name for s in data.slides],
                        list(data.genes), n_rows=data.n_cells, level="cells", n_cells=data.n_cells, stride=stride)


def _prepare(store, cohort: str, model_key: str | None, fmt: str, out: str | Path, slides, layers, *,
             stride: float = 1.0):
    """(chosen slides, layers or None for the whole panel, GeoJSON into a folder?) after every check
    that needs no slide data."""
    if model_key is None:
        raise TesseraError(f"Cohort {cohort!r} has no predictions yet: predict it first "
                           f"(python -m core.cli predict --cohort {cohort}).")
    panel = store.model_info(model_key).genes
    items = split_layers(layers)
    chosen_layers = resolve_layers(items, panel) if items else None
    chosen = select_slides(_runs(store, cohort, model_key, stride), slides, cohort)
    if fmt in ("png", "svg") and (len(chosen) != 1 or not chosen_layers or len(chosen_layers) != 1):
        raise TesseraError(f"A {fmt.upper()} figure shows one layer of one slide: give one --slide (of "
                           f"{len(chosen)} chosen) and one --layers value (e.g. --layers ERBB2).")
    # GeoJSON: --out a .geojson file for one slide, or a folder that gets one <slide>.geojson each
    many = fmt == "geojson" and Path(out).suffix.lower() not in SUFFIXES["geojson"]
    if fmt == "geojson" and not many and len(chosen) > 1:
        raise TesseraError(f"GeoJSON is one file per slide and {len(chosen)} slides are chosen: give --out a "
                           "folder (one <slide>.geojson each is written into it), or one --slide.")
    if fmt == "h5ad":   # X holds the whole panel: only signatures / nuclei add obs columns
        chosen_layers = [la for la in chosen_layers or [] if la.kind != "gene"]
    return chosen, chosen_layers, many


def _check_options(cmap: str, opacity: float, hires_px: int | None) -> None:
    from core.analysis.overlay import COLORMAPS

    if hires_px is not None and not 16 <= int(hires_px) <= 20000:
        raise TesseraError(f"--hires-px must be between 16 and 20000 px; got {hires_px}.")
    if cmap not in COLORMAPS:
        raise TesseraError(f"Unknown colour map {cmap!r}; use one of {', '.join(COLORMAPS)}.")
    if not 0.0 <= float(opacity) <= 1.0:
        raise TesseraError(f"--opacity must be between 0 and 1; got {opacity}.")


def _write(data: ExportData, fmt: str, out: Path, many: bool, **figure) -> ExportResult:
    from core.export import anndata_io, geojson, tables

    used, files = (None, None), [out]
    hires_px = figure.pop("hires_px") or (anndata_io.HIRES_PX if len(data.slides) == 1 else anndata_io.HIRES_PX_MANY)
    if fmt == "h5ad":
        atomic_write(out, lambda tmp: anndata_io.write_h5ad(data, tmp, hires_px=hires_px))
    elif fmt == "geojson":
        files = [out / geojson.file_name(s) for s in data.slides] if many else [out]
        with atomic_paths(files) as temps:
            for slide, tmp in zip(data.slides, temps):
                geojson.write_geojson(data, slide, tmp)
    elif fmt in ("csv", "parquet"):
        atomic_write(out, lambda tmp: tables.write_tiles(data, tmp, fmt))
    else:
        from core.export.figures import write_figure

        box = {}
        atomic_write(out, lambda tmp: box.update(used=write_figure(data, tmp, fmt, **figure)))
        used = box["used"]
    return ExportResult(fmt, [str(f) for f in files], data.cohort, data.model_key,
                        [s.slide_name for s in data.slides], [la.column for la in data.layers], data.n_tiles,
                        data.n_tiles, *used)


def _cohort_table(store, cohort, model_key, out, slides, layers, variables, stat) -> ExportResult:
    from core.export.tables import write_cohort_table

    if slides or layers:
        raise TesseraError("The cohort table has one row per patient: --slide and --layers do not apply; "
                           "choose its columns with --variables (e.g. 'CD8A;signature:cytolytic').")
    specs = variables if isinstance(variables, list) else [s.strip() for s in (variables or "").split(";")]
    specs = [s for s in specs if s]
    out = check_out(out, SUFFIXES["table"])
    box = {}
    atomic_write(out, lambda tmp: box.update(table=write_cohort_table(store, cohort, specs, tmp,
                                                                       model_key=model_key, stat=stat)))
    table = box["table"]
    return ExportResult("table", [str(out)], cohort, model_key, n_rows=len(table), columns=[str(c) for c in table.columns])


def plan_download(store, cohort: str, model_key: str | None, fmt: str, *, slides: list[str] | None = None,
                  layers: str | list[str] | None = None) -> tuple[str, str]:
    """(file name, MIME type) of :func:`export_bytes` with the same arguments, after the same checks
    (cheap: no slide data is read), so a page can show a download button or the error at once."""
    if fmt == "table":
        return _file_name(f"{cohort}_cohort", ".xlsx"), MIMES["xlsx"]
    chosen, chosen_layers, _ = _prepare(store, cohort, model_key, fmt, "folder", slides, layers)
    names = list(chosen["slide_name"])
    parts = [cohort] + ([names[0].rsplit(".", 1)[0]] if len(names) == 1 else [])
    if fmt in ("png", "svg"):
        parts.append(chosen_layers[0].column)
    if fmt == "geojson" and len(names) > 1:
        return _file_name("_".join(parts) + "_geojson", ".zip"), MIMES["zip"]
    return _file_name("_".join(parts), SUFFIXES[fmt][0]), MIMES[fmt]


def _file_name(stem: str, suffix: str) -> str:
    from core.safety import safe_filename

    return safe_filename(stem.replace(":", "-").replace(",", "+")[:100] + suffix, default="export" + suffix)


def export_bytes(store, cohort: str, model_key: str | None, fmt: str, **options) -> tuple[bytes, str, str]:
    """(content, file name, MIME type) of :func:`export` for a download: written to a temporary
    folder by the same function, then read back. Several GeoJSON files come as one .zip."""
    import io
    import zipfile

    name, mime = plan_download(store, cohort, model_key, fmt, slides=options.get("slides"),
                               layers=options.get("layers"))
    with tempfile.TemporaryDirectory(prefix="tessera-export-") as tmp:
        out = Path(tmp) / ("geojson" if fmt == "geojson" else name)
        result = export(store, cohort, model_key, fmt, out, **options)
        if len(result.files) == 1:
            return Path(result.files[0]).read_bytes(), name, mime
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
            for f in result.files:
                zf.write(f, Path(f).name)
        return buf.getvalue(), name, mime
