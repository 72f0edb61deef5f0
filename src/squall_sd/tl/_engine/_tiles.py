"""Where the tiles go: tile planning along a Hilbert curve, the tile dataset and its collation."""

from __future__ import annotations

import math
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pandas as pd

from squall_sd._logging import logger

if TYPE_CHECKING:
    import geopandas as gpd

    from squall_sd.pp import RegionGrid

__all__ = ["TileDataset", "TilePlan", "centers_and_extent", "collate_tiles", "hilbert_index", "plan_tiles"]


def hilbert_index(cells: np.ndarray) -> np.ndarray:
    """Position of integer 2-D cells along a Hilbert curve (vectorised).

    The cells are shifted so that the smallest coordinate on each axis is 0, and placed on the
    Hilbert curve of the smallest power-of-two square that holds them all. Consecutive positions
    of the curve are edge-adjacent cells, so cells visited in the order of their index stay close:
    tiles taken in this order share image chunks with the tiles just before them.

    Parameters
    ----------
    cells
        (n, 2) integer cell coordinates (x, y).

    Returns
    -------
    (n,) ``int64`` curve positions (distinct for distinct cells).
    """
    cells = np.asarray(cells, dtype=np.int64).reshape(-1, 2)
    if len(cells) == 0:
        return np.zeros(0, dtype=np.int64)
    xy = cells - cells.min(axis=0)
    if int(xy.max()) >= 2**30:  # a huge spread (stray coordinates): rank each axis so the curve stays small
        xy = np.column_stack([np.unique(xy[:, k], return_inverse=True)[1].reshape(-1) for k in range(2)])
    x, y = xy[:, 0].copy(), xy[:, 1].copy()
    side = 1
    while side <= int(xy.max()):
        side *= 2
    d = np.zeros(len(xy), dtype=np.int64)
    s = side // 2
    while s > 0:
        rx = (x & s) > 0
        ry = (y & s) > 0
        d += s * s * ((3 * rx.astype(np.int64)) ^ ry.astype(np.int64))
        # rotate the quadrant so the sub-curve starts and ends where the parent curve expects
        flip = ~ry & rx
        x = np.where(flip, s - 1 - (x & (s - 1)), x & (s - 1))
        y = np.where(flip, s - 1 - (y & (s - 1)), y & (s - 1))
        x, y = np.where(ry, x, y), np.where(ry, y, x)
        s //= 2
    return d


@dataclass
class TilePlan:
    """Tile centres (µm) and which regions each tile owns (every region is owned by exactly one tile).

    Attributes
    ----------
    centers
        (T, 2) tile centres, x and y in microns.
    owner_ptr
        (T + 1,) offsets into ``owned``: tile ``t`` owns regions ``owned[owner_ptr[t]:owner_ptr[t+1]]``.
    owned
        Region positions (rows of the shapes element) grouped by tile.
    layout
        ``"shapes"`` (one tile centred on each region) or ``"tiles"`` (a tiling).
    core_um
        Edge of the tiles' non-overlapping cores (``"tiles"`` layout), else 0.
    origin
        Integer (col, row) index of each tile's core on the core lattice (``"tiles"`` layout).
    """

    centers: np.ndarray
    owner_ptr: np.ndarray
    owned: np.ndarray
    layout: str
    core_um: float = 0.0
    origin: np.ndarray = field(default_factory=lambda: np.zeros((0, 2), dtype=np.int64))

    def __len__(self) -> int:
        return len(self.centers)


