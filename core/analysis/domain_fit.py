"""The maths of cohort spatial domains on slides in memory (the store-facing API is
:mod:`core.analysis.domains`): features, sampling, clustering, assignment, description.

Features (a BANKSY-style neighbourhood augmentation; Singhal et al. 2024, *Nat Genet* 56:431–441,
"BANKSY unifies cell typing and tissue domain segmentation for scalable spatial omics"): a tile's
predicted log1p(CP10k) is standardised per gene and PCA-reduced (both fitted on the sample) to
``p``; the same is done to the mean expression of its rook neighbours on its own slide
(:func:`core.analysis.spatial.grid_neighbours`; a tile without neighbours is its own neighbourhood)
to ``p̄``; the feature is ``[√(1−λ)·p, √λ·p̄]`` with λ = ``spatial_weight`` in [0, 1] (BANKSY's
λ: 0 = expression only, BANKSY's domain default 0.8). BANKSY's azimuthal Gabor term is left out.

Fit (:func:`fit_slides`; :func:`core.analysis.domains.fit_domains` for a cohort in the store):
tiles are sampled per slide in proportion to its tile count (largest remainder; each slide's draw
seeded by ``seed`` and its run key, so adding a slide leaves the other slides' draws alone);
clusters come from scanpy's kNN graph + Leiden (``flavor="igraph"``; with ``n_domains`` the
resolution is bisected until Leiden gives that many) or from k-means (scikit-learn). Clusters under
``MIN_SHARE`` of the sample are dropped; the domains are the centroids of the others, numbered
D1, D2, … by decreasing share.

Assignment (:func:`assign`; :func:`core.analysis.domains.tile_domains`): **nearest centroid**
(Euclidean) in the fitted feature space, for every tile of every slide — the fitted sample
included, so the stored sample labels, shares and markers are exactly what :func:`assign` gives
those tiles. Slides predicted after the fit are labelled without refitting. For k-means this is
k-means' own rule; for Leiden it re-labels the few sample tiles nearer another cluster's centroid
(``params['leiden_agreement_ari']``: ARI of the Leiden clusters and the final labels).
"""
from __future__ import annotations

import hashlib
import re
import warnings
from dataclasses import dataclass

import numpy as np
import pandas as pd

from core.analysis.spatial import grid_neighbours
from core.errors import AnalysisError

METHODS = ("auto", "leiden", "kmeans")
N_PCS, N_NEIGHBORS, N_MARKERS = 30, 15, 10
MIN_SHARE = 0.005          # clusters below this share of the sample are not domains
KMEANS_DEFAULT_K = 6
NAME_SHARE = 0.20          # a cell-type group names a domain from this mean share (at most two groups)
# Cell-type groups for domain names, checked in order against the type's words (after the first
# match): e.g. malignant_epithelial → tumour, normal_epithelial → epithelial, b_plasma → immune.
GROUPS = (("tumour", ("malignant", "tumour", "tumor", "cancer", "neoplastic", "carcinoma")),
          ("immune", ("t_cell", "b_cell", "nk", "nk_cell", "plasma", "lymphocyte", "macrophage", "monocyte",
                      "myeloid", "dendritic", "mast", "neutrophil", "immune", "treg", "cd4", "cd8")),
          ("stroma", ("fibroblast", "caf", "stroma", "stromal", "myofibroblast", "smooth_muscle", "mesenchymal",
                      "adipocyte")),
          ("vascular", ("endothelial", "endothelium", "pericyte", "vascular")),
          ("epithelial", ("epithelial", "epithelium", "luminal", "basal", "myoepithelial", "keratinocyte")))


@dataclass(frozen=True)
class SlideData:
    """One predicted slide in memory: tiles at level-0 top-left ``xy`` [N, 2] on a grid of pitch
    ``tile_size`` px, predicted log1p(CP10k) ``expression`` [N, G], optional ``composition`` [N, T]."""

    run_key: str
    xy: np.ndarray
    tile_size: int
    expression: np.ndarray
    composition: np.ndarray | None = None
    tile_idx: np.ndarray | None = None


