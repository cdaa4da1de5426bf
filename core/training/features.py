"""Encoder features of every spot under several *views*, computed once and cached per section.

A view is a way of looking at a spot:
- ``base``: the ``tile_um`` square centred on the spot, at the encoder's input size;
- ``dihedral``: the 8 flips/rotations of that square (H&E has no orientation), for augmentation
  while training and for test-time averaging;
- ``stain``: ``STAIN_VIEWS`` HED-jittered copies of it (:func:`core.wsi.stain.stain_jitter`,
  a fixed seed per section), for stain augmentation;
- ``context``: a square ``CONTEXT_SCALE`` × larger around the spot (the tissue the spot sits in),
  at the same input size; read off the image edge as white glass.

Each view holds ``pooled`` [V, N, C] float32 and ``tokens`` [V, N, T, C] float16 (the encoder's
final feature map), V = 1, 8 or ``STAIN_VIEWS``. Spots whose base square leaves the image are
dropped in every view alike (the same ``keep`` as :func:`core.training.stdata.section_patches`).
"""
from __future__ import annotations

import hashlib
import logging
import time
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)
VIEWS = ("base", "dihedral", "stain", "context")
CONTEXT_SCALE = 3.0
STAIN_VIEWS = 4
FEATURES_VERSION = "f1"


def view_patches(section, view: str, *, tile_um: float, px: int, seed: int = 0) -> np.ndarray:
    """uint8 patches [V, N_kept, px, px, 3] of one view of every kept spot."""
    from core.training.stdata import section_patches

    if view not in VIEWS:
        raise ValueError(f"unknown view {view!r}; one of {', '.join(VIEWS)}")
    mpp = tile_um / px
    base, keep = section_patches(section, tile_um=tile_um, mpp=mpp, out_px=px)
    if view == "base":
        return base[None]
    if view == "dihedral":
        views = []
        for k in range(8):
            x = np.flip(base, axis=2) if k >= 4 else base
            views.append(np.rot90(x, k % 4, axes=(1, 2)))
        return np.ascontiguousarray(np.stack(views))
    if view == "stain":
        from core.wsi.stain import stain_jitter

        rng = np.random.default_rng([seed, int(hashlib.blake2b(section.name.encode(), digest_size=4).hexdigest(), 16)])
        return np.stack([stain_jitter(base, rng) for _ in range(STAIN_VIEWS)])
    return _context_patches(section, keep, tile_um * CONTEXT_SCALE, px)[None]


def _context_patches(section, keep: np.ndarray, size_um: float, px: int) -> np.ndarray:
    from core.wsi.slide import Slide

    size = int(round(size_um / section.mpp))
    top_left = np.round(section.xy[keep] - size / 2).astype(np.int64)
    out = np.empty((len(top_left), px, px, 3), np.uint8)
    with Slide(section.image_path, mpp_override=section.mpp) as slide:
        for i, (x, y) in enumerate(top_left):   # off the image reads as white glass (OpenSlide)
            out[i] = slide.read_region((int(x), int(y)), size, px)
    return out


def encode(spec, patches: np.ndarray, *, batch_size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """(pooled [N, C] float32, tokens [N, T, C] float16) of uint8 patches [N, px, px, 3]."""
    import torch

    from models.scist import TesseraModel

    wrapper = TesseraModel(spec, torch.nn.Identity()).eval()   # only for its preprocessing
    pooled, tokens = [], []
    with torch.inference_mode():
        for i in range(0, len(patches), batch_size):
            x = wrapper.preprocess(torch.from_numpy(np.ascontiguousarray(patches[i:i + batch_size])))
            t = spec.module.tokens(x).float()
            tokens.append(t.half().numpy())
            pooled.append(t.mean(dim=1).numpy())
    return np.concatenate(pooled), np.concatenate(tokens)


def section_views(sections, view: str, *, encoder: str, tile_um: float, px: int | None = None,
                  cache_dir: Path, encoder_weights: str | Path | None = None, batch_size: int = 32,
                  keep_tokens: bool = True) -> list[dict]:
    """``[{"pooled": [V,N,C], "tokens": [V,N,T,C] | None}]`` per section, cached on disk by
    section, image, encoder (and its weights file), tiling, input size and view."""
    from models.encoders import create_encoder

    spec = None
    out = []
    for section in sections:
        weights = f"{Path(encoder_weights).resolve()}:{Path(encoder_weights).stat().st_mtime_ns}" if encoder_weights else ""
        key = hashlib.blake2b(f"{FEATURES_VERSION}|{section.name}|{section.image_path}|{len(section)}|{encoder}|{weights}|"
                              f"{tile_um}|{px}|{view}".encode(), digest_size=8).hexdigest()
        cache = Path(cache_dir) / f"{section.name}-{view}-{key}.npz"
        if cache.is_file():
            data = dict(np.load(cache))
        else:
            spec = spec or create_encoder(encoder, weights_path=encoder_weights)
            size = int(px or spec.native_px or 224)
            started = time.perf_counter()
            patches = view_patches(section, view, tile_um=tile_um, px=size)
            encoded = [encode(spec, v, batch_size=batch_size) for v in patches]
            data = {"pooled": np.stack([e[0] for e in encoded]), "tokens": np.stack([e[1] for e in encoded])}
            cache.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache.with_suffix(".tmp.npz")
            np.savez(tmp, **data)
            tmp.replace(cache)
            log.info("%s/%s/%s: %d × %d patches encoded in %.0f s", section.name, encoder, view, *patches.shape[:2],
                     time.perf_counter() - started)
        out.append({"pooled": data["pooled"], "tokens": data["tokens"] if keep_tokens else None})
    return out
