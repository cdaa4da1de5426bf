"""A map figure of one layer on one slide: the thumbnail with the colour-mapped tile grid on top,
a colour bar and a title (slide, layer, units). PNG is drawn with PIL; SVG is written by hand
(the thumbnail embedded as a base64 PNG, one ``<rect>`` per tile, a gradient colour bar), so it
opens in Illustrator/Inkscape with every tile editable.

Colours come from :mod:`core.analysis.overlay` (the viewer's own mapping); ``vmin``/``vmax`` fix the
scale so that several slides or layers export on one colour scale.
"""
from __future__ import annotations

import base64
import math
from pathlib import Path
from xml.sax.saxutils import escape, quoteattr

import numpy as np

from core.errors import TesseraError
from core.export.collect import ExportData, Layer, SlideData

FIGURE_PX = 1024          # long side of the thumbnail in the figure
TITLE_H, BAR_W, PAD = 48, 110, 10


def _range(values: np.ndarray, vmin: float | None, vmax: float | None) -> tuple[float, float]:
    from core.analysis.overlay import value_range

    lo, hi = value_range(values)
    lo = lo if vmin is None else float(vmin)
    hi = hi if vmax is None else float(vmax)
    if not (math.isfinite(lo) and math.isfinite(hi)) or not hi > lo:
        raise TesseraError(f"The colour range must have vmin < vmax; got vmin = {lo:g}, vmax = {hi:g}.")
    return lo, hi


def _title(slide: SlideData, layer: Layer) -> tuple[str, str]:
    return f"{slide.slide_name}", f"{layer.title} · {layer.units}"


def _thumb(slide: SlideData, max_px: int) -> np.ndarray:
    from core.export.anndata_io import thumbnail

    return thumbnail(slide.slide_path, max_px)


def _overlay(slide: SlideData, values: np.ndarray, size: tuple[int, int], lo: float, hi: float, cmap: str,
             opacity: float) -> np.ndarray:
    """RGBA [h, w] of the tile grid scaled onto the thumbnail (cell r, c covers level-0
    ``[c·t, (c+1)·t) × [r·t, (r+1)·t)``)."""
    from PIL import Image

    from core.analysis.overlay import colorize, tile_grid

    w, h = size
    grid = tile_grid(slide.tiles[["x", "y"]].to_numpy(), values, slide.tile_size, slide.width, slide.height)
    rgba = colorize(grid, lo, hi, cmap, alpha=int(round(255 * opacity)))
    rows, cols = grid.shape
    full = (max(1, round(cols * slide.tile_size * w / slide.width)), max(1, round(rows * slide.tile_size * h / slide.height)))
    return np.asarray(Image.fromarray(rgba, "RGBA").resize(full, Image.Resampling.NEAREST))[:h, :w]


def _bar_colors(lo: float, hi: float, cmap: str, n: int) -> np.ndarray:
    from core.analysis.overlay import colorize

    return colorize(np.linspace(lo, hi, n)[None, :], lo, hi, cmap)[0, :, :3]


def _ticks(lo: float, hi: float) -> list[float]:
    return [lo, (lo + hi) / 2, hi]


def figure_png(slide: SlideData, layer: Layer, *, vmin: float | None = None, vmax: float | None = None,
               cmap: str = "viridis", opacity: float = 0.7, max_px: int = FIGURE_PX) -> tuple[bytes, tuple[float, float]]:
    """(PNG bytes, (vmin, vmax) used)."""
    from PIL import Image, ImageDraw, ImageFont

    from core.analysis.overlay import png_bytes

    values = slide.values[layer.column]
    lo, hi = _range(values, vmin, vmax)
    thumb = _thumb(slide, max_px)
    th, tw = thumb.shape[:2]
    over = _overlay(slide, values, (tw, th), lo, hi, cmap, opacity)
    font, small = ImageFont.load_default(size=15), ImageFont.load_default(size=12)
    line1, line2 = _title(slide, layer)
    text_w = int(max(font.getlength(line1), small.getlength(line2))) + 2 * PAD
    width, height = max(tw + BAR_W, text_w), TITLE_H + max(th, 160) + PAD
    canvas = Image.new("RGBA", (width, height), (255, 255, 255, 255))
    base = Image.fromarray(thumb, "RGB").convert("RGBA")
    canvas.paste(Image.alpha_composite(base, Image.fromarray(over, "RGBA")), (0, TITLE_H))
    draw = ImageDraw.Draw(canvas)
    draw.text((PAD, 6), line1, fill=(0, 0, 0), font=font)
    draw.text((PAD, 28), line2, fill=(60, 60, 60), font=small)
    bar_h = min(max(th - 20, 120), 300)
    x0, y0 = tw + 16, TITLE_H + 10
    colors = _bar_colors(lo, hi, cmap, bar_h)[::-1]            # top = vmax
    canvas.paste(Image.fromarray(np.repeat(colors[:, None, :], 18, axis=1).astype(np.uint8), "RGB"), (x0, y0))
    draw.rectangle([x0, y0, x0 + 17, y0 + bar_h - 1], outline=(80, 80, 80))
    for v in _ticks(lo, hi):
        y = y0 + round((hi - v) / (hi - lo) * (bar_h - 1))
        draw.line([x0 + 18, y, x0 + 22, y], fill=(80, 80, 80))
        draw.text((x0 + 25, y - 7), f"{v:.3g}", fill=(0, 0, 0), font=small)
    return png_bytes(np.asarray(canvas)), (lo, hi)


