"""Importing a cohort as users have it: a folder of slides + a clinical table → a link report.

Every file found and every clinical patient ends up in the report with a status and a reason
(:class:`core.vocab.SlideStatus`); nothing is dropped silently.
"""
from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

from core.cohort.barcodes import parse_barcode
from core.errors import ClinicalFormatError, CohortExistsError, MissingMppError, NoTissueError, SlideOpenError
from core.store.db import SLIDE_COLUMNS, Store
from core.vocab import (CANDIDATE_SUFFIXES, MAX_GRID_FACTOR, MAX_TILES_PER_SLIDE, MPP_MAX, MPP_MIN,
                        VENDOR_SUFFIXES, SlideStatus)
from core.wsi.fingerprint import fingerprint
from core.wsi.slide import Slide
from core.wsi.tiling import TilingParams, tile_grid, tissue_mask

log = logging.getLogger(__name__)


@dataclass
class ImportReport:
    """What an import found: one row per file, the patients without slides, clinical issues."""

    name: str
    slides: pd.DataFrame
    clinical: pd.DataFrame
    clinical_format: str
    issues: list[dict] = field(default_factory=list)

    @property
    def patients_without_slides(self) -> list[str]:
        have = set(self.slides["patient"].dropna())
        return sorted(set(self.clinical["bcr_patient_barcode"]) - have)

    def counts(self) -> dict[str, int]:
        c = self.slides["status"].value_counts().to_dict()
        return {"files": len(self.slides), "linked": int((self.slides["link"] == "linked").sum()),
                "patients": int(self.clinical["bcr_patient_barcode"].nunique()),
                "patients_without_slides": len(self.patients_without_slides), **c}


def read_mpp_overrides(path: str | Path) -> dict[str, float]:
    """A CSV ``slide,mpp``: slide = file name, stem or path. Returns name → µm/px."""
    df = pd.read_csv(path)
    cols = {c.lower().strip(): c for c in df.columns}
    if "slide" not in cols or "mpp" not in cols:
        raise ClinicalFormatError(f"{Path(path).name}: an µm/px override file needs columns 'slide,mpp'; "
                                  f"found {', '.join(map(str, df.columns))}.")
    out = {}
    for slide, mpp in zip(df[cols["slide"]].astype(str), pd.to_numeric(df[cols["mpp"]], errors="coerce")):
        if not np.isfinite(mpp) or not MPP_MIN <= mpp <= MPP_MAX:
            raise ClinicalFormatError(f"{Path(path).name}: µm/px for {slide} must be between {MPP_MIN:g} and "
                                      f"{MPP_MAX:g} (typical: 0.25 at 40×, 0.5 at 20×), got {mpp:g}.")
        out[Path(slide).name] = float(mpp)
    return out


def _override_for(path: Path, overrides: dict[str, float]) -> float | None:
    for key in (path.name, path.stem, path.name.split(".")[0]):
        if key in overrides:
            return overrides[key]
    return None


@dataclass(frozen=True)
class SlideProbe:
    """What opening one file told us: its status, why, and the slide's vital numbers."""

    slide_name: str
    slide_path: str
    status: SlideStatus
    message: str = ""
    vendor: str | None = None
    width: int | None = None
    height: int | None = None
    levels: int | None = None
    objective: float | None = None
    mpp: float | None = None
    mpp_source: str | None = None
    tissue_fraction: float | None = None
    n_tiles: int | None = None

    def row(self) -> dict:
        """The import-report columns of this slide (status as its plain string)."""
        return {**asdict(self), "status": str(self.status)}


