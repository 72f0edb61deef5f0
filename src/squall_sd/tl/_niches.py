"""Spatial niches: neighbourhood aggregation over a squidpy graph + Gaussian mixture or Leiden.

The clustering itself (mixtures chosen by stability, Leiden) is in
:mod:`squall_sd.tl._niche_clustering`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pandas as pd
from anndata import AnnData
from threadpoolctl import threadpool_limits

from squall_sd._docs import d
from squall_sd._logging import logger
from squall_sd._sdata import resolve_adata
from squall_sd.tl._niche_clustering import _cluster, _relabel_by_size
from squall_sd.tl._utils import (
    aggregate_neighbors,
    get_connectivities,
    get_representation,
    provenance,
    spatial_connectivities,
)

if TYPE_CHECKING:
    from spatialdata import SpatialData

__all__ = ["niche_enrichment", "niches"]


def _representation(
    adata: AnnData, use_rep: str, *, batch_key: str | None, n_pcs: int | None, random_state: int
) -> tuple[np.ndarray, str]:
    """Return the representation to aggregate and its description, aligned per ``batch_key``."""
    if batch_key is None:
        rep, rep_desc = get_representation(adata, use_rep, n_pcs=n_pcs, random_state=random_state)
    else:
        if batch_key not in adata.obs:
            raise KeyError(f"`batch_key={batch_key!r}` not found in `adata.obs`; available: {list(adata.obs.columns)}.")
        # align all columns, then keep the n_pcs leading principal components of the aligned
        # representation: the leading columns of a joint PCA mostly separate the batches
        rep, rep_desc = get_representation(
            adata, use_rep, n_pcs=None if n_pcs is None else max(n_pcs, 50), random_state=random_state
        )
        rep = _align_batches(rep, adata.obs[batch_key].to_numpy())
        if n_pcs is not None and n_pcs < min(rep.shape):
            from sklearn.decomposition import PCA

            rep = PCA(n_pcs, random_state=random_state).fit_transform(rep).astype(np.float32)
            rep_desc = f"PCA({n_pcs}) of {rep_desc} aligned per {batch_key!r}"
        else:
            rep_desc = f"{rep_desc} aligned per {batch_key!r}"
    return rep, rep_desc


def _align_batches(rep: np.ndarray, batch: np.ndarray) -> np.ndarray:
    """Centre and scale every column within each batch, then restore the pooled within-batch scale."""
    rep = np.array(rep, dtype=np.float32, copy=True)
    codes = pd.Categorical(batch).codes
    if (codes < 0).any():
        raise ValueError("`batch_key` has missing values.")
    within = np.zeros(rep.shape[1], dtype=np.float64)
    for b in np.unique(codes):
        idx = codes == b
        block = rep[idx]
        sd = block.std(0)
        within += idx.sum() * sd.astype(np.float64) ** 2
        sd[sd == 0] = 1.0
        rep[idx] = (block - block.mean(0)) / sd
    return rep * np.sqrt(within / len(codes)).astype(np.float32)


@d.dedent
def niches(  # noqa: D417 - parameters from squall_sd._docs
    data: AnnData | SpatialData,
    *,
    use_rep: str = "X_pca",
    table_key: str | None = None,
    library_key: str | None = None,
    batch_key: str | None = None,
    spatial_key: str = "spatial",
    connectivity_key: str | None = None,
    graph: Literal["radius", "knn", "delaunay"] = "radius",
    radius: float | None = None,
    n_neighs: int = 6,
    n_hops: int = 3,
    n_pcs: int | None = 10,
    method: Literal["gmm", "leiden"] = "gmm",
    n_niches: int | Sequence[int] | None = None,
    n_runs: int = 10,
    covariance_type: Literal["full", "diag"] = "full",
    subsample: int | None = 20_000,
    selection_subsample: int | None = 5_000,
    resolution: float = 1.0,
    key_added: str = "squall_niche",
    random_state: int = 0,
    n_jobs: int | None = 1,
    copy: bool = False,
) -> AnnData | None:
    """Find spatial niches: clusters of neighbourhood-aggregated expression or embeddings.

    The procedure follows CellCharter: (1) a squidpy spatial graph, built per section so sections
    never connect; (2) each observation's representation concatenated with the mean
    representation of its neighbours at exactly 1, 2, …, ``n_hops`` hops; (3) clustering of the
    aggregate (centred, one global scale), either by a Gaussian mixture whose number of
    components is chosen by stability across runs, or by Leiden on a kNN graph of the aggregate.
    Several sections in one AnnData (``library_key``) share one model, so niche labels mean the
    same in all of them; ``batch_key`` first aligns the representation of each batch (section,
    patient) so that batch effects do not become niches.

    Parameters
    ----------
    %(data_table)s
    %(use_rep)s
    %(table_key_data)s
    %(library_key)s
    batch_key
        Column of ``obs`` naming batches (sections, patients, runs) whose representation is
        aligned before aggregation: every column (all columns of an ``obsm`` representation, 50
        principal components of a gene matrix) is centred and scaled within each batch and given
        its pooled within-batch standard deviation (location/scale alignment, as in ComBat without
        its shrinkage); the ``n_pcs`` leading principal components of the aligned representation
        are then used. Use it for joint fits across patients or technologies; it
        also removes real differences in composition between batches, so pass an integrated
        embedding (e.g. ``X_squall``, scVI, Harmony) instead when those matter. ``None``: no
        correction. It may equal ``library_key``.
    %(spatial_graph)s
    n_hops
        Number of hops ``L`` aggregated.
    %(n_pcs)s
    method
        ``"gmm"`` (Gaussian mixture, CellCharter-style) or ``"leiden"`` (scanpy).
    n_niches
        For ``"gmm"``: a number of niches, or candidates (e.g. ``range(2, 11)``, the default when
        ``None``) among which the most stable is chosen: for every candidate ``k`` the mixtures are
        fitted ``n_runs`` times and the stability of ``k`` is the mean adjusted Rand index of its
        labels with those at ``k - 1`` and ``k + 1`` of the other runs (mean over runs ± standard
        error). The reference is the highest local maximum of that curve (an end of the range only
        when the curve has no interior peak, with a warning); by the one-standard-error rule a
        smaller local maximum whose stability is within one standard error of the reference wins
        (the smallest such ``k``). The labels are those of the most central run at the chosen ``k``
        (highest mean adjusted Rand index to the other runs at ``k``), so they depend little on
        ``random_state``. Ignored by ``"leiden"``.
    n_runs
        Mixture fits per candidate (independent seeds) for the stability curve, or initialisations
        when ``n_niches`` is a single number (the fit with the highest likelihood is kept).
    covariance_type
        Covariance of the mixture components (``"full"``; ``"diag"`` is faster on large data).
    subsample
        Fit the final mixture on at most this many randomly drawn observations (all observations
        are labelled). ``None``: fit on all.
    selection_subsample
        Choose the number of niches (the ``n_runs`` × candidates stability fits) on at most this
        many of those observations; the final mixture is then refitted on the ``subsample`` cells,
        started from the best mixture of the search. ``None``: search on the ``subsample`` cells.
    resolution
        Leiden resolution.
    %(key_added)s
    random_state
        Seed of the PCA, the subsample, the mixtures and Leiden.
    n_jobs
        Threads for the linear algebra of the clustering (``None``: all cores). Small mixtures
        run fastest on one thread.
    %(copy)s

    Returns
    -------
    ``None``, or the modified copy of the table when ``copy=True``. Writes

    - :attr:`anndata.AnnData.obs` ``[key_added]`` - niche labels (categorical, ``"0"`` largest),
    - :attr:`anndata.AnnData.obsm` ``[f"X_{key_added}"]`` - the aggregated features,
    - :attr:`anndata.AnnData.obsp` ``[f"{key_added}_connectivities"]`` /
      ``[f"{key_added}_distances"]`` - the graph, when it was built here,
    - :attr:`anndata.AnnData.uns` ``[key_added]`` - parameters, provenance and (``gmm`` with
      candidates) the stability curve.

    Raises
    ------
    KeyError
        If ``use_rep``, ``library_key``, ``spatial_key`` or ``connectivity_key`` is missing.

    Examples
    --------
    >>> import scanpy as sc
    >>> import squall_sd as squall
    >>> adata = squall.datasets.example().tables["table"]  # doctest: +SKIP
    >>> sc.pp.normalize_total(adata); sc.pp.log1p(adata); sc.pp.pca(adata)  # doctest: +SKIP
    >>> squall.tl.niches(adata, n_niches=range(3, 9))  # doctest: +SKIP

    """
    adata = resolve_adata(data, table_key)
    if copy:
        adata = adata.copy()
    if method not in ("gmm", "leiden"):
        raise ValueError(f"Expected `method` to be 'gmm' or 'leiden', found {method!r}.")
    if n_runs < 1:
        raise ValueError(f"Expected `n_runs` to be >= 1, found {n_runs}.")
    if adata.n_obs < 3:
        raise ValueError(f"Need at least 3 observations to find niches, found {adata.n_obs}.")

    # 1. representation (fail early, before building anything)
    rep, rep_desc = _representation(adata, use_rep, batch_key=batch_key, n_pcs=n_pcs, random_state=random_state)

    # 2. graph
    adj, conn_key, graph_params = spatial_connectivities(
        adata,
        connectivity_key=connectivity_key,
        library_key=library_key,
        graph=graph,
        radius=radius,
        n_neighs=n_neighs,
        spatial_key=spatial_key,
        key_added=key_added,
    )
    if graph_params is None:  # an existing graph: record the obsp key it was read from
        conn_key = conn_key if conn_key in adata.obsp else f"{conn_key}_connectivities"
        graph_params = {"graph": "existing", "connectivity_key": conn_key}
    n_isolated = int(np.count_nonzero(np.diff(adj.indptr) == 0))
    if n_isolated:
        logger.warning(
            "%d of %d observations have no spatial neighbours; their niche follows their own "
            "profile "
            "(increase `radius` / `n_neighs` if this is unexpected).",
            n_isolated,
            adata.n_obs,
        )

    # 3. aggregation + standardisation
    # centred and divided by ONE global scale: the relative variance of the components (e.g. PCA
    # ordering) is kept, so low-variance, noisy columns are not inflated to unit variance
    feats = aggregate_neighbors(rep, adj, n_hops)
    feats -= feats.mean(0)
    scale = float(feats.std())
    feats /= scale if scale > 0 else 1.0

    # 4. clustering
    params: dict[str, Any] = {
        "use_rep": use_rep,
        "representation": rep_desc,
        "n_features": int(feats.shape[1]),
        "n_hops": int(n_hops),
        "n_pcs": n_pcs,
        "library_key": library_key,
        "batch_key": batch_key,
        "connectivity_key": conn_key,
        "graph_params": graph_params,
        "method": method,
        "random_state": int(random_state),
    }
    with threadpool_limits(limits=n_jobs):
        labels, extra = _cluster(
            feats,
            method=method,
            n_niches=n_niches,
            n_runs=n_runs,
            covariance_type=covariance_type,
            subsample=subsample,
            selection_subsample=selection_subsample,
            resolution=resolution,
            random_state=random_state,
            n_jobs=n_jobs,
        )
    params.update(extra)

    adata.obs[key_added] = _relabel_by_size(labels)
    adata.obsm[f"X_{key_added}"] = feats
    adata.uns[key_added] = provenance(**params)
    logger.info(
        "Adding `adata.obs[%r]` (%d niches), `adata.obsm['X_%s']`, `adata.uns[%r]`",
        key_added,
        params["n_niches"],
        key_added,
        key_added,
    )
    return adata if copy else None


@d.dedent
def niche_enrichment(  # noqa: D417 - parameters from squall_sd._docs
    data: AnnData | SpatialData,
    *,
    niche_key: str = "squall_niche",
    cluster_key: str | None = None,
    table_key: str | None = None,
    library_key: str | None = None,
    connectivity_key: str | None = None,
    normalize: Literal["niche", "cluster", "total"] = "niche",
    n_perms: int = 200,
    seed: int = 0,
    copy: bool = False,
) -> dict[str, pd.DataFrame] | None:
    """Describe niches: their composition in ``cluster_key`` and which niches border which.

    Parameters
    ----------
    %(data_table)s
    niche_key
        Column of ``obs`` with niche labels (from :func:`squall_sd.tl.niches`).
    cluster_key
        Column of ``obs`` with cell types / clusters / regions. ``None``: no composition table.
    %(table_key_data)s
    library_key
        Column of ``obs`` with sections; squidpy then permutes labels within each section.
    connectivity_key
        Graph in ``obsp`` for the neighbourhood enrichment. ``None``: the graph recorded in
        ``uns[niche_key]`` by :func:`squall_sd.tl.niches`, else ``"spatial_connectivities"``.
    normalize
        Composition normalisation: rows sum to one (``"niche"``: what each niche is made of),
        columns sum to one (``"cluster"``: where each cluster lies) or all entries sum to one.
    n_perms
        Permutations of squidpy's neighbourhood enrichment test.
    seed
        Seed of the permutations.
    copy
        Return the tables instead of writing them to ``uns``.

    Returns
    -------
    With ``copy=True`` a dict with ``"composition"`` (if ``cluster_key``), ``"zscore"`` and
    ``"count"`` DataFrames; otherwise ``None`` and writes

    - :attr:`anndata.AnnData.uns` ``[f"{niche_key}_composition"]`` - niches × clusters table,
    - :attr:`anndata.AnnData.uns` ``[f"{niche_key}_nhood_enrichment"]`` - squidpy's ``zscore`` and
      ``count`` between niches.

    Raises
    ------
    KeyError
        If ``niche_key``, ``cluster_key`` or the graph is missing.

    """
    import squidpy as sq

    adata = resolve_adata(data, table_key)
    for key, what in (
        (niche_key, "niche_key"),
        (cluster_key, "cluster_key"),
        (library_key, "library_key"),
    ):
        if key is not None and key not in adata.obs:
            hint = " Run `squall.tl.niches(adata)` first." if what == "niche_key" else ""
            raise KeyError(f"`{what}={key!r}` not found in `adata.obs`.{hint}")
    if normalize not in ("niche", "cluster", "total"):
        raise ValueError(f"Expected `normalize` to be 'niche', 'cluster' or 'total', found {normalize!r}.")
    if connectivity_key is None:
        connectivity_key = adata.uns.get(niche_key, {}).get("connectivity_key", "spatial_connectivities")
    get_connectivities(adata, connectivity_key)  # raises with the next step if missing
    if not isinstance(adata.obs[niche_key].dtype, pd.CategoricalDtype):
        adata.obs[niche_key] = adata.obs[niche_key].astype(str).astype("category")

    out: dict[str, pd.DataFrame] = {}
    if cluster_key is not None:
        norm = {"niche": "index", "cluster": "columns", "total": "all"}[normalize]
        comp = pd.crosstab(adata.obs[niche_key], adata.obs[cluster_key], normalize=norm)
        comp.index = comp.index.astype(str)
        comp.columns = comp.columns.astype(str)
        out["composition"] = comp

    res = sq.gr.nhood_enrichment(
        adata,
        cluster_key=niche_key,
        connectivity_key=connectivity_key,
        library_key=library_key,
        n_perms=n_perms,
        seed=seed,
        copy=True,
        n_jobs=1,
        show_progress_bar=False,
    )
    zscore, count = res[0], res[1]  # NhoodEnrichmentResult(zscore, counts) or a plain tuple
    cats = list(adata.obs[niche_key].cat.categories.astype(str))
    out["zscore"] = pd.DataFrame(np.asarray(zscore), index=cats, columns=cats)
    out["count"] = pd.DataFrame(np.asarray(count), index=cats, columns=cats)
    if copy:
        return out
    if "composition" in out:
        adata.uns[f"{niche_key}_composition"] = out["composition"]
    adata.uns[f"{niche_key}_nhood_enrichment"] = {
        "zscore": out["zscore"].to_numpy(),
        "count": out["count"].to_numpy(),
        "params": provenance(connectivity_key=connectivity_key, n_perms=int(n_perms), seed=int(seed)),
    }
    logger.info(
        "Adding `adata.uns['%s_composition']`, `adata.uns['%s_nhood_enrichment']`",
        niche_key,
        niche_key,
    )
    return None
