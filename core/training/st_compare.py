"""Measured vs predicted expression on one spatial-transcriptomics section, spot by spot.

:func:`compare_section` runs a model at the measured spots of a section (the HER2ST, Visium and
HEST layouts of :mod:`core.training.stdata`) through the same path as ``evaluate``
(:func:`core.training.evaluation.section_arrays`) and returns a :class:`SectionComparison`: spot
ids and centres, the measured and predicted matrices over the genes both the model's panel and
the section have, and the per-gene table (Pearson r, Spearman ρ, n spots, means).

Units: measured values are the model's training targets, ``log1p`` of counts normalised to 10⁴
per spot over the shared genes (:func:`core.training.stdata.targets`); predictions are the model's
output in those units. Spot centres are ``(x, y)`` level-0 px of the section's image.

It lives in ``core.training`` (beside ``evaluate``) because reading sections and cutting their
patches is training's; figures and table files are in :mod:`core.analysis.measured_spatial`.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from core.errors import AnalysisError, SectionFormatError

log = logging.getLogger(__name__)
TABLE_COLUMNS = ["gene", "pearson_r", "spearman_rho", "n_spots", "measured_mean", "predicted_mean"]
UNITS = "log1p(CP10k) over the genes shared by the model's panel and the section"


@dataclass(frozen=True)
class SectionComparison:
    """One section, measured against one model's predictions at its spots.

    ``xy`` are spot centres (x, y) in level-0 px of ``image_path`` (``image_size`` = (w, h) px);
    ``measured`` / ``predicted`` are float32 [n_spots, n_genes] in :data:`UNITS`; ``table`` has
    one row per gene (columns :data:`TABLE_COLUMNS`, in ``genes`` order). ``n_dropped`` spots
    were left out because the model's patch around them leaves the image.
    """

    section: str
    layout: str
    model: str
    image_path: str
    image_size: tuple[int, int]
    mpp: float
    spot_diameter_px: float
    spot_ids: tuple[str, ...]
    xy: np.ndarray
    genes: tuple[str, ...]
    measured: np.ndarray
    predicted: np.ndarray
    table: pd.DataFrame
    n_dropped: int = 0
    missing_genes: tuple[str, ...] = ()
    in_training: bool = False       # the model's card lists this section among its training data

    @property
    def training_notice(self) -> str | None:
        """A warning for a section the model was trained on: its r is not a held-out estimate."""
        if not self.in_training:
            return None
        return (f"{self.section} is one of the sections {self.model} was trained on: these correlations are "
                "in-sample and overstate how well it predicts new tissue. For held-out figures use a section it "
                "did not see, or the model card's leave-one-out table (python -m core.cli loso).")

    @property
    def units(self) -> str:
        return UNITS

    @property
    def n_spots(self) -> int:
        return len(self.spot_ids)

    @property
    def median_r(self) -> float:
        """Median Pearson r over the genes where it is defined (NaN when none is)."""
        r = self.table["pearson_r"].to_numpy(float)
        return float(np.nanmedian(r)) if np.isfinite(r).any() else float("nan")

    def values(self, gene: str) -> tuple[np.ndarray, np.ndarray]:
        """(measured, predicted) of one gene over the spots."""
        if gene not in self.genes:
            raise AnalysisError(f"{gene!r} is not among the {len(self.genes)} genes compared on {self.section} "
                                f"(e.g. {', '.join(self.genes[:5])}).")
        j = self.genes.index(gene)
        return self.measured[:, j], self.predicted[:, j]


def gene_table(measured: np.ndarray, predicted: np.ndarray, genes) -> pd.DataFrame:
    """Per-gene Pearson r and Spearman ρ over spots (rows), with n spots and both means.

    A gene whose measured *or* predicted values are constant over the spots has no correlation:
    r = ρ = NaN (as :func:`scipy.stats.pearsonr` returns), never a crash. Note that ``evaluate``'s
    ``mean_pcc`` scores a constant prediction of a varying gene as 0 instead; the two agree
    wherever both columns vary. Spearman ρ is Pearson r of the ranks (ties get average ranks).
    """
    from scipy.stats import rankdata

    m, p = np.asarray(measured, np.float64), np.asarray(predicted, np.float64)
    genes = list(genes)
    if m.ndim != 2 or m.shape != p.shape or m.shape[1] != len(genes):
        raise AnalysisError(f"measured {m.shape} and predicted {p.shape} must be spots × genes arrays of the same "
                            f"shape over {len(genes)} genes.")
    if len(m):
        r, rho = _pearson_columns(m, p), _pearson_columns(rankdata(m, axis=0), rankdata(p, axis=0))
    else:
        r = rho = np.full(len(genes), np.nan)
    varies = (np.ptp(m, axis=0) > 0) & (np.ptp(p, axis=0) > 0) if len(m) else np.zeros(len(genes), bool)
    return pd.DataFrame({"gene": genes, "pearson_r": np.where(varies, r, np.nan),
                         "spearman_rho": np.where(varies, rho, np.nan), "n_spots": np.full(len(genes), len(m)),
                         "measured_mean": m.mean(axis=0) if len(m) else np.nan,
                         "predicted_mean": p.mean(axis=0) if len(m) else np.nan})[TABLE_COLUMNS]


def _pearson_columns(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a - a.mean(axis=0)
    b = b - b.mean(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        r = (a * b).sum(axis=0) / np.sqrt((a * a).sum(axis=0) * (b * b).sum(axis=0))
    return np.clip(r, -1.0, 1.0)


def compare_section(model, section, *, genes: list[str] | None = None, image: str | Path | None = None,
                    batch_size: int = 32) -> SectionComparison:
    """Predict ``model`` (a :class:`core.engine.modelhub.LoadedModel`) at the spots of ``section``
    (a :class:`~core.training.stdata.SpatialSection`, or a path read with
    :func:`~core.training.stdata.read_section`, ``image`` replacing its image) and compare.

    ``genes`` restricts the table to those genes (in that order); their measured values keep the
    units of the whole shared panel. A gene not shared, or fewer than 3 spots whose patch lies on
    the image, raises :class:`core.errors.AnalysisError` naming them.
    """
    from core.training.evaluation import section_arrays
    from core.training.stdata import read_section
    from core.wsi.slide import Slide

    if not hasattr(section, "counts"):
        section = read_section(section, image=image)
    measured_genes = set(section.counts.var_names)
    _columns([g for g in model.genes if g in measured_genes], genes, section.name)  # a bad gene fails before predicting
    keep, shared, y, pred = section_arrays(model, section, batch_size=batch_size)
    if int(keep.sum()) < 3:
        raise AnalysisError(f"{section.name}: only {int(keep.sum())} of {len(keep)} spots have the model's "
                            f"{model.card['tile_um']:g} µm patch inside {section.image_path.name}; cannot compare.")
    cols = _columns(shared, genes, section.name)
    with Slide(section.image_path, mpp_override=section.mpp) as slide:
        size = tuple(int(v) for v in slide.dimensions)
    measured, predicted = y[:, cols].astype(np.float32), pred[:, cols].astype(np.float32)
    chosen = [shared[j] for j in cols]
    result = SectionComparison(
        section=section.name, layout=section.layout, model=model.key, image_path=str(section.image_path),
        image_size=size, mpp=float(section.mpp), spot_diameter_px=float(section.spot_diameter_um / section.mpp),
        spot_ids=tuple(np.asarray(section.counts.obs_names, str)[keep]), xy=np.asarray(section.xy, float)[keep],
        genes=tuple(chosen), measured=measured, predicted=predicted, table=gene_table(measured, predicted, chosen),
        n_dropped=int((~keep).sum()), missing_genes=tuple(g for g in model.genes if g not in shared),
        in_training=section.name in _training_sections(model.card))
    log.info("%s vs %s: %d spots × %d genes, median r %.3f", section.name, model.key, result.n_spots,
             len(chosen), result.median_r)
    return result


def _training_sections(card: dict) -> set[str]:
    """Section names the model card records as training data (``training_data.sections``)."""
    data = card.get("training_data")
    if isinstance(data, str):       # older cards stored the dict's repr
        import ast

        try:
            data = ast.literal_eval(data)
        except (ValueError, SyntaxError):
            return set()
    sections = data.get("sections") if isinstance(data, dict) else None
    return {str(s) for s in sections} if isinstance(sections, (list, tuple)) else set()


def _columns(shared: list[str], genes: list[str] | None, name: str) -> list[int]:
    if not genes:
        return list(range(len(shared)))
    wanted = list(dict.fromkeys(str(g).strip() for g in genes if str(g).strip()))
    unknown = [g for g in wanted if g not in shared]
    if unknown or not wanted:
        upper = {g.upper(): g for g in shared}
        hint = [f"{g} → {upper[g.upper()]}" for g in unknown if g.upper() in upper]
        raise AnalysisError(f"{name}: {len(unknown)} gene(s) are not both predicted by the model and measured in "
                            f"the section: {', '.join(unknown[:10]) or '(none given)'}"
                            f"{' (did you mean ' + ', '.join(hint[:5]) + '?)' if hint else ''}; "
                            f"{len(shared)} are, e.g. {', '.join(shared[:8])}.")
    return [shared.index(g) for g in wanted]


def section_paths(roots, *, max_depth: int = 4, max_dirs: int = 20000) -> list[Path]:
    """Every section (folder, or ``.h5ad`` when a folder holds several) under ``roots``, without
    reading any: layouts are detected with :func:`core.training.stdata.detect_layout`, symlinked
    folders are not followed, hidden ones are skipped; at most ``max_depth`` levels and
    ``max_dirs`` folders are looked at. An ``.h5ad`` without a whole-slide image beside it (or in
    HEST-1k's ``../wsis``) is no section (e.g. a single-cell reference). Sorted by root, then path.
    """
    from core.training.stdata import detect_layout

    found: dict[Path, None] = {}
    seen = 0
    for root in roots:
        root = Path(root)
        if not root.is_dir():
            continue
        for folder, dirs, _ in os.walk(root):
            seen += 1
            here = Path(folder)
            depth = len(here.relative_to(root).parts)
            dirs[:] = sorted(d for d in dirs if not d.startswith(".")) if depth < max_depth else []
            layout = detect_layout(here)
            if layout is not None:
                dirs[:] = []
                for path in (_hest_files(here) if layout == "hest" else [here]):
                    found.setdefault(path.resolve(), None)
            if seen >= max_dirs:
                log.warning("section search stopped after %d folders under %s", seen, root)
                return list(found)
    return list(found)


def _hest_files(folder: Path) -> list[Path]:
    from core.training.stdata import WSI_SUFFIXES

    files = sorted(folder.glob("*.h5ad"))
    has_wsi = lambda d: any(p.suffix.lower() in WSI_SUFFIXES for p in d.iterdir() if p.is_file())  # noqa: E731
    if not (has_wsi(folder) or ((folder.parent / "wsis").is_dir() and has_wsi(folder.parent / "wsis"))):
        return []
    return files if len(files) > 1 else [folder]


def section_mtime(path: str | Path) -> float:
    """The newest modification time of a section path and (for a folder) the files directly in it,
    so a cache keyed by it notices a rewritten counts table or image."""
    path = Path(path)
    try:
        times = [path.stat().st_mtime]
        if path.is_dir():
            times += [p.stat().st_mtime for p in path.iterdir() if p.is_file()]
        elif path.suffix == ".h5ad":
            times += [p.stat().st_mtime for p in path.parent.iterdir() if p.is_file()]
    except OSError as exc:
        raise SectionFormatError(f"{path}: cannot be read ({exc.strerror or exc}).") from exc
    return max(times)