def probe_slide(path: Path, *, tiling: TilingParams, mpp_override: float | None = None) -> SlideProbe:
    """Open a slide and find out whether it can be predicted; never raises for bad slides."""
    row: dict = {"slide_name": path.name, "slide_path": str(path.resolve()), "status": SlideStatus.OK, "message": ""}
    try:
        with Slide(path, mpp_override=mpp_override) as slide:
            row.update(vendor=slide.vendor, width=slide.dimensions[0], height=slide.dimensions[1],
                       levels=slide.level_count, objective=slide.objective_power)
            slide.thumbnail(256)  # decodes the low levels: catches truncated files early
            try:
                row.update(mpp=slide.mpp, mpp_source=slide.mpp_source)
            except MissingMppError as exc:
                return SlideProbe(**{**row, "status": SlideStatus.NEEDS_MPP, "message": str(exc),
                                     "mpp_source": "unknown"})
            if "estimate" in slide.mpp_source:
                row["message"] = (f"µm/px {slide.mpp:.3g} estimated from the objective power "
                                  f"({slide.objective_power:g}×); set it exactly if known.")
            too_large = _grid_too_large(slide, tiling)
            if too_large:
                return SlideProbe(**{**row, "status": SlideStatus.TOO_LARGE, "message": too_large})
            detected = tissue_mask(slide, mask_mpp=tiling.mask_mpp)
            row["tissue_fraction"] = float(detected[0].fraction)
            row["n_tiles"] = len(tile_grid(slide, tiling, tissue=detected))
            if row["n_tiles"] > MAX_TILES_PER_SLIDE:
                row.update(status=SlideStatus.TOO_LARGE, message=(
                    f"{path.name}: {row['n_tiles']:,} tiles of {tiling.tile_um:g} µm with tissue, more than the "
                    f"{MAX_TILES_PER_SLIDE:,} one slide may have (at {slide.mpp:.4g} µm/px, "
                    f"{row['width']:,} × {row['height']:,} px). Check its µm/px ({slide.mpp_source}); "
                    "set it exactly if it is wrong."))
    except SlideOpenError as exc:
        row.update(_classify_open_error(path, exc))
    except NoTissueError as exc:
        row.update(status=SlideStatus.NO_TISSUE, message=str(exc), n_tiles=0)
    except Exception as exc:  # OpenSlideError while decoding tiles of a damaged file
        row.update(status=SlideStatus.UNREADABLE,
                   message=f"{path.name}: reading failed ({type(exc).__name__}: {exc}); "
                           "the file may be truncated or damaged.")
    return SlideProbe(**row)


