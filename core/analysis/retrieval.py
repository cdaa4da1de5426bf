"""Cross-modal retrieval over a cohort's tiles: one function for the page and the CLI.

Queries (:class:`Query`): a gene, a signature, a measured profile (gene → value pairs), a tile of
a slide, or an uploaded patch (its model outputs). Spaces (:data:`SPACES`), each with its score:

- ``predicted``: the stored predictions. A gene or signature ranks tiles by the predicted value
  (log1p CP10k; a signature by its score, :mod:`core.analysis.signature_scores`): "highest
  predicted". A profile or a tile ranks tiles by the *z-projection*
  ``score = (1/G) Σ_g z_q,g · (ŷ_g − μ_g) / σ_g`` over the query's genes (for a tile or patch: its
  :data:`PROFILE_GENES` genes furthest from the cohort), with z_q,g = (q_g − μ_g) / σ_g and μ, σ
  the cohort's tile mean and standard deviation of each gene: positive where a tile deviates from
  the cohort the way the query does ("by predicted profile").
- ``image``: the model's tile embedding (cosine, through the vector index): "by image".
- ``joint``: the joint image ↔ expression space (:mod:`models.joint`; cosine between the query's
  embedding and the tiles' image embeddings): "closest in the joint space". A profile is embedded
  by the expression tower (genes it lacks at the training mean); a gene or signature by its
  prototype profile (the mean training profile of the spots in the gene's top decile; a
  signature: the mean of its genes' prototypes, :mod:`models.joint`); a tile or patch by the image
  tower.

Results are capped per slide and per patient (diversity), optionally restricted to patients in a
clinical group, and can be the bottom k (``lowest``) for contrast. Each result carries its slide,
patient, tile, level-0 x/y and score; :func:`result_composition` compares the results' predicted
cell-type composition with the cohort's.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from core.errors import TesseraError

SPACES = {"predicted": "the stored predicted expression",
          "image": "the model's image embedding of each tile",
          "joint": "the joint image ↔ expression space (contrastive projections)"}
FOUND_BY = {"predicted": "highest predicted", "image": "by image", "joint": "closest in the joint space"}
PROFILE_GENES = 50           # a tile/patch query in the predicted space uses its 50 most deviating genes
MAX_FETCH = 20_000           # over-fetch ceiling when caps or a group filter drop candidates


@dataclass
class Query:
    """What is asked. ``kind``: gene | signature | profile | tile | patch."""

    kind: str
    genes: list[str] = field(default_factory=list)     # gene (one) / signature (its genes or library name)
    signature: str | None = None                        # a signature spec (library name or typed genes)
    profile: dict[str, float] | None = None             # gene → value (log1p CP10k)
    slide: str | None = None                            # tile: slide name and tile index
    tile: int | None = None
    patch: dict | None = None                           # patch: {"expression": Series, "embedding", "joint"}
    label: str = ""

    def describe(self) -> dict:
        out = {"kind": self.kind}
        if self.kind == "gene":
            out["gene"] = self.genes[0]
        elif self.kind == "signature":
            out["signature"] = self.signature
        elif self.kind == "profile":
            out["n_genes"] = len(self.profile or {})
            out["label"] = self.label
        elif self.kind == "tile":
            out.update(slide=self.slide, tile=self.tile)
        elif self.kind == "patch":
            out["label"] = self.label
        return out


@dataclass
class Retrieval:
    query: dict
    space: str
    found_by: str
    score: str                      # what the score column means
    results: pd.DataFrame           # rank, slide, patient, tile, x, y, score, run_key, tile_size, slide_path
    n_slides: int                   # slides searched (after the group filter)
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        cols = ["rank", "slide", "patient", "tile", "x", "y", "score"]
        rows = [{c: (r[c].item() if hasattr(r[c], "item") else r[c]) for c in cols}
                for r in self.results[cols].to_dict("records")]
        return {"query": self.query, "space": self.space, "found_by": self.found_by, "score": self.score,
                "n_slides": self.n_slides, "notes": self.notes, "results": rows}


def default_space(query: Query) -> str:
    return {"gene": "predicted", "signature": "predicted", "profile": "joint", "tile": "image",
            "patch": "image"}[query.kind]


def searched_runs(store, cohort: str, model_key: str, where: dict[str, list[str]] | None = None) -> pd.DataFrame:
    """The cohort's slides with a run of the model, restricted to patients whose clinical
    ``column`` is one of the given values for every ``where`` entry."""
    runs = store.cohort_runs(cohort, model_key).dropna(subset=["run_key"])
    if where:
        from core.analysis.variables import clinical_column

        clinical = store.clinical(cohort)
        keep = None
        for column, values in where.items():
            col = clinical_column(clinical, column)
            wanted = {str(v) for v in values}
            present = set(col.dropna().astype(str))
            unknown = sorted(wanted - present)
            if unknown:
                raise TesseraError(f"{column}: no patient has {', '.join(unknown)}; values: "
                                   f"{', '.join(sorted(present)[:20])}.")
            ids = set(col[col.astype(str).isin(wanted)].index)
            keep = ids if keep is None else keep & ids
        runs = runs[runs["patient"].isin(keep or set())]
    return runs


def retrieve(store, cohort: str, model_key: str, query: Query, *, space: str | None = None, k: int = 24,
             lowest: bool = False, per_slide: int | None = None, per_patient: int | None = None,
             where: dict[str, list[str]] | None = None, joint=None, method: str | None = None) -> Retrieval:
    """The ``k`` tiles of the cohort for ``query`` in ``space`` (module docstring). ``joint``: the
    model's :class:`models.joint.JointSpace` (needed for the joint space with a profile, gene or
    signature query). ``method``: a signature's scoring method."""
    space = space or default_space(query)
    if space not in SPACES:
        raise TesseraError(f"--space must be one of {', '.join(SPACES)}, not {space!r}.")
    if not 1 <= int(k) <= 500:
        raise TesseraError(f"k must be between 1 and 500, not {k}.")
    if space == "image" and query.kind not in ("tile", "patch"):
        raise TesseraError("The image space needs an image query (a tile or a patch); for a gene, signature or "
                           "profile use the predicted or the joint space.")
    runs = searched_runs(store, cohort, model_key, where)
    if runs.empty:
        raise TesseraError("No predicted slide matches" + (" the clinical filter." if where else " in this cohort."))
    run_keys = list(runs["run_key"])
    patient_of = dict(zip(runs["run_key"], runs["patient"]))
    notes: list[str] = []
    fetch, score = _searcher(store, model_key, query, space, run_keys, lowest, joint, method, notes)
    capped = per_slide is not None or per_patient is not None
    n = k if not capped else 4 * k
    while True:
        found = fetch(n)
        found = found.assign(patient=found["run_key"].map(patient_of))
        kept = _cap(found, per_slide, per_patient)
        if len(kept) >= k or len(found) < n or n >= MAX_FETCH:
            break
        n = min(MAX_FETCH, n * 4)
    kept = kept.head(k).reset_index(drop=True)
    results = pd.DataFrame({"rank": np.arange(1, len(kept) + 1), "slide": kept["slide_name"],
                            "patient": kept["patient"], "tile": kept["tile_idx"].astype(int),
                            "x": kept["x"].astype(int), "y": kept["y"].astype(int),
                            "score": kept["score"].astype(float), "run_key": kept["run_key"],
                            "tile_size": kept["tile_size"].astype(int), "slide_path": kept["slide_path"]})
    if capped and len(results) < k:
        notes.append(f"{len(results)} tiles pass the caps (per slide {per_slide}, per patient {per_patient}).")
    found_by = ("lowest predicted" if lowest and space == "predicted" else
                "farthest in the joint space" if lowest else FOUND_BY[space])
    if space == "predicted" and query.kind in ("profile", "tile", "patch"):
        found_by = "by predicted profile" if not lowest else "opposite predicted profile"
    return Retrieval(query.describe(), space, found_by, score, results, len(runs), notes)