def plan_tiles(
    centers: np.ndarray,
    half_extent: np.ndarray,
    *,
    tile_um: float,
    token_um: float,
    layout: Literal["auto", "tiles", "shapes"] = "auto",
) -> TilePlan:
    """Lay tiles for prediction.

    ``"shapes"``: one tile centred on each region (every region sits in the middle of its own tile,
    with full context; one forward pass per region). ``"tiles"``: overlapping tiles whose
    non-overlapping cores of ``core_um`` tile the plane from the ``microns`` origin; the margin
    around each core is at least the largest region half-extent (and at least one token), so every
    region lies entirely inside the tile whose core holds its centre. ``"auto"`` takes ``"tiles"``
    when it needs fewer than 0.8 × as many forward passes as ``"shapes"``.

    Tiles are ordered along a Hilbert curve over their cells (tile cores, or for ``"shapes"``
    tile-sized cells), so consecutive tiles overlap the same image chunks and a small, constant
    chunk cache (:class:`squall_sd.pp.PatchDataset`) decodes each chunk about once.

    Parameters
    ----------
    centers
        (n, 2) region centres in microns.
    half_extent
        (n,) largest distance from each centre to its region's bounding box edge (µm).
    tile_um
        Tile edge in microns (``img_size * mpp``).
    token_um
        Token edge in microns (``patch_size * mpp``); margins are whole tokens, so tiles of the
        tiling share one token lattice.
    layout
        See above.

    Returns
    -------
    The plan.
    """
    n = len(centers)
    margin_tokens = max(1, math.ceil(float(np.max(half_extent, initial=0.0)) / token_um - 1e-9))
    margin = margin_tokens * token_um
    core = tile_um - 2 * margin
    tiling = None
    if core >= token_um - 1e-9 and layout in ("auto", "tiles"):
        cell = np.floor(centers / core).astype(np.int64)
        uniq, inv = np.unique(cell, axis=0, return_inverse=True)
        inv = inv.reshape(-1)
        tiling = (uniq, inv)
    if layout == "tiles" and tiling is None:
        logger.warning(
            "layout='tiles': regions up to %.4g µm across do not fit a %.4g µm tile with a core; using one "
            "tile per region", 2 * float(np.max(half_extent, initial=0.0)), tile_um,
        )
    use_tiles = tiling is not None and (layout == "tiles" or len(tiling[0]) < 0.8 * n)
    if not use_tiles:
        # one tile per region, visited along a Hilbert curve over tile-sized cells (regions in one
        # cell keep their order)
        centers = np.asarray(centers, dtype=float).reshape(-1, 2)
        cells = np.nan_to_num(np.floor(centers / tile_um), posinf=0.0, neginf=0.0)
        order = np.argsort(hilbert_index(cells), kind="stable")
        return TilePlan(
            centers=centers[order],
            owner_ptr=np.arange(n + 1, dtype=np.int64),
            owned=order.astype(np.int64),
            layout="shapes",
        )
    uniq, inv = tiling
    # visit the tiles along a Hilbert curve over their cells, not column by column: consecutive
    # tiles then share image chunks, so a small constant chunk cache decodes each chunk about once
    by_curve = np.argsort(hilbert_index(uniq), kind="stable")
    rank = np.empty_like(by_curve)
    rank[by_curve] = np.arange(len(by_curve))
    uniq, inv = uniq[by_curve], rank[inv]
    order = np.argsort(inv, kind="stable")
    counts = np.bincount(inv, minlength=len(uniq))
    ptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    tile_centers = (uniq + 0.5) * core
    return TilePlan(tile_centers, ptr, order.astype(np.int64), "tiles", core_um=core, origin=uniq)


class TileDataset:
    """Map-style dataset of tiles: RGB patch + the grid cells of the regions the tile owns.

    Item ``t`` is ``(t, patch, cells, local, weight)``: the ``uint8`` patch (3, P, P) read lazily
    by :class:`squall_sd.pp.PatchDataset`, and for every (grid cell, owned region) pair the flat
    cell index, the region's local index among the tile's owned regions and its weight (1, or the
    region's total cell count ÷ its cells in the tile for a region larger than the tile). The cell
    assignment is :class:`squall_sd.pp.RegionGrid` (the geometry of :func:`squall_sd.pp.region_weights`),
    computed here so that it runs in the DataLoader workers, one tile at a time.
    """

    def __init__(
        self,
        patches: Any,
        shapes: gpd.GeoDataFrame,
        plan: TilePlan,
        *,
        patch_px: int,
        mpp: float,
        grid: int,
        region_grid: Future | None = None,
    ):
        self.patches = patches
        self.shapes = shapes
        self.plan = plan
        self.patch_px, self.mpp, self.grid = int(patch_px), float(mpp), int(grid)
        self._rg: Any = region_grid  # a Future of :func:`region_grid_async`, the grid, or None

    @property
    def region_grid(self) -> Any:
        """The :class:`~squall_sd.pp.RegionGrid` (built on first use, also in each worker)."""
        if isinstance(self._rg, Future):
            self._rg = self._rg.result()
        if self._rg is None:
            from squall_sd.pp import RegionGrid

            self._rg = RegionGrid(self.shapes, patch_px=self.patch_px, mpp=self.mpp, grid=self.grid)
        return self._rg

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_rg"] = None  # the STRtree is rebuilt in the worker
        return state

    def __len__(self) -> int:
        return len(self.plan)

    def __getitem__(self, t: int) -> tuple[int, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        patch = self.patches[t]
        cx, cy = self.plan.centers[t]
        owned = self.plan.owned[self.plan.owner_ptr[t] : self.plan.owner_ptr[t + 1]]
        cells, regions, n_total = self.region_grid.assign(float(cx), float(cy))
        local = pd.Index(owned).get_indexer(regions)
        keep = local >= 0
        cells, local, n_total = cells[keep], local[keep], n_total[keep]
        n_in = np.bincount(local, minlength=len(owned))
        weight = (n_total / np.maximum(n_in[local], 1)).astype(np.float32)
        return t, patch, cells.astype(np.int64), local.astype(np.int64), weight


def region_grid_async(
    shapes: gpd.GeoDataFrame, *, patch_px: int, mpp: float, grid: int
) -> tuple[RegionGrid, Future]:
    """Return the :class:`~squall_sd.pp.RegionGrid` of ``shapes`` and start building its index in a thread.

    Reading the regions' geometry is quick; the index of tens of thousands of regions takes a few
    tenths of a second. Started as soon as the regions are known, it is built while the tiles are
    planned (from this same grid: :func:`centers_and_extent`), instead of in front of the first batch.
    Pass the returned future, which resolves to the grid once its index is built, to
    :class:`TileDataset` (``region_grid=``): the grid is the one the dataset would build itself.
    """
    from squall_sd.pp import RegionGrid

    regions = RegionGrid(shapes, patch_px=patch_px, mpp=mpp, grid=grid)
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="squall-region-grid")
    try:
        return regions, pool.submit(regions.build_index)
    finally:
        pool.shutdown(wait=False)


