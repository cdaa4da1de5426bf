"""Spatial-domain fits in the store (mixed into :class:`core.store.db.Store`).

One fit per (cohort, model): what :func:`core.analysis.domains.fit_domains` computed, stored so that
readers (opened read-only) can label any slide on demand without refitting.

- ``domain_fits``: the fit's parameters (JSON), the run keys it was fitted on, the genes, the
  standardisation (centre, scale), the PCA components and the domain centroids (flattened DOUBLE
  arrays, shapes in ``params``), the domain labels and their description (names, shares,
  markers, composition; JSON).
- ``domain_sample``: the tiles the fit was computed on (run_key, tile_idx) with their domain.

A refit **replaces** the cohort's fit for that model (both tables, one transaction): old fits are
not kept; ``fitted_at`` and ``run_keys`` say what the current one was made from.
The statistics are computed in :mod:`core.analysis.domains`; this module only stores them.
"""
from __future__ import annotations

import json

import numpy as np
import pandas as pd

from core.errors import StoreError

# Executed by core.store.schema.migrate with the rest of the schema (a writer creates the tables
# in older stores; readers check for them first).
DOMAIN_SCHEMA = """
CREATE TABLE IF NOT EXISTS domain_fits (
    cohort VARCHAR, model_key VARCHAR, method VARCHAR, params JSON, run_keys VARCHAR[], genes VARCHAR[],
    center DOUBLE[], scale DOUBLE[], components DOUBLE[], centroids DOUBLE[], labels VARCHAR[],
    description JSON, fitted_at TIMESTAMP, PRIMARY KEY (cohort, model_key));
CREATE TABLE IF NOT EXISTS domain_sample (
    cohort VARCHAR, model_key VARCHAR, run_key VARCHAR, tile_idx INTEGER, domain VARCHAR);
"""
_ARRAYS = ("center", "scale", "components", "centroids")


class DomainTables:
    """Writes and reads of ``domain_fits`` / ``domain_sample`` over ``self.con``."""

    con: object
    read_only: bool

    def save_domain_fit(self, cohort: str, model_key: str, record: dict, sample: pd.DataFrame) -> None:
        """Replace the cohort's domain fit for ``model_key``. ``record``: method, params (dict),
        run_keys, genes, labels, description (dict) and the float arrays center, scale,
        components [P, G], centroids [K, F]; ``sample``: run_key, tile_idx, domain."""
        if self.read_only:
            raise StoreError("The store is open read-only; open it for writing to save a domain fit.")
        if cohort not in self.cohorts():
            raise StoreError(f"No cohort named {cohort!r} in {self.path}; import it first.")
        arrays = {k: np.asarray(record[k], dtype=np.float64) for k in _ARRAYS}
        params = {**record["params"], "shapes": {k: list(v.shape) for k, v in arrays.items()}}
        rows = sample[["run_key", "tile_idx", "domain"]].assign(cohort=cohort, model_key=model_key)
        rows = rows[["cohort", "model_key", "run_key", "tile_idx", "domain"]].astype({"tile_idx": "int32"})
        con = self.con
        con.execute("BEGIN")
        try:
            con.execute("DELETE FROM domain_fits WHERE cohort=? AND model_key=?", [cohort, model_key])
            con.execute("DELETE FROM domain_sample WHERE cohort=? AND model_key=?", [cohort, model_key])
            con.execute("INSERT INTO domain_fits VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, now())",
                        [cohort, model_key, record["method"], json.dumps(params), list(record["run_keys"]),
                         list(record["genes"]), *(arrays[k].ravel().tolist() for k in _ARRAYS),
                         list(record["labels"]), json.dumps(record["description"])])
            con.register("_domain_sample", rows)
            con.execute("INSERT INTO domain_sample SELECT * FROM _domain_sample")
            con.execute("COMMIT")
        except Exception:
            con.execute("ROLLBACK")
            raise
        finally:
            con.unregister("_domain_sample")

    def domain_fit(self, cohort: str, model_key: str) -> dict | None:
        """The stored fit as saved (arrays reshaped, ``fitted_at`` as text), or None."""
        if not self._has_table("domain_fits"):       # a read-only store no writer has opened since
            return None
        row = self.con.execute(
            "SELECT method, params, run_keys, genes, center, scale, components, centroids, labels, description, "
            "fitted_at FROM domain_fits WHERE cohort=? AND model_key=?", [cohort, model_key]).fetchall()
        if not row:
            return None
        method, params, run_keys, genes, *flat, labels, description, fitted_at = row[0]
        params = json.loads(params)
        shapes = params.pop("shapes")
        arrays = {k: np.asarray(v, dtype=np.float64).reshape(shapes[k]) for k, v in zip(_ARRAYS, flat)}
        return {"method": method, "params": params, "run_keys": list(run_keys), "genes": list(genes), **arrays,
                "labels": list(labels), "description": json.loads(description), "fitted_at": str(fitted_at)}

    def domain_sample(self, cohort: str, model_key: str) -> pd.DataFrame:
        """run_key, tile_idx, domain of the tiles the current fit was computed on."""
        if not self._has_table("domain_sample"):
            return pd.DataFrame(columns=["run_key", "tile_idx", "domain"])
        return self.con.execute("SELECT run_key, tile_idx, domain FROM domain_sample WHERE cohort=? AND model_key=? "
                                "ORDER BY run_key, tile_idx", [cohort, model_key]).df()

    def domain_fits(self, cohort: str) -> pd.DataFrame:
        """model_key, method, n_domains, fitted_at of every domain fit of the cohort (oldest first)."""
        if not self._has_table("domain_fits"):
            return pd.DataFrame(columns=["model_key", "method", "n_domains", "fitted_at"])
        return self.con.execute("SELECT model_key, method, len(labels) AS n_domains, fitted_at FROM domain_fits "
                                "WHERE cohort=? ORDER BY fitted_at", [cohort]).df()
