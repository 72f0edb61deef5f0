"""Static spatial plots on the H&E: expression, niches, signatures, pseudotime."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from squall_sd._constants import PREDICTED_VAR
from squall_sd._logging import logger
from squall_sd.pl._utils import (
    PAD_UM,
    Spots,
    cropped_image,
    get_axes,
    obs_values,
    render_panel,
    resolve_spots,
    robust_norm,
    save_figure,
    spot_radius_um,
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


def _is_sdata(data: Any) -> bool:
    from spatialdata import SpatialData

    return isinstance(data, SpatialData)


def _annotates(sdata: SpatialData, table_key: str, shapes_key: str | None) -> bool:
    if shapes_key is None:
        return True
    from squall_sd.tl._keys import tables_annotating

    return table_key in tables_annotating(sdata, shapes_key)


def find_prediction(
    sdata: SpatialData, *, table_key: str | None, layer: str, shapes_key: str | None = None
) -> _Source:
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
        from squall_sd.tl._keys import check_table_key

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
            raise KeyError(
                f"Several tables hold predicted expression: {group}; "
                "pass `table_key=` to choose one."
            )
    raise KeyError(
        f"No predicted expression found: no table has `layers[{layer!r}]` or "
        f"`var[{PREDICTED_VAR!r}]` "
        f"(tables: {sorted(sdata.tables)}). Run `squall.tl.predict_expression(sdata, model)` first."
    )


def _measured_source(
    sdata: SpatialData, pred: _Source, shapes_key: str, measured_layer: str | None
) -> _Source | None:
    """Return the measured expression of the predicted spots, or ``None`` when there is none."""
    from squall_sd.tl._keys import tables_annotating

    if pred.layer is not None:
        key = pred.table_key
    else:
        others = [n for n in tables_annotating(sdata, shapes_key) if n != pred.table_key]
        others = [
            n
            for n in others
            if PREDICTED_VAR not in sdata.tables[n].var or sdata.tables[n].n_vars > 0
        ]
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


def _as_list(x: str | Sequence[str] | None) -> list[str] | None:
    if x is None:
        return None
    return [x] if isinstance(x, str) else [str(g) for g in x]


def _image_key(sdata: SpatialData, image_key: str | None, show_image: bool) -> str | None:
    if not show_image or (image_key is None and not sdata.images):
        return None
    from squall_sd.tl._keys import resolve_image_key

    return resolve_image_key(sdata, image_key)


# ---------------------------------------------------------------------------------------------
# expression
# ---------------------------------------------------------------------------------------------
def expression(
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
    image_key
        The H&E; default the only image (or the one recorded by the reader).
    show_image
        Draw the H&E behind the spots.
    cmap
        Colour map.
    vmin, vmax
        Colour limits per panel: a number, ``None`` (data minimum / maximum) or ``"pNN"``
        (NN-th percentile of the panel's values; default ``vmax="p99"``).
    fill_alpha
        Opacity of the spots.
    pad_um
        Margin around the spots, in microns.
    figsize
        Size of a new figure, in inches (default 4 × 4 per panel).
    ax
        Axes to draw into: ``len(genes) × n_columns`` of them (row-major), where ``n_columns``
        is 2 with measured expression and 1 without.
    save
        Save the figure to this path (format from the suffix).

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
            f"Genes {missing} not in table {pred.table_key!r} ({ptab.n_vars} genes, "
            f"e.g. {list(ptab.var_names[:5])})."
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


# ---------------------------------------------------------------------------------------------
# obs columns (niches, signatures, pseudotime)
# ---------------------------------------------------------------------------------------------
def _palette(
    adata: AnnData, key: str, palette: dict[str, str] | Sequence[str] | str | None
) -> dict[str, str]:
    """Return category → colour: ``palette``, ``uns[f"{key}_colors"]`` or scanpy's default."""
    from matplotlib import colormaps
    from matplotlib.colors import to_hex
    from scanpy.plotting import palettes

    series = adata.obs[key]
    cats = [
        str(c)
        for c in (
            series.cat.categories
            if isinstance(series.dtype, pd.CategoricalDtype)
            else pd.unique(series.dropna())
        )
    ]
    if isinstance(palette, dict):
        missing = [c for c in cats if c not in palette]
        if missing:
            raise ValueError(f"`palette` has no colour for categories {missing}.")
        return {c: to_hex(palette[c]) for c in cats}
    if isinstance(palette, str):
        cmap = colormaps[palette]
        colors = [to_hex(cmap(i / max(len(cats) - 1, 1))) for i in range(len(cats))]
    elif palette is not None:
        colors = [to_hex(c) for c in palette]
    else:
        stored = adata.uns.get(f"{key}_colors")
        if stored is not None and len(stored) >= len(cats):
            colors = [to_hex(c) for c in stored]
        else:
            colors = list(palettes.default_20 if len(cats) <= 20 else palettes.default_102)
    if len(colors) < len(cats):
        raise ValueError(f"`palette` has {len(colors)} colours for {len(cats)} categories.")
    return dict(zip(cats, colors[: len(cats)], strict=True))


