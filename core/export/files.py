"""Writing export files safely: the output path is checked before any work, and every file is
written to a temporary name in its own folder and renamed into place, so a failed or interrupted
export never leaves a half-written file (and a file already there stays intact until the new one
is complete)."""
from __future__ import annotations

import contextlib
import os
import secrets
from pathlib import Path
from typing import Callable, Iterator

from core.errors import TesseraError


def check_out(path: str | Path, suffixes: tuple[str, ...], *, folder: bool = False) -> Path:
    """``path`` as a writable output: a file ending in one of ``suffixes`` (not a folder), or
    with ``folder`` a folder that exists or can be made. Raises a :class:`TesseraError` naming it."""
    path = Path(path).expanduser()
    if folder:
        if path.exists() and not path.is_dir():
            raise TesseraError(f"--out {path} is a file; several slides are written as one file each into a folder: "
                               "give a folder path.")
        target = path
    else:
        if path.is_dir():
            raise TesseraError(f"--out {path} is a folder; give a file name ending in {' or '.join(suffixes)}.")
        if path.suffix.lower() not in suffixes:
            raise TesseraError(f"--out {path} should end in {' or '.join(suffixes)}.")
        target = path.parent
    try:
        target.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise TesseraError(f"Cannot create the folder {target}: {exc.strerror or exc}. "
                           "Give a path in a writable folder.") from None
    try:    # a real write: os.access says yes to root on read-only mounts and /proc
        probe = _temp_name(target / "probe")
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise TesseraError(f"Cannot write into {target}: {exc.strerror or exc}. Give a path in a writable folder.") from None
    return path


def _temp_name(path: Path) -> Path:
    # same folder (rename stays atomic), same suffix (writers that choose the format by it)
    return path.with_name(f".{path.stem}.{secrets.token_hex(4)}.partial{path.suffix}")


@contextlib.contextmanager
def atomic_paths(paths: list[Path]) -> Iterator[list[Path]]:
    """Temporary paths to write ``paths`` to; on success all are renamed into place together,
    on any error all are removed."""
    temps = [_temp_name(Path(p)) for p in paths]
    try:
        yield temps
        for tmp, final in zip(temps, paths):
            os.replace(tmp, final)
    except OSError as exc:
        _remove(temps)
        raise TesseraError(f"Cannot write {paths[0] if len(paths) == 1 else paths[0].parent}: "
                           f"{exc.strerror or exc}. Give a path in a writable folder with free space.") from None
    except BaseException:
        _remove(temps)
        raise


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """``write(tmp)`` then rename ``tmp`` to ``path``; nothing is left at ``path`` if it fails."""
    path = Path(path)
    with atomic_paths([path]) as (tmp,):
        write(tmp)
    return path


def _remove(paths: list[Path]) -> None:
    for p in paths:
        with contextlib.suppress(FileNotFoundError):
            p.unlink()
