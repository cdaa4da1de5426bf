"""Reading what users bring to a cross-modal query: a measured profile (pasted text, a CSV, an
``.h5ad`` with an obs selection) and a patch image with its µm/px.

Everything here is untrusted input (a browser upload or a path typed on a shared server): sizes
are bounded, parse failures become one clear :class:`core.errors.TesseraError`, nothing is
executed, and values must be finite.
"""
from __future__ import annotations

import io
import re
from pathlib import Path

import numpy as np
import pandas as pd

from core.errors import TesseraError

MAX_PROFILE_BYTES = 50 * 2 ** 20          # a profile CSV / pasted text
MAX_H5AD_BYTES = 2 * 2 ** 30              # an AnnData file read for an obs selection (backed)
MAX_IMAGE_PIXELS = 64 * 2 ** 20           # an uploaded patch (PIL's decompression-bomb guard)
_PAIR = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]{0,31})\s*[,;:=\t ]\s*(-?[0-9.eE+-]+)\s*$")


def parse_profile_text(text: str) -> dict[str, float]:
    """``GENE value`` pairs, one per line (comma, tab, space, ``=`` or ``:`` between); a header
    line and blank lines are skipped. Raises with the first bad line's number."""
    if len(text.encode("utf-8", "ignore")) > MAX_PROFILE_BYTES:
        raise TesseraError(f"The profile is larger than {MAX_PROFILE_BYTES // 2**20} MB; give gene, value pairs only.")
    out: dict[str, float] = {}
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        m = _PAIR.match(line)
        if m is None:
            if n == 1 and not out:            # a header such as "gene,value"
                continue
            raise TesseraError(f"Line {n} of the profile is not 'GENE value': {line.strip()[:60]!r}.")
        try:
            value = float(m.group(2))
        except ValueError:
            raise TesseraError(f"Line {n}: {m.group(2)!r} is not a number.") from None
        if not np.isfinite(value):
            raise TesseraError(f"Line {n}: the value of {m.group(1)} is not finite.")
        out[m.group(1)] = value
    if not out:
        raise TesseraError("The profile has no 'GENE value' pair.")
    return out


def read_profile(path: Path, *, obs: str | None = None) -> tuple[dict[str, float], str]:
    """A profile from a CSV/TSV of gene, value pairs, or the mean log1p(CP10k) of the cells an
    ``obs`` selection (``column=value[,value…]``) picks in an ``.h5ad``. Returns (profile, a label
    saying where it came from)."""
    path = Path(path)
    if not path.is_file():
        raise TesseraError(f"No profile file {path}.")
    if path.suffix.lower() == ".h5ad":
        return read_h5ad_profile(path, obs)
    if obs:
        raise TesseraError("--obs selects cells of an .h5ad file; a CSV profile is used as it is.")
    if path.stat().st_size > MAX_PROFILE_BYTES:
        raise TesseraError(f"{path.name} is larger than {MAX_PROFILE_BYTES // 2**20} MB; give gene, value pairs only.")
    return parse_profile_text(path.read_text(errors="replace")), path.name


def parse_selection(obs: str | None) -> tuple[str, list[str]]:
    if not obs or "=" not in obs:
        raise TesseraError("An .h5ad profile needs an obs selection: column=value[,value…] "
                           "(e.g. cell_type=T cells), so the mean of those cells is the query.")
    column, values = obs.split("=", 1)
    wanted = [v.strip() for v in values.split(",") if v.strip()]
    if not column.strip() or not wanted:
        raise TesseraError(f"The obs selection {obs!r} must be column=value[,value…].")
    return column.strip(), wanted


def read_h5ad_profile(path: Path, obs: str | None) -> tuple[dict[str, float], str]:
    """Mean log1p(CP10k) over the selected cells: raw counts (integers) are normalised per cell
    to 10⁴ first; values that are already log-normalised (non-integers) are averaged as they are."""
    import anndata as ad

    column, wanted = parse_selection(obs)
    if path.stat().st_size > MAX_H5AD_BYTES:
        raise TesseraError(f"{path.name} is larger than {MAX_H5AD_BYTES // 2**30} GB.")
    try:
        adata = ad.read_h5ad(path, backed="r")
    except Exception as exc:  # noqa: BLE001 - h5py/anndata raise many kinds for a bad file
        raise TesseraError(f"{path.name} is not a readable .h5ad file ({type(exc).__name__}).") from None
    try:
        if column not in adata.obs.columns:
            raise TesseraError(f"{path.name} has no obs column {column!r}; columns: "
                               f"{', '.join(map(str, adata.obs.columns[:20]))}.")
        mask = adata.obs[column].astype(str).isin(wanted).to_numpy()
        if not mask.any():
            present = adata.obs[column].astype(str).value_counts().index[:20]
            raise TesseraError(f"No cell has {column} in {wanted}; values: {', '.join(present)}.")
        x = adata[mask].to_memory().X
        x = x.toarray() if hasattr(x, "toarray") else np.asarray(x)
        x = np.asarray(x, np.float64)
        if not np.isfinite(x).all() or (x < 0).any():
            raise TesseraError(f"{path.name}: the expression matrix has negative or non-finite values.")
        if np.allclose(x, np.round(x)):
            total = x.sum(axis=1, keepdims=True)
            x = np.log1p(np.divide(x, total, out=np.zeros_like(x), where=total > 0) * 1e4)
        profile = dict(zip(map(str, adata.var_names), x.mean(axis=0).astype(float)))
    finally:
        adata.file.close()
    return profile, f"{path.name}: mean of {int(mask.sum())} cells with {column} in {', '.join(wanted)}"


def read_patch(data: bytes, name: str = "patch") -> tuple[np.ndarray, float | None, str]:
    """An uploaded image → (RGB array, µm/px from its metadata or None, where that came from).

    TIFF: XResolution with ResolutionUnit cm or inch (scanners write pixels per cm/inch at the
    scan's resolution). PNG/JPEG: their dpi only when it is a microscopy resolution (≥ 2,500 dpi,
    i.e. ≤ 10 µm/px): 72/96/300 dpi are screen or print defaults and say nothing about the tissue.
    """
    from PIL import Image, UnidentifiedImageError

    Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS
    try:
        img = Image.open(io.BytesIO(data))
        img.load()
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
        raise TesseraError(f"{name} is not a readable PNG, JPEG or TIFF image ({type(exc).__name__}); "
                           f"images up to {MAX_IMAGE_PIXELS // 2**20} MP are accepted.") from None
    mpp, source = _image_mpp(img)
    rgb = np.asarray(img.convert("RGB"))
    return rgb, mpp, source


def _image_mpp(img) -> tuple[float | None, str]:
    from core.vocab import MPP_MAX, MPP_MIN

    tags = getattr(img, "tag_v2", None)
    if tags is not None and 282 in tags:
        unit = int(tags.get(296, 2))
        res = float(tags[282])
        per_um = {2: 25_400.0, 3: 10_000.0}.get(unit)
        if per_um and res > 0:
            mpp = per_um / res
            if MPP_MIN <= mpp <= MPP_MAX:
                return mpp, f"TIFF resolution tag ({res:g} px per {'inch' if unit == 2 else 'cm'})"
    dpi = img.info.get("dpi")
    if dpi and float(dpi[0]) >= 2_500:
        mpp = 25_400.0 / float(dpi[0])
        if MPP_MIN <= mpp <= MPP_MAX:
            return mpp, f"image dpi ({float(dpi[0]):.0f})"
    return None, "no µm/px in the file"
