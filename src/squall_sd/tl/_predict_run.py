"""The forward passes of :func:`~squall_sd.tl.predict_expression`: its step in the engine loop and its dense maps."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any

import numpy as np

from squall_sd._logging import logger
from squall_sd.tl._engine import (
    Canvas,
    TileDataset,
    TilePlan,
    collate_tiles,
    image_from_canvas,
    make_loader,
    on_device,
    resolve_device,
    run_batches,
)

if TYPE_CHECKING:
    from concurrent.futures import Future

    import geopandas as gpd
    import torch
    from spatialdata import SpatialData

    from squall_sd._sdata import Region
    from squall_sd.models import Squall

__all__ = ["PredictRun", "dense_image", "predict_tiles"]


@dataclass
class PredictRun:
    """What the forward passes produced: region values, the dense-map canvas, and how they were run."""

    pred: np.ndarray
    plan: TilePlan
    centers: np.ndarray
    tile_um: float
    grid: int
    device: torch.device
    autocast: bool
    canvas: Canvas | None = None
    lo: np.ndarray | None = None
    core_cells: int = 0
    margin_cells: int = 0


def predict_tiles(
    sdata: SpatialData,
    model: Squall,
    shapes: gpd.GeoDataFrame,
    region: Region,
    plan: TilePlan,
    centers: np.ndarray,
    *,
    image_key: str,
    mpp: float,
    channels: np.ndarray,
    dense_idx: np.ndarray | None,
    reduce: str,
    batch_size: int,
    num_workers: int | str,
    device: str,
    autocast: bool | None,
    progress: bool,
    region_grid: Future | None = None,
    tta: bool = False,
) -> PredictRun:
    """Run the tiles of ``plan`` through the model (the engine loop); ``sdata`` is not changed."""
    from squall_sd.pp import extract_patches

    cfg = model.config
    tile_um = cfg.img_size * mpp
    patches = extract_patches(
        sdata, plan.centers, image_key=image_key, patch_px=cfg.img_size, mpp=mpp, effective_mpp=cfg.effective_mpp
    )
    dataset = TileDataset(
        patches, shapes, plan, patch_px=cfg.img_size, mpp=mpp, grid=cfg.expr_size, region_grid=region_grid
    )
    dev = resolve_device(device)
    use_autocast = (dev.type == "cuda") if autocast is None else bool(autocast)
    loader = make_loader(
        dataset, batch_size=batch_size, num_workers=num_workers, device=dev,
        collate=_sparse_collate(cfg.expr_size, plan),
    )
    logger.info(
        "predict_expression: %d %s of %r at %g µm/px -> %d tiles (%s layout, %.1f regions/tile), %d genes, on %s",
        len(shapes), region.kind, region.key, mpp, len(plan), plan.layout, len(shapes) / max(len(plan), 1),
        len(channels), dev,
    )
    pred = np.full((len(shapes), len(channels)), np.nan, dtype=np.float32)
    run = PredictRun(pred, plan, centers, tile_um, cfg.expr_size, dev, use_autocast)
    if dense_idx is not None:
        _dense_canvas(run, len(dense_idx))
    step = _forward_step(model, run, mpp=mpp, channels=channels, dense_idx=dense_idx, reduce=reduce, tta=tta)
    try:
        with on_device(model, dev):
            run_batches(loader, step, patches=patches, desc="predict_expression", progress=progress)
    except BaseException:
        if run.canvas is not None:
            run.canvas.cleanup()
        raise
    return run


def _sparse_collate(grid: int, plan: TilePlan) -> Callable[[list[Any]], Any]:
    return partial(collate_tiles, grid=grid, plan=plan, sparse=True)


def _dense_canvas(run: PredictRun, n_genes: int) -> None:
    """Give ``run`` the canvas of the dense maps: the tile cores of the plan, side by side."""
    plan = run.plan
    run.core_cells = int(round(plan.core_um / (run.tile_um / run.grid)))
    run.margin_cells = (run.grid - run.core_cells) // 2
    run.lo = plan.origin.min(axis=0)
    hi = plan.origin.max(axis=0)
    run.canvas = Canvas(
        (n_genes, int(hi[1] - run.lo[1] + 1) * run.core_cells, int(hi[0] - run.lo[0] + 1) * run.core_cells)
    )


def _forward_step(
    model: Squall,
    run: PredictRun,
    *,
    mpp: float,
    channels: np.ndarray,
    dense_idx: np.ndarray | None,
    reduce: str,
    tta: bool = False,
) -> Callable[[Any], int]:
    """Return the engine step: one forward pass per batch into ``run.pred`` (and the dense canvas)."""
    dense_t = None if dense_idx is None else [int(i) for i in dense_idx]  # channel indices
    genes_arg = channels.tolist() if len(channels) < model.n_genes else None

    def step(batch: Any) -> int:
        tids, rgb, w, ridx = batch
        if dense_t is None:
            agg = model.predict(rgb, mpp, genes=genes_arg, aggregate=w, reduce=reduce, autocast=run.autocast, tta=tta)
        else:
            # spot values and dense maps from one forward pass
            agg, dense = model.predict(
                rgb, mpp, genes=genes_arg, aggregate=w, reduce=reduce, autocast=run.autocast, dense_genes=dense_t,
                tta=tta,
            )
            _paste_dense(run, tids.numpy(), dense)
        ridx_np = ridx.numpy()
        ok = ridx_np >= 0
        run.pred[ridx_np[ok]] = agg.float().cpu().numpy()[ok]
        return len(tids)

    return step


def _paste_dense(run: PredictRun, tids: np.ndarray, dense: torch.Tensor) -> None:
    """Put the cores of a batch's dense maps (B, grid, grid, genes) into the canvas."""
    c, m = run.core_cells, run.margin_cells
    dn = dense[:, m : m + c, m : m + c].permute(0, 3, 1, 2).cpu().numpy()
    for k, t in enumerate(tids):
        ox, oy = (run.plan.origin[t] - run.lo) * c
        run.canvas.data[:, oy : oy + c, ox : ox + c] = dn[k]


def dense_image(run: PredictRun, dense_genes: list[str], dense_key_added: str) -> Any:
    """Return the dense maps as an image element in ``microns``."""
    cell_um = run.tile_um / run.grid
    origin = (float(run.lo[0] * run.plan.core_um), float(run.lo[1] * run.plan.core_um))
    image = image_from_canvas(run.canvas.data, channels=dense_genes, pixel_um=cell_um, origin_um=origin)
    logger.info("Adding `sdata.images[%r]` (%s at %.3g µm/px)", dense_key_added, run.canvas.data.shape, cell_um)
    return image
