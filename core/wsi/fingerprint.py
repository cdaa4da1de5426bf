"""Content fingerprints of slide files: the cache key of every prediction run."""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Protocol


class FingerprintMemo(Protocol):
    """Where fingerprints are remembered by (path, size, mtime) — the store implements it."""

    read_only: bool

    def cached_fingerprint(self, path: str, size: int, mtime_ns: int) -> str | None: ...

    def remember_fingerprint(self, path: str, size: int, mtime_ns: int, fingerprint: str) -> None: ...


def file_fingerprint(path: str | Path, *, chunk: int = 1 << 22) -> str:
    """Content hash (BLAKE2b-128) of the whole file: moving a slide keeps it, editing changes it."""
    digest = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def fingerprint(memo: FingerprintMemo, path: str | Path) -> str:
    """Content fingerprint, memoised by (path, size, mtime) so an unchanged file is not hashed again."""
    path = Path(path).resolve()
    st = path.stat()
    cached = memo.cached_fingerprint(str(path), st.st_size, st.st_mtime_ns)
    if cached:
        return cached
    fp = file_fingerprint(path)
    if not memo.read_only:
        memo.remember_fingerprint(str(path), st.st_size, st.st_mtime_ns, fp)
    return fp
