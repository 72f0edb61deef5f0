"""Spatial niches: neighbourhood aggregation over a squidpy graph + Gaussian mixture or Leiden."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pandas as pd
from anndata import AnnData
from threadpoolctl import threadpool_limits

from squall_sd._logging import logger
from squall_sd._sdata import resolve_adata
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

_DEFAULT_RANGE = range(2, 11)


def _fit_gmm(X: np.ndarray, k: int, seed: int, covariance_type: str, warm_start_from: Any = None) -> Any:
    """Fit one Gaussian mixture; k-means initialisation (or the parameters of ``warm_start_from``)."""
    from sklearn.mixture import GaussianMixture

    kwargs: dict[str, Any] = {}
    if warm_start_from is not None:
        kwargs = {
            "weights_init": warm_start_from.weights_,
            "means_init": warm_start_from.means_,
            "precisions_init": warm_start_from.precisions_,
        }
    gmm = GaussianMixture(
        n_components=k,
        covariance_type=covariance_type,
        reg_covar=1e-3,
        max_iter=200,
        tol=1e-3,
        # a full k-means initialisation (not only k-means++ seeds): the EM then starts from a
        # sensible partition, which makes runs more reproducible and the stability curve informative
        init_params="kmeans",
        random_state=seed,
        **kwargs,
    )
    gmm.fit(X)
    return gmm


def _stability_select(
    X: np.ndarray,
    ks: list[int],
    *,
    n_runs: int,
    random_state: int,
    covariance_type: str,
) -> tuple[int, Any, pd.DataFrame]:
    """Choose the number of mixture components by clustering stability (CellCharter's idea).

    Every ``k`` in ``ks`` (plus its neighbours ``min(ks) - 1`` and ``max(ks) + 1``) is fitted
    ``n_runs`` times, each run with its own seed drawn from ``random_state``. The stability of ``k``
    for run ``r`` is the mean adjusted Rand index between its labels at ``k`` and the labels at
    ``k - 1`` and ``k + 1`` of every other run: a real structure persists when one more or one fewer
    component is allowed, and across initialisations. The curve is the mean over runs, with its
    standard error over runs. The ``k`` is chosen by :func:`_pick_k` (highest interior peak,
    then the one-standard-error rule toward fewer niches). The model returned is the most central
    run at that ``k`` (highest mean ARI to the other runs at ``k``), not the luckiest seed.
    """
    grid = sorted(set(ks))
    ext = ([grid[0] - 1] if grid[0] - 1 >= 2 else []) + grid + [grid[-1] + 1]
    ext = [k for k in ext if k <= X.shape[0] - 1]
    labels: dict[int, list[np.ndarray]] = {k: [] for k in ext}
    models: dict[int, list[Any]] = {k: [] for k in ext}
    # independent streams per run (not random_state + run: neighbouring random states would share runs)
    seeds = np.random.default_rng(random_state).integers(0, 2**31 - 1, size=n_runs)
    for run in range(n_runs):
        for k in ext:
            gmm = _fit_gmm(X, k, int(seeds[run]), covariance_type)
            labels[k].append(gmm.predict(X))
            models[k].append(gmm)
    from sklearn.metrics import adjusted_rand_score

    others = [[s for s in range(n_runs) if s != r] or [r] for r in range(n_runs)]
    rows = []
    medoid: dict[int, int] = {}
    for k in grid:
        if k not in labels:
            continue
        per_run = np.array(
            [
                np.mean(
                    [
                        adjusted_rand_score(labels[k][r], labels[kk][s])
                        for kk in (k - 1, k + 1)
                        if kk in labels
                        for s in others[r]
                    ]
                )
                if (k - 1 in labels or k + 1 in labels)
                else np.nan
                for r in range(n_runs)
            ]
        )
        within = np.eye(n_runs)
        for r in range(n_runs):
            for s in range(r + 1, n_runs):
                within[r, s] = within[s, r] = adjusted_rand_score(labels[k][r], labels[k][s])
        centrality = (within.sum(1) - 1) / max(n_runs - 1, 1)
        medoid[k] = int(np.argmax(centrality))
        rows.append(
            {
                "n_niches": k,
                "stability": float(np.nanmean(per_run)) if np.isfinite(per_run).any() else np.nan,
                "stability_se": float(np.nanstd(per_run, ddof=1) / np.sqrt(n_runs)) if n_runs > 1 else 0.0,
                "stability_within_k": float(centrality.mean()) if n_runs > 1 else np.nan,
                "log_likelihood": float(models[k][medoid[k]].lower_bound_),
            }
        )
    curve = pd.DataFrame(rows)
    if curve.empty or curve["stability"].isna().all():
        raise ValueError(f"Could not evaluate any `n_niches` in {ks} on {X.shape[0]} observations.")
    k_best = _pick_k(curve)
    return k_best, models[k_best][medoid[k_best]], curve


def _pick_k(curve: pd.DataFrame) -> int:
    """Return the number of niches from a stability curve.

    The reference is the highest interior local maximum of the stability (CellCharter's choice);
    then, by the one-standard-error rule, the smallest ``k`` whose stability is within one standard
    error (column ``stability_se``, if present) of that peak wins: differences within the noise of
    the runs do not justify more niches. A candidate at the end of the range is the reference only
    when the curve has no interior peak; then a warning suggests widening the range, since the best
    ``k`` may lie outside it.
    """
    ks = curve["n_niches"].to_numpy()
    stab = np.nan_to_num(curve["stability"].to_numpy(dtype=float), nan=-np.inf)
    se = (
        np.nan_to_num(curve["stability_se"].to_numpy(dtype=float), nan=0.0)
        if "stability_se" in curve
        else np.zeros(len(ks))
    )
    interior = [
        i for i in range(1, len(ks) - 1) if stab[i] >= stab[i - 1] and stab[i] >= stab[i + 1] and np.isfinite(stab[i])
    ]
    if interior:
        best = max(interior, key=lambda i: stab[i])
        within = [i for i in interior if i < best and stab[i] >= stab[best] - se[best]]
        return int(ks[min(within)]) if within else int(ks[best])
    i = int(np.argmax(stab))
    if len(ks) > 2:
        logger.warning(
            "The clustering stability has no interior peak among `n_niches` %s; using %d at the end of "
            "the range. Consider a wider range (see `adata.uns[key_added]['stability']`).",
            [int(k) for k in ks],
            int(ks[i]),
        )
    return int(ks[i])


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


def _relabel_by_size(labels: np.ndarray) -> pd.Categorical:
    """Relabel clusters ``0..k-1`` by decreasing size (deterministic names)."""
    uniq, counts = np.unique(labels, return_counts=True)
    order = uniq[np.argsort(-counts, kind="stable")]
    mapping = {old: new for new, old in enumerate(order)}
    new = np.fromiter((mapping[x] for x in labels), dtype=int, count=len(labels))
    cats = [str(i) for i in range(len(order))]
    return pd.Categorical(new.astype(str), categories=cats)


def niches(
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
    data
        AnnData, or SpatialData whose table ``table_key`` is used.
    use_rep
        Representation to aggregate: a key of ``obsm`` (``"X_pca"``, ``"X_squall"`` embeddings, …),
        ``"X"`` or a key of ``layers`` (e.g. predicted expression). Gene matrices are reduced to
        ``n_pcs`` principal components first; they should be normalised (e.g. log1p CP10k). Genes
        that are NaN everywhere (not predicted, in a ``predict_expression`` layer) are left out.
    table_key
        Table of a SpatialData input (default ``"table"``).
    library_key
        Column of ``obs`` naming the section of each observation; the graph is built per section.
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
    spatial_key
        Key of the coordinates in ``obsm`` (``squall.io`` readers store microns).
    connectivity_key
        Existing graph in ``obsp`` to use. ``None`` (default) builds one with ``graph`` and writes
        it to ``obsp[f"{key_added}_connectivities"]``.
    graph
        How to build the graph: ``"radius"`` (all neighbours within ``radius``), ``"knn"``
        (``n_neighs`` nearest) or ``"delaunay"`` (triangulation, edges longer than ``radius``
        dropped if given).
    radius
        Radius in the units of ``obsm[spatial_key]`` (microns for ``squall.io`` data). ``None``
        with ``graph="radius"``: 1.5 × the median nearest-neighbour distance.
    n_neighs
        Number of neighbours of the ``"knn"`` graph.
    n_hops
        Number of hops ``L`` aggregated.
    n_pcs
        Leading components of the representation used (or principal components computed for a
        gene matrix). ``None``: all columns.
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
    key_added
        Name of the outputs.
    random_state
        Seed of the PCA, the subsample, the mixtures and Leiden.
    n_jobs
        Threads for the linear algebra of the clustering (``None``: all cores). Small mixtures
        run fastest on one thread.
    copy
        Return a modified copy of the table instead of writing in place.

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


def _cluster(
    feats: np.ndarray,
    *,
    method: str,
    n_niches: int | Sequence[int] | None,
    n_runs: int,
    covariance_type: str,
    subsample: int | None,
    resolution: float,
    random_state: int,
    n_jobs: int | None,
    selection_subsample: int | None = None,
) -> tuple[np.ndarray, dict[str, Any]]:
    """Cluster the aggregated features; return labels and parameters for ``uns``."""
    n_obs = feats.shape[0]
    params: dict[str, Any] = {}
    rng = np.random.default_rng(random_state)
    if method == "gmm":
        fit_idx = np.arange(n_obs)
        if subsample is not None and n_obs > subsample:
            fit_idx = np.sort(rng.choice(n_obs, size=subsample, replace=False))
            logger.info("Fitting the mixtures on %d of %d observations", subsample, n_obs)
        X_fit = feats[fit_idx]
        if n_niches is None:
            n_niches = _DEFAULT_RANGE
        if isinstance(n_niches, int | np.integer):
            k = int(n_niches)
            if not 1 <= k < X_fit.shape[0]:
                raise ValueError(f"Expected `n_niches` in [1, {X_fit.shape[0] - 1}], found {k}.")
            models = [_fit_gmm(X_fit, k, random_state + r, covariance_type) for r in range(n_runs)]
            model = max(models, key=lambda m: m.lower_bound_)
            curve = None
        else:
            ks = [int(k) for k in n_niches]
            if not ks or min(ks) < 2:
                raise ValueError(f"Expected candidate `n_niches` >= 2, found {list(n_niches)}.")
            X_sel = X_fit
            if selection_subsample is not None and X_fit.shape[0] > selection_subsample:
                sel = np.sort(rng.choice(X_fit.shape[0], size=selection_subsample, replace=False))
                X_sel = X_fit[sel]
                logger.info("Choosing the number of niches on %d observations", selection_subsample)
            k, model, curve = _stability_select(
                X_sel,
                ks,
                n_runs=n_runs,
                random_state=random_state,
                covariance_type=covariance_type,
            )
            if X_sel is not X_fit:  # refit on the larger sample, from the best mixture of the search
                model = _fit_gmm(X_fit, k, random_state, covariance_type, warm_start_from=model)
            logger.info("Chose %d niches by stability (candidates %s)", k, ks)
        labels = model.predict(feats)
        params.update(
            {
                "n_niches": int(k),
                "n_niches_candidates": None if curve is None else [int(x) for x in curve["n_niches"]],
                "n_runs": int(n_runs),
                "covariance_type": covariance_type,
                "subsample": None if len(fit_idx) == n_obs else int(len(fit_idx)),
                "selection_subsample": None
                if curve is None or selection_subsample is None or len(fit_idx) <= selection_subsample
                else int(selection_subsample),
            }
        )
        if curve is not None:
            params["stability"] = {c: curve[c].to_numpy() for c in curve.columns}
    else:
        import scanpy as sc
        from sklearn.neighbors import kneighbors_graph

        knn = kneighbors_graph(feats, n_neighbors=min(15, n_obs - 1), include_self=False, n_jobs=n_jobs)
        knn = ((knn + knn.T) > 0).astype(np.float32)
        tmp = AnnData(np.zeros((n_obs, 0), dtype=np.float32))
        sc.tl.leiden(
            tmp,
            resolution=resolution,
            adjacency=knn,
            flavor="igraph",
            n_iterations=2,
            directed=False,
            random_state=random_state,
            key_added="leiden",
        )
        labels = tmp.obs["leiden"].astype(int).to_numpy()
        params.update({"resolution": float(resolution), "n_niches": int(len(np.unique(labels)))})
    return labels, params


def niche_enrichment(
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
    data
        AnnData, or SpatialData whose table ``table_key`` is used.
    niche_key
        Column of ``obs`` with niche labels (from :func:`squall_sd.tl.niches`).
    cluster_key
        Column of ``obs`` with cell types / clusters / regions. ``None``: no composition table.
    table_key
        Table of a SpatialData input (default ``"table"``).
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