@dataclass(frozen=True)
class DomainFit:
    """A cohort's domains. ``domains``: domain, name, title, n_tiles, share (of the fitted sample),
    markers (top 3); ``composition``: domains × cell types (mean share); ``markers``: domain, rank,
    gene, score, logfoldchange, pval_adj (top ``N_MARKERS``, scanpy wilcoxon); ``sample``:
    run_key, tile_idx, domain of the fitted tiles."""

    cohort: str
    model_key: str
    method: str
    params: dict
    run_keys: tuple[str, ...]
    genes: tuple[str, ...]
    center: np.ndarray
    scale: np.ndarray
    components: np.ndarray
    centroids: np.ndarray
    labels: tuple[str, ...]
    domains: pd.DataFrame
    composition: pd.DataFrame
    markers: pd.DataFrame
    sample: pd.DataFrame
    fitted_at: str | None = None

    def to_json(self) -> dict:
        comp = self.composition
        return {"cohort": self.cohort, "model": self.model_key, "method": self.method, "params": self.params,
                "fitted_at": self.fitted_at, "n_slides": len(self.run_keys), "n_sample": len(self.sample),
                "run_keys": list(self.run_keys), "assignment": "nearest centroid in the fitted feature space",
                "domains": self.domains.to_dict("records"), "markers": self.markers.to_dict("records"),
                "composition": [{"domain": d, **row} for d, row in comp.to_dict("index").items()]}


# ---------------------------------------------------------------- features and assignment

def neighbour_mean(values: np.ndarray, xy: np.ndarray, tile_size: int) -> np.ndarray:
    """Per tile, the mean of ``values`` over its rook neighbours on the grid (itself when it has none)."""
    from scipy.sparse import coo_matrix

    values = np.asarray(values, np.float64)
    pairs = grid_neighbours(xy, tile_size)
    n = len(values)
    rows, cols = np.concatenate([pairs[:, 0], pairs[:, 1]]), np.concatenate([pairs[:, 1], pairs[:, 0]])
    adjacency = coo_matrix((np.ones(len(rows)), (rows, cols)), shape=(n, n)).tocsr()
    sums, counts = adjacency @ values, np.asarray(adjacency.sum(axis=1)).ravel()
    alone = counts == 0
    sums[alone], counts[alone] = values[alone], 1.0
    return sums / counts[:, None]


def _embed(center, scale, components, weight: float, own: np.ndarray, nbr: np.ndarray) -> np.ndarray:
    p = ((own - center) / scale) @ components.T
    pn = ((nbr - center) / scale) @ components.T
    return np.hstack([np.sqrt(1.0 - weight) * p, np.sqrt(weight) * pn])


