"""Per-tile signature scores that are comparable across slides: two methods, each a fixed linear
combination of a tile's predicted log1p(CP10k), ``offset + Σ weight_g · x_g``, the same on every
slide, so a tile scores the same whichever slide it sits on (and the store can rank tiles in SQL).

- ``score_genes`` (Satija et al., Nat Biotechnol 2015;33:495; Tirosh et al., Science 2016;352:189;
  as in ``scanpy.tl.score_genes``, scanpy 1.11.5): the mean of the signature's genes minus the mean
  of control genes drawn from the same expression bins. The control genes are chosen once, from
  the *reference* gene means, with a fixed seed, by the same steps as scanpy 1.11.5 (25 bins of
  ``rank(mean) // round(G / 24)`` genes, ``ctrl_size`` genes per bin drawn with
  ``RandomState(seed).choice`` as pandas' ``sample`` does, the signature's genes taken out after
  the draw): on an AnnData of the reference tiles the scores equal scanpy's.
- ``mean_z``: the mean over the signature's genes of each gene z-scored with its mean and SD
  (ddof = 1, as :func:`core.analysis.variables.zscore`) over the reference tiles; a gene constant
  there contributes 0.

The reference is every complete run (slide) of the model in the store (:meth:`Store.model_runs`),
not one slide or one cohort: the slide page knows no cohort and a slide may sit in several, and
one reference gives one score per tile on every page and in the CLI. Gene means for
``score_genes`` are the tile-weighted means of the stored slide summaries (``slide_summary``:
Σ n_tiles · mean / Σ n_tiles, i.e. the mean over every reference tile); ``mean_z`` reads the
signature's genes of every reference tile once. Adding predictions to the store changes the
reference, and with it the scores (pages re-read when the store file changes).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from core.analysis.signatures import Resolved, resolve
from core.errors import AnalysisError

METHODS: dict[str, str] = {
    "score_genes": "mean of the genes minus the mean of expression-matched control genes (Satija et al. 2015; "
                   "scanpy score_genes)",
    "mean_z": "mean z-score of the genes against all reference tiles",
}
DEFAULT_METHOD = "score_genes"
CTRL_SIZE, N_BINS, SEED = 50, 25, 0       # scanpy's defaults


def check_method(method: str) -> str:
    if method not in METHODS:
        raise AnalysisError(f"Unknown signature score method {method!r}; use {' or '.join(METHODS)}.")
    return method


@dataclass(frozen=True)
class Scoring:
    """A signature's score as ``offset + Σ weights[g] · x_g`` over predicted log1p(CP10k)."""

    signature: Resolved
    method: str
    weights: dict[str, float]
    offset: float
    control: tuple[str, ...] = ()           # score_genes' control genes
    n_runs: int = 0                         # the reference
    n_tiles: int = 0
    params: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.signature.name

    @property
    def notice(self) -> str | None:
        return self.signature.notice

    def describe(self) -> str:
        """One line naming the method and the genes, for captions and the CLI."""
        genes = list(self.signature.genes_used)
        shown = ", ".join(genes) if len(genes) <= 10 else ", ".join(genes[:8]) + f", … ({len(genes)} genes)"
        if self.method == "score_genes":
            return (f"score_genes: mean of {shown} minus the mean of {len(self.control)} control genes matched by "
                    f"expression bin (Satija et al. 2015; scanpy score_genes)")
        return (f"mean_z: mean z-score of {shown}, each gene standardised by its mean and SD over the "
                f"{self.n_tiles} reference tiles")

    def apply(self, matrix: np.ndarray, genes: list[str]) -> np.ndarray:
        """Scores of the rows of ``matrix`` (tiles × ``genes``), in float64."""
        col = {g: i for i, g in enumerate(genes)}
        w = np.zeros(len(genes))
        for g, v in self.weights.items():
            w[col[g]] = v
        return np.asarray(matrix, dtype=np.float64) @ w + self.offset

    def to_json(self) -> dict:
        s = self.signature
        return {"signature": s.name, "method": self.method, "description": self.describe(), "source": s.source,
                "category": s.category, "genes_used": list(s.genes_used), "genes_missing": list(s.genes_missing),
                "notice": s.notice, "control_genes": list(self.control), "weights": self.weights,
                "offset": self.offset, "reference": {"runs": self.n_runs, "tiles": self.n_tiles}, **self.params}


# ---------------------------------------------------------------- the methods on plain numbers

