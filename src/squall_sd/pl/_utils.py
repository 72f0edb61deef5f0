"""Shared machinery of :mod:`squall_sd.pl`: element resolution, the cropped H&E, panels, saving.

matplotlib, spatialdata, napari, :mod:`squall_sd.pp` and :mod:`squall_sd.tl` (whose packages load
spatialdata and anndata on import) are imported inside functions, so that
``import squall_sd.pl`` stays light.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
from scipy import sparse

from squall_sd._constants import ATTRS_KEY, MICRONS
from squall_sd._logging import logger
from squall_sd._sdata import (
    affine_mpp,
    affine_to_microns,
    check_table_key,
    image_levels,
    is_axis_aligned,
    resolve_region,
    resolve_table_key,
    table_regions,
)

if TYPE_CHECKING:
    import geopandas as gpd
    from anndata import AnnData
    from matplotlib.axes import Axes
    from matplotlib.colors import Colormap, Normalize
    from matplotlib.figure import Figure
    from spatialdata import SpatialData

__all__ = [
    "PANEL_SIZE",
    "Spots",
    "cropped_image",
    "get_axes",
    "obs_values",
    "render_panel",
    "resolve_spots",
    "save_figure",
    "table_values",
]

#: Size (inches) of one spatial panel when the function creates the figure.
PANEL_SIZE = 4.0
#: Longest side (pixels) of the H&E crop rendered behind the spots.
IMAGE_PX = 1000
#: Margin (µm) around the spots when cropping the H&E.
PAD_UM = 100.0


@dataclass(frozen=True)
class Spots:
    """Spots / bins / cells to colour, with the table that annotates them.

    Attributes
    ----------
    shapes_key
        Shapes element.
    table_key
        Table annotating ``shapes_key`` (the one to colour by).
    centers_um
        (n, 2) x, y centres in microns, in the order of the shapes element.
    radius_um
        (n,) radii in microns (of the disc with the same area, for polygons).
    bounds_um
        ``(xmin, ymin, xmax, ymax)`` of the shapes in microns.

    """

    shapes_key: str
    table_key: str | None
    centers_um: np.ndarray
    radius_um: np.ndarray
    bounds_um: tuple[float, float, float, float]


def shapes_in_microns(
    shapes: gpd.GeoDataFrame,
) -> tuple[np.ndarray, np.ndarray, tuple[float, float, float, float]]:
    """Return centres (x, y), radii and bounds of a shapes element, all in µm.

    Parameters
    ----------
    shapes
        A :class:`~spatialdata.models.ShapesModel` element registered in ``microns``.

    Returns
    -------
    ``(centers, radius, bounds)``.

    """
    m = affine_to_microns(shapes)
    geom = shapes.geometry
    if "radius" in shapes.columns and (geom.geom_type == "Point").all():
        xy = np.c_[geom.x.to_numpy(float), geom.y.to_numpy(float)]
        radius = shapes["radius"].to_numpy(float) * affine_mpp(m)
        polygons = False
    else:
        cent = geom.centroid
        xy = np.c_[cent.x.to_numpy(float), cent.y.to_numpy(float)]
        radius = np.sqrt(geom.area.to_numpy(float) / np.pi) * affine_mpp(m)  # equivalent-area radius
        polygons = True
    centers = xy @ m[:2, :2].T + m[:2, 2]
    if len(centers) == 0:
        raise ValueError("The shapes element is empty: nothing to plot.")
    if polygons:
        b = np.asarray(geom.total_bounds, dtype=float)  # intrinsic xmin, ymin, xmax, ymax
        corners = np.array([[b[0], b[1]], [b[2], b[1]], [b[0], b[3]], [b[2], b[3]]]) @ m[:2, :2].T + m[:2, 2]
        lo, hi = corners.min(0), corners.max(0)
    else:
        lo = (centers - radius[:, None]).min(0)
        hi = (centers + radius[:, None]).max(0)
    return centers, radius, (float(lo[0]), float(lo[1]), float(hi[0]), float(hi[1]))


def resolve_spots(sdata: SpatialData, *, shapes_key: str | None = None, table_key: str | None = None) -> Spots:
    """Find the shapes to colour and the table annotating them.

    With ``table_key`` given, its annotated shapes element is used (unless ``shapes_key`` says
    otherwise); without, the only shapes element annotated by a table (see
    :func:`squall_sd._sdata.resolve_region`).

    Parameters
    ----------
    sdata
        The SpatialData.
    shapes_key
        Shapes element, or ``None``.
    table_key
        Table, or ``None``.

    Returns
    -------
    The resolved :class:`Spots`.

    """
    if shapes_key is None and table_key is not None:
        check_table_key(sdata, table_key)
        shapes_key = annotated_shapes(sdata, table_key)
    region = resolve_region(sdata, shapes_key=shapes_key)
    if region is None or region.kind != "shapes":
        raise ValueError(
            "The SpatialData holds no shapes element (spots / bins / cells) to colour; it has "
            f"shapes {sorted(sdata.shapes)}, labels {sorted(sdata.labels)}. Pass `shapes_key=`."
        )
    tkey = resolve_table_key(sdata, region.key, table_key)
    centers, radius, bounds = shapes_in_microns(sdata.shapes[region.key])
    return Spots(region.key, tkey, centers, radius, bounds)


def annotated_shapes(sdata: SpatialData, table_key: str) -> str:
    """Return the shapes element annotated by table ``table_key`` (it must annotate exactly one)."""
    try:
        regions = table_regions(sdata.tables[table_key])
    except Exception as e:  # noqa: BLE001
        raise ValueError(
            f"Table {table_key!r} does not annotate any element (no spatialdata region / instance keys)."
        ) from e
    shapes = [r for r in regions if r in sdata.shapes]
    if len(shapes) != 1:
        raise ValueError(
            f"Table {table_key!r} annotates {regions}; expected exactly one shapes element. Pass `shapes_key=`."
        )
    return str(shapes[0])


def cropped_image(
    sdata: SpatialData,
    image_key: str,
    bounds_um: tuple[float, float, float, float],
    *,
    pad_um: float = PAD_UM,
    max_px: int = IMAGE_PX,
) -> Any:
    """Return the H&E around ``bounds_um`` as a small single-scale image element in ``microns``.

    The coarsest pyramid level that still gives at least ``max_px`` pixels along the longest side
    of the crop is read (lazily; only the crop is computed), so plots stay fast on gigapixel slides.

    Parameters
    ----------
    sdata
        The SpatialData.
    image_key
        The image.
    bounds_um
        ``(xmin, ymin, xmax, ymax)`` in microns.
    pad_um
        Margin added on every side, in microns.
    max_px
        Target longest side of the crop, in pixels.

    Returns
    -------
    A :class:`~spatialdata.models.Image2DModel` element (``(c, y, x)``, uint8 or the image dtype).

    """
    from spatialdata.models import Image2DModel
    from spatialdata.transformations import Affine

    levels = image_levels(sdata, image_key)
    x0, y0, x1, y1 = bounds_um
    x0, y0, x1, y1 = x0 - pad_um, y0 - pad_um, x1 + pad_um, y1 + pad_um
    extent = max(x1 - x0, y1 - y0)
    level = levels[0]
    for lv in levels:  # finest first: keep the coarsest level that is fine enough
        if extent / lv.mpp >= max_px:
            level = lv
    m = level.affine
    if not is_axis_aligned(m):
        logger.warning("image %r is rotated in %r; plotting its full extent", image_key, MICRONS)
        px = (0, 0, level.shape_yx[1], level.shape_yx[0])
    else:
        inv = np.linalg.inv(m)
        corners = np.array([[x0, y0, 1.0], [x1, y1, 1.0]]) @ inv.T
        lo = np.floor(corners[:, :2].min(0)).astype(int)
        hi = np.ceil(corners[:, :2].max(0)).astype(int)
        h, w = level.shape_yx
        px = (max(lo[0], 0), max(lo[1], 0), min(hi[0], w), min(hi[1], h))
    if px[2] <= px[0] or px[3] <= px[1]:
        raise ValueError(f"The spots lie outside image {image_key!r} in {MICRONS!r}; check their transformations.")
    data = level.data[:, px[1] : px[3], px[0] : px[2]].compute()
    shift = np.array([[1.0, 0.0, px[0]], [0.0, 1.0, px[1]], [0.0, 0.0, 1.0]])
    affine = Affine(m @ shift, input_axes=("x", "y"), output_axes=("x", "y"))
    c_coords = None
    element = sdata.images[image_key]
    try:
        first = element if not hasattr(element, "children") else next(iter(element["scale0"].data_vars.values()))
        c_coords = [str(c) for c in first.coords["c"].values]
    except Exception:  # noqa: BLE001 - channel names are cosmetic
        c_coords = None
    return Image2DModel.parse(data, dims=("c", "y", "x"), c_coords=c_coords, transformations={MICRONS: affine})


def table_values(adata: AnnData, gene: str, layer: str | None) -> np.ndarray:
    """Return the values of ``gene`` in ``layer`` (``None``: ``X``) as a dense float vector."""
    if gene not in adata.var_names:
        raise KeyError(f"Gene {gene!r} not found in the table's `var_names` ({adata.n_vars} genes).")
    j = int(adata.var_names.get_loc(gene))
    mat = adata.X if layer is None else adata.layers[layer]
    col = mat[:, j]
    if sparse.issparse(col):
        col = col.toarray()
    return np.asarray(col, dtype=float).ravel()


def obs_values(adata: AnnData, key: str) -> pd.Series:
    """Return ``adata.obs[key]``, or raise a :class:`KeyError` listing similar columns."""
    if key not in adata.obs:
        prefix = key.split("_")[0]
        near = [c for c in adata.obs.columns if str(c).startswith(prefix)][:10] or list(adata.obs.columns)[:10]
        raise KeyError(f"`obs[{key!r}]` not found in the table. Columns like it: {near}.")
    return adata.obs[key]


def robust_norm(values: np.ndarray, *, vmin: float | None, vmax: float | str | None) -> Normalize:
    """Return a :class:`~matplotlib.colors.Normalize` for ``values``.

    ``vmax`` may be a number, ``None`` (the maximum) or ``"pNN"`` (the NN-th percentile of the
    finite values).
    """
    from matplotlib.colors import Normalize

    finite = np.asarray(values, dtype=float)
    finite = finite[np.isfinite(finite)]
    if finite.size == 0:
        return Normalize(0.0, 1.0, clip=True)

    def _resolve(v: float | str | None, default: float) -> float:
        if v is None:
            return default
        if isinstance(v, str):
            if not v.startswith("p"):
                raise ValueError(f"Colour limits must be numbers or 'pNN' percentiles, got {v!r}.")
            return float(np.percentile(finite, float(v[1:])))
        return float(v)

    lo = _resolve(vmin, float(finite.min()))
    hi = _resolve(vmax, float(finite.max()))
    if hi <= lo:
        hi = lo + 1e-9 if lo == 0 else lo + abs(lo) * 1e-6
    return Normalize(lo, hi, clip=True)


def render_panel(
    sdata: SpatialData,
    *,
    image_key: str | None,
    spots: Spots,
    ax: Axes,
    color: str | None,
    table_key: str | None,
    table_layer: str | None = None,
    cmap: Colormap | str | None = None,
    norm: Normalize | None = None,
    palette: dict[str, str] | None = None,
    groups: Sequence[str] | None = None,
    title: str | None = None,
    fill_alpha: float = 1.0,
    image: Any = None,
    pad_um: float = PAD_UM,
    colorbar_label: str | None = None,
) -> Axes:
    """Draw the (cropped) H&E and the spots coloured by ``color`` on ``ax`` with spatialdata-plot.

    Parameters
    ----------
    sdata
        The SpatialData.
    image_key
        The H&E (``None``: spots only).
    spots
        The spots (see :func:`resolve_spots`).
    ax
        Axes to draw on.
    color
        A gene of the table (``var_names``) or an ``obs`` column, or ``None`` for plain spots.
    table_key
        The table holding ``color``.
    table_layer
        Layer of the table to take genes from (``None``: ``X``).
    cmap, norm
        Colour map and normalisation of continuous values.
    palette
        Category → colour of categorical values.
    groups
        Categories to show (others are drawn in grey).
    title
        Panel title.
    fill_alpha
        Opacity of the spots.
    image
        A precomputed :func:`cropped_image` (reused across panels).
    pad_um
        Margin around the spots, in microns.
    colorbar_label
        Label of the colour bar of continuous values (drawn when ``norm`` is given).

    Returns
    -------
    ``ax``.

    """
    import spatialdata_plot  # noqa: F401 - registers the `sdata.pl` accessor
    from spatialdata import SpatialData

    elements: dict[str, Any] = {"shapes": {spots.shapes_key: sdata.shapes[spots.shapes_key]}}
    if table_key is not None:
        elements["tables"] = {table_key: sdata.tables[table_key]}
    if image_key is not None:
        if image is None:
            image = cropped_image(sdata, image_key, spots.bounds_um, pad_um=pad_um)
        elements["images"] = {image_key: image}
    sub = SpatialData(**elements)
    chain = sub.pl
    if image_key is not None:
        chain = chain.render_images(image_key).pl
    kwargs: dict[str, Any] = {"fill_alpha": fill_alpha}
    if color is not None:
        kwargs.update(color=color, table_name=table_key)
        if table_layer is not None:
            kwargs["table_layer"] = table_layer
        if cmap is not None:
            kwargs["cmap"] = cmap
        if norm is not None:
            kwargs["norm"] = norm
            kwargs["colorbar"] = False  # drawn below, so that constrained layout makes room for it
        if palette is not None:
            kwargs["palette"] = palette
        if groups is not None:
            kwargs["groups"] = list(groups)
            kwargs["na_color"] = "lightgrey"
    chain.render_shapes(spots.shapes_key, **kwargs).pl.show(
        coordinate_systems=MICRONS,
        ax=ax,
        show=False,
        title=title if title is not None else "",
        frameon=True,
    )
    if color is not None and norm is not None:
        from matplotlib import colormaps
        from matplotlib.cm import ScalarMappable

        cm = colormaps[cmap] if isinstance(cmap, str) or cmap is None else cmap
        ax.figure.colorbar(ScalarMappable(norm=norm, cmap=cm), ax=ax, shrink=0.8, label=colorbar_label)
    x0, y0, x1, y1 = spots.bounds_um
    ax.set_xlim(x0 - pad_um, x1 + pad_um)
    ax.set_ylim(y1 + pad_um, y0 - pad_um)
    ax.set_xlabel("µm")
    ax.set_ylabel("")
    ax.set_aspect("equal")
    return ax


def get_axes(
    ax: Axes | Sequence[Axes] | np.ndarray | None,
    n: int,
    *,
    ncols: int,
    panel_size: tuple[float, float] = (PANEL_SIZE, PANEL_SIZE),
    figsize: tuple[float, float] | None = None,
) -> tuple[Figure, list[Axes]]:
    """Return ``n`` axes: the given ones (checked) or a new figure with ``ncols`` columns.

    Parameters
    ----------
    ax
        An Axes, a sequence / array of Axes, or ``None``.
    n
        Number of panels needed.
    ncols
        Columns of a new figure.
    panel_size
        Size of one panel of a new figure, in inches.
    figsize
        Size of a new figure (overrides ``panel_size``).

    Returns
    -------
    ``(figure, axes)``, the axes flattened in row-major order.

    """
    import matplotlib.pyplot as plt
    from matplotlib.axes import Axes

    if ax is not None:
        axes = [ax] if isinstance(ax, Axes) else list(np.asarray(ax, dtype=object).ravel())
        if len(axes) != n:
            raise ValueError(f"This plot needs {n} axes, got {len(axes)} in `ax=`; pass {n} axes or `ax=None`.")
        return axes[0].figure, axes
    ncols = max(1, min(ncols, n))
    nrows = int(np.ceil(n / ncols))
    if figsize is None:
        figsize = (panel_size[0] * ncols, panel_size[1] * nrows)
    fig, grid = plt.subplots(nrows, ncols, figsize=figsize, squeeze=False, layout="constrained")
    flat = list(grid.ravel())
    for extra in flat[n:]:
        extra.set_visible(False)
    return fig, flat[:n]


def save_figure(fig: Figure, save: str | os.PathLike | None, *, dpi: float | None = None) -> None:
    """Save ``fig`` to ``save`` (format from the suffix) when a path is given."""
    if save is None:
        return
    fig.savefig(os.fspath(save), dpi=dpi if dpi is not None else "figure", bbox_inches="tight")
    logger.info("saved figure to %s", os.fspath(save))


def spot_radius_um(adata: AnnData, centers: np.ndarray) -> float:
    """Return a spot radius (µm) for AnnData-only plots.

    ``uns["squall"]["spot_diameter_um"] / 2`` when recorded, else 40 % of the median
    nearest-neighbour distance.
    """
    meta = adata.uns.get(ATTRS_KEY, {}) if isinstance(adata.uns.get(ATTRS_KEY, {}), dict) else {}
    if meta.get("spot_diameter_um"):
        return float(meta["spot_diameter_um"]) / 2.0
    if len(centers) < 2:
        return 1.0
    from scipy.spatial import cKDTree

    d, _ = cKDTree(centers).query(centers, k=2)
    return float(0.4 * np.median(d[:, 1]))
