"""Per-gene agreement between measured and predicted expression (Pearson, Spearman, partial r).

The metric of the her2st virtual-expression benchmark: per gene, the correlation across the spots
(or cells) of one held-out section. Because sequencing depth confounds it (after CP10k + log1p a
low-expressed gene still rises with a spot's total UMI), the partial Pearson r controlling for log
total UMI is computed beside it when a depth covariate is given.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
from anndata import AnnData
from scipy import sparse, stats

from squall_sd._logging import logger

__all__ = [
    "bh_adjust",
    "evaluate_expression",
    "partial_pearson_per_gene",
    "pearson_per_gene",
    "spearman_per_gene",
]


def _as_2d_float(x: Any, name: str) -> np.ndarray:
    """Return ``x`` as a dense 2-D float64 array (a 1-D input becomes one column)."""
    if sparse.issparse(x):
        x = x.toarray()
    arr = np.asarray(x, dtype=np.float64)
    if arr.ndim == 1:
        arr = arr[:, None]
    if arr.ndim != 2:
        raise ValueError(f"`{name}` must be a 1-D or 2-D array (observations × genes), got shape {arr.shape}.")
    return arr


def _check_pair(y_true: Any, y_pred: Any) -> tuple[np.ndarray, np.ndarray]:
    a = _as_2d_float(y_true, "y_true")
    b = _as_2d_float(y_pred, "y_pred")
    if a.shape != b.shape:
        raise ValueError(
            f"`y_true` and `y_pred` must have the same shape (observations × genes), got {a.shape} and {b.shape}."
        )
    return a, b


def _columnwise_r(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pearson r of matching columns; NaN where a column is constant (or has < 2 rows)."""
    n = a.shape[0]
    if n < 2:
        return np.full(a.shape[1], np.nan)
    # magnitude of each column before centring: spread at round-off level of it counts as constant
    mag_a = np.maximum(np.abs(a).max(axis=0), np.finfo(np.float64).tiny)
    mag_b = np.maximum(np.abs(b).max(axis=0), np.finfo(np.float64).tiny)
    a = a - a.mean(axis=0, keepdims=True)
    b = b - b.mean(axis=0, keepdims=True)
    ss_a = np.einsum("ij,ij->j", a, a)
    ss_b = np.einsum("ij,ij->j", b, b)
    num = np.einsum("ij,ij->j", a, b)
    const = (ss_a <= n * (1e-12 * mag_a) ** 2) | (ss_b <= n * (1e-12 * mag_b) ** 2)
    with np.errstate(invalid="ignore", divide="ignore"):
        r = num / np.sqrt(ss_a * ss_b)
    r[const | ~np.isfinite(r)] = np.nan
    return np.clip(r, -1.0, 1.0)