def control_genes(means: pd.Series, genes: list[str], *, ctrl_size: int = CTRL_SIZE, n_bins: int = N_BINS,
                  seed: int = SEED) -> tuple[str, ...]:
    """scanpy 1.11.5's control set (``ctrl_as_ref=True``) for ``genes`` given the gene pool's
    means (a Series over the pool, in the pool's order). Sorted, as scanpy's ``Index.union``."""
    avg = means[np.isfinite(means.to_numpy(dtype=float))]
    n_items = int(np.round(len(avg) / (n_bins - 1)))
    # scanpy divides by n_items; with 0 (a pool under n_bins / 2 genes) every gene lands in one cut
    cut = avg.rank(method="min") // n_items if n_items else pd.Series(0.0, index=avg.index)
    rng = np.random.RandomState(seed)       # scanpy seeds numpy's global RandomState the same way
    wanted = set(genes)
    chosen: set[str] = set()
    for c in np.unique(cut.loc[[g for g in genes if g in cut.index]]):
        pool = cut.index[cut.to_numpy() == c]
        if ctrl_size < len(pool):
            pool = pool[rng.choice(len(pool), size=ctrl_size, replace=False)]
        chosen.update(g for g in pool if g not in wanted)
    if not chosen:
        raise AnalysisError(f"No control genes for {', '.join(genes)}: the panel has too few other genes in the "
                            "same expression bins; use mean_z.")
    return tuple(sorted(chosen))


def score_genes_weights(genes: list[str], control: tuple[str, ...]) -> dict[str, float]:
    weights = {g: 1.0 / len(genes) for g in genes}
    for g in control:
        weights[g] = weights.get(g, 0.0) - 1.0 / len(control)
    return weights


def mean_z_weights(moments: pd.DataFrame, genes: list[str]) -> tuple[dict[str, float], float]:
    """(weights, offset) of the mean z-score; ``moments`` has mean and sd per gene (index)."""
    weights, offset = {}, 0.0
    for g in genes:
        mean, sd = float(moments.at[g, "mean"]), float(moments.at[g, "sd"])
        if not np.isfinite(sd) or sd <= 0:
            continue                        # constant over the reference: z = 0
        weights[g] = 1.0 / (len(genes) * sd)
        offset -= mean / (len(genes) * sd)
    return weights or {genes[0]: 0.0}, offset


# ---------------------------------------------------------------- the reference, from the store

def reference_means(store, model_key: str, genes: list[str], runs: pd.DataFrame) -> pd.Series:
    """Per gene (in ``genes``' order): the mean over every tile of ``runs`` (run_key, n_tiles),
    from the stored per-slide means weighted by their tile counts."""
    summ = store.slide_summary(model_key, list(genes), list(runs["run_key"]))
    summ = summ.merge(runs, on="run_key")
    summ["w"] = summ["mean"].astype(float) * summ["n_tiles"]
    per = summ.groupby("gene").agg(w=("w", "sum"), n=("n_tiles", "sum"), runs=("run_key", "nunique"))
    short = [g for g in genes if g not in per.index or per.at[g, "runs"] < len(runs)]
    if short:
        raise AnalysisError(f"The store's slide summaries lack {', '.join(short[:5])} for some slides; "
                            "re-run `python -m core.cli migrate` or re-predict those slides.")
    return (per["w"] / per["n"]).reindex(genes)


def reference_moments(store, model_key: str, genes: list[str], runs: pd.DataFrame) -> pd.DataFrame:
    """Per gene: n, mean and SD (ddof = 1) over every tile of ``runs``, combined slide by slide
    (Chan et al.'s pairwise update, so no sum of squares loses precision)."""
    n, mean, m2 = 0, np.zeros(len(genes)), np.zeros(len(genes))
    for run_key in runs["run_key"]:
        _, x, _ = store.run_expression(model_key, run_key, list(genes))
        if not len(x):
            continue
        x = x.astype(np.float64)
        nb, mb = len(x), x.mean(axis=0)
        m2b = ((x - mb) ** 2).sum(axis=0)
        delta, total = mb - mean, n + nb
        mean = mean + delta * nb / total
        m2 = m2 + m2b + delta ** 2 * n * nb / total
        n = total
    sd = np.sqrt(m2 / (n - 1)) if n > 1 else np.full(len(genes), np.nan)
    return pd.DataFrame({"n": n, "mean": mean, "sd": sd}, index=pd.Index(list(genes), name="gene"))


