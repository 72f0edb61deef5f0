"""H&E embeddings: per spot / tile, and the whole-slide token map (SQUALL spec §6.3)."""

from __future__ import annotations

import time
from functools import partial
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from squall_sd._logging import logger
from squall_sd.tl._keys import instance_positions, resolve_region
from squall_sd.tl._predict import (
    MAX_UPSAMPLE,
    TRIM_EVERY,
    Canvas,
    TileDataset,
    _set_uns,
    centers_and_extent,
    collate_tiles,
    image_from_canvas,
    make_loader,
    new_table,
    persist,
    plan_tiles,
    progress_bar,
    provenance_record,
    resolve_device,
    resolve_image_mpp,
    resolve_model,
    resolve_where,
    trim_heap,
)

if TYPE_CHECKING:
    from anndata import AnnData
    from spatialdata import SpatialData

    from squall_sd.models import Squall

__all__ = ["embed"]


def _collate_patches(items: list[tuple[int, np.ndarray]]):
    import torch

    return torch.as_tensor([i for i, _ in items]), torch.from_numpy(np.stack([p for _, p in items]))


class _Windows:
    """Dataset of (index, patch) over a :class:`~squall_sd.pp.PatchDataset`."""

    def __init__(self, patches: Any) -> None:
        self.patches = patches

    def __len__(self) -> int:
        return len(self.patches)

    def __getitem__(self, i: int) -> tuple[int, np.ndarray]:
        return i, self.patches[i]


