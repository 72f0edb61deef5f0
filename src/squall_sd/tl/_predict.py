"""Virtual spatial transcriptomics: predict expression from the H&E at spots, bins, cells or virtual spots.

This module resolves what to predict and assembles the outputs; the tiles are planned and run through
the model by the inference engine (:mod:`squall_sd.tl._engine`), which :func:`squall_sd.tl.embed` shares.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from squall_sd._constants import (
    ATTRS_KEY,
    DENSE_KEY,
    PREDICT_LAYER_KEY,
    PREDICT_TABLE_KEY,
    PREDICTED_VAR,
    VIRTUAL_SPOTS_KEY,
)
from squall_sd._docs import d
from squall_sd._logging import logger
from squall_sd._sdata import Region, instance_positions, resolve_region
from squall_sd._sdata._write import add_elements, snapshot_table
from squall_sd.tl._engine import (
    TilePlan,
    centers_and_extent,
    frozen_gc,
    plan_tiles,
    region_grid_async,
)
from squall_sd.tl._inference import (
    MAX_UPSAMPLE,
    new_table,
    resolve_image_mpp,
    resolve_model,
    resolve_where,
    set_uns,
)
from squall_sd.tl._predict_genes import match_table_genes, restrict_to_genes
from squall_sd.tl._predict_run import PredictRun, dense_image, predict_tiles
from squall_sd.tl._utils import provenance

if TYPE_CHECKING:
    import geopandas as gpd
    from anndata import AnnData
    from spatialdata import SpatialData

    from squall_sd.models import Squall
    from squall_sd.pp import RegionGrid

__all__ = ["predict_expression"]


@frozen_gc
@d.dedent
def predict_expression(  # noqa: D417 - parameters from squall_sd._docs
    sdata: SpatialData,
    model: Squall | str,
    *,
    image_key: str | None = None,
    shapes_key: str | None = None,
    labels_key: str | None = None,
    table_key: str | None = None,
    spots: Literal["visium", "bins", "tiles"] | None = None,
    spot_size_um: float | None = None,
    genes: Sequence[str] | None = None,
    mpp: float | None = None,
    layout: Literal["auto", "tiles", "shapes"] = "auto",
    reduce: Literal["sum", "mean"] | None = None,
    dense_genes: Sequence[str] | None = None,
    key_added: str = PREDICT_LAYER_KEY,
    table_key_added: str = PREDICT_TABLE_KEY,
    shapes_key_added: str = VIRTUAL_SPOTS_KEY,
    dense_key_added: str = DENSE_KEY,
    batch_size: int = 32,
    num_workers: int | Literal["auto"] = "auto",
    device: str = "auto",
    autocast: bool | None = None,
    max_upsample: float = MAX_UPSAMPLE,
    tta: bool = False,
    progress: bool = True,
    inplace: bool = True,
    overwrite: bool = False,
    write_to_store: bool | None = None,
) -> AnnData | None:
    """Predict gene expression from the H&E at spots, bins, cells or virtual spots.

    **Where.** At the element a table annotates (the spots / bins / cells of a reader's
    SpatialData; no keys needed when there is one), at ``shapes_key`` / ``labels_key``, or, for an
    H&E-only slide (no shapes, or ``spots=`` given), at virtual spots laid over the detected tissue
    (:func:`squall_sd.pp.detect_tissue` + :func:`squall_sd.pp.make_spots`). Tiles of
    ``model.config.img_size`` px at ``mpp`` µm/px are read lazily from the best pyramid level
    (:func:`squall_sd.pp.extract_patches`). With ``layout="shapes"`` each region is the centre of its
    own tile; with ``layout="tiles"`` overlapping tiles whose margins are at least the largest region
    radius cover the regions and each region is aggregated from the one tile whose core holds its
    centre (so it lies wholly inside it); ``"auto"`` takes the tiling when it needs fewer forward
    passes (e.g. Visium spots at 4 µm/px: ~40 spots per tile; at 0.5 µm/px one tile per spot). A
    region's value is the sum (``reduce="sum"``, the SQUALL target space: the region's vector) or
    mean of the model's 4 px grid cells whose centres lie inside it (:func:`squall_sd.pp.region_weights`
    geometry), aggregated inside the forward pass.

    **How.** A :class:`torch.utils.data.DataLoader` (``num_workers`` processes) reads tiles and
    builds region weights while the model runs batched on ``device``; results go straight into a
    preallocated array, so memory does not grow with the slide (except the output itself). Nothing
    is written to ``sdata`` (or its zarr store) until every tile has been predicted.

    Parameters
    ----------
    %(inference_inputs)s
    shapes_key
        Shapes of spots / bins / cells to predict at; default the element the table annotates.
    %(labels_key)s
    %(table_key_region)s
    %(virtual_spots)s
    genes
        Restrict the prediction to these model genes (default: all). For an existing table, whose genes
        are matched to the model's by symbol / Ensembl id, only these columns are predicted (the others
        stay NaN) and each must be a column of the table; a gene the model does not predict raises
        :class:`KeyError`.
    mpp
        µm per pixel of the tiles fed to the model; default ``model.config.mpp``.
        Tiles cut from an image sharper than the model's ``config.effective_mpp`` (when it has
        one) are degraded to it first, as in the model's training (:func:`squall_sd.pp.degrade_patches`).
    layout
        ``"auto"``, ``"tiles"`` or ``"shapes"`` (see above). Dense maps need ``"tiles"`` (forced).
    reduce
        ``"sum"`` or ``"mean"`` over a region's grid cells; default ``model.config.region_reduce``,
        the aggregation the model was trained for (``"sum"`` for the published binary target,
        ``"mean"`` for ``squall-tiny-her2st``'s log1p(CP10k)).
    dense_genes
        Also write dense maps of these genes at the model's native grid (4 px cells, 2 µm at
        0.5 µm/px) as the image ``dense_key_added`` (channels = genes) in ``microns``; NaN outside
        the predicted tiles.
    key_added
        Layer of an existing table that receives the predictions.
    table_key_added
        Name of the new table when there is no table.
    shapes_key_added
        Name of the virtual spots (H&E-only slides).
    dense_key_added
        Name of the dense-map image.
    %(inference)s
    tta
        Test-time augmentation: average each tile's prediction over its 8 rotations and mirror images
        (:meth:`squall_sd.models.Squall.predict`), 8x the compute. The bundled ``squall-tiny-her2st``
        gains about 0.005 in mean per-gene r on a held-out section (model card).
    %(progress)s
    inplace
        Write into ``sdata``; otherwise return the table and leave ``sdata`` unchanged.
    overwrite
        Replace an existing layer / table / image / shapes of the same name.
    %(write_to_store)s

    Returns
    -------
    With ``inplace=False`` the table (a copy of the existing one with the new layer, or the new
    table). Otherwise ``None``, and

    - with a table: ``tables[table_key].layers[key_added]`` - predictions for the genes the model
      predicts (float32), NaN for the others; ``var["squall_predicted"]`` marks the predicted genes;
    - without: ``tables[table_key_added]`` - ``X`` = predictions (regions × model genes), annotating
      the region (``region`` / ``instance_id`` columns), ``obsm["spatial"]`` = centres in µm;
    - H&E-only: ``shapes[shapes_key_added]`` (virtual spots) and ``shapes[f"{image_key}_tissue"]``;
    - with ``dense_genes``: ``images[dense_key_added]``;
    - ``uns["squall"]["predict_expression"]`` - provenance (squall-sd version, model name,
      weights sha256, parameters).

    Raises
    ------
    KeyError
        An element key that does not exist, or an ambiguous choice (the available keys are listed).
    ValueError
        No µm/px for the image, a model much finer than the image, no tissue found, no gene overlap
        between model and table, or an output that exists (pass ``overwrite=True``).
    """
    model = resolve_model(model)
    reduce = _check_options(model, reduce=reduce, layout=layout, spots=spots)
    image_key, mpp = resolve_image_mpp(sdata, model, image_key=image_key, mpp=mpp, max_upsample=max_upsample)
    region, shapes, tkey, new_shapes = _resolve_region(
        sdata, image_key=image_key, shapes_key=shapes_key, labels_key=labels_key, table_key=table_key,
        spots=spots, spot_size_um=spot_size_um, shapes_key_added=shapes_key_added, overwrite=overwrite,
        inplace=inplace,
    )
    table = sdata.tables[tkey] if tkey is not None else None
    target = _resolve_genes(
        sdata, model, table, tkey, region, shapes, genes=genes, key_added=key_added,
        table_key_added=table_key_added, overwrite=overwrite, inplace=inplace,
    )
    dense_genes, dense_idx, layout = _resolve_dense(
        sdata, model, dense_genes, dense_key_added=dense_key_added, layout=layout, overwrite=overwrite,
        inplace=inplace,
    )
    # the regions' index is built in a thread while the tiles are planned from the same grid
    regions, region_grid = region_grid_async(
        shapes, patch_px=model.config.img_size, mpp=mpp, grid=model.config.expr_size
    )
    plan, centers = _plan(model, regions, mpp=mpp, layout=layout)
    run = predict_tiles(
        sdata, model, shapes, region, plan, centers, image_key=image_key, mpp=mpp, channels=target.channels,
        dense_idx=dense_idx, reduce=reduce, batch_size=batch_size, num_workers=num_workers, device=device,
        autocast=autocast, progress=progress, region_grid=region_grid, tta=tta,
    )

    # ---- assemble (nothing has touched sdata so far) -----------------------------------------
    prov = provenance(
        model, image_key=image_key, region=region.key, region_kind=region.kind, table_key=tkey, mpp=mpp,
        tile_px=model.config.img_size, layout=run.plan.layout, n_tiles=len(run.plan), reduce=reduce, spots=spots,
        spot_size_um=spot_size_um, dense_genes=dense_genes, batch_size=batch_size, device=str(run.device),
        autocast=run.autocast, key_added=key_added, tta=bool(tta),
    )
    out_table, undo = _assemble_table(run, target, table, tkey, region, shapes, key_added=key_added, inplace=inplace)
    set_uns(out_table, prov, "predict_expression")
    if not inplace:
        if run.canvas is not None:
            run.canvas.cleanup()
        return out_table
    new_images = {} if run.canvas is None else {dense_key_added: dense_image(run, dense_genes, dense_key_added)}
    new_tables = {} if table is not None else {table_key_added: out_table}
    for k, v in new_shapes.items():
        logger.info("Adding `sdata.shapes[%r]` (%d shapes)", k, len(v))
    if table is None:
        logger.info("Adding `sdata.tables[%r]` (%d x %d)", table_key_added, out_table.n_obs, out_table.n_vars)
    add_elements(
        sdata, {"shapes": new_shapes, "images": new_images, "tables": new_tables},
        replaced=[tkey] if table is not None else [], undo=undo, write_to_store=write_to_store,
    )
    return None


# ---------------------------------------------------------------------------------------------
# resolve
# ---------------------------------------------------------------------------------------------
def _check_options(model: Squall, *, reduce: str | None, layout: str, spots: str | None) -> str:
    """Check the option values; return ``reduce`` (default ``model.config.region_reduce``)."""
    if reduce is None:
        reduce = model.config.region_reduce
    if reduce not in ("sum", "mean"):
        raise ValueError(f"`reduce` must be 'sum' or 'mean', found {reduce!r}.")
    if layout not in ("auto", "tiles", "shapes"):
        raise ValueError(f"`layout` must be 'auto', 'tiles' or 'shapes', found {layout!r}.")
    if spots is not None and spots not in ("visium", "bins", "tiles"):
        raise ValueError(f"`spots` must be 'visium', 'bins' or 'tiles', found {spots!r}.")
    return reduce


def _resolve_region(
    sdata: SpatialData,
    *,
    image_key: str,
    shapes_key: str | None,
    labels_key: str | None,
    table_key: str | None,
    spots: str | None,
    spot_size_um: float | None,
    shapes_key_added: str,
    overwrite: bool,
    inplace: bool,
) -> tuple[Region, gpd.GeoDataFrame, str | None, dict[str, Any]]:
    """Where to predict: ``(region, shapes, table key, new shapes)`` (see :func:`resolve_where`)."""
    if spots is not None and (shapes_key is not None or labels_key is not None):
        raise ValueError("Pass `spots=` (virtual spots) or `shapes_key=` / `labels_key=`, not both.")
    region = None if spots is not None else resolve_region(sdata, shapes_key=shapes_key, labels_key=labels_key)
    if region is None and shapes_key_added in sdata.shapes and not overwrite and inplace:
        raise ValueError(
            f"`shapes_key_added={shapes_key_added!r}` already exists in `sdata.shapes`. Pass "
            "`overwrite=True`, another `shapes_key_added`, or `shapes_key=` to predict at it."
        )
    return resolve_where(
        sdata, region, image_key=image_key, table_key=table_key, spots=spots,
        spot_size_um=spot_size_um, shapes_key_added=shapes_key_added,
    )


@dataclass
class _Target:
    """Which model channels are predicted, and where they go (table columns and rows, or new gene names)."""

    channels: np.ndarray
    genes: list[str]
    columns: np.ndarray | None = None
    rows: np.ndarray | None = None
    pos: np.ndarray | None = None


def _resolve_genes(
    sdata: SpatialData,
    model: Squall,
    table: AnnData | None,
    tkey: str | None,
    region: Region,
    shapes: gpd.GeoDataFrame,
    *,
    genes: Sequence[str] | None,
    key_added: str,
    table_key_added: str,
    overwrite: bool,
    inplace: bool,
) -> _Target:
    """Resolve what to predict: the table's genes the model predicts (restricted to ``genes``), or the model's genes."""
    if table is None:
        if inplace and table_key_added in sdata.tables and not overwrite:
            raise ValueError(
                f"`table_key_added={table_key_added!r}` already exists in `sdata.tables`. Pass `overwrite=True` "
                "to replace it, or another `table_key_added`."
            )
        channels = np.arange(model.n_genes) if genes is None else np.asarray(model.gene_index(list(genes)))
        out_genes = (model.genes or [f"channel_{i}" for i in range(model.n_genes)])
        return _Target(channels, [out_genes[c] for c in channels])
    if key_added in table.layers and not overwrite:
        raise ValueError(
            f"`tables[{tkey!r}].layers[{key_added!r}]` already exists. Pass `overwrite=True` to replace it, "
            "or another `key_added`."
        )
    channels, columns = match_table_genes(model, table, tkey)
    if genes is not None:
        channels, columns = restrict_to_genes(model, channels, columns, genes, tkey)
    rows, pos = instance_positions(table, region.key, shapes.index)
    if len(rows) == 0:
        raise ValueError(f"No row of table {tkey!r} matches an instance of {region.key!r}.")
    out_genes = [model.genes[c] for c in channels] if model.genes else [str(c) for c in channels]
    return _Target(channels, out_genes, columns, rows, pos)


def _resolve_dense(
    sdata: SpatialData,
    model: Squall,
    dense_genes: Sequence[str] | str | None,
    *,
    dense_key_added: str,
    layout: str,
    overwrite: bool,
    inplace: bool,
) -> tuple[list[str] | None, np.ndarray | None, str]:
    """Dense maps: ``(dense genes, their channels, layout)`` (dense maps need ``layout="tiles"``)."""
    if dense_genes is None:
        return None, None, layout
    dense_genes = [dense_genes] if isinstance(dense_genes, str) else list(dense_genes)
    dense_idx = np.asarray(model.gene_index(dense_genes), dtype=np.int64)
    if inplace and dense_key_added in sdata.images and not overwrite:
        raise ValueError(
            f"`dense_key_added={dense_key_added!r}` already exists in `sdata.images`. Pass `overwrite=True` "
            "or another `dense_key_added`."
        )
    if layout == "shapes":
        logger.info("dense_genes needs a tiling; using layout='tiles'")
    return dense_genes, dense_idx, "tiles"


def _plan(model: Squall, regions: RegionGrid, *, mpp: float, layout: str) -> tuple[TilePlan, np.ndarray]:
    """Lay the tiles over the regions (:func:`~squall_sd.tl._engine.plan_tiles`); return the plan and the centres."""
    cfg = model.config
    tile_um = cfg.img_size * mpp
    centers, half = centers_and_extent(regions)
    plan = plan_tiles(centers, half, tile_um=tile_um, token_um=cfg.patch_size * mpp, layout=layout)
    if float(half.max(initial=0)) > tile_um / 2:
        logger.warning(
            "Some regions (up to %.4g µm across) are larger than a %.4g µm tile; they are predicted from the "
            "part inside their tile (scaled by their cell count)", 2 * float(half.max()), tile_um,
        )
    return plan, centers


# ---------------------------------------------------------------------------------------------
# assemble
# ---------------------------------------------------------------------------------------------
def _assemble_table(
    run: PredictRun,
    target: _Target,
    table: AnnData | None,
    tkey: str | None,
    region: Region,
    shapes: gpd.GeoDataFrame,
    *,
    key_added: str,
    inplace: bool,
) -> tuple[AnnData, list[Callable[[], None]]]:
    """Return the output table (new, or the existing one / its copy with the new layer) and its undo."""
    if table is None:
        return new_table(run.pred, target.genes, region, shapes, run.centers), []
    rows, pos, columns = target.rows, target.pos, target.columns
    layer = np.full((table.n_obs, table.n_vars), np.nan, dtype=np.float32)
    step = 8192  # rows at a time: no full-size temporary copy of ``pred`` beside it and the layer
    for a in range(0, len(rows), step):
        layer[np.ix_(rows[a : a + step], columns)] = run.pred[pos[a : a + step]]
    run.pred = None  # free the predictions before the table is copied
    mask = np.zeros(table.n_vars, dtype=bool)
    mask[columns] = True
    out_table = table if inplace else table.copy()
    undo = [snapshot_table(table, layers=[key_added], var=[PREDICTED_VAR], uns=[ATTRS_KEY])] if inplace else []
    out_table.layers[key_added] = layer
    out_table.var[PREDICTED_VAR] = mask
    logger.info(
        "Adding `sdata.tables[%r].layers[%r]` (%d of %d genes predicted)", tkey, key_added, len(columns),
        table.n_vars,
    )
    return out_table, undo