def _as_categorical(adata: AnnData, key: str) -> pd.Series:
    series = obs_values(adata, key)
    if not isinstance(series.dtype, pd.CategoricalDtype):
        series = series.astype(str).astype("category")
    return series


def _scatter_obs(
    adata: AnnData,
    ax: Axes,
    *,
    values: np.ndarray | None = None,
    categories: pd.Series | None = None,
    colors: dict[str, str] | None = None,
    cmap: Colormap | str | None = None,
    norm: Any = None,
    spatial_key: str = "spatial",
    title: str = "",
    legend_title: str | None = None,
    groups: Sequence[str] | None = None,
    fill_alpha: float = 1.0,
) -> Axes:
    """Draw observations of an AnnData (no H&E) as discs at ``obsm[spatial_key]`` (µm)."""
    from matplotlib import colormaps
    from matplotlib.collections import PatchCollection
    from matplotlib.patches import Circle, Patch

    if spatial_key not in adata.obsm:
        raise KeyError(
            f"`obsm[{spatial_key!r}]` not found: an AnnData needs spot positions (µm) to be "
            "plotted. Pass the "
            "SpatialData instead, or `spatial_key=`."
        )
    xy = np.asarray(adata.obsm[spatial_key], dtype=float)[:, :2]
    r = spot_radius_um(adata, xy)
    patches = [Circle((float(x), float(y)), r) for x, y in xy]
    if categories is not None:
        labels = categories.astype(object).to_numpy()
        face = [
            (colors or {}).get(str(v), "lightgrey")
            if pd.notna(v) and (groups is None or str(v) in groups)
            else "lightgrey"
            for v in labels
        ]
        coll = PatchCollection(patches, facecolors=face, edgecolors="none", alpha=fill_alpha)
        ax.add_collection(coll)
        shown = [c for c in (colors or {}) if groups is None or c in groups]
        handles = [Patch(color=colors[c], label=c) for c in shown]
        ax.legend(
            handles=handles,
            title=legend_title,
            loc="center left",
            bbox_to_anchor=(1.0, 0.5),
            frameon=False,
        )
    else:
        cm = colormaps[cmap] if isinstance(cmap, str) else cmap
        coll = PatchCollection(patches, cmap=cm, norm=norm, edgecolors="none", alpha=fill_alpha)
        coll.set_array(np.ma.masked_invalid(values))
        ax.add_collection(coll)
        ax.figure.colorbar(coll, ax=ax, label=legend_title)
    pad = 2 * r
    ax.set_xlim(xy[:, 0].min() - pad, xy[:, 0].max() + pad)
    ax.set_ylim(xy[:, 1].max() + pad, xy[:, 1].min() - pad)
    ax.set_aspect("equal")
    ax.set_xlabel("µm")
    ax.set_title(title)
    return ax