def _grid_too_large(slide: Slide, tiling: TilingParams) -> str:
    """A message when the slide's whole tile grid is absurdly large (checked before any decode), else ''."""
    size = tiling.tile_um / slide.mpp
    w, h = slide.dimensions
    n_grid = (w // size) * (h // size)
    limit = MAX_GRID_FACTOR * MAX_TILES_PER_SLIDE
    if n_grid <= limit:
        return ""
    return (f"{slide.path.name}: {w:,} × {h:,} px at {slide.mpp:.4g} µm/px ({slide.mpp_source}) is "
            f"{w * slide.mpp / 1e4:.1f} × {h * slide.mpp / 1e4:.1f} cm, a grid of {int(n_grid):,} tiles of "
            f"{tiling.tile_um:g} µm; one slide may have at most {MAX_TILES_PER_SLIDE:,} tiles with tissue "
            f"(grid {limit:,}). Check its µm/px; set it exactly if it is wrong.")


def _classify_open_error(path: Path, exc: SlideOpenError) -> dict:
    suffix = path.suffix.lower()
    if exc.kind == "unsupported" and suffix in VENDOR_SUFFIXES:
        return {"status": SlideStatus.UNREADABLE, "message": (
            f"{path.name}: OpenSlide does not recognise this {suffix} file ({path.stat().st_size:,} bytes); "
            "it is probably truncated or damaged. Download it again.")}
    if suffix == ".dcm":
        return {"status": SlideStatus.UNSUPPORTED, "message": (
            f"{path.name}: OpenSlide could not read this DICOM file ({exc.__cause__ or exc}). DICOM WSI needs "
            "the complete series of one slide in its own folder; otherwise convert it to a pyramidal TIFF.")}
    if exc.kind == "unsupported" and suffix in {".tif", ".tiff"}:
        return {"status": SlideStatus.UNSUPPORTED, "message": (
            f"{path.name}: a TIFF without a tiled pyramid, which OpenSlide does not read as a slide. "
            "Convert it to a tiled pyramidal TIFF (e.g. vips tiffsave --tile --pyramid).")}
    kind = SlideStatus.UNSUPPORTED if exc.kind == "unsupported" else SlideStatus.UNREADABLE
    return {"status": kind, "message": str(exc)}


def _select_per_patient(df: pd.DataFrame) -> pd.Series:
    """Default slide per patient: usable first, then diagnostic (DX), primary tumour, then name."""
    selected = pd.Series(False, index=df.index)
    if df.empty:
        return selected
    rank = pd.DataFrame({
        "usable": ~(df["status"] == SlideStatus.OK),
        "dx": ~df["slide_type"].fillna("").astype(str).str.startswith("diagnostic"),
        "primary": ~(df["sample_type"] == "primary tumour"),
        "name": df["slide_name"],
    }, index=df.index)
    linked = df[df["patient"].notna() & df["status"].isin([SlideStatus.OK, SlideStatus.NEEDS_MPP])]
    for _, idx in linked.groupby("patient").groups.items():
        selected[rank.loc[idx].sort_values(["usable", "dx", "primary", "name"]).index[0]] = True
    return selected


def scan_folder(folder: Path, *, tiling: TilingParams, fingerprint: Callable[[Path], str],
                mpp_overrides: dict[str, float] | None = None,
                progress: Callable[[int, int, str], None] | None = None) -> pd.DataFrame:
    """Probe every file under ``folder`` (recursively); one row per file (``SLIDE_COLUMNS``)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ClinicalFormatError(f"Slide folder not found: {folder}")
    files = sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith("."))
    rows, seen = [], {}
    for i, path in enumerate(files):
        if progress:
            progress(i, len(files), path.name)
        base = {"slide_name": path.name, "slide_path": str(path.resolve())}
        if path.suffix.lower() not in CANDIDATE_SUFFIXES:
            rows.append({**base, "status": str(SlideStatus.NOT_A_SLIDE),
                         "message": f"ignored: {path.suffix or 'no'} suffix is not a whole-slide format"})
            continue
        fp = fingerprint(path)
        if fp in seen:
            rows.append({**base, "fingerprint": fp, "status": str(SlideStatus.DUPLICATE),
                         "message": f"same content as {seen[fp]}; imported once"})
            continue
        seen[fp] = path.name
        probe = probe_slide(path, tiling=tiling, mpp_override=_override_for(path, mpp_overrides or {}))
        rows.append({**probe.row(), "fingerprint": fp})
    return pd.DataFrame(rows, columns=SLIDE_COLUMNS).astype({"slide_name": object, "slide_path": object,
                                                             "status": object, "message": object})


def link(slides: pd.DataFrame, clinical: pd.DataFrame) -> pd.DataFrame:
    """Add barcode fields, the link status and the per-patient default slide."""
    slides = slides.copy()
    patients = set(clinical["bcr_patient_barcode"].astype(str))
    barcodes = [parse_barcode(n) if s != SlideStatus.NOT_A_SLIDE else None
                for n, s in zip(slides["slide_name"], slides["status"])]
    slides["patient"] = [b.patient if b else None for b in barcodes]
    slides["sample_type"] = [b.sample_type if b else None for b in barcodes]
    slides["slide_type"] = [b.slide_type if b else None for b in barcodes]
    slides["link"] = [
        "not a slide" if s == SlideStatus.NOT_A_SLIDE else
        "no barcode" if b is None else "linked" if b.patient in patients else "no clinical"
        for b, s in zip(barcodes, slides["status"])]
    slides["selected"] = _select_per_patient(slides)
    return slides


def _folder_issues(slides: pd.DataFrame, slides_dir: Path) -> list[dict]:
    """Say so when the folder gave nothing to predict (the report still lists what it found)."""
    if slides.empty:
        return [{"severity": "warning", "kind": "slides", "subject": str(slides_dir),
                 "message": f"No file found under {slides_dir}: the cohort has clinical data only. "
                            "Import again with the folder that holds the slides."}]
    if not (slides["status"] == SlideStatus.OK).any():
        found = ", ".join(f"{n} {s}" for s, n in slides["status"].value_counts().items())
        return [{"severity": "warning", "kind": "slides", "subject": str(slides_dir),
                 "message": f"No slide under {slides_dir} is ready to predict ({found}); "
                            "see each file's message below."}]
    return []


def _no_slides() -> pd.DataFrame:
    return pd.DataFrame(columns=SLIDE_COLUMNS)


def import_cohort(store: Store, name: str, slides_dir: Path | None, clinical_path: Path | None, *, mapping=None,
                  fmt: str | None = None, mpp_overrides: dict[str, float] | None = None,
                  tiling: TilingParams | None = None, progress=None,
                  event_coding: str | dict[str, str] = "auto", replace: bool = False) -> ImportReport:
    """Scan, probe, link and save cohort ``name`` in the store; returns the link report.

    ``slides_dir`` None imports the clinical table alone (a clinical-only cohort: clinical and
    measured variables can be analysed before any slide is there). ``clinical_path`` None adds or
    rescans the slides of an existing cohort against the clinical table it already has.

    Importing a clinical table under the name of a cohort that is already in the store replaces
    that cohort only with ``replace=True``; otherwise :class:`~core.errors.CohortExistsError`.
    """
    from core.cohort.clinical import read_clinical

    if slides_dir is None and clinical_path is None:
        raise ClinicalFormatError("Give a clinical table, a slide folder, or both.")
    if clinical_path is not None and not replace and name in store.cohorts():
        raise CohortExistsError(
            f"There is already a cohort {name!r} in the store. Importing a clinical table under its name would "
            "replace its slides and clinical table: ask for it explicitly (--replace, or 'Replace the cohort' "
            "on the Import page), choose another name, or give only a slide folder to add slides to it.")
    source = {"kind": "import", "slides": str(slides_dir) if slides_dir else None}
    if clinical_path is not None:
        clinical = read_clinical(clinical_path, mapping=mapping, fmt=fmt, event_coding=event_coding)
        table, clinical_format, clinical_issues = clinical.table, clinical.format, list(clinical.issues)
        source.update(clinical=str(clinical_path), format=clinical.format, event_coding=event_coding)
    else:
        if name not in store.cohorts():
            raise ClinicalFormatError(f"There is no cohort {name!r} yet, so its slides have no clinical table to "
                                      "link to. Give the clinical table too (--clinical FILE).")
        previous = store.cohort_source(name)
        table, clinical_format, clinical_issues = store.clinical(name), previous.get("format", "stored"), []
        source.update({k: previous.get(k) for k in ("clinical", "format", "event_coding")})
    tiling = tiling or TilingParams()
    if slides_dir is None:
        slides = link(_no_slides(), table)
        issues = [{"severity": "info", "kind": "slides", "subject": name,
                   "message": f"Clinical data only: {len(table)} patients, no slides yet. Clinical and measured "
                              "variables can be analysed now; add slides later by importing a slide folder into "
                              f"the cohort {name!r}."}]
    else:
        slides = scan_folder(slides_dir, tiling=tiling, fingerprint=lambda p: fingerprint(store, p),
                             mpp_overrides=mpp_overrides, progress=progress)
        slides = link(slides, table)
        issues = _folder_issues(slides, Path(slides_dir))
    issues += [{"severity": i.severity, "kind": "clinical", "subject": i.patient or i.column or "",
                "message": i.message} for i in clinical_issues]
    if clinical_path is None:
        issues += [{"severity": i["severity"], "kind": i["kind"], "subject": i["subject"], "message": i["message"]}
                   for i in store.cohort_issues(name).to_dict("records") if i["kind"] == "clinical"]
    report = ImportReport(name, slides, table, clinical_format, issues)
    store.save_cohort(name, slides, table, source, issues=issues)
    log.info("import %s: %s", name, report.counts())
    return report


def fix_slide_mpp(store: Store, cohort: str, slide_path: str, mpp: float, *,
                  tiling: TilingParams | None = None) -> SlideProbe:
    """Set a user-given µm/px for one slide, re-probe it with that value and save the new status."""
    if not np.isfinite(float(mpp)) or not MPP_MIN <= float(mpp) <= MPP_MAX:
        raise ClinicalFormatError(f"µm/px must be between {MPP_MIN:g} and {MPP_MAX:g} (typical: 0.25 at 40×, "
                                  f"0.5 at 20×); got {mpp}.")
    probe = probe_slide(Path(slide_path), tiling=tiling or TilingParams(), mpp_override=float(mpp))
    row = probe.row()
    store.update_slide(cohort, slide_path, {k: row[k] for k in
                                            ("status", "message", "mpp", "mpp_source", "tissue_fraction", "n_tiles")})
    return probe


def import_measured(store: Store, cohort: str, matrix_path: Path):
    """Read a measured expression matrix for ``cohort`` (keys matched to its patients) and store it,
    replacing an earlier one. Returns the :class:`core.cohort.measured.MeasuredImport`."""
    from core.cohort.measured import read_measured, to_long

    if cohort not in store.cohorts():
        raise ClinicalFormatError(f"No cohort {cohort!r} in the store; import its clinical table first "
                                  "(python -m core.cli import --clinical FILE --name N).")
    patients = store.clinical(cohort)["bcr_patient_barcode"].astype(str).tolist()
    result = read_measured(matrix_path, patients)
    store.save_measured(cohort, to_long(result.matrix), {"file": Path(matrix_path).name,
                                                         "orientation": result.orientation, "key": result.key,
                                                         "summary": result.summary()})
    log.info("measured %s: %s", cohort, result.summary())
    return result