def _png_b64(rgb: np.ndarray) -> str:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(rgb, "RGB").save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def figure_svg(slide: SlideData, layer: Layer, *, vmin: float | None = None, vmax: float | None = None,
               cmap: str = "viridis", opacity: float = 0.7, max_px: int = FIGURE_PX) -> tuple[bytes, tuple[float, float]]:
    """(SVG bytes, (vmin, vmax) used): the thumbnail as an embedded image, a ``<rect>`` per tile
    (``data-tile`` = tile index, ``data-value`` = its value), a gradient colour bar."""
    from core.analysis.overlay import colorize

    values = slide.values[layer.column]
    lo, hi = _range(values, vmin, vmax)
    thumb = _thumb(slide, max_px)
    th, tw = thumb.shape[:2]
    sx, sy = tw / slide.width, th / slide.height
    line1, line2 = _title(slide, layer)
    width = max(tw + BAR_W, int(8.5 * max(len(line1), len(line2))) + 2 * PAD)
    height = TITLE_H + max(th, 160) + PAD
    fills = colorize(values[None, :].astype(np.float64), lo, hi, cmap)[0]
    ts = slide.tile_size
    rects = [f'<rect data-tile="{int(i)}" data-value="{v:.6g}" x="{x * sx:.2f}" y="{y * sy:.2f}" '
             f'width="{ts * sx:.2f}" height="{ts * sy:.2f}" fill="#{c[0]:02x}{c[1]:02x}{c[2]:02x}"/>'
             for i, x, y, v, c in zip(slide.tiles["tile_idx"], slide.tiles["x"], slide.tiles["y"], values, fills)
             if np.isfinite(v)]
    bar_h = min(max(th - 20, 120), 300)
    x0, y0 = tw + 16, TITLE_H + 10
    stops = "".join(f'<stop offset="{k / 15:.4f}" stop-color="#{c[0]:02x}{c[1]:02x}{c[2]:02x}"/>'
                    for k, c in enumerate(_bar_colors(lo, hi, cmap, 16)[::-1]))
    ticks = "".join(
        f'<line x1="{x0 + 18}" x2="{x0 + 22}" y1="{y:.1f}" y2="{y:.1f}" stroke="#505050"/>'
        f'<text x="{x0 + 25}" y="{y + 4:.1f}" font-size="12">{v:.3g}</text>'
        for v in _ticks(lo, hi) for y in [y0 + (hi - v) / (hi - lo) * bar_h])
    svg = (f'<svg xmlns="http://www.w3.org/2000/svg" xmlns:xlink="http://www.w3.org/1999/xlink" '
           f'width="{width}" height="{height}" viewBox="0 0 {width} {height}" font-family="sans-serif">'
           f'<rect width="100%" height="100%" fill="#ffffff"/>'
           f'<text x="{PAD}" y="20" font-size="15">{escape(line1)}</text>'
           f'<text x="{PAD}" y="40" font-size="12" fill="#3c3c3c">{escape(line2)}</text>'
           f'<g transform="translate(0,{TITLE_H})">'
           f'<image x="0" y="0" width="{tw}" height="{th}" preserveAspectRatio="none" '
           f'xlink:href="data:image/png;base64,{_png_b64(thumb)}"/>'
           f'<g id="tiles" opacity="{opacity:.3g}" shape-rendering="crispEdges">{"".join(rects)}</g></g>'
           f'<defs><linearGradient id="bar" x1="0" y1="0" x2="0" y2="1">{stops}</linearGradient></defs>'
           f'<rect x="{x0}" y="{y0}" width="18" height="{bar_h}" fill="url(#bar)" stroke="#505050"/>'
           f'{ticks}<title>{escape(line1)} {escape(line2)}</title>'
           f'<desc>{escape(layer.column)}: vmin {lo:.6g}, vmax {hi:.6g}, colour map {quoteattr(cmap)[1:-1]}</desc></svg>')
    return svg.encode("utf-8"), (lo, hi)


def write_figure(data: ExportData, path: Path, fmt: str, **options) -> tuple[float, float]:
    """The figure of ``data``'s single slide and single layer to ``path``; returns (vmin, vmax)."""
    if len(data.slides) != 1 or len(data.layers) != 1:
        raise TesseraError(f"A {fmt.upper()} figure shows one layer of one slide; got {len(data.slides)} slide(s) "
                           f"and {len(data.layers)} layer(s). Give one --slide and one --layers value.")
    make = figure_png if fmt == "png" else figure_svg
    content, used = make(data.slides[0], data.layers[0], **options)
    Path(path).write_bytes(content)
    return used
