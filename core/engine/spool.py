"""The write spool: how prediction jobs hand results to the store without holding its lock.

DuckDB lets one process write a database file, and a writer excludes readers in other processes.
So engines never write the store while they run: each finished *chunk* of a slide's tiles
(a fixed tile-index range) goes to a Parquet file here, written to a temporary name and renamed
(atomic on POSIX); when every chunk of a slide is present, a ``run.json`` marker with the run
record is renamed into place. The store ingests complete runs in one transaction each
(:func:`core.engine.access.ingest_spool`), by whichever process next holds the write lock for a moment:
the CLI between slides, or the app.

Resuming after ``kill -9``: chunks on disk are kept, a half-written chunk is only a ``.tmp`` file
(ignored and removed), so a rerun computes the missing chunks only and every tile lands exactly
once; a run without its marker is never ingested, so no partial slide is ever visible.

Layout: ``<spool>/<run_key>/chunk1024-00000.parquet … run.json``.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

# Tiles per chunk: the unit of resumption. Part of every chunk's file name, so chunks written
# with another size are never mixed in (they are recomputed).
CHUNK_TILES = int(os.environ.get("TESSERA_CHUNK_TILES", "1024"))
OUTPUTS = ("expression", "embedding", "composition")
_MARKER = "run.json"


def spool_dir(store_path: str | Path) -> Path:
    """The spool that belongs to a store file (``store.duckdb`` → ``store.duckdb.spool``)."""
    return Path(str(store_path) + ".spool")


def _atomic_write(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    write(tmp)
    os.replace(tmp, path)


class Spool:
    def __init__(self, root: str | Path):
        self.root = Path(root)

    def _run_dir(self, run_key: str) -> Path:
        return self.root / run_key

    # -- writers ------------------------------------------------------------------------------
    def done_chunks(self, run_key: str) -> set[int]:
        """Chunk numbers already written for ``run_key`` (stale temporary files are removed)."""
        folder = self._run_dir(run_key)
        if not folder.is_dir():
            return set()
        done = set()
        for path in folder.iterdir():
            if path.name.endswith(".tmp"):
                path.unlink(missing_ok=True)
            elif path.name.startswith(f"chunk{CHUNK_TILES}-") and path.suffix == ".parquet":
                done.add(int(path.stem.split("-")[1]))
        return done

    def write_chunk(self, run_key: str, chunk: int, tile_idx: np.ndarray, xy: np.ndarray, tissue: np.ndarray,
                    outputs: dict[str, np.ndarray]) -> None:
        """One chunk: tile indices, level-0 x/y, tissue fraction and the model outputs per tile."""
        folder = self._run_dir(run_key)
        folder.mkdir(parents=True, exist_ok=True)
        table = pa.table({
            "tile_idx": np.asarray(tile_idx, np.int32), "x": np.asarray(xy[:, 0], np.int32),
            "y": np.asarray(xy[:, 1], np.int32), "tissue": np.asarray(tissue, np.float32),
            **{name: _fixed(outputs[name]) for name in OUTPUTS},
            **({"nuclei": _fixed(outputs["nuclei"], np.int16)} if outputs.get("nuclei") is not None else {}),
        })
        _atomic_write(folder / _chunk_name(chunk), lambda p: pq.write_table(table, p))

    def finish(self, run_key: str, record: dict, n_chunks: int) -> None:
        """Mark the run complete (all ``n_chunks`` chunks must be present)."""
        missing = set(range(n_chunks)) - self.done_chunks(run_key)
        if missing:
            raise RuntimeError(f"run {run_key}: chunks {sorted(missing)[:5]} are missing")
        self._run_dir(run_key).mkdir(parents=True, exist_ok=True)
        _atomic_write(self._run_dir(run_key) / _MARKER,
                      lambda p: p.write_text(json.dumps({**record, "n_chunks": n_chunks, "chunk_tiles": CHUNK_TILES})))

    # -- readers ------------------------------------------------------------------------------
    def complete_runs(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.parent.name for p in self.root.glob(f"*/{_MARKER}"))

    def pending_runs(self) -> list[str]:
        """Runs with chunks but no marker (a job running, or interrupted and not yet resumed)."""
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if p.is_dir() and not (p / _MARKER).exists())

    def read_run(self, run_key: str) -> tuple[dict, dict[str, np.ndarray]]:
        """The run record and its tiles' arrays, ordered by tile index."""
        folder = self._run_dir(run_key)
        record = json.loads((folder / _MARKER).read_text())
        size, n_chunks = record.pop("chunk_tiles"), record.pop("n_chunks")
        parts = [pq.read_table(folder / _chunk_name(i, size)) for i in range(n_chunks)]
        table = pa.concat_tables(parts) if parts else None
        if table is None or table.num_rows == 0:
            raise RuntimeError(f"run {run_key} has no tiles in the spool")
        arrays = {name: table.column(name).to_numpy() for name in ("tile_idx", "x", "y", "tissue")}
        for name in OUTPUTS:
            col = table.column(name).combine_chunks()
            arrays[name] = np.asarray(col.flatten(), np.float32).reshape(len(col), -1)
        if "nuclei" in table.column_names:      # per-class nucleus counts (predict --nuclei)
            col = table.column("nuclei").combine_chunks()
            arrays["nuclei"] = np.asarray(col.flatten(), np.int16).reshape(len(col), -1)
        order = np.argsort(arrays["tile_idx"], kind="stable")
        return record, {k: v[order] for k, v in arrays.items()}

    def remove(self, run_key: str) -> None:
        shutil.rmtree(self._run_dir(run_key), ignore_errors=True)


def _chunk_name(chunk: int, size: int = CHUNK_TILES) -> str:
    return f"chunk{size}-{chunk:05d}.parquet"


def _fixed(matrix: np.ndarray, dtype=np.float32) -> pa.FixedSizeListArray:
    matrix = np.ascontiguousarray(matrix, dtype=dtype)
    return pa.FixedSizeListArray.from_arrays(pa.array(matrix.ravel()), matrix.shape[1])
