"""Interactive viewing in napari (napari-spatialdata): H&E, expression and niches in microns.

matplotlib, spatialdata, napari, :mod:`squall_sd.pp` and :mod:`squall_sd.tl` (whose packages load
spatialdata and anndata on import) are imported inside functions, so that
``import squall_sd.pl`` stays light.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any
from unittest import mock

import numpy as np
import pandas as pd
from scipy import sparse

from squall_sd._constants import MICRONS
from squall_sd._docs import d
from squall_sd._logging import logger
from squall_sd._sdata import instance_positions, resolve_image_key
from squall_sd.pl._panels import _as_categorical, _as_list, _palette, _with_categorical
from squall_sd.pl._spatial import _measured_source, find_prediction
from squall_sd.pl._utils import Spots, resolve_spots, robust_norm, table_values

if TYPE_CHECKING:
    import napari as _napari
    from matplotlib.colors import Colormap
    from napari_spatialdata import Interactive
    from spatialdata import SpatialData

__all__ = ["napari", "require_napari", "require_napari_spatialdata"]

#: Install hint for the optional napari dependency.
NAPARI_HINT = 'pip install "squall-sd[napari]"'
#: Genes shown when ``genes=None``: this many predicted genes with the most variable predictions.
DEFAULT_N_GENES = 3
#: Name of napari-spatialdata's table widget in ``viewer.window.dock_widgets``.
VIEW_WIDGET = "View (napari-spatialdata)"
#: Units of the layers' world coordinates (the ``microns`` coordinate system).
UNITS = ("um", "um")
#: Colour of spots without a value (no prediction, no table row, no niche label).
MISSING_RGBA = (0.6, 0.6, 0.6, 0.5)


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


def require_napari_spatialdata() -> type[Interactive]:
    """Return :class:`napari_spatialdata.Interactive`, or raise an :class:`ImportError` (hint)."""
    try:
        from napari_spatialdata import Interactive
    except ImportError as e:
        raise ImportError(
            f"squall.pl.napari opens the SpatialData with napari-spatialdata: {NAPARI_HINT} (or "
            f'`pip install "napari-spatialdata>=0.5"`). Import failed with: {e}'
        ) from e
    return Interactive


def _rgba(values: np.ndarray, cmap: Colormap | str, norm: Any) -> np.ndarray:
    from matplotlib import colormaps

    cm = colormaps[cmap] if isinstance(cmap, str) else cmap
    colors = np.asarray(cm(norm(np.nan_to_num(values, nan=norm.vmin))), dtype=float)
    colors[~np.isfinite(values)] = MISSING_RGBA
    return colors


def _default_genes(sdata: SpatialData, table_key: str, layer: str | None) -> list[str]:
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


def _open_interactive(interactive_cls: type[Interactive], sdata: SpatialData, viewer: _napari.Viewer) -> Interactive:
    """Open ``sdata`` in ``viewer`` with napari-spatialdata's ``Interactive``.

    ``Interactive`` docks its widgets into :func:`napari.current_viewer` (or a new viewer); it has
    no ``viewer=`` argument, so it is made to see ``viewer`` as the current one while it is built.
    """
    import napari as napari_module

    with mock.patch.object(napari_module, "current_viewer", lambda: viewer):
        interactive = interactive_cls(sdata, headless=True)
    # Select `microns` in the widget before adding layers: selecting a coordinate system hides the
    # layers whose name is not an element name, and ours are named after the gene / niche column.
    interactive.switch_coordinate_system(MICRONS)
    return interactive


def _add_element(interactive: Interactive, sdata: SpatialData, key: str, name: str) -> Any:
    """Add element ``key`` as a layer ``name`` in ``microns`` through napari-spatialdata.

    :meth:`~napari_spatialdata.Interactive.add_element` loads the layer in a worker thread and names
    it after the element; one shapes element is shown once per gene and kind here, so the layer
    is built synchronously with the same loader (``SpatialDataViewer.get_sdata_*``, which sets the
    transformation to ``microns``, the spot radii and the ``sdata`` / ``adata`` / ``indices``
    metadata the widgets use) and renamed before it is added.
    """
    import shapely

    model = interactive._sdata_widget.viewer_model
    if key in sdata.images:
        layer = model.get_sdata_image(sdata, key, MICRONS, False)
    elif isinstance(sdata.shapes[key].geometry.iloc[0], shapely.Point):
        layer = model.get_sdata_circles(sdata, key, MICRONS, False)
    else:
        layer = model.get_sdata_shapes(sdata, key, MICRONS, False)
    layer.name = name
    layer.units = UNITS
    model.add_layer(layer)
    return layer


def _color_by(
    interactive: Interactive,
    layer: Any,
    *,
    table_key: str,
    var: str | None = None,
    adata_layer: str | None = None,
    obs: str | None = None,
) -> None:
    """Colour ``layer`` by a table column with napari-spatialdata's View widget.

    Does what a click does: select the layer, the table and ``adata_layer`` (for ``var``) in the
    widget, then colour by the ``var`` gene or the ``obs`` column (``face_color`` and the
    widget's "Colored by").
    """
    viewer = interactive._viewer
    view = viewer.window.dock_widgets[VIEW_WIDGET]
    viewer.layers.selection.active = layer
    if table_key not in (layer.metadata.get("table_names") or []):
        raise KeyError(
            f"Table {table_key!r} does not annotate {layer.metadata.get('name')!r}; "
            "napari-spatialdata cannot colour it by that table."
        )
    view.table_name_widget.setCurrentText(table_key)
    if var is not None:
        view.adata_layer_widget.setCurrentText(adata_layer if adata_layer is not None else "X")
        view.var_widget.setAdataLayer(adata_layer)
        view.var_widget._onAction((var,))
    else:
        view.obs_widget._onAction((obs,))


@d.dedent
def napari(  # noqa: D417 - parameters from squall_sd._docs
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

    The SpatialData is opened with napari-spatialdata (:class:`napari_spatialdata.Interactive`):
    its SpatialData widget lists the elements by coordinate system, with ``"microns"`` selected,
    and its View widget colours a layer by any table column or gene. The H&E is added as a
    multiscale image (all pyramid levels, read lazily) and the spots once per gene and kind
    (``"ERBB2 predicted"``, ``"ERBB2 measured"``), each coloured by that gene through the View
    widget (the values are also the layer's ``features``, shown in the status bar), and once
    coloured by the niche column, all in ``"microns"``, so they line up. Expression colours are
    clipped at ``vmax`` (a percentile by default) and niches use the same palette as
    :func:`squall_sd.pl.niches`. Only the first overlay is visible at first; toggle the others in
    the layer list.

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
    %(image_key_he)s
    cmap
        Colour map of expression.
    vmax
        Upper colour limit per layer: a number, ``None`` (maximum) or ``"pNN"`` (percentile).
    opacity
        Opacity of the overlays.
    viewer
        Add the layers (and napari-spatialdata's widgets) to this viewer instead of opening a
        new one.
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
        napari or napari-spatialdata is not installed (``pip install "squall-sd[napari]"``).
    KeyError
        Genes were asked for but there are no predictions, or an unknown gene.

    """
    napari_module = require_napari()
    interactive_cls = require_napari_spatialdata()
    gene_list = _as_list(genes)
    try:
        pred = find_prediction(sdata, table_key=table_key, layer=layer, shapes_key=shapes_key)
    except KeyError:
        if gene_list:
            raise
        pred = None
    spots = resolve_spots(sdata, shapes_key=shapes_key, table_key=pred.table_key if pred is not None else table_key)
    if pred is not None and gene_list is None:
        gene_list = _default_genes(sdata, pred.table_key, pred.layer)
    gene_list = gene_list or []
    meas = _measured_source(sdata, pred, spots.shapes_key, measured_layer) if (pred and measured) else None
    if pred is not None:
        ptab = sdata.tables[pred.table_key]
        missing = [g for g in gene_list if g not in ptab.var_names]
        if missing:
            raise KeyError(f"Genes {missing} not in table {pred.table_key!r} ({ptab.n_vars} genes).")

    if viewer is None:
        viewer = napari_module.Viewer(title=title, show=show)
    interactive = _open_interactive(interactive_cls, sdata, viewer)
    ikey = resolve_image_key(sdata, image_key) if (image_key is not None or sdata.images) else None
    if ikey is not None:
        _add_element(interactive, sdata, ikey, ikey)

    overlays = []
    for gene in gene_list:
        for kind, src in (("predicted", pred), ("measured", meas)):
            if src is None:
                continue
            tab = sdata.tables[src.table_key]
            if gene not in tab.var_names:
                continue
            values = _spot_order(sdata, spots, src.table_key, table_values(tab, gene, src.layer))
            if kind == "predicted" and not np.isfinite(values).any():
                raise ValueError(f"Gene {gene!r} has no predicted values (the model does not predict it).")
            lay = _add_element(interactive, sdata, spots.shapes_key, f"{gene} {kind}")
            _color_by(interactive, lay, table_key=src.table_key, var=gene, adata_layer=src.layer)
            # napari-spatialdata scales the colours from the minimum to the maximum (one bright
            # spot washes out the rest) and gives missing values (unpredicted genes) the colour
            # map's "bad" colour; recolour with `vmax` and grey for missing values. It also sets
            # the features in table row order; set them in the order of the layer's spots.
            lay.face_color = _rgba(values, cmap, robust_norm(values, vmin=None, vmax=vmax))
            lay.features = pd.DataFrame({gene: values, "index": lay.metadata["indices"]})
            overlays.append(lay)

    if niches is not None:
        tkey = spots.table_key
        if tkey is not None and niches in sdata.tables[tkey].obs:
            tab = sdata.tables[tkey]
            series = _as_categorical(tab, niches)
            colors = _palette(_with_categorical(tab, niches, series), niches, None)
            labels = _spot_order(sdata, spots, tkey, series.astype(object).to_numpy(), fill=None)
            lay = _add_element(interactive, sdata, spots.shapes_key, niches)
            _color_by(interactive, lay, table_key=tkey, obs=niches)
            # napari-spatialdata colours categories with `uns[f"{niches}_colors"]` when that holds
            # one colour per category (and then fails on spots without a label), else with its
            # own tab20; recolour with the palette of `squall.pl.niches` (the same colours as the
            # static plots, also when `uns` has none) and grey for spots without a label.
            lay.face_color = np.array(
                [_to_rgba(colors.get(str(v), "#bbbbbb")) if pd.notna(v) else MISSING_RGBA for v in labels]
            )
            lay.features = pd.DataFrame(
                {
                    niches: pd.Categorical(labels, categories=list(colors)),
                    "index": lay.metadata["indices"],
                }
            )
            overlays.append(lay)
        else:
            logger.info("no `obs[%r]` in the table; not adding a niche layer", niches)

    for i, lay in enumerate(overlays):
        lay.opacity = opacity
        lay.visible = i == 0
    if overlays:
        viewer.layers.selection.active = overlays[0]
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
    rows, pos = instance_positions(sdata.tables[table_key], spots.shapes_key, sdata.shapes[spots.shapes_key].index)
    out = np.full(
        len(spots.centers_um),
        fill,
        dtype=object if fill is None or values.dtype == object else float,
    )
    out[pos] = np.asarray(values)[rows]
    return out