def _nearest(features: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """Index of the nearest centroid per row; elementwise (no BLAS), so a row's answer never depends
    on the other rows it is computed with."""
    out = np.empty(len(features), np.int64)
    for start in range(0, len(features), 2048):
        block = features[start:start + 2048]
        out[start:start + 2048] = ((block[:, None, :] - centroids[None]) ** 2).sum(axis=2).argmin(axis=1)
    return out


def assign(fit: DomainFit, expression: np.ndarray, xy: np.ndarray, tile_size: int) -> np.ndarray:
    """Domain label of every tile of one slide (tile order), by the fit's nearest-centroid rule."""
    expression = np.asarray(expression, np.float64)
    if expression.shape[1] != len(fit.genes):
        raise AnalysisError(f"The expression has {expression.shape[1]} genes; the domain fit has {len(fit.genes)}.")
    feats = _embed(fit.center, fit.scale, fit.components, float(fit.params["spatial_weight"]), expression,
                   neighbour_mean(expression, xy, tile_size))
    return np.asarray(fit.labels, dtype=str)[_nearest(feats, fit.centroids)]


# ---------------------------------------------------------------- sampling

def allocate(sizes, n_sample: int) -> np.ndarray:
    """Tiles drawn per slide: all when the cohort has at most ``n_sample``, else in proportion to
    each slide's tile count (largest remainder, ties to the earlier slide)."""
    sizes = np.asarray(sizes, np.int64)
    if sizes.sum() <= n_sample:
        return sizes.copy()
    quota = sizes * (n_sample / sizes.sum())
    take = np.floor(quota).astype(np.int64)
    order = np.lexsort((np.arange(len(sizes)), -(quota - take)))
    take[order[:n_sample - take.sum()]] += 1
    return np.minimum(take, sizes)


def _sample_slide(slide: SlideData, k: int, seed: int) -> dict:
    expr = np.asarray(slide.expression, np.float64)
    n = len(expr)
    digest = int(hashlib.blake2b(slide.run_key.encode(), digest_size=8).hexdigest(), 16)
    rng = np.random.default_rng([seed, digest])
    pick = np.arange(n) if k >= n else np.sort(rng.choice(n, size=k, replace=False))
    idx = np.arange(n) if slide.tile_idx is None else np.asarray(slide.tile_idx)
    comp = None if slide.composition is None else np.asarray(slide.composition, np.float64)[pick]
    return {"own": expr[pick], "nbr": neighbour_mean(expr, slide.xy, slide.tile_size)[pick], "comp": comp,
            "run_key": [slide.run_key] * len(pick), "tile_idx": idx[pick]}


# ---------------------------------------------------------------- fitting

def resolve_method(method: str) -> str:
    if method not in METHODS:
        raise AnalysisError(f"Unknown domain method {method!r}; choose one of {', '.join(METHODS)}.")
    if method == "kmeans":
        return method
    try:
        import igraph  # noqa: F401
        import leidenalg  # noqa: F401
    except ImportError:
        if method == "leiden":
            raise AnalysisError("Leiden needs the leidenalg and igraph packages (pip install -r requirements.txt); "
                                "or use --method kmeans.") from None
        return "kmeans"
    return "leiden"


def check_options(method: str, n_domains: int | None, resolution: float, spatial_weight: float) -> str:
    """Validate the fit's options before any slide is read; returns the method that will run."""
    if not 0.0 <= spatial_weight <= 1.0:
        raise AnalysisError(f"spatial_weight is BANKSY's λ, between 0 and 1; got {spatial_weight}.")
    if n_domains is not None and n_domains < 2:
        raise AnalysisError(f"n_domains must be at least 2; got {n_domains}.")
    if not resolution > 0:
        raise AnalysisError(f"The Leiden resolution must be positive; got {resolution}.")
    return resolve_method(method)


def _leiden(features, resolution: float, n_domains: int | None, seed: int, min_size: int) -> tuple[np.ndarray, float]:
    import anndata as ad
    import scanpy as sc

    adata = ad.AnnData(features.astype(np.float32))
    # exact kNN (sklearn) with Gaussian-kernel weights: deterministic, and no numba compilation
    # (umap's connectivities and pynndescent cost ~15 s of JIT per process)
    sc.pp.neighbors(adata, n_neighbors=min(N_NEIGHBORS, len(features) - 1), use_rep="X", method="gauss",
                    transformer="sklearn", random_state=seed)

    def run(res: float) -> np.ndarray:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            sc.tl.leiden(adata, resolution=res, flavor="igraph", n_iterations=-1, directed=False,
                         random_state=seed, key_added="_domain")
        return adata.obs["_domain"].astype(int).to_numpy()

    if n_domains is None:
        return run(resolution), resolution
    lo, hi, best = np.log(1e-3), np.log(20.0), None
    for _ in range(30):  # the cluster count grows with the resolution: bisect it on a log scale
        res = float(np.exp((lo + hi) / 2))
        raw = run(res)
        k = int((np.bincount(raw) >= min_size).sum())
        if best is None or abs(k - n_domains) < abs(best[2] - n_domains):
            best = (raw, res, k)
        if k == n_domains:
            break
        lo, hi = (np.log(res), hi) if k < n_domains else (lo, np.log(res))
    return best[0], best[1]


def _finalise(features, raw: np.ndarray, min_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Centroids of the clusters of at least ``min_size`` tiles, ordered by decreasing share after
    nearest-centroid assignment, and that assignment."""
    ids, counts = np.unique(raw, return_counts=True)
    keep = ids[counts >= min_size] if (counts >= min_size).any() else ids[[counts.argmax()]]
    cents = np.stack([features[raw == i].mean(axis=0) for i in keep])
    for _ in range(len(cents)):          # a centroid that wins no tile is not a domain
        lab = _nearest(features, cents)
        used = np.bincount(lab, minlength=len(cents)) > 0
        if used.all():
            break
        cents = cents[used]
    order = np.argsort(-np.bincount(lab, minlength=len(cents)), kind="stable")
    rank = np.empty_like(order)
    rank[order] = np.arange(len(order))
    return cents[order], rank[lab]


def fit_slides(slides, *, genes: list[str], cell_types: list[str] = (), cohort: str = "", model_key: str = "",
               method: str = "auto", n_domains: int | None = None, resolution: float = 0.5,
               spatial_weight: float = 0.8, n_sample: int = 20000, seed: int = 0, n_pcs: int = N_PCS) -> DomainFit:
    """Fit domains on slides in memory (:class:`SlideData`, e.g. a synthetic matrix); what
    :func:`core.analysis.domains.fit_domains` does for a cohort in the store."""
    slides = sorted(slides, key=lambda s: s.run_key)
    takes = allocate([len(s.expression) for s in slides], n_sample)
    parts = [_sample_slide(s, int(k), seed) for s, k in zip(slides, takes)]
    return _fit_parts(parts, genes=genes, cell_types=cell_types, cohort=cohort, model_key=model_key, method=method,
                      n_domains=n_domains, resolution=resolution, spatial_weight=spatial_weight, seed=seed,
                      n_pcs=n_pcs, n_sample=n_sample, run_keys=[s.run_key for s in slides])


def _fit_parts(parts, *, genes, cell_types, cohort, model_key, method, n_domains, resolution, spatial_weight, seed,
               n_pcs, n_sample, run_keys) -> DomainFit:
    from sklearn.decomposition import PCA

    used = check_options(method, n_domains, resolution, spatial_weight)
    own = np.vstack([p["own"] for p in parts])
    n = len(own)
    if n < 20:
        raise AnalysisError(f"Only {n} predicted tiles in the cohort; domains need at least 20.")
    nbr = np.vstack([p["nbr"] for p in parts])
    center, scale = own.mean(axis=0), own.std(axis=0)
    scale = np.where(scale > 1e-8, scale, 1.0)       # a constant gene contributes nothing
    k_pcs = int(min(n_pcs, own.shape[1], n - 1))
    components = PCA(n_components=k_pcs, svd_solver="full").fit((own - center) / scale).components_
    feats = _embed(center, scale, components, spatial_weight, own, nbr)
    min_size = max(3, int(np.ceil(MIN_SHARE * n)))
    params = {"requested_method": method, "spatial_weight": float(spatial_weight), "n_pcs": k_pcs, "seed": int(seed),
              "n_sample": int(n_sample), "n_domains_requested": n_domains, "min_domain_tiles": min_size}
    if used == "leiden":
        raw, res = _leiden(feats, float(resolution), n_domains, seed, min_size)
        params.update(resolution=res, n_neighbors=min(N_NEIGHBORS, n - 1), leiden_flavor="igraph")
    else:
        from sklearn.cluster import KMeans

        k = n_domains or KMEANS_DEFAULT_K
        if k > n:
            raise AnalysisError(f"{k} domains asked for {n} sampled tiles.")
        raw = KMeans(n_clusters=k, n_init=10, random_state=seed).fit_predict(feats)
    centroids, lab = _finalise(feats, raw, min_size)
    if used == "leiden":   # how far nearest-centroid moved the sample tiles from their Leiden clusters
        from sklearn.metrics import adjusted_rand_score
        params["leiden_agreement_ari"] = float(adjusted_rand_score(raw, lab))
    labels = tuple(f"D{i + 1}" for i in range(len(centroids)))
    names = np.asarray(labels)[lab]
    comps = [p["comp"] for p in parts]
    comp = np.vstack(comps) if all(c is not None for c in comps) else None
    domains, composition, markers = describe(own, names, labels, list(genes), list(cell_types), comp)
    sample = pd.DataFrame({"run_key": [k for p in parts for k in p["run_key"]],
                           "tile_idx": np.concatenate([p["tile_idx"] for p in parts]).astype(np.int64),
                           "domain": names})
    return DomainFit(cohort, model_key, used, params, tuple(run_keys), tuple(genes), center, scale, components,
                     centroids, labels, domains, composition, markers, sample)


# ---------------------------------------------------------------- describing

def cell_type_group(cell_type: str) -> str:
    """The readable group of a cell type for domain names (:data:`GROUPS`; else the type itself)."""
    words = [w[:-1] if len(w) > 3 and w.endswith("s") else w  # plural: "T cells", "fibroblasts"
             for w in re.split(r"[^a-z0-9]+", str(cell_type).lower()) if w]
    padded = "_" + "_".join(words) + "_"
    for group, keys in GROUPS:
        if any(f"_{k}_" in padded for k in keys):
            return group
    return " ".join(words) or str(cell_type)


def domain_name(label: str, composition: pd.Series | None) -> str:
    """``"D3 tumour–immune"``: the cell-type groups (:func:`cell_type_group`, shares summed) with a
    mean share ≥ ``NAME_SHARE`` in the domain, largest first, at most two; the largest group alone
    when none reaches it; the bare label without a composition."""
    if composition is None or composition.empty:
        return label
    groups = composition.groupby([cell_type_group(t) for t in composition.index]).sum()
    groups = groups.iloc[np.lexsort((groups.index.to_numpy(), -groups.to_numpy()))]
    chosen = [g for g, s in groups.items() if s >= NAME_SHARE][:2] or [groups.index[0]]
    return f"{label} {'–'.join(chosen)}"


def describe(expression, names, labels, genes, cell_types, composition=None):
    """(domains, composition, markers) of the sample: share and name per domain, mean cell-type
    composition, marker genes by ``scanpy.tl.rank_genes_groups`` (wilcoxon) on the sample's log1p
    expression."""
    n = len(names)
    counts = pd.Series(names).value_counts().reindex(labels, fill_value=0)
    if composition is not None and composition.shape[1] == len(cell_types) and len(cell_types):
        comp = pd.DataFrame(composition, columns=list(cell_types)).groupby(np.asarray(names)).mean().reindex(labels)
    else:
        comp = pd.DataFrame(index=list(labels))
    comp.index.name = "domain"
    markers = rank_markers(expression, names, labels, genes)
    top = {d: markers.loc[markers["domain"] == d, "gene"].head(3).tolist() for d in labels}
    rows = []
    for d in labels:
        name = domain_name(d, comp.loc[d] if comp.shape[1] else None)
        title = f"{name} ({', '.join(top[d])})" if top[d] else name
        rows.append({"domain": d, "name": name, "title": title, "n_tiles": int(counts[d]),
                     "share": float(counts[d] / n), "markers": top[d]})
    return pd.DataFrame(rows), comp, markers


def rank_markers(expression, names, labels, genes) -> pd.DataFrame:
    """Top ``N_MARKERS`` genes per domain (scanpy wilcoxon, each domain against the rest)."""
    cols = ["domain", "rank", "gene", "score", "logfoldchange", "pval_adj"]
    if len(labels) < 2:
        return pd.DataFrame(columns=cols)
    import anndata as ad
    import scanpy as sc

    adata = ad.AnnData(np.asarray(expression, np.float32),
                       obs=pd.DataFrame({"domain": pd.Categorical(names, categories=list(labels))},
                                        index=[str(i) for i in range(len(names))]),
                       var=pd.DataFrame(index=list(genes)))
    sc.tl.rank_genes_groups(adata, "domain", method="wilcoxon", use_raw=False, n_genes=min(N_MARKERS, len(genes)))
    df = sc.get.rank_genes_groups_df(adata, group=None)
    df = df.rename(columns={"group": "domain", "names": "gene", "scores": "score", "logfoldchanges": "logfoldchange",
                            "pvals_adj": "pval_adj"})
    df["domain"] = df["domain"].astype(str)
    df["rank"] = df.groupby("domain").cumcount() + 1
    return df[cols].reset_index(drop=True)