def _cap(found: pd.DataFrame, per_slide: int | None, per_patient: int | None) -> pd.DataFrame:
    """Keep candidates in score order while their slide and patient are under the caps."""
    keep = np.ones(len(found), bool)
    if per_slide is not None:
        keep &= found.groupby("slide_name").cumcount().to_numpy() < per_slide
    if per_patient is not None:
        sub = found[keep]
        ok = sub.groupby("patient", dropna=False).cumcount().to_numpy() < per_patient
        idx = np.flatnonzero(keep)
        keep[idx[~ok]] = False
    return found[keep]


# -- the searchers: fetch(n) → DataFrame run_key, tile_idx, x, y, tile_size, slide_name, slide_path, score --
def _searcher(store, model_key, query, space, run_keys, lowest, joint, method, notes):
    if space == "predicted":
        return _predicted(store, model_key, query, run_keys, lowest, method, notes)
    if space == "image":
        return _nearest(store, model_key, run_keys, query, "image", lowest, notes)
    return _nearest(store, model_key, run_keys, query, "joint", lowest, notes, joint=joint)


def _predicted(store, model_key, query, run_keys, lowest, method, notes):
    if query.kind == "gene":
        gene = query.genes[0]

        def fetch(n):
            return store.top_tiles(model_key, [gene], run_keys, n, lowest=lowest).rename(columns={"value": "score"})
        return fetch, f"predicted {gene}, log1p(CP10k)"
    if query.kind == "signature":
        from core.analysis.signature_scores import DEFAULT_METHOD, signature_scoring

        scoring = signature_scoring(store, model_key, query.signature, method or DEFAULT_METHOD)
        if scoring.notice:
            notes.append(scoring.notice)

        def fetch(n):
            return store.top_tiles(model_key, dict(scoring.weights), run_keys, n, offset=scoring.offset,
                                   lowest=lowest).rename(columns={"value": "score"})
        source = f" Source: {scoring.signature.source}." if scoring.signature.is_library else ""
        return fetch, (f"{scoring.name} score by {scoring.describe()}. Reference: {scoring.n_tiles} tiles of "
                       f"{scoring.n_runs} slides.{source}")
    profile = _query_profile(store, model_key, query, run_keys, notes)
    weights, offset = _z_projection(store, model_key, profile, run_keys)

    def fetch(n):
        return store.top_tiles(model_key, weights, run_keys, n, offset=offset, lowest=lowest).rename(
            columns={"value": "score"})
    return fetch, (f"z-projection on {len(weights)} genes: mean over genes of z(query) × z(tile) against the "
                   "cohort's tiles (0 = unrelated; 1 ≈ as far from the cohort as the query, the same way)")