def embed(
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
    key_added: str = "X_squall",
    table_key_added: str = "squall_embedding",
    shapes_key_added: str = "squall_spots",
    token_map_key_added: str = "squall_token_map",
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
    sdata
        SpatialData with an H&E registered in ``microns``.
    model
        A model or a name / path for :func:`squall_sd.models.load`.
    image_key
        The H&E (default: the only image).
    shapes_key
        Shapes to embed at (default: the element the table annotates).
    labels_key
        Labels of cells to embed at.
    table_key
        Table annotating the region (default: the one that does; none: a new table).
    spots
        Embed at virtual spots (``"visium"`` / ``"bins"`` / ``"tiles"``) over the tissue.
    spot_size_um
        Virtual spot diameter / edge in µm.
    pool
        ``"region"`` or ``"tile"`` (see above).
    mpp
        µm per pixel of the tiles (default ``model.config.mpp``).
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
    batch_size
        Tiles per forward pass.
    num_workers
        DataLoader worker processes; ``"auto"``: 0 on the CPU, ``min(8, cores // 2)`` on a GPU.
    device
        ``"auto"``, ``"cpu"``, ``"cuda"``, ...
    autocast
        bf16 autocast (default on CUDA only).
    max_upsample
        Refuse models finer than the image by more than this factor.
    progress
        Show progress bars.
    inplace
        Write into ``sdata``; otherwise return the table.
    overwrite
        Replace existing outputs.
    write_to_store
        Write the new elements to the zarr store (default: when ``sdata`` is backed), after success.

    Returns
    -------
    With ``inplace=False`` the table; otherwise ``None`` and

    - ``tables[table_key | table_key_added].obsm[key_added]`` - (regions × embed_dim) float32;
    - with ``token_map=True``: ``images[token_map_key_added]`` - (embed_dim, H, W) token features
      in ``microns`` (pixel = one token, ``patch_size * mpp`` µm);
    - ``uns["squall"]["embed"]`` - provenance.
    """
    import torch

    model = resolve_model(model)
    if pool not in ("region", "tile"):
        raise ValueError(f"`pool` must be 'region' or 'tile', found {pool!r}.")
    image_key, mpp = resolve_image_mpp(
        sdata, model, image_key=image_key, mpp=mpp, max_upsample=max_upsample
    )
    cfg = model.config
    token_stride = int(token_stride)
    if not 1 <= token_stride <= cfg.grid:
        raise ValueError(f"`token_stride` must be in [1, {cfg.grid}], found {token_stride}.")

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
    if token_map and inplace and token_map_key_added in sdata.images and not overwrite:
        raise ValueError(f"`token_map_key_added={token_map_key_added!r}` already exists; pass `overwrite=True`.")

    from squall_sd.pp import extract_patches

    dev = resolve_device(device)
    use_autocast = (dev.type == "cuda") if autocast is None else bool(autocast)
    tile_um, token_um = cfg.img_size * mpp, cfg.patch_size * mpp
    centers, half = centers_and_extent(shapes)
    plan = plan_tiles(centers, half, tile_um=tile_um, token_um=token_um, layout="shapes" if pool == "tile" else layout)
    patches = extract_patches(sdata, plan.centers, image_key=image_key, patch_px=cfg.img_size, mpp=mpp)
    loader = make_loader(
        TileDataset(patches, shapes, plan, patch_px=cfg.img_size, mpp=mpp, grid=cfg.expr_size),
        batch_size=batch_size, num_workers=num_workers, device=dev,
        collate=partial(collate_tiles, grid=cfg.expr_size, plan=plan),
    )
    emb = np.full((len(shapes), cfg.embed_dim), np.nan, dtype=np.float32)
    was_training, prev_device = model.training, model.device
    model.eval()
    model.to(dev)
    canvas = None
    try:
        bar = progress_bar(len(plan), desc="embed", enabled=progress)
        for k_batch, (_, rgb, w, ridx) in enumerate(loader):
            if k_batch % TRIM_EVERY == TRIM_EVERY - 1:
                trim_heap()
            tok = model.embed(rgb, mpp, pool=None, autocast=use_autocast)  # (B, N, D)
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
            bar.update(len(ridx_np))
        bar.close()
        if token_map:
            canvas, origin = _token_map(
                sdata, model, image_key=image_key, centers=centers, half=half, mpp=mpp, stride=token_stride,
                batch_size=batch_size, num_workers=num_workers, device=dev, autocast=use_autocast, progress=progress,
            )
    except BaseException:
        if canvas is not None:
            canvas.cleanup()
        raise
    finally:
        model.to(prev_device)
        model.train(was_training)

    prov = provenance_record(
        model, image_key=image_key, region=region.key, table_key=tkey, pool=pool, mpp=mpp, layout=plan.layout,
        n_tiles=len(plan), token_map=token_map, token_stride=token_stride if token_map else None,
        key_added=key_added, device=str(dev),
    )
    undo = None
    if table is not None:
        rows, pos = instance_positions(table, region.key, shapes.index)
        out = np.full((table.n_obs, cfg.embed_dim), np.nan, dtype=np.float32)
        out[rows] = emb[pos]
        out_table = table if inplace else table.copy()
        if inplace:
            old = (table.obsm.get(key_added), dict(table.uns.get("squall", {})) if "squall" in table.uns else None)

            def undo() -> None:
                if old[0] is None:
                    table.obsm.pop(key_added, None)
                else:
                    table.obsm[key_added] = old[0]
                if old[1] is None:
                    table.uns.pop("squall", None)
                else:
                    table.uns["squall"] = old[1]

        out_table.obsm[key_added] = out
        written_table = tkey
    else:
        out_table = new_table(np.zeros((len(shapes), 0), dtype=np.float32), [], region, shapes, centers)
        out_table.obsm[key_added] = emb
        written_table = table_key_added
    _set_uns(out_table, prov, "embed")
    logger.info("Adding `sdata.tables[%r].obsm[%r]` (%d x %d)", written_table, key_added, *emb.shape)
    if not inplace:
        if canvas is not None:
            canvas.cleanup()
        return out_table
    new_images = {}
    if canvas is not None:
        new_images[token_map_key_added] = image_from_canvas(
            canvas.data, channels=[f"f{i}" for i in range(cfg.embed_dim)], pixel_um=token_um, origin_um=origin
        )
        logger.info("Adding `sdata.images[%r]` %s", token_map_key_added, canvas.data.shape)
    added: list[tuple[str, str, Any]] = []
    for kind, items in (("shapes", new_shapes), ("images", new_images)):
        for k, v in items.items():
            added.append((kind, k, getattr(sdata, kind).get(k)))
            getattr(sdata, kind)[k] = v
    if table is None:
        added.append(("tables", written_table, sdata.tables.get(written_table)))
        sdata.tables[written_table] = out_table
    try:
        persist(sdata, new=[*new_shapes, *new_images], replaced=[written_table], write_to_store=write_to_store)
    except BaseException:
        for kind, k, old_v in added:
            container = getattr(sdata, kind)
            if old_v is None:
                del container[k]
            else:
                container[k] = old_v
        if undo is not None:
            undo()
        raise
    return None


def _token_map(
    sdata: SpatialData,
    model: Squall,
    *,
    image_key: str,
    centers: np.ndarray,
    half: np.ndarray,
    mpp: float,
    stride: int,
    batch_size: int,
    num_workers: int | str,
    device: Any,
    autocast: bool,
    progress: bool,
) -> tuple[Canvas, tuple[float, float]]:
    """Overlapping-window token map over the regions' bounding box (see :func:`embed`)."""
    from squall_sd.pp import extract_patches

    cfg = model.config
    g = cfg.grid
    token_um = cfg.patch_size * mpp
    lo = np.floor((centers - half[:, None]).min(axis=0) / token_um).astype(int)  # (x, y) token index
    hi = np.ceil((centers + half[:, None]).max(axis=0) / token_um).astype(int)
    size = hi - lo  # tokens (x, y)
    starts = [np.arange(lo[a] - g + stride, hi[a], stride) for a in (0, 1)]
    sx, sy = np.meshgrid(starts[0], starts[1], indexing="xy")
    tl = np.column_stack([sx.ravel(), sy.ravel()])  # top-left token of each window
    win_centers = (tl + g / 2) * token_um
    logger.info(
        "token map: %d x %d tokens, %d windows of %d px at stride %d token(s) (each token covered by up to "
        "%d windows: %dx the forward passes of a plain tiling)",
        size[0], size[1], len(tl), cfg.img_size, stride, (g // stride) ** 2, (g // stride) ** 2,
    )
    canvas = Canvas((cfg.embed_dim, int(size[1]), int(size[0])), fill=0.0)
    count = np.zeros((int(size[1]), int(size[0])), dtype=np.float32)
    patches = extract_patches(sdata, win_centers, image_key=image_key, patch_px=cfg.img_size, mpp=mpp)
    loader = make_loader(_Windows(patches), batch_size=batch_size, num_workers=num_workers, device=device,
                         collate=_collate_patches)
    bar = progress_bar(len(tl), desc="token map", enabled=progress)
    t0 = time.perf_counter()
    try:
        for ids, rgb in loader:
            tok = model.embed(rgb, mpp, pool=None, autocast=autocast).float().cpu().numpy()
            tok = tok.reshape(len(ids), g, g, -1)
            for k, i in enumerate(ids.numpy()):
                x0, y0 = tl[i] - lo
                ya, yb = max(y0, 0), min(y0 + g, size[1])
                xa, xb = max(x0, 0), min(x0 + g, size[0])
                if ya >= yb or xa >= xb:
                    continue
                block = tok[k, ya - y0 : yb - y0, xa - x0 : xb - x0]
                canvas.data[:, ya:yb, xa:xb] += np.moveaxis(block, -1, 0)
                count[ya:yb, xa:xb] += 1
            bar.update(len(ids))
    except BaseException:
        canvas.cleanup()
        raise
    finally:
        bar.close()
    canvas.data /= np.where(count > 0, count, np.nan)[None]
    logger.info("token map: %d windows in %.1f s", len(tl), time.perf_counter() - t0)
    return canvas, (float(lo[0] * token_um), float(lo[1] * token_um))
