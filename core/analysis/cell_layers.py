"""A cells run's cells with names and values: what the Slide page's cell layer, the cell
biomarkers and the cell exports read (one function, so all three agree).

Values are computed from the stored factors (:func:`core.analysis.cells.cell_values`): the cell's
type, its tile's NNLS weights and normalisers and the tile's stored prediction.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from core.errors import TesseraError
from core.store.db import Store


@dataclass(frozen=True)
class RunCells:
    """The cells of one run: ``frame`` (tile_idx, x, y in level-0 px, outline, morphology,
    ``cell_type`` as a name, ``confidence``) and, per requested gene, a column ``gene:<name>``."""

    run_key: str
    cell_types: list[str]
    frame: pd.DataFrame

    def __len__(self) -> int:
        return len(self.frame)


def no_cells_message(slide: str = "this slide") -> str:
    return (f"No cells for {slide}: predict with cells (`python -m core.cli predict --cohort … --cells`, or "
            "tick 'Find cells' on the Predictions page).")


def run_cells(store: Store, model_key: str, run_key: str, genes: list[str] | tuple = (), *,
              columns: list[str] | None = None, bounds: tuple[float, float, float, float] | None = None,
              residual: bool = True) -> RunCells:
    """The run's cells with ``genes``' values (log1p CP10k). Raises :class:`TesseraError` with
    what to do when the run has no cells or a gene is not in the model's panel."""
    if not store.has_cells(run_key):
        raise TesseraError(no_cells_message())
    info = store.model_info(model_key)
    unknown = [g for g in genes if g not in info.genes]
    if unknown:
        raise TesseraError(f"{', '.join(unknown[:5])}: not in the model's panel of {len(info.genes)} genes.")
    cols = None if columns is None else list(dict.fromkeys([*columns, "cell_type"]))
    frame = store.run_cells(run_key, cols, bounds=bounds)
    types = list(info.cell_types)
    codes = frame["cell_type"].to_numpy(np.int64)
    if genes:
        profiles = store.model_profiles(model_key)
        if profiles is None:
            raise TesseraError(f"The store has no reference profiles for {model_key}; predict its cells again.")
        w, z = store.cell_factors(run_key)
        tiles, matrix, _ = store.run_expression(model_key, run_key, list(genes))
        tile_expr = np.zeros((len(w), len(genes)))
        tile_expr[tiles["tile_idx"].to_numpy(np.int64)] = matrix
        gi = np.array([info.genes.index(g) for g in genes])
        from core.analysis.cells import cell_values

        values = cell_values(gi, codes, frame["tile_idx"].to_numpy(np.int64), w, z, tile_expr,
                             profiles.loc[types, info.genes].to_numpy(), residual=residual)
        for j, g in enumerate(genes):
            frame[f"gene:{g}"] = values[:, j].astype(np.float32)
    frame["cell_type"] = pd.Categorical.from_codes(codes, categories=types)
    return RunCells(run_key, types, frame)