def _query_profile(store, model_key, query, run_keys, notes) -> pd.Series:
    """gene → value of a profile, tile or patch query over the panel genes it names."""
    info = store.model_info(model_key)
    if query.kind == "profile":
        profile = panel_profile(query.profile, info.genes)
        missing = [g for g in query.profile if g.upper() not in {p.upper() for p in info.genes}]
        if missing:
            notes.append(f"{len(missing)} gene(s) not in the panel were left out: {', '.join(missing[:10])}"
                         + ("…" if len(missing) > 10 else "") + ".")
        if profile.empty:
            raise TesseraError("None of the profile's genes is in the model's panel.")
        return profile
    if query.kind == "tile":
        run_key = _tile_run(store, model_key, query, run_keys)
        full = store.tile_profile(model_key, run_key, int(query.tile)).astype(float)
    else:
        full = pd.Series(query.patch["expression"], dtype=float)
    stats = _cohort_stats(store, model_key, list(full.index), run_keys)
    z = ((full - stats["mean"]) / stats["sd"]).abs().sort_values(ascending=False)
    return full[z.index[:PROFILE_GENES]]


def _cohort_stats(store, model_key, genes: list[str], run_keys: list[str]) -> pd.DataFrame:
    """Per gene the mean and standard deviation over the runs' tiles (index gene; sd ≥ 1e-3)."""
    from core.store.schema import ident

    info = store.model_info(model_key)
    cols = ", ".join(f"avg({ident(g)}), stddev_pop({ident(g)})" for g in genes)
    row = store.con.execute(f"""SELECT {cols} FROM {info.pred_table} WHERE run_id IN
                                (SELECT run_id FROM runs WHERE run_key IN (SELECT unnest(?::VARCHAR[])))""",
                            [list(run_keys)]).fetchone()
    values = np.asarray(row, dtype=float).reshape(-1, 2)
    return pd.DataFrame({"mean": values[:, 0], "sd": np.maximum(np.nan_to_num(values[:, 1]), 1e-3)}, index=genes)


def _z_projection(store, model_key, profile: pd.Series, run_keys) -> tuple[dict[str, float], float]:
    """Weights and offset of the linear score (1/G) Σ_g z_q,g (ŷ_g − μ_g) / σ_g."""
    stats = _cohort_stats(store, model_key, list(profile.index), run_keys)
    zq = (profile - stats["mean"]) / stats["sd"]
    weights = (zq / stats["sd"] / len(profile)).astype(float)
    offset = float(-(weights * stats["mean"]).sum())
    return {g: float(w) for g, w in weights.items()}, offset


