"""Static spatial plots on the H&E: expression, niches, signatures, pseudotime.

The panels of ``obs`` columns are drawn by :mod:`squall_sd.pl._panels`. :mod:`squall_sd.tl` (which
loads anndata and scipy) and :mod:`spatialdata` are imported inside functions, so that
``import squall_sd.pl`` stays light.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from squall_sd._constants import PREDICTED_VAR
from squall_sd._docs import d
from squall_sd._logging import logger
from squall_sd._sdata import check_table_key, tables_annotating
from squall_sd.pl._panels import _as_list, _image_key, _obs_panels, _one_obs_panel, _table_of
from squall_sd.pl._utils import (
    PAD_UM,
    cropped_image,
    get_axes,
    render_panel,
    resolve_spots,
    robust_norm,
    save_figure,
    table_values,
)

if TYPE_CHECKING:
    from anndata import AnnData
    from matplotlib.axes import Axes
    from matplotlib.colors import Colormap
    from spatialdata import SpatialData

__all__ = ["expression", "niches", "signatures", "trajectory"]


# ---------------------------------------------------------------------------------------------
# where the predictions are
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Source:
    table_key: str
    layer: str | None


def _annotates(sdata: SpatialData, table_key: str, shapes_key: str | None) -> bool:
    if shapes_key is None:
        return True
    return table_key in tables_annotating(sdata, shapes_key)


def find_prediction(sdata: SpatialData, *, table_key: str | None, layer: str, shapes_key: str | None = None) -> _Source:
    """Locate the predicted expression written by :func:`squall_sd.tl.predict_expression`.

    A table with ``layers[layer]`` (predictions beside measured counts), else a table whose
    ``var["squall_predicted"]`` marks predictions held in ``X`` (the ``"squall_expression"`` table
    of a slide without measured expression).

    Parameters
    ----------
    sdata
        The SpatialData.
    table_key
        Table to use, or ``None`` to search all tables.
    layer
        Layer holding the predictions.
    shapes_key
        Only consider tables annotating this shapes element.

    Returns
    -------
    The table and layer (``None``: ``X``) holding the predictions.

    """
    if table_key is not None:
        check_table_key(sdata, table_key)
        t = sdata.tables[table_key]
        if layer in t.layers:
            return _Source(table_key, layer)
        if PREDICTED_VAR in t.var:
            return _Source(table_key, None)
        raise KeyError(
            f"Table {table_key!r} holds no predicted expression: no `layers[{layer!r}]` (layers: "
            f"{list(t.layers)}) and no `var[{PREDICTED_VAR!r}]`. "
            "Run `squall.tl.predict_expression(sdata, "
            "model)` first, or pass `layer=` / `table_key=`."
        )
    names = [n for n in sorted(sdata.tables) if _annotates(sdata, n, shapes_key)]
    with_layer = [n for n in names if layer in sdata.tables[n].layers]
    in_x = [n for n in names if n not in with_layer and PREDICTED_VAR in sdata.tables[n].var]
    for group, lay in ((with_layer, layer), (in_x, None)):
        if len(group) == 1:
            return _Source(group[0], lay)
        if len(group) > 1:
            raise KeyError(f"Several tables hold predicted expression: {group}; pass `table_key=` to choose one.")
    raise KeyError(
        f"No predicted expression found: no table has `layers[{layer!r}]` or "
        f"`var[{PREDICTED_VAR!r}]` "
        f"(tables: {sorted(sdata.tables)}). Run `squall.tl.predict_expression(sdata, model)` first."
    )


def _measured_source(sdata: SpatialData, pred: _Source, shapes_key: str, measured_layer: str | None) -> _Source | None:
    """Return the measured expression of the predicted spots, or ``None`` when there is none."""
    if pred.layer is not None:
        key = pred.table_key
    else:
        others = [n for n in tables_annotating(sdata, shapes_key) if n != pred.table_key]
        others = [n for n in others if PREDICTED_VAR not in sdata.tables[n].var or sdata.tables[n].n_vars > 0]
        if len(others) != 1:
            if len(others) > 1:
                logger.info(
                    "several tables annotate %r (%s); not plotting measured expression",
                    shapes_key,
                    others,
                )
            return None
        key = others[0]
    if measured_layer is not None and measured_layer not in sdata.tables[key].layers:
        raise KeyError(
            f"`measured_layer={measured_layer!r}` not found in table {key!r} (layers: "
            f"{list(sdata.tables[key].layers)})."
        )
    return _Source(key, measured_layer)


# ---------------------------------------------------------------------------------------------
# expression
# ---------------------------------------------------------------------------------------------
@d.dedent
def expression(  # noqa: D417 - parameters from squall_sd._docs
    sdata: SpatialData,
    genes: str | Sequence[str],
    *,
    table_key: str | None = None,
    layer: str = "squall",
    measured: bool = True,
    measured_layer: str | None = None,
    shapes_key: str | None = None,
    image_key: str | None = None,
    show_image: bool = True,
    cmap: Colormap | str = "viridis",
    vmin: float | str | None = None,
    vmax: float | str | None = "p99",
    fill_alpha: float = 1.0,
    pad_um: float = PAD_UM,
    figsize: tuple[float, float] | None = None,
    ax: Axes | Sequence[Axes] | None = None,
    save: str | os.PathLike | None = None,
) -> np.ndarray:
    """Plot predicted (and measured) expression of genes on the H&E, spot by spot.

    For each gene one row of panels: the expression predicted by
    :func:`squall_sd.tl.predict_expression` and, when the slide has measured expression for
    the same spots, the measured one beside it. Spots are drawn as their true shapes (discs
    of the real radius) over the H&E, in the ``"microns"`` coordinate system, with
    :mod:`spatialdata_plot`. Each panel has its own colour scale.

    Parameters
    ----------
    sdata
        SpatialData with the H&E, the spots and a table holding predictions.
    genes
        Gene(s) to plot (``var_names`` of the table).
    table_key
        Table holding the predictions; default the one table with ``layers[layer]``, else the
        one whose ``var["squall_predicted"]`` marks predictions in ``X`` (``"squall_expression"``).
    layer
        Layer holding the predictions (ignored for a table holding them in ``X``).
    measured
        Also plot measured expression when present: ``X`` (or ``measured_layer``) of the table
        holding a prediction layer, or of the one other table annotating the same spots.
    measured_layer
        Layer of measured expression (e.g. log-normalised counts); default ``X``.
    shapes_key
        Spots to plot; default the element the prediction table annotates.
    %(image_key_he)s
    %(show_image)s
    cmap
        Colour map.
    vmin, vmax
        Colour limits per panel: a number, ``None`` (data minimum / maximum) or ``"pNN"``
        (NN-th percentile of the panel's values; default ``vmax="p99"``).
    %(spot_style)s
    figsize
        Size of a new figure, in inches (default 4 × 4 per panel).
    ax
        Axes to draw into: ``len(genes) × n_columns`` of them (row-major), where ``n_columns``
        is 2 with measured expression and 1 without.
    %(save)s

    Returns
    -------
    :class:`numpy.ndarray` of :class:`~matplotlib.axes.Axes`, shape ``(len(genes), n_columns)``;
    column 0 is predicted, column 1 measured.

    Raises
    ------
    KeyError
        No predictions (run :func:`squall_sd.tl.predict_expression` first), or an unknown gene.
    ValueError
        A gene the model does not predict (all values NaN), or the wrong number of ``ax``.

    """
    gene_list = _as_list(genes) or []
    if not gene_list:
        raise ValueError("Pass at least one gene in `genes`.")
    pred = find_prediction(sdata, table_key=table_key, layer=layer, shapes_key=shapes_key)
    spots = resolve_spots(sdata, shapes_key=shapes_key, table_key=pred.table_key)
    meas = _measured_source(sdata, pred, spots.shapes_key, measured_layer) if measured else None
    ptab = sdata.tables[pred.table_key]
    missing = [g for g in gene_list if g not in ptab.var_names]
    if missing:
        raise KeyError(
            f"Genes {missing} not in table {pred.table_key!r} ({ptab.n_vars} genes, e.g. {list(ptab.var_names[:5])})."
        )
    if meas is not None and not any(g in sdata.tables[meas.table_key].var_names for g in gene_list):
        meas = None
    ncols = 2 if meas is not None else 1
    fig, axes = get_axes(ax, len(gene_list) * ncols, ncols=ncols, figsize=figsize)
    ikey = _image_key(sdata, image_key, show_image)
    image = cropped_image(sdata, ikey, spots.bounds_um, pad_um=pad_um) if ikey is not None else None
    for i, gene in enumerate(gene_list):
        values = table_values(ptab, gene, pred.layer)
        if not np.isfinite(values).any():
            raise ValueError(
                f"Gene {gene!r} has no predicted values in table {pred.table_key!r} (all NaN): "
                "the model "
                f"does not predict it. Predicted genes are marked by `var[{PREDICTED_VAR!r}]`."
            )
        render_panel(
            sdata,
            image_key=ikey,
            image=image,
            spots=spots,
            ax=axes[i * ncols],
            color=gene,
            table_key=pred.table_key,
            table_layer=pred.layer,
            cmap=cmap,
            norm=robust_norm(values, vmin=vmin, vmax=vmax),
            title=f"{gene} predicted",
            fill_alpha=fill_alpha,
            pad_um=pad_um,
        )
        if meas is None:
            continue
        target = axes[i * ncols + 1]
        mtab = sdata.tables[meas.table_key]
        if gene not in mtab.var_names:
            target.set_axis_off()
            target.set_title(f"{gene} not measured")
            continue
        mvalues = table_values(mtab, gene, meas.layer)
        render_panel(
            sdata,
            image_key=ikey,
            image=image,
            spots=spots,
            ax=target,
            color=gene,
            table_key=meas.table_key,
            table_layer=meas.layer,
            cmap=cmap,
            norm=robust_norm(mvalues, vmin=vmin, vmax=vmax),
            title=f"{gene} measured",
            fill_alpha=fill_alpha,
            pad_um=pad_um,
        )
    save_figure(fig, save)
    return np.asarray(axes, dtype=object).reshape(len(gene_list), ncols)


@d.dedent
def niches(  # noqa: D417 - parameters from squall_sd._docs
    data: SpatialData | AnnData,
    *,
    key: str = "squall_niche",
    table_key: str | None = None,
    shapes_key: str | None = None,
    image_key: str | None = None,
    show_image: bool = True,
    groups: Sequence[str] | None = None,
    palette: dict[str, str] | Sequence[str] | str | None = None,
    fill_alpha: float = 1.0,
    pad_um: float = PAD_UM,
    title: str | None = None,
    figsize: tuple[float, float] | None = None,
    ax: Axes | None = None,
    save: str | os.PathLike | None = None,
) -> Axes:
    """Plot the spatial niches found by :func:`squall_sd.tl.niches` on the H&E.

    Parameters
    ----------
    %(data_plot)s
    key
        Categorical column of ``obs`` holding the niche labels.
    %(table_key_plot)s
    %(shapes_key_plot)s
    %(image_key_he)s
    %(show_image)s
    groups
        Niches to colour; the others are drawn in light grey.
    palette
        Niche → colour mapping, a list of colours, or a colormap name; default
        ``uns[f"{key}_colors"]`` (scanpy's convention), else scanpy's default palette.
    %(spot_style)s
    title
        Panel title (default ``key``).
    figsize
        Size of a new figure, in inches.
    ax
        Axes to draw into.
    %(save)s

    Returns
    -------
    The :class:`~matplotlib.axes.Axes`.

    Raises
    ------
    KeyError
        ``obs[key]`` is missing (run :func:`squall_sd.tl.niches` first).

    """
    return _one_obs_panel(
        data,
        key,
        run="squall.tl.niches(adata)",
        title=title,
        kind="categorical",
        table_key=table_key,
        shapes_key=shapes_key,
        image_key=image_key,
        show_image=show_image,
        cmap=None,
        vmin=None,
        vmax=None,
        palette=palette,
        groups=groups,
        fill_alpha=fill_alpha,
        pad_um=pad_um,
        figsize=figsize,
        ax=ax,
        save=save,
    )


@d.dedent
def signatures(  # noqa: D417 - parameters from squall_sd._docs
    data: SpatialData | AnnData,
    keys: str | Sequence[str] | None = None,
    *,
    table_key: str | None = None,
    key_prefix: str = "sig_",
    shapes_key: str | None = None,
    image_key: str | None = None,
    show_image: bool = True,
    cmap: Colormap | str = "magma",
    vmin: float | str | None = "p1",
    vmax: float | str | None = "p99",
    fill_alpha: float = 1.0,
    pad_um: float = PAD_UM,
    ncols: int = 3,
    figsize: tuple[float, float] | None = None,
    ax: Axes | Sequence[Axes] | None = None,
    save: str | os.PathLike | None = None,
) -> list[Axes]:
    """Plot signature scores from :func:`squall_sd.tl.score_signatures` on the H&E.

    Parameters
    ----------
    %(data_plot)s
    keys
        Score columns of ``obs``: full names (``"sig_tls"``) or signature names (``"tls"``, the
        ``key_prefix`` is added). Default: every column starting with ``key_prefix``.
    %(table_key_plot)s
    key_prefix
        Prefix of the score columns.
    %(shapes_key_plot)s
    %(image_key_he)s
    %(show_image)s
    cmap
        Colour map.
    vmin, vmax
        Colour limits per panel: numbers, ``None`` (data range) or ``"pNN"`` percentiles.
    %(spot_style)s
    ncols
        Panels per row of a new figure.
    figsize
        Size of a new figure, in inches.
    ax
        Axes to draw into, one per score.
    %(save)s

    Returns
    -------
    One :class:`~matplotlib.axes.Axes` per score.

    Raises
    ------
    KeyError
        No score column (run :func:`squall_sd.tl.score_signatures` first) or an unknown key.

    """
    adata = _table_of(data, table_key, shapes_key)
    names = _as_list(keys)
    if names is None:
        names = [str(c) for c in adata.obs.columns if str(c).startswith(key_prefix) and _numeric(adata.obs[c])]
        if not names:
            raise KeyError(
                f"No signature scores (`obs` columns starting with {key_prefix!r}) in the "
                "table. Run "
                "`squall.tl.score_signatures(adata)` first, or pass `keys=`."
            )
    cols = [n if n in adata.obs or f"{key_prefix}{n}" not in adata.obs else f"{key_prefix}{n}" for n in names]
    for c, n in zip(cols, names, strict=True):
        if c not in adata.obs:
            near = [str(x) for x in adata.obs.columns if str(x).startswith(key_prefix)]
            raise KeyError(
                f"Signature score {n!r} not found in `obs` (score columns: {near}). Run "
                "`squall.tl.score_signatures(adata)` first."
            )
    titles = [c[len(key_prefix) :] if c.startswith(key_prefix) else c for c in cols]
    return _obs_panels(
        data,
        cols,
        kind="continuous",
        table_key=table_key,
        shapes_key=shapes_key,
        image_key=image_key,
        show_image=show_image,
        cmap=cmap,
        vmin=vmin,
        vmax=vmax,
        palette=None,
        groups=None,
        titles=titles,
        fill_alpha=fill_alpha,
        pad_um=pad_um,
        ncols=ncols,
        figsize=figsize,
        ax=ax,
        save=save,
    )


def _numeric(series: pd.Series) -> bool:
    return pd.api.types.is_numeric_dtype(series) and not pd.api.types.is_bool_dtype(series)


@d.dedent
def trajectory(  # noqa: D417 - parameters from squall_sd._docs
    data: SpatialData | AnnData,
    *,
    key: str = "squall_pseudotime",
    table_key: str | None = None,
    shapes_key: str | None = None,
    image_key: str | None = None,
    show_image: bool = True,
    cmap: Colormap | str = "plasma",
    vmin: float | str | None = None,
    vmax: float | str | None = None,
    fill_alpha: float = 1.0,
    pad_um: float = PAD_UM,
    title: str | None = None,
    figsize: tuple[float, float] | None = None,
    ax: Axes | None = None,
    save: str | os.PathLike | None = None,
) -> Axes:
    """Plot the pseudotime from :func:`squall_sd.tl.trajectory` on the H&E.

    Parameters
    ----------
    %(data_plot)s
    key
        Column of ``obs`` holding the pseudotime (observations not reached are NaN, drawn grey).
    %(table_key_plot)s
    %(shapes_key_plot)s
    %(image_key_he)s
    %(show_image)s
    cmap
        Colour map.
    vmin, vmax
        Colour limits: numbers, ``None`` (data range) or ``"pNN"`` percentiles.
    %(spot_style)s
    title
        Panel title (default ``key``).
    figsize
        Size of a new figure, in inches.
    ax
        Axes to draw into.
    %(save)s

    Returns
    -------
    The :class:`~matplotlib.axes.Axes`.

    Raises
    ------
    KeyError
        ``obs[key]`` is missing (run :func:`squall_sd.tl.trajectory` first).

    """
    return _one_obs_panel(
        data,
        key,
        run="squall.tl.trajectory(adata, root=...)",
        title=title,
        kind="continuous",
        table_key=table_key,
        shapes_key=shapes_key,
        image_key=image_key,
        show_image=show_image,
        cmap=cmap,
        vmin=vmin,
        vmax=vmax,
        palette=None,
        groups=None,
        fill_alpha=fill_alpha,
        pad_um=pad_um,
        figsize=figsize,
        ax=ax,
        save=save,
    )