def _r_pvalue(r: np.ndarray, dof: int) -> np.ndarray:
    """Two-sided p-value of ``r`` under H0: rho = 0 (t test with ``dof`` degrees of freedom)."""
    r = np.asarray(r, dtype=np.float64)
    p = np.full(r.shape, np.nan)
    if dof < 1:
        return p
    ok = np.isfinite(r)
    rr = np.clip(r[ok], -1.0, 1.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        t = rr * np.sqrt(dof / np.maximum(1.0 - rr**2, 0.0))
    p[ok] = 2.0 * stats.t.sf(np.abs(t), dof)
    return p


def pearson_per_gene(
    y_true: np.ndarray, y_pred: np.ndarray, *, return_pvalue: bool = False
) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """Pearson correlation of each gene (column) between measured and predicted values.

    Parameters
    ----------
    y_true
        Measured values, observations × genes (dense or sparse; a 1-D array is one gene).
    y_pred
        Predicted values of the same shape.
    return_pvalue
        Also return the two-sided p-value of each r (t test with ``n - 2`` degrees of freedom,
        identical to :func:`scipy.stats.pearsonr`).

    Returns
    -------
    numpy.ndarray or tuple of numpy.ndarray
        ``r`` of shape ``(n_genes,)``, NaN for a gene that is constant in either input;
        ``(r, p)`` when ``return_pvalue`` is true.

    Raises
    ------
    ValueError
        If the shapes differ.

    """
    a, b = _check_pair(y_true, y_pred)
    r = _columnwise_r(a, b)
    if return_pvalue:
        return r, _r_pvalue(r, a.shape[0] - 2)
    return r


def spearman_per_gene(
    y_true: np.ndarray, y_pred: np.ndarray, *, return_pvalue: bool = False
) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """Spearman rank correlation of each gene (column) between measured and predicted values.

    Ties get average ranks, as in :func:`scipy.stats.spearmanr`.

    Parameters
    ----------
    y_true
        Measured values, observations × genes.
    y_pred
        Predicted values of the same shape.
    return_pvalue
        Also return the two-sided p-value (t approximation with ``n - 2`` degrees of freedom, as
        :func:`scipy.stats.spearmanr`).

    Returns
    -------
    numpy.ndarray or tuple of numpy.ndarray
        ``rho`` of shape ``(n_genes,)`` (NaN for constant genes); ``(rho, p)`` when
        ``return_pvalue``.

    Raises
    ------
    ValueError
        If the shapes differ.

    """
    a, b = _check_pair(y_true, y_pred)
    ra = stats.rankdata(a, axis=0) if a.shape[0] else a
    rb = stats.rankdata(b, axis=0) if b.shape[0] else b
    rho = _columnwise_r(np.asarray(ra, dtype=np.float64), np.asarray(rb, dtype=np.float64))
    if return_pvalue:
        return rho, _r_pvalue(rho, a.shape[0] - 2)
    return rho


def partial_pearson_per_gene(
    y_true: np.ndarray,
    y_pred: np.ndarray,
    covariate: np.ndarray,
    *,
    return_pvalue: bool = False,
) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """Partial Pearson r per gene between measured and predicted values, controlling for covariates.

    Both the measured and the predicted values of each gene are regressed (least squares, with an
    intercept) on the covariate(s); the result is the Pearson r of the two residuals. With the
    covariate set to log total UMI this removes what a predictor gains by knowing sequencing depth.

    Parameters
    ----------
    y_true
        Measured values, observations × genes.
    y_pred
        Predicted values of the same shape.
    covariate
        Covariate(s) per observation, shape ``(n_obs,)`` or ``(n_obs, k)``, e.g.
        ``log1p(total UMI)``.
    return_pvalue
        Also return two-sided p-values (t test with ``n - 2 - k`` degrees of freedom).

    Returns
    -------
    numpy.ndarray or tuple of numpy.ndarray
        Partial r of shape ``(n_genes,)``; NaN where a residual is constant (e.g. a prediction that
        is an exact linear function of the covariate). ``(r, p)`` when ``return_pvalue``.

    Raises
    ------
    ValueError
        If the shapes differ or the covariate does not have one row per observation.

    """
    a, b = _check_pair(y_true, y_pred)
    z = _as_2d_float(covariate, "covariate")
    if z.shape[0] != a.shape[0]:
        raise ValueError(f"`covariate` must have one row per observation ({a.shape[0]}), got shape {z.shape}.")
    if not np.all(np.isfinite(z)):
        raise ValueError("`covariate` contains non-finite values.")
    design = np.column_stack([np.ones(a.shape[0]), z])
    q, _ = np.linalg.qr(design)
    res_a = a - q @ (q.T @ a)
    res_b = b - q @ (q.T @ b)
    # a residual at round-off level relative to the original spread means "fully explained"
    spread_a = np.ptp(a, axis=0) if a.shape[0] else np.zeros(a.shape[1])
    spread_b = np.ptp(b, axis=0) if b.shape[0] else np.zeros(b.shape[1])
    r = _columnwise_r(res_a, res_b)
    flat = (np.ptp(res_a, axis=0) <= 1e-9 * np.maximum(spread_a, 1e-300)) | (
        np.ptp(res_b, axis=0) <= 1e-9 * np.maximum(spread_b, 1e-300)
    )
    r[flat] = np.nan
    if return_pvalue:
        return r, _r_pvalue(r, a.shape[0] - 2 - z.shape[1])
    return r


def bh_adjust(p: np.ndarray) -> np.ndarray:
    """Benjamini–Hochberg adjusted p-values (q-values); NaN entries are ignored and stay NaN.

    Parameters
    ----------
    p
        p-values, any shape. The number of tests ``m`` is the number of finite entries.

    Returns
    -------
    numpy.ndarray
        Adjusted p-values of the same shape: ``min_{j >= i} p_(j) m / j`` capped at 1, matching
        :func:`scipy.stats.false_discovery_control` (``method="bh"``) on the finite entries.

    Raises
    ------
    ValueError
        If a finite p-value lies outside ``[0, 1]``.

    """
    p = np.asarray(p, dtype=np.float64)
    out = np.full(p.shape, np.nan)
    flat = p.ravel()
    ok = np.isfinite(flat)
    vals = flat[ok]
    if vals.size == 0:
        return out
    if np.any((vals < 0) | (vals > 1)):
        raise ValueError("p-values must lie in [0, 1].")
    m = vals.size
    order = np.argsort(vals, kind="mergesort")
    ranked = vals[order] * m / np.arange(1, m + 1)
    ranked = np.minimum.accumulate(ranked[::-1])[::-1]
    adj = np.empty(m)
    adj[order] = np.minimum(ranked, 1.0)
    res = out.ravel()
    res[ok] = adj
    return res.reshape(p.shape)


def _summary(r: np.ndarray) -> dict[str, float]:
    finite = r[np.isfinite(r)]
    if finite.size == 0:
        return {"mean": float("nan"), "median": float("nan")}
    return {"mean": float(finite.mean()), "median": float(np.median(finite))}


def _get_matrix(adata: AnnData, source: str | np.ndarray | None, what: str) -> Any:
    if source is None:
        return adata.X
    if isinstance(source, str):
        if source not in adata.layers:
            raise KeyError(
                f"The {what} layer {source!r} is not in `adata.layers` "
                f"(available: {list(adata.layers)}). "
                f"Pass the name of a layer, or None for `adata.X`."
            )
        return adata.layers[source]
    mat = source
    if getattr(mat, "shape", None) != adata.shape:
        raise ValueError(f"The {what} array must have shape {adata.shape}, got {getattr(mat, 'shape', None)}.")
    return mat


def evaluate_expression(
    adata: AnnData,
    *,
    measured: str | None = None,
    predicted: str | np.ndarray = "squall",
    genes: Sequence[str] | None = None,
    depth_key: str | None = None,
    key_added: str = "squall_eval",
    alpha: float = 0.05,
    copy: bool = False,
) -> dict[str, Any]:
    """Score predicted against measured expression, gene by gene, across the observations.

    For every evaluated gene, the Pearson r and Spearman rho across observations (spots / cells)
    with Benjamini–Hochberg adjusted p-values, and, when ``depth_key`` is given, the partial Pearson
    r controlling for that depth covariate. Call it once per held-out section: correlations pooled
    over sections also reward between-section differences.

    Both matrices should be on the same scale, e.g. CP10k + log1p (:func:`scanpy.pp.normalize_total`
    with ``target_sum=1e4`` then :func:`scanpy.pp.log1p`); Pearson r is invariant to a per-gene
    affine rescaling of the prediction, so a prediction on another linear scale scores the same.

    Parameters
    ----------
    adata
        Observations × genes.
    measured
        Layer holding the measured (normalised) expression; ``None`` uses ``adata.X``.
    predicted
        Layer holding the predicted expression (default ``"squall"``), or an array of shape
        ``adata.shape``.
    genes
        Genes to evaluate (a subset of ``adata.var_names``); default all. Genes not evaluated get
        NaN in the ``var`` columns.
    depth_key
        Column of ``adata.obs`` with the depth covariate for the partial correlation — pass
        **log** total UMI (e.g. scanpy's ``log1p_total_counts`` from
        :func:`scanpy.pp.calculate_qc_metrics` computed on raw counts). ``None`` skips it.
    key_added
        Prefix of the ``var`` columns and key of the summary in ``adata.uns``.
    alpha
        False-discovery rate for counting significant genes.
    copy
        Only return the summary; do not write into ``adata``.

    Returns
    -------
    dict
        The summary (unless ``copy=True`` also stored in ``adata.uns[key_added]``): ``n_obs``,
        ``n_genes`` (genes with a finite r), ``mean_pearson``, ``median_pearson``,
        ``mean_spearman``, ``median_spearman``, ``n_significant`` (genes with r > 0 and BH
        q < ``alpha``), ``alpha`` and, with ``depth_key``, ``mean_partial_pearson``,
        ``median_partial_pearson``, ``n_significant_partial`` and ``depth_key``.

        Unless ``copy=True``, ``adata.var`` gains ``{key_added}_pearson``, ``_pearson_pval``,
        ``_pearson_padj``, ``_spearman``, ``_spearman_padj`` and, with ``depth_key``,
        ``_partial_pearson`` and ``_partial_pearson_padj``.

    Raises
    ------
    KeyError
        If a layer, gene or ``depth_key`` is missing.
    ValueError
        If the predicted array has the wrong shape or fewer than 3 observations are given.

    """
    if adata.n_obs < 3:
        raise ValueError(f"Need at least 3 observations to correlate, got {adata.n_obs}.")
    if genes is None:
        idx = np.arange(adata.n_vars)
    else:
        genes = list(genes)
        missing = [g for g in genes if g not in adata.var_names]
        if missing:
            raise KeyError(f"{len(missing)} genes are not in `adata.var_names`, e.g. {missing[:5]}.")
        idx = adata.var_names.get_indexer(genes)
    y_true = _get_matrix(adata, measured, "measured")
    y_pred = _get_matrix(adata, predicted, "predicted")
    y_true = _as_2d_float(y_true[:, idx], "measured")
    y_pred = _as_2d_float(y_pred[:, idx], "predicted")

    r, p = pearson_per_gene(y_true, y_pred, return_pvalue=True)
    rho, p_rho = spearman_per_gene(y_true, y_pred, return_pvalue=True)
    q = bh_adjust(p)
    q_rho = bh_adjust(p_rho)

    def _full(values: np.ndarray) -> np.ndarray:
        col = np.full(adata.n_vars, np.nan)
        col[idx] = values
        return col

    def _put(column: str, values: np.ndarray) -> None:
        if not copy:
            adata.var[f"{key_added}_{column}"] = _full(values)

    _put("pearson", r)
    _put("pearson_pval", p)
    _put("pearson_padj", q)
    _put("spearman", rho)
    _put("spearman_padj", q_rho)

    s_r, s_rho = _summary(r), _summary(rho)
    summary: dict[str, Any] = {
        "n_obs": int(adata.n_obs),
        "n_genes": int(np.isfinite(r).sum()),
        "n_genes_requested": int(len(idx)),
        "mean_pearson": s_r["mean"],
        "median_pearson": s_r["median"],
        "mean_spearman": s_rho["mean"],
        "median_spearman": s_rho["median"],
        "n_significant": int(np.sum((r > 0) & (q < alpha))),
        "alpha": float(alpha),
    }
    if depth_key is not None:
        if depth_key not in adata.obs:
            raise KeyError(
                f"`depth_key` {depth_key!r} is not a column of `adata.obs`; compute log total UMI "
                "first, e.g. `sc.pp.calculate_qc_metrics(adata, inplace=True, log1p=True)` → "
                "'log1p_total_counts'."
            )
        depth = pd.to_numeric(adata.obs[depth_key], errors="raise").to_numpy(dtype=np.float64)
        pr, pp_ = partial_pearson_per_gene(y_true, y_pred, depth, return_pvalue=True)
        pq = bh_adjust(pp_)
        _put("partial_pearson", pr)
        _put("partial_pearson_padj", pq)
        s_pr = _summary(pr)
        summary.update(
            mean_partial_pearson=s_pr["mean"],
            median_partial_pearson=s_pr["median"],
            n_significant_partial=int(np.sum((pr > 0) & (pq < alpha))),
            depth_key=depth_key,
        )
    n_nan = int(len(idx) - summary["n_genes"])
    if n_nan:
        logger.info(
            "evaluate_expression: %d of %d genes are constant in measured or predicted (r = NaN).",
            n_nan,
            len(idx),
        )
    if not copy:
        adata.uns[key_added] = summary
    return summary
