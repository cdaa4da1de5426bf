"""Checks for what comes from a browser: server paths, uploaded file names, text shown as Markdown.

The UI may read only inside the configured data roots (``TESSERA_DATA_ROOTS`` or ``data_roots``
in ``tessera.toml``; by default the demo folder and the project's ``data/``). The CLI, run by a
local user with their own file permissions, is not restricted.
"""
from __future__ import annotations

import re
from pathlib import Path

from core.errors import TesseraError


class PathNotAllowedError(TesseraError):
    """A server path typed in the UI is outside the data roots (or does not exist inside them)."""


def inside_roots(text: str | Path, roots: tuple[Path, ...], *, kind: str = "path", must_exist: bool = True) -> Path:
    """The resolved path (symlinks followed) when it lies inside one of ``roots``; otherwise a
    refusal that names the roots and nothing about the file (not even whether it exists)."""
    raw = str(text or "").strip()
    if not raw:
        raise PathNotAllowedError(f"Give a {kind}.")
    if "\x00" in raw or len(raw) > 4096:
        raise PathNotAllowedError(f"That {kind} is not a valid path.")
    path = Path(raw).expanduser()
    resolved = path.resolve(strict=False)
    allowed = [Path(r).resolve(strict=False) for r in roots]
    if not any(resolved == r or r in resolved.parents for r in allowed):
        shown = ", ".join(str(r) for r in allowed) or "none configured"
        raise PathNotAllowedError(
            f"This server reads only inside its data folders ({shown}); the {kind} you gave is not inside them. "
            "Ask an operator to put the data there or to add its folder to TESSERA_DATA_ROOTS "
            "(or data_roots in tessera.toml).")
    if must_exist and not resolved.exists():
        raise PathNotAllowedError(f"No such {kind} inside the data folders: {md_escape(raw)}.")
    return resolved


_UNSAFE_NAME = re.compile(r"[^A-Za-z0-9._ -]+")


def safe_filename(name: str, *, default: str = "upload") -> str:
    """A file name to store an upload under: the last path component, only letters, digits,
    ``. _ -`` and spaces, no leading dots, at most 120 characters, the suffix kept."""
    base = Path(str(name or "")).name
    base = _UNSAFE_NAME.sub("_", base).strip(" .")
    if not base:
        base = default
    if len(base) > 120:
        stem, dot, suffix = base.rpartition(".")
        base = (stem[: 110] + "." + suffix[:9]) if dot else base[:120]
    return base


_MD_SPECIAL = re.compile(r"([\\`*_{}\[\]()#+\-.!|<>~$:=])")


def md_escape(text: object) -> str:
    """``text`` with every Markdown-active character backslash-escaped, so a name typed by a user
    (a cohort, a gene, a file) renders as itself: no links, images, HTML or formatting injected."""
    return _MD_SPECIAL.sub(r"\\\1", str(text))
