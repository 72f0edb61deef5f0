"""Panels of ``obs`` columns (niches, signatures, pseudotime): palettes, AnnData scatter, H&E panels.

matplotlib and scanpy are imported inside the functions that need them.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from squall_sd._sdata import resolve_adata, resolve_image_key
from squall_sd.pl._utils import (
    Spots,
    cropped_image,
    get_axes,
    obs_values,
    render_panel,
    resolve_spots,
    robust_norm,
    save_figure,
    spot_radius_um,
)

if TYPE_CHECKING:
    from anndata import AnnData
    from matplotlib.axes import Axes
    from matplotlib.colors import Colormap
    from spatialdata import SpatialData


def _is_sdata(data: Any) -> bool:
    from spatialdata import SpatialData

    return isinstance(data, SpatialData)


def _as_list(x: str | Sequence[str] | None) -> list[str] | None:
    if x is None:
        return None
    return [x] if isinstance(x, str) else [str(g) for g in x]


def _image_key(sdata: SpatialData, image_key: str | None, show_image: bool) -> str | None:
    if not show_image or (image_key is None and not sdata.images):
        return None
    return resolve_image_key(sdata, image_key)


# ---------------------------------------------------------------------------------------------
# obs columns (niches, signatures, pseudotime)
# ---------------------------------------------------------------------------------------------
def _palette(adata: AnnData, key: str, palette: dict[str, str] | Sequence[str] | str | None) -> dict[str, str]:
    """Return category → colour: ``palette``, ``uns[f"{key}_colors"]`` or scanpy's default."""
    from matplotlib import colormaps
    from matplotlib.colors import to_hex
    from scanpy.plotting import palettes

    series = adata.obs[key]
    cats = [
        str(c)
        for c in (
            series.cat.categories if isinstance(series.dtype, pd.CategoricalDtype) else pd.unique(series.dropna())
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
                    raise ValueError(f"`groups` {unknown} are not categories of `obs[{key!r}]` ({list(colors)}).")
            scatter: dict[str, Any] = {"categories": series, "colors": colors, "groups": groups}
            render: dict[str, Any] = {"palette": colors, "groups": groups}
            plot_data = _with_table(data, spots.table_key, plot_table) if spots is not None else None
        else:
            values = pd.to_numeric(obs_values(adata, key), errors="coerce").to_numpy(dtype=float)
            if not np.isfinite(values).any():
                raise ValueError(f"`obs[{key!r}]` has no finite values to plot.")
            norm = robust_norm(values, vmin=vmin, vmax=vmax)
            scatter = {"values": values, "cmap": cmap, "norm": norm}
            render = {"cmap": cmap, "norm": norm}
            plot_data = data
        if spots is None:
            _scatter_obs(adata, target, title=title, legend_title=key, fill_alpha=fill_alpha, **scatter)
        else:
            render_panel(
                plot_data,
                image_key=ikey,
                image=image,
                spots=spots,
                ax=target,
                color=key,
                table_key=spots.table_key,
                title=title,
                fill_alpha=fill_alpha,
                pad_um=pad_um,
                **render,
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
    out.obsm["spatial"] = adata.obsm["spatial"] if "spatial" in adata.obsm else np.zeros((adata.n_obs, 2))
    return out


def _with_table(sdata: SpatialData, table_key: str, table: AnnData) -> SpatialData:
    """Return ``sdata``, or a shallow SpatialData with ``table`` under ``table_key``."""
    if sdata.tables[table_key] is table:
        return sdata
    from spatialdata import SpatialData
    from spatialdata.models import TableModel

    attrs = dict(sdata.tables[table_key].uns.get(TableModel.ATTRS_KEY, {}))
    table.uns[TableModel.ATTRS_KEY] = attrs
    return SpatialData(images=dict(sdata.images), shapes=dict(sdata.shapes), tables={table_key: table})


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


def _table_of(data: SpatialData | AnnData, table_key: str | None, shapes_key: str | None) -> AnnData:
    if _is_sdata(data):
        spots = resolve_spots(data, shapes_key=shapes_key, table_key=table_key)
        if spots.table_key is None:
            raise KeyError(f"No table annotates shapes {spots.shapes_key!r}; pass `table_key=`.")
        return data.tables[spots.table_key]
    return resolve_adata(data, table_key)


def _require_obs(
    data: SpatialData | AnnData, table_key: str | None, shapes_key: str | None, key: str, run: str
) -> None:
    adata = _table_of(data, table_key, shapes_key)
    if key not in adata.obs:
        raise KeyError(f"`obs[{key!r}]` not found in the table. Run `{run}` first, or pass `key=`.")