def _obs_panels(
    data: SpatialData | AnnData,
    keys: list[str],
    *,
    kind: str,
    table_key: str | None,
    shapes_key: str | None,
    image_key: str | None,
    show_image: bool,
    cmap: Colormap | str | None,
    vmin: float | str | None,
    vmax: float | str | None,
    palette: dict[str, str] | Sequence[str] | str | None,
    groups: Sequence[str] | None,
    titles: list[str],
    fill_alpha: float,
    pad_um: float,
    ncols: int,
    figsize: tuple[float, float] | None,
    ax: Axes | Sequence[Axes] | None,
    save: str | os.PathLike | None,
) -> list[Axes]:
    """One panel per ``obs`` column, continuous (``kind="continuous"``) or categorical."""
    from squall_sd.tl._utils import resolve_adata

    spots: Spots | None = None
    if _is_sdata(data):
        spots = resolve_spots(data, shapes_key=shapes_key, table_key=table_key)
        if spots.table_key is None:
            raise KeyError(f"No table annotates shapes {spots.shapes_key!r}; pass `table_key=`.")
        adata = data.tables[spots.table_key]
    else:
        adata = resolve_adata(data, table_key)
    for key in keys:
        obs_values(adata, key)
    fig, axes = get_axes(ax, len(keys), ncols=ncols, figsize=figsize)
    image = None
    ikey = None
    if spots is not None:
        ikey = _image_key(data, image_key, show_image)
        if ikey is not None:
            image = cropped_image(data, ikey, spots.bounds_um, pad_um=pad_um)
    for key, target, title in zip(keys, axes, titles, strict=True):
        if kind == "categorical":
            series = _as_categorical(adata, key)
            plot_table = _with_categorical(adata, key, series)
            colors = _palette(plot_table, key, palette)
            if groups is not None:
                unknown = [g for g in groups if g not in colors]
                if unknown:
                    raise ValueError(
                        f"`groups` {unknown} are not categories of `obs[{key!r}]` ({list(colors)})."
                    )
            if spots is None:
                _scatter_obs(
                    adata,
                    target,
                    categories=series,
                    colors=colors,
                    title=title,
                    legend_title=key,
                    groups=groups,
                    fill_alpha=fill_alpha,
                )
            else:
                render_panel(
                    _with_table(data, spots.table_key, plot_table),
                    image_key=ikey,
                    image=image,
                    spots=spots,
                    ax=target,
                    color=key,
                    table_key=spots.table_key,
                    palette=colors,
                    groups=groups,
                    title=title,
                    fill_alpha=fill_alpha,
                    pad_um=pad_um,
                )
        else:
            values = pd.to_numeric(obs_values(adata, key), errors="coerce").to_numpy(dtype=float)
            if not np.isfinite(values).any():
                raise ValueError(f"`obs[{key!r}]` has no finite values to plot.")
            norm = robust_norm(values, vmin=vmin, vmax=vmax)
            if spots is None:
                _scatter_obs(
                    adata,
                    target,
                    values=values,
                    cmap=cmap,
                    norm=norm,
                    title=title,
                    legend_title=key,
                    fill_alpha=fill_alpha,
                )
            else:
                render_panel(
                    data,
                    image_key=ikey,
                    image=image,
                    spots=spots,
                    ax=target,
                    color=key,
                    table_key=spots.table_key,
                    cmap=cmap,
                    norm=norm,
                    title=title,
                    fill_alpha=fill_alpha,
                    pad_um=pad_um,
                )
    save_figure(fig, save)
    return axes


def _with_categorical(adata: AnnData, key: str, series: pd.Series) -> AnnData:
    """Return ``adata`` if ``obs[key]`` is categorical, else a light copy where it is."""
    if isinstance(adata.obs[key].dtype, pd.CategoricalDtype):
        return adata
    from anndata import AnnData

    obs = adata.obs.copy()
    obs[key] = series
    out = AnnData(obs=obs, uns=dict(adata.uns))
    out.obsm["spatial"] = (
        adata.obsm["spatial"] if "spatial" in adata.obsm else np.zeros((adata.n_obs, 2))
    )
    return out


def _with_table(sdata: SpatialData, table_key: str, table: AnnData) -> SpatialData:
    """Return ``sdata``, or a shallow SpatialData with ``table`` under ``table_key``."""
    if sdata.tables[table_key] is table:
        return sdata
    from spatialdata import SpatialData
    from spatialdata.models import TableModel

    attrs = dict(sdata.tables[table_key].uns.get(TableModel.ATTRS_KEY, {}))
    table.uns[TableModel.ATTRS_KEY] = attrs
    return SpatialData(
        images=dict(sdata.images), shapes=dict(sdata.shapes), tables={table_key: table}
    )


