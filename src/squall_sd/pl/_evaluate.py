"""Agreement of predictions with measurements: per-gene correlation summary and scatter plots.

matplotlib, spatialdata, napari, :mod:`squall_sd.pp` and :mod:`squall_sd.tl` (whose packages load
spatialdata and anndata on import) are imported inside functions, so that
``import squall_sd.pl`` stays light.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Literal

import numpy as np
import pandas as pd
from scipy import sparse

from squall_sd._constants import PREDICTED_VAR
from squall_sd._docs import d
from squall_sd._logging import logger
from squall_sd.pl._spatial import find_prediction
from squall_sd.pl._utils import get_axes, save_figure, table_values

if TYPE_CHECKING:
    from anndata import AnnData
    from matplotlib.axes import Axes
    from spatialdata import SpatialData

__all__ = ["predicted_vs_measured"]


def _resolve_table(data: AnnData | SpatialData, table_key: str | None, layer: str) -> AnnData:
    from spatialdata import SpatialData

    if not isinstance(data, SpatialData):
        return data
    src = find_prediction(data, table_key=table_key, layer=layer)
    if src.layer is None:
        raise ValueError(
            f"Table {src.table_key!r} holds predictions in `X` and no measured expression. "
            "predicted_vs_measured needs both in one table: predict at the measured spots "
            "(`squall.tl.predict_expression(sdata, model)` writes `layers['squall']` of the "
            "measured table)."
        )
    return data.tables[src.table_key]


def _correlations(adata: AnnData, *, layer: str, measured_layer: str | None, key: str) -> pd.Series:
    """Per-gene Pearson r: ``var[f"{key}_pearson"]`` when present, else computed (not stored)."""
    col = f"{key}_pearson"
    if col in adata.var:
        return pd.to_numeric(adata.var[col], errors="coerce").astype(float)
    from squall_sd.tl._evaluate import pearson_per_gene

    if layer not in adata.layers:
        raise KeyError(
            f"`layers[{layer!r}]` not found (layers: {list(adata.layers)}). Run "
            "`squall.tl.predict_expression(sdata, model)` first, or pass `layer=`."
        )
    pred = np.asarray(adata.layers[layer].toarray() if sparse.issparse(adata.layers[layer]) else adata.layers[layer])
    keep = np.isfinite(pred).all(axis=0)
    if PREDICTED_VAR in adata.var:
        keep &= adata.var[PREDICTED_VAR].to_numpy(dtype=bool)
    if not keep.any():
        raise ValueError(f"`layers[{layer!r}]` holds no predicted gene (all columns contain NaN).")
    meas = adata.X if measured_layer is None else adata.layers[measured_layer]
    meas = meas[:, np.flatnonzero(keep)]
    meas = meas.toarray() if sparse.issparse(meas) else np.asarray(meas)
    with np.errstate(invalid="ignore", divide="ignore"):
        r = pearson_per_gene(np.asarray(meas, dtype=float), pred[:, keep].astype(float))
    out = pd.Series(np.nan, index=adata.var_names, dtype=float)
    out.iloc[np.flatnonzero(keep)] = r
    logger.info(
        "computed Pearson r of %d genes (not stored; `squall.tl.evaluate_expression` stores them)",
        int(keep.sum()),
    )
    return out


@d.dedent
def predicted_vs_measured(  # noqa: D417 - parameters from squall_sd._docs
    data: AnnData | SpatialData,
    *,
    genes: str | Sequence[str] | None = None,
    layer: str = "squall",
    measured_layer: str | None = None,
    table_key: str | None = None,
    key: str = "squall_eval",
    summary: Literal["hist", "bar"] = "hist",
    n_top: int = 20,
    n_genes: int = 3,
    bins: int = 30,
    ncols: int = 4,
    figsize: tuple[float, float] | None = None,
    ax: Axes | Sequence[Axes] | None = None,
    save: str | os.PathLike | None = None,
) -> list[Axes]:
    """Summarise per-gene agreement of predicted with measured expression, and scatter chosen genes.

    The first panel summarises the per-gene Pearson r across spots: a histogram of all genes
    (``summary="hist"``) or the ``n_top`` best genes as ranked bars (``summary="bar"``). The
    correlations come from ``var[f"{key}_pearson"]`` written by
    :func:`squall_sd.tl.evaluate_expression`, or are computed here (and not stored) when absent.
    Each further panel is a scatter of measured (x) against predicted (y) expression of one gene,
    one dot per spot.

    Parameters
    ----------
    data
        AnnData with measured expression (``X`` or ``measured_layer``) and predictions
        (``layers[layer]``), or a SpatialData whose prediction table is used.
    genes
        Genes to scatter; default the ``n_genes`` genes with the highest r.
    layer
        Layer holding the predictions.
    measured_layer
        Layer holding the measured expression (default ``X``). Use the same normalisation as
        :func:`squall_sd.tl.evaluate_expression` (e.g. log1p CP10k) for comparable numbers.
    table_key
        Table of a SpatialData; default the one holding ``layers[layer]``.
    key
        Prefix of the ``var`` columns written by :func:`squall_sd.tl.evaluate_expression`.
    summary
        ``"hist"`` (histogram of r over genes) or ``"bar"`` (ranked bars of the best genes).
    n_top
        Genes in the ranked bars.
    n_genes
        Genes to scatter when ``genes`` is not given.
    bins
        Histogram bins.
    ncols
        Panels per row of a new figure.
    figsize
        Size of a new figure, in inches (default 3.5 × 3.5 per panel).
    ax
        Axes to draw into: ``1 + len(genes)`` of them.
    %(save)s

    Returns
    -------
    The summary :class:`~matplotlib.axes.Axes` followed by one per scattered gene.

    Raises
    ------
    KeyError
        No predictions (``layers[layer]``) or an unknown gene.
    ValueError
        An unknown ``summary``, no finite correlation, or the wrong number of ``ax``.

    """
    if summary not in ("hist", "bar"):
        raise ValueError(f"`summary` must be 'hist' or 'bar', got {summary!r}.")
    adata = _resolve_table(data, table_key, layer)
    if measured_layer is not None and measured_layer not in adata.layers:
        raise KeyError(f"`measured_layer={measured_layer!r}` not found (layers: {list(adata.layers)}).")
    r = _correlations(adata, layer=layer, measured_layer=measured_layer, key=key)
    finite = r[np.isfinite(r.to_numpy())].sort_values(ascending=False, kind="mergesort")
    if finite.empty:
        raise ValueError("No gene has a finite Pearson r (constant predictions or measurements).")
    if genes is None:
        gene_list = [str(g) for g in finite.index[: max(int(n_genes), 0)]]
    else:
        gene_list = [genes] if isinstance(genes, str) else [str(g) for g in genes]
        missing = [g for g in gene_list if g not in adata.var_names]
        if missing:
            raise KeyError(f"Genes {missing} not found in `var_names` ({adata.n_vars} genes).")
    if layer not in adata.layers and gene_list:
        raise KeyError(f"`layers[{layer!r}]` not found (layers: {list(adata.layers)}); pass `layer=`.")
    n = 1 + len(gene_list)
    fig, axes = get_axes(ax, n, ncols=ncols, panel_size=(3.5, 3.5), figsize=figsize)

    ax0 = axes[0]
    if summary == "hist":
        ax0.hist(finite.to_numpy(), bins=bins, range=(-1.0, 1.0), color="#4c72b0", edgecolor="white")
        med = float(finite.median())
        ax0.axvline(med, color="#c44e52", linestyle="--", linewidth=1.5)
        ax0.set_xlim(-1.0, 1.0)
        ax0.set_xlabel("Pearson r (per gene)")
        ax0.set_ylabel("genes")
        ax0.set_title(f"{len(finite)} genes, median r = {med:.2f}")
    else:
        top = finite.iloc[: max(int(n_top), 1)]
        pos = np.arange(len(top))
        ax0.barh(pos, top.to_numpy(), color="#4c72b0")
        ax0.set_yticks(pos, [str(g) for g in top.index])
        ax0.invert_yaxis()
        ax0.set_xlabel("Pearson r")
        ax0.set_title(f"top {len(top)} of {len(finite)} genes")

    for gene, target in zip(gene_list, axes[1:], strict=True):
        x = table_values(adata, gene, measured_layer)
        y = table_values(adata, gene, layer)
        ok = np.isfinite(x) & np.isfinite(y)
        target.scatter(x[ok], y[ok], s=8, color="#4c72b0", alpha=0.7, linewidths=0)
        rv = r.get(gene, np.nan)
        target.set_title(f"{gene}  r = {rv:.2f}" if np.isfinite(rv) else f"{gene}  r = n/a")
        target.set_xlabel("measured")
        target.set_ylabel("predicted")
    save_figure(fig, save)
    return axes