_MEMO: dict[tuple, Scoring] = {}     # a Scoring per store state: a heatmap of every slide reads the reference once
_MEMO_MAX = 64


def signature_scoring(store, model_key: str, spec: str, method: str = DEFAULT_METHOD, *,
                      reference: list[str] | None = None, ctrl_size: int = CTRL_SIZE, n_bins: int = N_BINS,
                      seed: int = SEED) -> Scoring:
    """The score of signature ``spec`` (a library name or typed genes, see
    :func:`core.analysis.signatures.resolve`) by ``method`` for ``model_key``, against the
    reference runs (default: every run of the model in the store). Remembered per store file,
    reference (run ids: a re-predicted slide gets a new one) and parameters."""
    check_method(method)
    panel = list(store.model_info(model_key).genes)
    sig = resolve(spec, panel)
    runs = store.model_runs(model_key)
    if reference is not None:
        runs = runs[runs["run_key"].isin(list(reference))]
    if runs.empty:
        where = " among the reference runs given." if reference is not None else "; predict a cohort first."
        raise AnalysisError(f"Model {model_key} has no predicted slides in this store{where}")
    key = (str(getattr(store, "path", id(store))), model_key, sig.genes_used, sig.name, method,
           tuple(runs["run_id"]), ctrl_size, n_bins, seed)
    if key not in _MEMO:
        if len(_MEMO) >= _MEMO_MAX:
            _MEMO.pop(next(iter(_MEMO)))
        _MEMO[key] = _scoring(store, model_key, sig, method, panel, runs[["run_key", "n_tiles"]],
                              ctrl_size=ctrl_size, n_bins=n_bins, seed=seed)
    return _MEMO[key]


def _scoring(store, model_key: str, sig: Resolved, method: str, panel: list[str], runs: pd.DataFrame, *,
             ctrl_size: int, n_bins: int, seed: int) -> Scoring:
    genes = list(sig.genes_used)
    ref = {"n_runs": len(runs), "n_tiles": int(runs["n_tiles"].sum())}
    if method == "score_genes":
        control = control_genes(reference_means(store, model_key, panel, runs), genes, ctrl_size=ctrl_size,
                                n_bins=n_bins, seed=seed)
        return Scoring(sig, method, score_genes_weights(genes, control), 0.0, control, **ref,
                       params={"ctrl_size": ctrl_size, "n_bins": n_bins, "seed": seed})
    weights, offset = mean_z_weights(reference_moments(store, model_key, genes, runs), genes)
    return Scoring(sig, method, weights, offset, **ref)


def tile_scores(store, model_key: str, run_key: str, scoring: Scoring) -> pd.DataFrame:
    """tile_idx, x, y (level-0 px) and the score of every tile of one slide."""
    return store.heatmap(model_key, run_key, dict(scoring.weights), offset=scoring.offset)


def slide_scores(store, cohort: str, model_key: str, spec: str, method: str = DEFAULT_METHOD, *,
                 slides: list[str] | None = None) -> tuple[pd.DataFrame, Scoring]:
    """Per predicted slide of the cohort (or of ``slides``, by slide name): slide_name, patient,
    run_key, n_tiles, mean and q90 (numpy's linear quantile, as the slide summaries) of the tile
    score. Returns (table, the scoring)."""
    scoring = signature_scoring(store, model_key, spec, method)
    runs = store.cohort_runs(cohort, model_key).dropna(subset=["run_key"])
    if slides:
        unknown = [s for s in slides if s not in set(runs["slide_name"])]
        if unknown:
            raise AnalysisError(f"No predicted slide {', '.join(map(repr, unknown))} in cohort {cohort!r} "
                                f"(e.g. {', '.join(runs['slide_name'].head(3))}).")
        runs = runs[runs["slide_name"].isin(slides)]
    if runs.empty:
        raise AnalysisError(f"Cohort {cohort!r} has no slides predicted by {model_key}.")
    rows = []
    for r in runs.itertuples(index=False):
        v = tile_scores(store, model_key, r.run_key, scoring)["value"].to_numpy(dtype=float)
        rows.append({"slide_name": r.slide_name, "patient": r.patient, "run_key": r.run_key, "n_tiles": len(v),
                     "mean": float(v.mean()) if len(v) else np.nan,
                     "q90": float(np.quantile(v, 0.9)) if len(v) else np.nan})
    return pd.DataFrame(rows), scoring
