"""Interactive viewing in napari: H&E, predicted / measured expression and niches in microns."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from squall_sd._constants import MICRONS
from squall_sd._logging import logger
from squall_sd.pl._utils import Spots, resolve_spots, robust_norm, table_values

if TYPE_CHECKING:
    import napari as _napari
    from matplotlib.colors import Colormap
    from spatialdata import SpatialData

__all__ = ["napari", "require_napari"]

#: Install hint for the optional napari dependency.
NAPARI_HINT = 'pip install "squall-sd[napari]"'
#: Genes shown when ``genes=None``: this many predicted genes with the most variable predictions.
DEFAULT_N_GENES = 3
#: Units of the layers' world coordinates (the ``microns`` coordinate system).
UNITS = ("um", "um")


def require_napari() -> Any:
    """Import and return :mod:`napari`, or raise an :class:`ImportError` with the install hint."""
    try:
        import napari as napari_module
    except ImportError as e:
        raise ImportError(
            f"squall.pl.napari needs napari with a Qt backend: {NAPARI_HINT} (or `pip install "
            f'"napari[pyqt6]"`). Import failed with: {e}'
        ) from e
    return napari_module


def _swap_xy(m: np.ndarray) -> np.ndarray:
    """Turn an (x, y) homogeneous 3×3 matrix into napari's (row, col) = (y, x) order."""
    p = np.array([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    return p @ m @ p


def _rgba(values: np.ndarray, cmap: Colormap | str, norm: Any) -> np.ndarray:
    from matplotlib import colormaps

    cm = colormaps[cmap] if isinstance(cmap, str) else cmap
    colors = np.asarray(cm(norm(np.nan_to_num(values, nan=norm.vmin))), dtype=float)
    colors[~np.isfinite(values)] = (0.6, 0.6, 0.6, 0.5)
    return colors


def _default_genes(sdata: SpatialData, table_key: str, layer: str | None) -> list[str]:
    from scipy import sparse

    t = sdata.tables[table_key]
    mat = t.X if layer is None else t.layers[layer]
    mat = mat.toarray() if sparse.issparse(mat) else np.asarray(mat, dtype=float)
    finite = np.isfinite(mat)
    n = finite.sum(axis=0)
    filled = np.where(finite, mat, 0.0)
    mean = filled.sum(axis=0) / np.maximum(n, 1)
    var = np.where(finite, (mat - mean) ** 2, 0.0).sum(axis=0) / np.maximum(n, 1)
    var = np.where(n >= 2, var, -np.inf)
    order = np.argsort(-var, kind="stable")[:DEFAULT_N_GENES]
    return [str(t.var_names[i]) for i in order if np.isfinite(var[i])]


def _add_image(viewer: _napari.Viewer, sdata: SpatialData, image_key: str) -> Any:
    import dask.array as da

    from squall_sd.pp._utils import image_levels

    levels = image_levels(sdata, image_key)
    data = [da.moveaxis(lv.data, 0, -1) for lv in levels]  # (c, y, x) -> (y, x, c)
    rgb = data[0].shape[-1] in (3, 4)
    return viewer.add_image(
        data if len(data) > 1 else data[0],
        multiscale=len(data) > 1,
        rgb=rgb,
        affine=_swap_xy(levels[0].affine),
        name=image_key,
        units=UNITS,
        metadata={"coordinate_system": MICRONS},
    )


def _add_spots(
    viewer: _napari.Viewer,
    spots: Spots,
    *,
    name: str,
    face: np.ndarray,
    features: pd.DataFrame,
    opacity: float,
    visible: bool,
) -> Any:
    return viewer.add_points(
        spots.centers_um[:, ::-1],
        size=2.0 * spots.radius_um,
        face_color=face,
        border_width=0.0,
        features=features,
        opacity=opacity,
        name=name,
        visible=visible,
        units=UNITS,
        metadata={"coordinate_system": MICRONS, "shapes_key": spots.shapes_key},
    )


def napari(
    sdata: SpatialData,
    *,
    genes: str | Sequence[str] | None = None,
    niches: str | None = "squall_niche",
    table_key: str | None = None,
    layer: str = "squall",
    measured: bool = True,
    measured_layer: str | None = None,
    shapes_key: str | None = None,
    image_key: str | None = None,
    cmap: Colormap | str = "viridis",
    vmax: float | str | None = "p99",
    opacity: float = 0.85,
    viewer: _napari.Viewer | None = None,
    show: bool = True,
    title: str = "squall",
) -> _napari.Viewer:
    """Open the H&E with predicted expression, measured expression and niches in napari.

    Every layer is placed in the ``"microns"`` coordinate system, so they line up: the H&E as a
    multiscale image (all pyramid levels, read lazily) with its pixel → micron affine, and the spots
    as points layers with their true diameter in microns, one layer per gene and kind
    (``"ERBB2 predicted"``, ``"ERBB2 measured"``), coloured by value (the values are also the
    layer's ``features``, shown in the status bar), and the niches as a layer coloured by label.
    Only the first overlay is visible at first; toggle the others in the layer list.

    Works in a notebook (``show=True`` opens a window beside it) and from a shell as
    ``squall view result.zarr --genes ERBB2 CD74``.

    Parameters
    ----------
    sdata
        SpatialData with the H&E registered in ``microns`` and spots annotated by a table.
    genes
        Genes to overlay; default the three predicted genes with the most variable
        predictions (none when there are no predictions).
    niches
        Categorical ``obs`` column with niche labels to overlay (skipped when absent); ``None``
        for none.
    table_key
        Table with the predictions (see :func:`squall_sd.pl.expression`).
    layer
        Layer holding the predictions.
    measured
        Also add measured expression of the genes when present.
    measured_layer
        Layer of measured expression (default ``X``).
    shapes_key
        Spots to show; default the element the table annotates.
    image_key
        The H&E; default the only image.
    cmap
        Colour map of expression.
    vmax
        Upper colour limit per layer: a number, ``None`` (maximum) or ``"pNN"`` (percentile).
    opacity
        Opacity of the overlays.
    viewer
        Add the layers to this viewer instead of opening a new one.
    show
        Show the viewer window (ignored with ``viewer=``).
    title
        Window title of a new viewer.

    Returns
    -------
    The :class:`napari.Viewer`.

    Raises
    ------
    ImportError
        napari is not installed (``pip install "squall-sd[napari]"``).
    KeyError
        Genes were asked for but there are no predictions, or an unknown gene.

    """
    from squall_sd.pl._spatial import (
        _as_list,
        _measured_source,
        _palette,
        find_prediction,
    )
    from squall_sd.tl._keys import resolve_image_key

    napari_module = require_napari()
    gene_list = _as_list(genes)
    try:
        pred = find_prediction(sdata, table_key=table_key, layer=layer, shapes_key=shapes_key)
    except KeyError:
        if gene_list:
            raise
        pred = None
    spots = resolve_spots(
        sdata, shapes_key=shapes_key, table_key=pred.table_key if pred is not None else table_key
    )
    if pred is not None and gene_list is None:
        gene_list = _default_genes(sdata, pred.table_key, pred.layer)
    gene_list = gene_list or []
    meas = (
        _measured_source(sdata, pred, spots.shapes_key, measured_layer)
        if (pred and measured)
        else None
    )
    if pred is not None:
        ptab = sdata.tables[pred.table_key]
        missing = [g for g in gene_list if g not in ptab.var_names]
        if missing:
            raise KeyError(
                f"Genes {missing} not in table {pred.table_key!r} ({ptab.n_vars} genes)."
            )

    if viewer is None:
        viewer = napari_module.Viewer(title=title, show=show)
    ikey = resolve_image_key(sdata, image_key) if (image_key is not None or sdata.images) else None
    if ikey is not None:
        _add_image(viewer, sdata, ikey)

    first = True
    for gene in gene_list:
        for kind, src in (("predicted", pred), ("measured", meas)):
            if src is None:
                continue
            tab = sdata.tables[src.table_key]
            if gene not in tab.var_names:
                continue
            values = _spot_order(sdata, spots, src.table_key, table_values(tab, gene, src.layer))
            if kind == "predicted" and not np.isfinite(values).any():
                raise ValueError(
                    f"Gene {gene!r} has no predicted values (the model does not predict it)."
                )
            norm = robust_norm(values, vmin=None, vmax=vmax)
            _add_spots(
                viewer,
                spots,
                name=f"{gene} {kind}",
                face=_rgba(values, cmap, norm),
                features=pd.DataFrame({gene: values}),
                opacity=opacity,
                visible=first,
            )
            first = False

    if niches is not None:
        tkey = spots.table_key
        if tkey is not None and niches in sdata.tables[tkey].obs:
            from squall_sd.pl._spatial import _as_categorical, _with_categorical

            tab = sdata.tables[tkey]
            series = _as_categorical(tab, niches)
            colors = _palette(_with_categorical(tab, niches, series), niches, None)
            labels = _spot_order(sdata, spots, tkey, series.astype(object).to_numpy(), fill=None)
            face = np.array(
                [
                    _to_rgba(colors.get(str(v), "#bbbbbb")) if pd.notna(v) else _to_rgba("#bbbbbb")
                    for v in labels
                ]
            )
            _add_spots(
                viewer,
                spots,
                name=niches,
                face=face,
                features=pd.DataFrame({niches: pd.Categorical(labels, categories=list(colors))}),
                opacity=opacity,
                visible=first,
            )
            first = False
        else:
            logger.info("no `obs[%r]` in the table; not adding a niche layer", niches)

    viewer.scale_bar.visible = True
    viewer.reset_view()
    _focus(viewer, spots)
    return viewer


def _focus(viewer: _napari.Viewer, spots: Spots, *, margin: float = 0.05) -> None:
    """Centre the camera on the spots and zoom so that they fill the canvas."""
    x0, y0, x1, y1 = spots.bounds_um
    extent = np.asarray(viewer.layers.extent.world, dtype=float)[:, -2:]  # (min, max) x (y, x)
    span_world = extent[1] - extent[0]
    span_spots = np.array([y1 - y0, x1 - x0]) * (1 + 2 * margin)
    if np.all(span_spots > 0) and np.all(span_world > 0):
        factor = float(np.min(span_world / span_spots))
        if factor > 1:
            viewer.camera.zoom = viewer.camera.zoom * factor
    center = list(viewer.camera.center)
    center[-2:] = [(y0 + y1) / 2.0, (x0 + x1) / 2.0]
    viewer.camera.center = tuple(center)


def _to_rgba(c: str) -> tuple[float, float, float, float]:
    from matplotlib.colors import to_rgba

    return to_rgba(c)


def _spot_order(
    sdata: SpatialData, spots: Spots, table_key: str, values: np.ndarray, *, fill: Any = np.nan
) -> np.ndarray:
    """Reorder per-table-row ``values`` into the shapes element's order (missing rows: ``fill``)."""
    from squall_sd.tl._keys import instance_positions

    rows, pos = instance_positions(
        sdata.tables[table_key], spots.shapes_key, sdata.shapes[spots.shapes_key].index
    )
    out = np.full(
        len(spots.centers_um),
        fill,
        dtype=object if fill is None or values.dtype == object else float,
    )
    out[pos] = np.asarray(values)[rows]
    return out