def niches(
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
    data
        SpatialData (spots drawn with their true radius over the H&E, in ``"microns"``), or an
        AnnData (discs at ``obsm["spatial"]``, in µm, without the H&E).
    key
        Categorical column of ``obs`` holding the niche labels.
    table_key
        Table of a SpatialData; default the one table annotating the spots.
    shapes_key
        Spots to plot; default the element the table annotates.
    image_key
        The H&E; default the only image.
    show_image
        Draw the H&E behind the spots.
    groups
        Niches to colour; the others are drawn in light grey.
    palette
        Niche → colour mapping, a list of colours, or a colormap name; default
        ``uns[f"{key}_colors"]`` (scanpy's convention), else scanpy's default palette.
    fill_alpha
        Opacity of the spots.
    pad_um
        Margin around the spots, in microns.
    title
        Panel title (default ``key``).
    figsize
        Size of a new figure, in inches.
    ax
        Axes to draw into.
    save
        Save the figure to this path.

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


def _one_obs_panel(
    data: SpatialData | AnnData,
    key: str,
    *,
    run: str,
    title: str | None,
    table_key: str | None,
    shapes_key: str | None,
    **panel: Any,
) -> Axes:
    """Plot ``obs[key]`` as one :func:`_obs_panels` panel titled ``title`` (default ``key``).

    A missing ``obs[key]`` raises a :class:`KeyError` that says to run ``run`` first.
    """
    _require_obs(data, table_key, shapes_key, key, run)
    axes = _obs_panels(
        data,
        [key],
        table_key=table_key,
        shapes_key=shapes_key,
        titles=[title if title is not None else key],
        ncols=1,
        **panel,
    )
    return axes[0]


def _table_of(
    data: SpatialData | AnnData, table_key: str | None, shapes_key: str | None
) -> AnnData:
    if _is_sdata(data):
        spots = resolve_spots(data, shapes_key=shapes_key, table_key=table_key)
        if spots.table_key is None:
            raise KeyError(f"No table annotates shapes {spots.shapes_key!r}; pass `table_key=`.")
        return data.tables[spots.table_key]
    from squall_sd.tl._utils import resolve_adata

    return resolve_adata(data, table_key)


def _require_obs(
    data: SpatialData | AnnData, table_key: str | None, shapes_key: str | None, key: str, run: str
) -> None:
    adata = _table_of(data, table_key, shapes_key)
    if key not in adata.obs:
        raise KeyError(f"`obs[{key!r}]` not found in the table. Run `{run}` first, or pass `key=`.")


def signatures(
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
    data
        SpatialData (spots over the H&E) or AnnData (discs at ``obsm["spatial"]``).
    keys
        Score columns of ``obs``: full names (``"sig_tls"``) or signature names (``"tls"``, the
        ``key_prefix`` is added). Default: every column starting with ``key_prefix``.
    table_key
        Table of a SpatialData; default the one table annotating the spots.
    key_prefix
        Prefix of the score columns.
    shapes_key
        Spots to plot; default the element the table annotates.
    image_key
        The H&E; default the only image.
    show_image
        Draw the H&E behind the spots.
    cmap
        Colour map.
    vmin, vmax
        Colour limits per panel: numbers, ``None`` (data range) or ``"pNN"`` percentiles.
    fill_alpha
        Opacity of the spots.
    pad_um
        Margin around the spots, in microns.
    ncols
        Panels per row of a new figure.
    figsize
        Size of a new figure, in inches.
    ax
        Axes to draw into, one per score.
    save
        Save the figure to this path.

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
        names = [
            str(c)
            for c in adata.obs.columns
            if str(c).startswith(key_prefix) and _numeric(adata.obs[c])
        ]
        if not names:
            raise KeyError(
                f"No signature scores (`obs` columns starting with {key_prefix!r}) in the "
                "table. Run "
                "`squall.tl.score_signatures(adata)` first, or pass `keys=`."
            )
    cols = [
        n if n in adata.obs or f"{key_prefix}{n}" not in adata.obs else f"{key_prefix}{n}"
        for n in names
    ]
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


def trajectory(
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
    data
        SpatialData (spots over the H&E) or AnnData (discs at ``obsm["spatial"]``).
    key
        Column of ``obs`` holding the pseudotime (observations not reached are NaN, drawn grey).
    table_key
        Table of a SpatialData; default the one table annotating the spots.
    shapes_key
        Spots to plot; default the element the table annotates.
    image_key
        The H&E; default the only image.
    show_image
        Draw the H&E behind the spots.
    cmap
        Colour map.
    vmin, vmax
        Colour limits: numbers, ``None`` (data range) or ``"pNN"`` percentiles.
    fill_alpha
        Opacity of the spots.
    pad_um
        Margin around the spots, in microns.
    title
        Panel title (default ``key``).
    figsize
        Size of a new figure, in inches.
    ax
        Axes to draw into.
    save
        Save the figure to this path.

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
