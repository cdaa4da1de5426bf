"""Fetches OpenSeadragon (the deep-zoom viewer library) from the npm registry at setup time, checks
the tarball against the registry's published SHA-512 integrity, and unpacks only the built script
and its button images into the viewer component's ``vendor/`` folder (git-ignored).

Nothing is downloaded at run time: the app serves the unpacked files from disk, and without them
the Slide page says how to fetch them (``make setup`` runs this once).

    python -m core.viewer.vendor            # idempotent; exits 0 when already present
"""
from __future__ import annotations

import base64
import hashlib
import io
import sys
import tarfile
import urllib.request
from pathlib import Path

VERSION = "4.1.1"
TARBALL = f"https://registry.npmjs.org/openseadragon/-/openseadragon-{VERSION}.tgz"
# the registry's `dist.integrity` for openseadragon@4.1.1
INTEGRITY = "sha512-owU9gsasAcobLN+LM8lN58Xc2VDSDotY9mkrwS/NB6g9KX/PcusV4RZvhHng2RF/Q0pMziwldf62glwXoGnuzg=="
VENDOR = Path(__file__).resolve().parents[2] / "pages" / "components" / "viewer" / "vendor"
SCRIPT = VENDOR / "openseadragon.min.js"


def present() -> bool:
    return SCRIPT.is_file() and (VENDOR / "VERSION").is_file() and (VENDOR / "VERSION").read_text().strip() == VERSION


def _verify(data: bytes) -> None:
    algo, _, digest = INTEGRITY.partition("-")
    got = base64.b64encode(hashlib.new(algo, data).digest()).decode()
    if got != digest:
        raise RuntimeError(f"openseadragon-{VERSION}.tgz failed its integrity check ({algo}); refusing to unpack it")


def unpack(data: bytes, dest: Path = VENDOR) -> None:
    """Only ``package/build/openseadragon/openseadragon.min.js`` and ``images/*.png``; member names
    are checked so that nothing lands outside ``dest``."""
    _verify(data)
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "images").mkdir(exist_ok=True)
    prefix = "package/build/openseadragon/"
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
        for member in tar.getmembers():
            if not member.isfile() or not member.name.startswith(prefix):
                continue
            rel = member.name[len(prefix):]
            if rel == "openseadragon.min.js" or (rel.startswith("images/") and rel.endswith(".png")
                                                  and "/" not in rel[len("images/"):]):
                target = dest / rel
                target.write_bytes(tar.extractfile(member).read())
    (dest / "LICENSE.txt").write_text(f"OpenSeadragon {VERSION}, BSD-3-Clause, https://openseadragon.github.io/\n")
    (dest / "VERSION").write_text(VERSION + "\n")


def fetch(timeout: float = 60.0) -> None:
    with urllib.request.urlopen(TARBALL, timeout=timeout) as resp:  # noqa: S310 (fixed https URL)
        data = resp.read()
    unpack(data)


def main() -> int:
    if present():
        print(f"OpenSeadragon {VERSION} present in {VENDOR}")
        return 0
    try:
        fetch()
    except (OSError, RuntimeError) as exc:
        print(f"error: could not fetch OpenSeadragon {VERSION} from {TARBALL}: {exc}. The Slide page's viewer "
              "needs it; rerun `make setup` with access to the npm registry.", file=sys.stderr)
        return 2
    print(f"OpenSeadragon {VERSION} unpacked into {VENDOR}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