def collate_tiles(
    items: list[tuple[int, np.ndarray, np.ndarray, np.ndarray, np.ndarray]],
    *,
    grid: int,
    plan: TilePlan,
    sparse: bool = False,
):
    """Batch tiles: ``(tile ids, rgb uint8 (B,3,P,P), weights (B,R,grid,grid), region positions (B,R))``.

    With ``sparse=True`` the weights are a sparse COO tensor (a tile owns up to a few hundred
    regions, so the dense weights of a batch take tens of MB; the sparse ones a few).
    """
    import torch

    tids = np.array([it[0] for it in items], dtype=np.int64)
    rgb = torch.from_numpy(np.stack([it[1] for it in items]))
    n_owned = plan.owner_ptr[tids + 1] - plan.owner_ptr[tids]
    r = max(int(n_owned.max(initial=0)), 1)
    b, g2 = len(items), grid * grid
    idx = np.full((b, r), -1, dtype=np.int64)
    for k, (t, *_rest) in enumerate(items):
        idx[k, : n_owned[k]] = plan.owned[plan.owner_ptr[t] : plan.owner_ptr[t + 1]]
    if sparse:
        bi = np.concatenate([np.full(len(it[2]), k, dtype=np.int64) for k, it in enumerate(items)])
        cells = np.concatenate([it[2] for it in items]).astype(np.int64)
        local = np.concatenate([it[3] for it in items]).astype(np.int64)
        vals = np.concatenate([it[4] for it in items]).astype(np.float32)
        ind = torch.from_numpy(np.stack([bi, local, cells // grid, cells % grid]))
        w = torch.sparse_coo_tensor(
            ind, torch.from_numpy(vals), (b, r, grid, grid), check_invariants=False
        ).coalesce()
        return torch.from_numpy(tids), rgb, w, torch.from_numpy(idx)
    w = np.zeros((b, r, g2), dtype=np.float32)
    for k, (_t, _, cells, local, weight) in enumerate(items):
        np.add.at(w[k], (local, cells), weight)
    return torch.from_numpy(tids), rgb, torch.from_numpy(w.reshape(b, r, grid, grid)), torch.from_numpy(idx)


def centers_and_extent(regions: gpd.GeoDataFrame | RegionGrid) -> tuple[np.ndarray, np.ndarray]:
    """Region centres (µm) and half extents (µm), exactly as :class:`~squall_sd.pp.RegionGrid` sees them.

    ``regions``: a shapes element, or its :class:`~squall_sd.pp.RegionGrid` (centres and bounds do not
    depend on the grid's tile size, so the grid of :func:`region_grid_async` serves).
    """
    from squall_sd.pp import RegionGrid

    rg = regions if isinstance(regions, RegionGrid) else RegionGrid(regions, patch_px=1, mpp=1.0, grid=1)
    b = rg.bounds
    half = np.max(np.abs(np.column_stack([b[:, 0], b[:, 1], b[:, 2], b[:, 3]]) - np.tile(rg.center, 2)), axis=1)
    return rg.center, half
