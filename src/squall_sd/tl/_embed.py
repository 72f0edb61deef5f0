"""H&E embeddings: per spot / tile, and the whole-slide token map (SQUALL spec §6.3).

This module resolves what to embed and assembles the outputs; the tiles are planned and run through
the model by the inference engine (:mod:`squall_sd.tl._engine`), which
:func:`squall_sd.tl.predict_expression` shares.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from squall_sd._constants import ATTRS_KEY, EMBED_KEY, EMBED_TABLE_KEY, TOKEN_MAP_KEY, VIRTUAL_SPOTS_KEY
from squall_sd._docs import d
from squall_sd._logging import logger
from squall_sd._sdata import Region, instance_positions, resolve_region
from squall_sd._sdata._write import add_elements, snapshot_table
from squall_sd.tl._engine import (
    TileDataset,
    TilePlan,
    centers_and_extent,
    collate_tiles,
    frozen_gc,
    image_from_canvas,
    make_loader,
    on_device,
    plan_tiles,
    region_grid_async,
    resolve_device,
    run_batches,
)
from squall_sd.tl._inference import (
    MAX_UPSAMPLE,
    new_table,
    resolve_image_mpp,
    resolve_model,
    resolve_where,
    set_uns,
)
from squall_sd.tl._token_map import token_map as _token_map
from squall_sd.tl._utils import provenance

if TYPE_CHECKING:
    from concurrent.futures import Future

    import geopandas as gpd
    import torch
    from anndata import AnnData
    from spatialdata import SpatialData

    from squall_sd.models import Squall

__all__ = ["embed"]


@frozen_gc
@d.dedent
def embed(  # noqa: D417 - parameters from squall_sd._docs
    sdata: SpatialData,
    model: Squall | str,
    *,
    image_key: str | None = None,
    shapes_key: str | None = None,
    labels_key: str | None = None,
    table_key: str | None = None,
    spots: Literal["visium", "bins", "tiles"] | None = None,
    spot_size_um: float | None = None,
    pool: Literal["region", "tile"] = "region",
    mpp: float | None = None,
    layout: Literal["auto", "tiles", "shapes"] = "auto",
    token_map: bool = False,
    token_stride: int = 1,
    key_added: str = EMBED_KEY,
    table_key_added: str = EMBED_TABLE_KEY,
    shapes_key_added: str = VIRTUAL_SPOTS_KEY,
    token_map_key_added: str = TOKEN_MAP_KEY,
    batch_size: int = 32,
    num_workers: int | Literal["auto"] = "auto",
    device: str = "auto",
    autocast: bool | None = None,
    max_upsample: float = MAX_UPSAMPLE,
    progress: bool = True,
    inplace: bool = True,
    overwrite: bool = False,
    write_to_store: bool | None = None,
) -> AnnData | None:
    """Embed the H&E at spots / bins / cells with the model's RGB tokens (``forward_rgb``).

    With ``pool="region"`` a region's embedding is the mean of the RGB tokens of its tile weighted
    by how many of the region's grid cells each token holds (the geometry of
    :func:`squall_sd.pp.region_weights`; tiles laid as in :func:`squall_sd.tl.predict_expression`);
    with ``pool="tile"`` it is the mean of all tokens of a tile centred on the region.

    ``token_map=True`` also computes the whole-slide token map of the SQUALL tutorial (spec §6.3,
    H&E-only variant): windows of ``img_size`` px slide over the bounding box of the regions with a
    stride of ``token_stride`` tokens, their tokens are added into a canvas at their position, and
    the canvas is divided by the number of windows covering each token. **Cost:** every token is
    covered by ``(grid / token_stride)²`` windows, i.e. ``(14 / token_stride)² = 196`` forward
    passes per tile-sized area at the published ``token_stride=1`` instead of 1 for a
    non-overlapping tiling; the number of windows is logged before starting. ``token_stride=grid``
    is a plain tiling.

    Parameters
    ----------
    %(inference_inputs)s
    shapes_key
        Shapes to embed at (default: the element the table annotates).
    %(labels_key)s
    %(table_key_region)s
    %(virtual_spots)s
    pool
        ``"region"`` or ``"tile"`` (see above).
    mpp
        µm per pixel of the tiles (default ``model.config.mpp``).
        Tiles cut from an image sharper than the model's ``config.effective_mpp`` (when it has
        one) are degraded to it first, as in the model's training (:func:`squall_sd.pp.degrade_patches`).
    layout
        Tile layout for ``pool="region"`` (see :func:`~squall_sd.tl.predict_expression`).
    token_map
        Also compute the whole-slide token map.
    token_stride
        Window stride of the token map in tokens (1 = published recipe).
    key_added
        ``obsm`` key of the embeddings.
    table_key_added
        Name of the new table when no table annotates the region.
    shapes_key_added
        Name of virtual spots.
    token_map_key_added
        Name of the token-map image element (channels = token features, one pixel per token).
    %(inference)s
    %(progress)s
    inplace
        Write into ``sdata``; otherwise return the table.
    overwrite
        Replace existing outputs.
    %(write_to_store)s

    Returns
    -------
    With ``inplace=False`` the table; otherwise ``None`` and

    - ``tables[table_key | table_key_added].obsm[key_added]`` - (regions × embed_dim) float32;
    - with ``token_map=True``: ``images[token_map_key_added]`` - (embed_dim, H, W) token features
      in ``microns`` (pixel = one token, ``patch_size * mpp`` µm);
    - ``uns["squall"]["embed"]`` - provenance.
    """
    model = resolve_model(model)
    if pool not in ("region", "tile"):
        raise ValueError(f"`pool` must be 'region' or 'tile', found {pool!r}.")
    image_key, mpp = resolve_image_mpp(sdata, model, image_key=image_key, mpp=mpp, max_upsample=max_upsample)
    cfg = model.config
    token_stride = int(token_stride)
    if not 1 <= token_stride <= cfg.grid:
        raise ValueError(f"`token_stride` must be in [1, {cfg.grid}], found {token_stride}.")
    region, shapes, tkey, new_shapes = _resolve_region(
        sdata, image_key=image_key, shapes_key=shapes_key, labels_key=labels_key, table_key=table_key, spots=spots,
        spot_size_um=spot_size_um, key_added=key_added, table_key_added=table_key_added,
        shapes_key_added=shapes_key_added, token_map_key_added=token_map_key_added if token_map else None,
        overwrite=overwrite, inplace=inplace,
    )
    table = sdata.tables[tkey] if tkey is not None else None

    dev = resolve_device(device)
    use_autocast = (dev.type == "cuda") if autocast is None else bool(autocast)
    # the regions' index is built in a thread while the tiles are planned
    regions, region_grid = region_grid_async(shapes, patch_px=cfg.img_size, mpp=mpp, grid=cfg.expr_size)
    centers, half = centers_and_extent(regions)
    plan = plan_tiles(
        centers, half, tile_um=cfg.img_size * mpp, token_um=cfg.patch_size * mpp,
        layout="shapes" if pool == "tile" else layout,
    )
    canvas = None
    with on_device(model, dev):
        emb = _embed_tiles(
            sdata, model, shapes, plan, image_key=image_key, mpp=mpp, pool=pool, batch_size=batch_size,
            num_workers=num_workers, device=dev, autocast=use_autocast, progress=progress, region_grid=region_grid,
        )
        if token_map:
            canvas, origin = _token_map(
                sdata, model, image_key=image_key, centers=centers, half=half, mpp=mpp, stride=token_stride,
                batch_size=batch_size, num_workers=num_workers, device=dev, autocast=use_autocast, progress=progress,
            )

    prov = provenance(
        model, image_key=image_key, region=region.key, table_key=tkey, pool=pool, mpp=mpp, layout=plan.layout,
        n_tiles=len(plan), token_map=token_map, token_stride=token_stride if token_map else None,
        key_added=key_added, device=str(dev),
    )
    out_table, undo = _assemble_table(emb, table, region, shapes, centers, key_added=key_added, inplace=inplace)
    set_uns(out_table, prov, "embed")
    logger.info(
        "Adding `sdata.tables[%r].obsm[%r]` (%d x %d)", tkey if table is not None else table_key_added, key_added,
        *emb.shape,
    )
    if not inplace:
        if canvas is not None:
            canvas.cleanup()
        return out_table
    new_images = {}
    if canvas is not None:
        new_images[token_map_key_added] = image_from_canvas(
            canvas.data, channels=[f"f{i}" for i in range(cfg.embed_dim)], pixel_um=cfg.patch_size * mpp,
            origin_um=origin,
        )
        logger.info("Adding `sdata.images[%r]` %s", token_map_key_added, canvas.data.shape)
    new_tables = {} if table is not None else {table_key_added: out_table}
    add_elements(
        sdata, {"shapes": new_shapes, "images": new_images, "tables": new_tables},
        replaced=[tkey] if table is not None else [], undo=undo, write_to_store=write_to_store,
    )
    return None


def _resolve_region(
    sdata: SpatialData,
    *,
    image_key: str,
    shapes_key: str | None,
    labels_key: str | None,
    table_key: str | None,
    spots: str | None,
    spot_size_um: float | None,
    key_added: str,
    table_key_added: str,
    shapes_key_added: str,
    token_map_key_added: str | None,
    overwrite: bool,
    inplace: bool,
) -> tuple[Region, gpd.GeoDataFrame, str | None, dict[str, Any]]:
    """Where to embed: ``(region, shapes, table key, new shapes)``; raise for outputs that exist."""
    region = None if spots is not None else resolve_region(sdata, shapes_key=shapes_key, labels_key=labels_key)
    if region is None and inplace and shapes_key_added in sdata.shapes and not overwrite:
        raise ValueError(f"`shapes_key_added={shapes_key_added!r}` already exists; pass `overwrite=True`.")
    region, shapes, tkey, new_shapes = resolve_where(
        sdata, region, image_key=image_key, table_key=table_key, spots=spots,
        spot_size_um=spot_size_um, shapes_key_added=shapes_key_added,
    )
    table = sdata.tables[tkey] if tkey is not None else None
    if table is not None and key_added in table.obsm and not overwrite:
        raise ValueError(f"`tables[{tkey!r}].obsm[{key_added!r}]` already exists; pass `overwrite=True`.")
    if table is None and inplace and table_key_added in sdata.tables and not overwrite:
        raise ValueError(f"`table_key_added={table_key_added!r}` already exists; pass `overwrite=True`.")
    if token_map_key_added is not None and inplace and token_map_key_added in sdata.images and not overwrite:
        raise ValueError(f"`token_map_key_added={token_map_key_added!r}` already exists; pass `overwrite=True`.")
    return region, shapes, tkey, new_shapes


def _embed_tiles(
    sdata: SpatialData,
    model: Squall,
    shapes: gpd.GeoDataFrame,
    plan: TilePlan,
    *,
    image_key: str,
    mpp: float,
    pool: str,
    batch_size: int,
    num_workers: int | str,
    device: torch.device,
    autocast: bool,
    progress: bool,
    region_grid: Future | None = None,
) -> np.ndarray:
    """Run the tiles of ``plan`` through ``model.embed`` (the engine loop): (regions × embed_dim) float32."""
    from squall_sd.pp import extract_patches

    cfg = model.config
    patches = extract_patches(
        sdata, plan.centers, image_key=image_key, patch_px=cfg.img_size, mpp=mpp, effective_mpp=cfg.effective_mpp
    )
    loader = make_loader(
        TileDataset(
            patches, shapes, plan, patch_px=cfg.img_size, mpp=mpp, grid=cfg.expr_size, region_grid=region_grid
        ),
        batch_size=batch_size, num_workers=num_workers, device=device,
        collate=partial(collate_tiles, grid=cfg.expr_size, plan=plan),
    )
    emb = np.full((len(shapes), cfg.embed_dim), np.nan, dtype=np.float32)
    step = _embed_step(model, emb, mpp=mpp, pool=pool, autocast=autocast)
    run_batches(loader, step, patches=patches, desc="embed", progress=progress)
    return emb


def _embed_step(model: Squall, emb: np.ndarray, *, mpp: float, pool: str, autocast: bool) -> Callable[[Any], int]:
    """Return the engine step: the RGB tokens of a batch pooled per region (or tile) into ``emb``."""
    import torch

    cfg = model.config

    def step(batch: Any) -> int:
        _, rgb, w, ridx = batch
        tok = model.embed(rgb, mpp, pool=None, autocast=autocast)  # (B, N, D)
        if pool == "tile":
            vec = tok.mean(dim=1)[:, None, :].expand(-1, w.shape[1], -1)
        else:
            p = cfg.expr_patch
            b, r = w.shape[:2]
            tw = w.to(tok.device).reshape(b, r, cfg.grid, p, cfg.grid, p).sum(dim=(3, 5)).reshape(b, r, -1)
            tw = tw / tw.sum(dim=2, keepdim=True).clamp_min(1e-12)
            vec = torch.einsum("brn,bnd->brd", tw, tok)
        ridx_np = ridx.numpy()
        ok = ridx_np >= 0
        emb[ridx_np[ok]] = vec.float().cpu().numpy()[ok]
        return len(ridx_np)

    return step


def _assemble_table(
    emb: np.ndarray,
    table: AnnData | None,
    region: Region,
    shapes: gpd.GeoDataFrame,
    centers: np.ndarray,
    *,
    key_added: str,
    inplace: bool,
) -> tuple[AnnData, list[Callable[[], None]]]:
    """Return the output table (new, or the existing one / its copy with ``obsm[key_added]``) and its undo."""
    if table is None:
        out_table = new_table(np.zeros((len(shapes), 0), dtype=np.float32), [], region, shapes, centers)
        out_table.obsm[key_added] = emb
        return out_table, []
    rows, pos = instance_positions(table, region.key, shapes.index)
    out = np.full((table.n_obs, emb.shape[1]), np.nan, dtype=np.float32)
    out[rows] = emb[pos]
    out_table = table if inplace else table.copy()
    undo = [snapshot_table(table, obsm=[key_added], uns=[ATTRS_KEY])] if inplace else []
    out_table.obsm[key_added] = out
    return out_table, undo