def _tile_run(store, model_key, query, run_keys) -> str:
    runs = store.con.execute("SELECT run_key, n_tiles FROM runs WHERE slide_name = ? AND run_key IN "
                             "(SELECT unnest(?::VARCHAR[]))", [query.slide, list(run_keys)]).fetchall()
    if not runs:
        raise TesseraError(f"No predicted slide {query.slide!r} among the searched slides.")
    run_key, n_tiles = runs[0]
    if not 0 <= int(query.tile) < int(n_tiles):
        raise TesseraError(f"Slide {query.slide} has tiles 0–{int(n_tiles) - 1}; there is no tile {query.tile}.")
    return run_key


def panel_profile(profile: dict[str, float], genes: list[str]) -> pd.Series:
    """The profile's values of panel genes, matched ignoring case, under the panel's names."""
    by_upper = {g.upper(): g for g in genes}
    out = {by_upper[g.upper()]: float(v) for g, v in profile.items() if g.upper() in by_upper}
    return pd.Series(out, dtype=float)


def joint_query_vector(joint, genes: list[str], query: Query) -> np.ndarray:
    """The expression-tower embedding of a profile, gene or signature query (module docstring)."""
    import torch

    if joint is None:
        raise TesseraError("This model ships no joint space; retrain it with `python -m core.cli train-joint` "
                           "or use the predicted space.")
    index = {g: i for i, g in enumerate(genes)}
    values = joint.gene_mean.clone()
    known = torch.zeros(len(genes), dtype=torch.bool)
    if query.kind == "profile":
        for g, v in panel_profile(query.profile or {}, genes).items():
            if g in index:
                values[index[g]] = float(v)
                known[index[g]] = True
    else:
        rows = [index[g] for g in query.genes if g in index]
        if rows:
            values = joint.gene_prototypes[rows].mean(dim=0)
            known[:] = True
    if not bool(known.any()):
        raise TesseraError("None of the query's genes is in the model's panel.")
    with torch.inference_mode():
        return joint.expression(joint.complete(values[None], known))[0].numpy()


def _nearest(store, model_key, run_keys, query, space, lowest, notes, *, joint=None):
    from core.store.tile_index import nearest

    exclude = None
    run_ids = store.run_ids(run_keys)
    if query.kind == "tile":
        run_key = _tile_run(store, model_key, query, run_keys)
        vector = store.tile_vector(run_key, int(query.tile), space)
        if vector is None:
            raise TesseraError(f"Slide {query.slide} was predicted without a joint space; re-predict it "
                               "(`python -m core.cli predict --force`) or use the image or predicted space.")
        exclude = (run_ids[run_key] << 32) | int(query.tile)
    elif query.kind == "patch":
        vector = query.patch.get("joint" if space == "joint" else "embedding")
        if vector is None:
            raise TesseraError("This model ships no joint space; use the image or predicted space.")
    else:
        genes = list(store.model_info(model_key).genes)
        if query.kind == "profile":
            panel = {g.upper() for g in genes}
            missing = [g for g in (query.profile or {}) if g.upper() not in panel]
            if missing:
                notes.append(f"{len(missing)} gene(s) not in the panel were left out: {', '.join(missing[:10])}"
                             + ("…" if len(missing) > 10 else "") + ".")
        if query.kind == "signature":
            from core.analysis.signature_scores import signature_scoring

            query = Query("signature", genes=[g for g, _ in signature_scoring(store, model_key, query.signature,
                                                                              "mean").weights],
                          signature=query.signature)
        vector = joint_query_vector(joint, genes, query)
    vector = np.asarray(vector, np.float32)
    sign = -1.0 if lowest else 1.0

    def fetch(n):
        out = nearest(store, model_key, run_ids, sign * vector, k=n, exclude=exclude, space=space)
        return out.assign(score=sign * out["similarity"]).drop(columns=["similarity"])
    what = "the model's image embedding" if space == "image" else "the joint space"
    return fetch, f"cosine similarity in {what} (1 = same direction, 0 = unrelated)"


def result_composition(store, model_key: str, results: pd.DataFrame, run_keys: list[str]) -> pd.DataFrame:
    """Per cell type: the results' mean predicted composition, the cohort's (mean over its
    slides' tiles) and their difference."""
    info = store.model_info(model_key)
    ids = store.run_ids(list(dict.fromkeys(results["run_key"])))
    wanted = (np.array([ids[r] for r in results["run_key"]], np.int64) << 32) | results["tile"].to_numpy(np.int64)
    res = store.compositions_by_id(wanted)
    cohort = store.mean_composition(run_keys, len(info.cell_types))
    return pd.DataFrame({"cell type": info.cell_types, "results": res.mean(axis=0) if len(res) else np.nan,
                         "cohort": cohort}).assign(difference=lambda d: d["results"] - d["cohort"])
