"""Niche clustering of aggregated features: Gaussian mixtures chosen by stability, or Leiden.

The mixtures follow CellCharter (the number of components chosen by clustering stability).

scikit-learn and scanpy are imported inside the functions: ``import squall_sd.tl`` does not load them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
from anndata import AnnData

from squall_sd._logging import logger

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


def _relabel_by_size(labels: np.ndarray) -> pd.Categorical:
    """Relabel clusters ``0..k-1`` by decreasing size (deterministic names)."""
    uniq, counts = np.unique(labels, return_counts=True)
    order = uniq[np.argsort(-counts, kind="stable")]
    mapping = {old: new for new, old in enumerate(order)}
    new = np.fromiter((mapping[x] for x in labels), dtype=int, count=len(labels))
    cats = [str(i) for i in range(len(order))]
    return pd.Categorical(new.astype(str), categories=cats)


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
