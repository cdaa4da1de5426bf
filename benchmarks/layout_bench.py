"""Gene-per-column vs a long table, measured on the same predictions (issue 5: "measure, then choose").

``python -m benchmarks.layout_bench [--path DIR] [--slides 100] [--reps 30]``

Takes the first ``--slides`` runs of the simulated store that ``benchmarks.store_bench`` filled
(``DIR/store.duckdb``) and writes them, in two scratch DuckDB files (deleted at the end), in two layouts:

- wide: what ``core.store.db`` uses, ``(run_id, tile_idx, x, y, <one REAL column per gene>)``;
- long: ``(run_id, tile_idx, gene_id SMALLINT, value REAL)``, rows in the order an engine writes
  them (run, tile, gene), plus a ``genes`` lookup table.

Then times the two page queries that read predictions, on each: the heatmap (one gene of one
slide, with x/y) and the cohort top-24 of one gene over every run; prints p50/p95 and the size of
each layout. This module only reads the product's store file and builds scratch tables; the
product itself keeps all SQL in ``core/store/db.py``.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np


def _timed(con, calls: list[tuple[str, list]], budget_s: float) -> list[float]:
    """Time each (sql, params) call after one untimed warm-up; stop early past ``budget_s``."""
    con.execute(*calls[0]).fetchall()
    out, t0 = [], time.perf_counter()
    for sql, params in calls:
        t = time.perf_counter()
        con.execute(sql, params).fetchall()
        out.append((time.perf_counter() - t) * 1000)
        if time.perf_counter() - t0 > budget_s and len(out) >= 5:
            break
    return out


def main(argv=None) -> None:
    import duckdb

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--path", type=Path, default=Path("/tmp/tessera-bench"))
    ap.add_argument("--slides", type=int, default=100)
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--budget", type=float, default=60.0)
    args = ap.parse_args(argv)
    source = args.path / "store.duckdb"
    files = {name: args.path / f"layout-{name}.duckdb" for name in ("wide", "long")}
    for f in files.values():
        f.unlink(missing_ok=True)
    con = duckdb.connect(config={"memory_limit": "6GB"})
    con.execute(f"ATTACH '{source}' AS src (READ_ONLY)")
    for name, f in files.items():
        con.execute(f"ATTACH '{f}' AS {name}db")
    table, genes = con.execute("SELECT pred_table, genes FROM src.models LIMIT 1").fetchone()
    n = args.slides
    t = time.perf_counter()
    con.execute(f"CREATE TABLE widedb.wide AS SELECT * FROM src.{table} WHERE run_id <= {n} ORDER BY run_id, tile_idx")
    wide_s = time.perf_counter() - t
    con.execute("CREATE TABLE longdb.genes AS SELECT unnest(?::VARCHAR[]) AS gene, "
                "unnest(generate_series(0, ?))::SMALLINT AS gene_id", [genes, len(genes) - 1])
    cols = ", ".join(f'"{g}"' for g in genes)
    t = time.perf_counter()
    con.execute(f"""CREATE TABLE longdb.long AS
        SELECT u.run_id, u.tile_idx, g.gene_id, u.value
        FROM (UNPIVOT (SELECT run_id, tile_idx, {cols} FROM widedb.wide) ON {cols} INTO NAME gene VALUE value) u
        JOIN longdb.genes g USING (gene) ORDER BY u.run_id, u.tile_idx, g.gene_id""")
    long_s = time.perf_counter() - t
    con.execute("CREATE TABLE longdb.tiles AS SELECT run_id, tile_idx, x, y FROM widedb.wide")
    con.execute("DETACH src")
    for name in files:
        con.execute(f"DETACH {name}db")
    sizes = {name: f.stat().st_size for name, f in files.items()}
    con.execute(f"ATTACH '{files['wide']}' AS widedb (READ_ONLY)")
    con.execute(f"ATTACH '{files['long']}' AS longdb (READ_ONLY)")
    con.execute("USE widedb")
    rows = {"wide": con.execute("SELECT count(*) FROM widedb.wide").fetchone()[0],
            "long": con.execute("SELECT count(*) FROM longdb.long").fetchone()[0]}

    rng = np.random.default_rng(0)
    picks = [(int(rng.integers(1, n + 1)), int(rng.integers(len(genes)))) for _ in range(args.reps)]
    res = {
        "heatmap, wide": [(f'SELECT tile_idx, x, y, "{genes[g]}" FROM widedb.wide WHERE run_id = ? ORDER BY tile_idx', [r])
                          for r, g in picks],
        "heatmap, long (+ join tiles for x/y)": [
            ("SELECT l.tile_idx, t.x, t.y, l.value FROM longdb.long l JOIN longdb.tiles t USING (run_id, tile_idx) "
             "WHERE l.run_id = ? AND l.gene_id = ? ORDER BY l.tile_idx", [r, g]) for r, g in picks],
        "heatmap, long (value only)": [
            ("SELECT tile_idx, value FROM longdb.long WHERE run_id = ? AND gene_id = ? ORDER BY tile_idx", [r, g])
            for r, g in picks],
        f"top-24, wide ({n} runs)": [
            (f'SELECT run_id, tile_idx, "{genes[g]}" AS v FROM widedb.wide ORDER BY v DESC LIMIT 24', [])
            for _, g in picks[:10]],
        f"top-24, long ({n} runs)": [
            ("SELECT run_id, tile_idx, value FROM longdb.long WHERE gene_id = ? ORDER BY value DESC LIMIT 24", [g])
            for _, g in picks[:10]],
    }
    res = {name: _timed(con, calls, args.budget) for name, calls in res.items()}
    con.close()

    print(f"layout_bench: {n} slides, {rows['wide']:,} tiles x {len(genes)} genes "
          f"(long table {rows['long']:,} rows); built wide in {wide_s:.0f} s, long in {long_s:.0f} s")
    print(f"file size: wide {sizes['wide'] / 2**20:.0f} MiB, long {sizes['long'] / 2**20:.0f} MiB "
          "(long includes a tiles table for x/y)")
    print(f"{'query':44s} {'n':>4s} {'p50 ms':>9s} {'p95 ms':>9s}")
    for name, ms in res.items():
        print(f"{name:44s} {len(ms):4d} {np.percentile(ms, 50):9.1f} {np.percentile(ms, 95):9.1f}")
    for f in files.values():
        f.unlink(missing_ok=True)


if __name__ == "__main__":
    main()
