"""Virtual spatial transcriptomics: predict expression from the H&E at spots, bins, cells or virtual spots."""

from __future__ import annotations

import functools
import math
import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pandas as pd

from squall_sd._constants import ATTRS_KEY, MICRONS
from squall_sd._logging import logger
from squall_sd.tl._keys import (
    Region,
    check_microns,
    instance_positions,
    resolve_image_key,
    resolve_region,
    resolve_table_key,
)

if TYPE_CHECKING:
    import geopandas as gpd
    import torch
    from anndata import AnnData
    from spatialdata import SpatialData

    from squall_sd.models import Squall

__all__ = ["predict_expression"]

#: Largest allowed ratio image µm/px ÷ model µm/px (how much the image may be up-sampled).
MAX_UPSAMPLE = 4.0
#: A dense map or token map larger than this (bytes) is accumulated in a memory-mapped temporary file.
MEMMAP_BYTES = 256 * 2**20


# ---------------------------------------------------------------------------------------------
# model / device helpers (shared with tl.embed)
# ---------------------------------------------------------------------------------------------
def resolve_model(model: Squall | str) -> Squall:
    """Return a model: ``model`` itself, or :func:`squall_sd.models.load` of a name / path."""
    from squall_sd.models import Squall, load

    if isinstance(model, str):
        return load(model)
    if not isinstance(model, Squall):
        raise TypeError(
            f"`model` must be a squall model (`squall.models.load(...)`) or a model name, found "
            f"{type(model).__name__}."
        )
    return model


def resolve_device(device: str | torch.device) -> torch.device:
    """``"auto"`` → CUDA when available, else CPU; anything else is passed to :class:`torch.device`."""
    import torch

    if isinstance(device, str) and device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def check_resolution(image_mpp: float, mpp: float, *, model_name: str, image_key: str, max_upsample: float) -> None:
    """Raise when the tiles would be up-sampled from the image by more than ``max_upsample``."""
    if image_mpp / mpp > max_upsample * (1 + 1e-6):
        raise ValueError(
            f"Model {model_name!r} reads tiles at {mpp:g} µm/px, but image {image_key!r} has only "
            f"{image_mpp:.4g} µm/px at full resolution: the tiles would be up-sampled "
            f"{image_mpp / mpp:.1f}x (more than {max_upsample:g}x). Use a model trained at a coarser "
            f"resolution (≥ {image_mpp / max_upsample:.3g} µm/px, e.g. a Visium 'lowres' model at ~4 µm/px), "
            "a higher-resolution scan of the slide, or pass `mpp=` explicitly."
        )


def provenance_record(model: Squall, **params: Any) -> dict[str, Any]:
    """Provenance for ``uns``: package version, model name, weights and parameters (no ``None`` values)."""
    from squall_sd import __version__

    rec: dict[str, Any] = {
        "squall_sd_version": __version__,
        "model": model.config.name,
        "weights_sha256": model.weights_sha256 or "none (random weights)",
        "weights_source": model.weights_source or "none",
    }
    rec["params"] = {k: _plain(v) for k, v in params.items() if v is not None}
    return rec


def _plain(v: Any) -> Any:
    if isinstance(v, (np.generic,)):
        return v.item()
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    return v if isinstance(v, (str, int, float, bool)) else str(v)


# ---------------------------------------------------------------------------------------------
# where the tiles go
# ---------------------------------------------------------------------------------------------
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

    def __init__(self, patches: Any, shapes: gpd.GeoDataFrame, plan: TilePlan, *, patch_px: int, mpp: float, grid: int):
        self.patches = patches
        self.shapes = shapes
        self.plan = plan
        self.patch_px, self.mpp, self.grid = int(patch_px), float(mpp), int(grid)
        self._rg: Any = None

    @property
    def region_grid(self) -> Any:
        """The :class:`~squall_sd.pp.RegionGrid` (built on first use, also in each worker)."""
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


#: batches between two :func:`trim_heap` calls in the prediction loops
TRIM_EVERY = 8


@functools.lru_cache(maxsize=1)
def _malloc_trim() -> Any:
    """Glibc's ``malloc_trim``, or ``None`` where there is none (macOS, Windows, musl)."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc.malloc_trim
    except (OSError, AttributeError):
        return None


def trim_heap() -> None:
    """Give freed heap memory back to the operating system (glibc ``malloc_trim``; a no-op elsewhere).

    glibc raises its mmap threshold once a large block is freed, so the ~10 MB batches that follow
    are served from the heap, and what they free stays resident. In ``benchmarks`` the main process
    grew by 75-120 MB over the first ~32 batches of a large slide and then levelled off; trimming every
    :data:`TRIM_EVERY` batches keeps it near the first batches' level (dask.distributed trims its
    workers the same way). Only free memory is released; nothing in use is touched.
    """
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


#: most DataLoader workers ``num_workers="auto"`` starts on a GPU
AUTO_WORKERS = 8


def resolve_workers(num_workers: int | str, device: torch.device) -> int:
    """Return the number of DataLoader worker processes ``num_workers`` means on ``device``.

    ``"auto"``: ``min(8, cores // 2)`` on a CUDA GPU, where one reading thread cannot keep up with the
    forward pass (``benchmarks/predict_throughput.py``), and none elsewhere (tiles are read in a thread
    beside the forward pass, which measured as fast as a worker process on the CPU; other accelerators
    were not measured).
    """
    if isinstance(num_workers, str):
        if num_workers != "auto":
            raise ValueError(f"`num_workers` must be an integer >= 0 or 'auto', found {num_workers!r}.")
        return min(AUTO_WORKERS, (os.cpu_count() or 1) // 2) if device.type == "cuda" else 0
    if int(num_workers) < 0:
        raise ValueError(f"Expected `num_workers` to be >= 0, found {num_workers!r}.")
    return int(num_workers)


def make_loader(dataset: Any, *, batch_size: int, num_workers: int | str, device: torch.device, collate: Any):
    """Return a :class:`torch.utils.data.DataLoader` over ``dataset`` in order (workers prefetch, pinned on CUDA)."""
    from torch.utils.data import DataLoader

    if int(batch_size) <= 0:
        raise ValueError(f"Expected `batch_size` to be positive, found {batch_size!r}.")
    num_workers = resolve_workers(num_workers, device)
    kw: dict[str, Any] = {}
    if num_workers > 0:
        kw["prefetch_factor"] = 4
    return DataLoader(
        dataset,
        batch_size=int(batch_size),
        shuffle=False,
        num_workers=int(num_workers),
        collate_fn=collate,
        pin_memory=device.type == "cuda",
        **kw,
    )


def progress_bar(total: int, *, desc: str, enabled: bool) -> Any:
    """Return a :mod:`tqdm.auto` bar (disabled when ``enabled`` is false)."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="tile", disable=not enabled, leave=False)


# ---------------------------------------------------------------------------------------------
# regions
# ---------------------------------------------------------------------------------------------
def region_geometry(sdata: SpatialData, region: Region) -> gpd.GeoDataFrame:
    """Return the region element as shapes (labels are vectorised with :func:`spatialdata.to_polygons`)."""
    if region.kind == "shapes":
        return sdata.shapes[region.key]
    from spatialdata import to_polygons
    from spatialdata.transformations import get_transformation, set_transformation

    labels = sdata.labels[region.key]
    gdf = to_polygons(labels)
    if len(gdf) == 0:
        raise ValueError(f"Labels {region.key!r} hold no labelled cells.")
    set_transformation(gdf, get_transformation(labels, get_all=True), set_all=True)
    return gdf


def centers_and_extent(shapes: gpd.GeoDataFrame) -> tuple[np.ndarray, np.ndarray]:
    """Region centres (µm) and half extents (µm), exactly as :class:`~squall_sd.pp.RegionGrid` sees them."""
    from squall_sd.pp import RegionGrid

    rg = RegionGrid(shapes, patch_px=1, mpp=1.0, grid=1)
    b = rg.bounds
    half = np.max(np.abs(np.column_stack([b[:, 0], b[:, 1], b[:, 2], b[:, 3]]) - np.tile(rg.center, 2)), axis=1)
    return rg.center, half


def virtual_spots(
    sdata: SpatialData,
    *,
    image_key: str,
    spots: str,
    spot_size_um: float | None,
) -> tuple[gpd.GeoDataFrame, gpd.GeoDataFrame | None]:
    """Detect the tissue (unless ``f"{image_key}_tissue"`` exists) and lay virtual spots over it.

    Nothing is added to ``sdata``: the new elements are returned.
    """
    from squall_sd.pp import detect_tissue, make_spots

    tissue_key = f"{image_key}_tissue"
    tissue = None
    if tissue_key in sdata.shapes:
        gdf = make_spots(
            sdata, kind=spots, size_um=spot_size_um, image_key=image_key, tissue_key=tissue_key, inplace=False
        )
    else:
        tissue = detect_tissue(sdata, image_key=image_key, inplace=False)
        gdf = make_spots(sdata, kind=spots, size_um=spot_size_um, image_key=image_key, tissue=tissue, inplace=False)
    return gdf, tissue


# ---------------------------------------------------------------------------------------------
# forward passes
# ---------------------------------------------------------------------------------------------
class _Prefetch:
    """Iterate ``iterable`` in a background thread, keeping up to ``depth`` items ready.

    With ``num_workers=0`` the tiles are read (and their region weights built) in this thread while
    the model runs in the main thread: numpy, zarr decompression and torch release the GIL, so
    reading overlaps the forward pass. Exceptions are re-raised in the consumer; :meth:`close`
    stops the thread early.
    """

    _END = object()

    def __init__(self, iterable: Any, depth: int = 2) -> None:
        import queue
        import threading

        self._q: Any = queue.Queue(maxsize=max(1, int(depth)))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(iterable,), daemon=True, name="squall-prefetch")
        self._thread.start()

    def _put(self, item: Any) -> bool:
        import queue

        while not self._stop.is_set():
            try:
                self._q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self, iterable: Any) -> None:
        try:
            for item in iterable:
                if not self._put((True, item)):
                    return
        except BaseException as err:  # noqa: BLE001 - handed to the consumer
            self._put((False, err))
            return
        self._put((True, self._END))

    def __iter__(self) -> Any:
        while True:
            ok, item = self._q.get()
            if not ok:
                raise item
            if item is self._END:
                return
            yield item

    def close(self) -> None:
        """Stop the background thread (drops what it has read ahead)."""
        import queue

        self._stop.set()
        try:
            while True:
                self._q.get_nowait()
        except queue.Empty:
            pass
        self._thread.join(timeout=5)


class Canvas:
    """A (C, H, W) float32 array in memory, or memory-mapped in a temporary folder when large."""

    def __init__(self, shape: tuple[int, int, int], *, fill: float = np.nan) -> None:
        nbytes = int(np.prod(shape)) * 4
        self.tmpdir: str | None = None
        if nbytes > MEMMAP_BYTES:
            self.tmpdir = tempfile.mkdtemp(prefix="squall_canvas_")
            self.data = np.lib.format.open_memmap(f"{self.tmpdir}/canvas.npy", mode="w+", dtype=np.float32, shape=shape)
            logger.info("accumulating a %.1f GB map in %s (memory-mapped)", nbytes / 1e9, self.tmpdir)
        else:
            self.data = np.empty(shape, dtype=np.float32)
        self.data[...] = fill

    def cleanup(self) -> None:
        """Remove the temporary folder (if any)."""
        if self.tmpdir is not None:
            shutil.rmtree(self.tmpdir, ignore_errors=True)


def image_from_canvas(
    data: np.ndarray,
    *,
    channels: Sequence[str],
    pixel_um: float,
    origin_um: tuple[float, float],
    transformations_extra: dict | None = None,
):
    """Return a chunked (c, y, x) image element in ``microns``: pixel (0, 0) starts at ``origin_um`` (x, y)."""
    import dask.array as da
    from spatialdata.models import Image2DModel
    from spatialdata.transformations import Scale, Translation
    from spatialdata.transformations import Sequence as TSequence

    t = TSequence(
        [Scale([pixel_um, pixel_um], axes=("y", "x")), Translation([origin_um[1], origin_um[0]], axes=("y", "x"))]
    )
    arr = da.from_array(data, chunks=(1, 1024, 1024))
    transformations = {MICRONS: t}
    if transformations_extra:
        transformations.update(transformations_extra)
    return Image2DModel.parse(
        arr, dims=("c", "y", "x"), c_coords=[str(c) for c in channels], transformations=transformations
    )


# ---------------------------------------------------------------------------------------------
# genes
# ---------------------------------------------------------------------------------------------
def vocabulary_frame(model: Squall) -> pd.DataFrame:
    """Return the model vocabulary as a DataFrame of alternative identifiers per channel (for gene matching)."""
    vocab = model.vocabulary
    if vocab is None:
        raise ValueError(
            f"Model {model.config.name!r} has no gene names, so its channels cannot be matched to a table's "
            "genes. Load it with `squall.models.load(..., genes_file='gene_token_homologs.csv')`."
        )
    cols: dict[str, list[str]] = {"symbol": list(vocab.symbols)}
    for name in ("ensembl_ids", "mouse_symbols", "mouse_ensembl_ids"):
        values = getattr(vocab, name, None)
        if values is not None:
            cols[name] = [str(v) if v else "" for v in values]
    return pd.DataFrame(cols)


def match_table_genes(model: Squall, table: AnnData, table_key: str) -> tuple[np.ndarray, np.ndarray]:
    """Model channels and table columns of the genes both have (each table column at most once).

    Returns
    -------
    ``(channels, columns)`` of equal length.
    """
    from squall_sd.pp import gene_index

    frame = vocabulary_frame(model)
    col = gene_index(table, frame)
    channels = np.flatnonzero(col >= 0)
    columns = col[channels]
    _, first = np.unique(columns, return_index=True)
    first = np.sort(first)
    channels, columns = channels[first], columns[first]
    if len(channels) == 0:
        raise ValueError(
            f"No gene of table {table_key!r} ({table.n_vars} genes, e.g. {list(table.var_names[:3])}) is "
            f"predicted by model {model.config.name!r} ({model.n_genes} genes, e.g. {frame['symbol'].tolist()[:3]}). "
            "Put gene symbols or Ensembl ids in `var_names` or in a `var` column 'gene_ids' / 'gene_symbols', "
            "check the species, or pass `table_key=None, shapes_key=...` to a new table with the model's genes."
        )
    return channels.astype(np.int64), columns.astype(np.int64)


def restrict_to_genes(
    model: Squall, channels: np.ndarray, columns: np.ndarray, genes: Sequence[str] | str, table_key: str
) -> tuple[np.ndarray, np.ndarray]:
    """Keep the (channel, column) pairs of ``genes``; every requested gene must be in the model and the table."""
    genes = [genes] if isinstance(genes, str) else list(genes)
    try:
        wanted = model.gene_index(genes)
    except KeyError as e:
        raise KeyError(
            f"{e.args[0] if e.args else e} `genes` must name genes the model predicts "
            f"(see `model.genes`, {model.n_genes} genes)."
        ) from None
    in_table = set(channels.tolist())
    keep = np.isin(channels, np.asarray(wanted, dtype=np.int64))
    missing = sorted({g for g, c in zip(genes, wanted, strict=True) if c not in in_table}, key=str)
    if missing:
        raise ValueError(
            f"`genes` {missing[:10]} are predicted by the model but not columns of table {table_key!r}; a table "
            "that already annotates the shapes gets predictions only for its own genes. Drop them from `genes`, "
            "or pass `table_key=None` to write a new table with any of the model's genes."
        )
    return channels[keep], columns[keep]


def resolve_image_mpp(
    sdata: SpatialData, model: Squall, *, image_key: str | None, mpp: float | None, max_upsample: float
) -> tuple[str, float]:
    """Return the H&E key and the tiles' µm per pixel (default ``model.config.mpp``).

    Raises when the image has no µm per pixel or is much coarser than the tiles (``max_upsample``).

    Shared by :func:`predict_expression` and :func:`squall_sd.tl.embed`.
    """
    image_key = resolve_image_key(sdata, image_key)
    image_mpp = check_microns(sdata, image_key)
    cfg = model.config
    mpp = float(cfg.mpp if mpp is None else mpp)
    check_resolution(image_mpp, mpp, model_name=cfg.name, image_key=image_key, max_upsample=max_upsample)
    return image_key, mpp


def resolve_where(
    sdata: SpatialData,
    region: Region | None,
    *,
    image_key: str,
    table_key: str | None,
    spots: str | None,
    spot_size_um: float | None,
    shapes_key_added: str,
) -> tuple[Region, gpd.GeoDataFrame, str | None, dict[str, Any]]:
    """Return ``(region, shapes, table_key, new_shapes)`` for a resolved ``region``.

    ``region=None`` lays virtual spots (``spots``, default ``"visium"``) over the tissue: they (and
    the tissue polygons, when detected) are returned in ``new_shapes`` and there is no table.
    Shared by :func:`predict_expression` and :func:`squall_sd.tl.embed`.
    """
    new_shapes: dict[str, Any] = {}
    if region is None:
        shapes, tissue = virtual_spots(
            sdata, image_key=image_key, spots=spots or "visium", spot_size_um=spot_size_um
        )
        trim_heap()  # tissue detection's working images are freed
        new_shapes[shapes_key_added] = shapes
        if tissue is not None:
            new_shapes[f"{image_key}_tissue"] = tissue
        return Region(shapes_key_added, "shapes"), shapes, None, new_shapes
    shapes = region_geometry(sdata, region)
    return region, shapes, resolve_table_key(sdata, region.key, table_key), new_shapes


# ---------------------------------------------------------------------------------------------
# the tool
# ---------------------------------------------------------------------------------------------
def predict_expression(
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
    key_added: str = "squall",
    table_key_added: str = "squall_expression",
    shapes_key_added: str = "squall_spots",
    dense_key_added: str = "squall_dense",
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
    sdata
        SpatialData with an H&E image registered in ``microns``.
    model
        A model (:func:`squall_sd.models.load`) or the name / path to load. It is put in eval mode
        and moved to ``device``.
    image_key
        The H&E; default the only image (or the one recorded by the reader).
    shapes_key
        Shapes of spots / bins / cells to predict at; default the element the table annotates.
    labels_key
        Labels element of cells to predict at (vectorised with :func:`spatialdata.to_polygons`).
    table_key
        Table annotating the region; default the one table that does (none: a new table).
    spots
        Predict at virtual ``"visium"`` spots, ``"bins"`` or ``"tiles"`` over the tissue (default
        ``"visium"`` when the SpatialData has no shapes).
    spot_size_um
        Virtual spot diameter / bin or tile edge in µm (defaults of :func:`squall_sd.pp.make_spots`).
    genes
        Restrict the prediction to these model genes (default: all). For an existing table, whose genes
        are matched to the model's by symbol / Ensembl id, only these columns are predicted (the others
        stay NaN) and each must be a column of the table; a gene the model does not predict raises
        :class:`KeyError`.
    mpp
        µm per pixel of the tiles fed to the model; default ``model.config.mpp``.
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
    batch_size
        Tiles per forward pass.
    num_workers
        DataLoader worker processes reading tiles (0: a thread of the main process reads them while
        the model runs). ``"auto"``: 0 on the CPU, ``min(8, cores // 2)`` on a GPU, where one
        reading thread cannot keep up with the forward pass.
    device
        ``"auto"`` (CUDA when available, else CPU), ``"cpu"``, ``"cuda"``, ``"cuda:1"``, ...
    autocast
        bf16 autocast; default on for CUDA, off on CPU.
    max_upsample
        Refuse models whose µm/px is finer than the image's by more than this factor.
    progress
        Show a progress bar.
    inplace
        Write into ``sdata``; otherwise return the table and leave ``sdata`` unchanged.
    overwrite
        Replace an existing layer / table / image / shapes of the same name.
    write_to_store
        Also write the new or changed elements to ``sdata``'s zarr store (default: when ``sdata``
        is backed). Happens only after the prediction succeeded.

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
    if reduce is None:
        reduce = model.config.region_reduce
    if reduce not in ("sum", "mean"):
        raise ValueError(f"`reduce` must be 'sum' or 'mean', found {reduce!r}.")
    if layout not in ("auto", "tiles", "shapes"):
        raise ValueError(f"`layout` must be 'auto', 'tiles' or 'shapes', found {layout!r}.")
    if spots is not None and spots not in ("visium", "bins", "tiles"):
        raise ValueError(f"`spots` must be 'visium', 'bins' or 'tiles', found {spots!r}.")
    image_key, mpp = resolve_image_mpp(
        sdata, model, image_key=image_key, mpp=mpp, max_upsample=max_upsample
    )
    cfg = model.config

    # ---- where --------------------------------------------------------------------------------
    if spots is not None and (shapes_key is not None or labels_key is not None):
        raise ValueError("Pass `spots=` (virtual spots) or `shapes_key=` / `labels_key=`, not both.")
    region = None if spots is not None else resolve_region(sdata, shapes_key=shapes_key, labels_key=labels_key)
    if region is None and shapes_key_added in sdata.shapes and not overwrite and inplace:
        raise ValueError(
            f"`shapes_key_added={shapes_key_added!r}` already exists in `sdata.shapes`. Pass "
            "`overwrite=True`, another `shapes_key_added`, or `shapes_key=` to predict at it."
        )
    region, shapes, tkey, new_shapes = resolve_where(
        sdata, region, image_key=image_key, table_key=table_key, spots=spots,
        spot_size_um=spot_size_um, shapes_key_added=shapes_key_added,
    )

    # ---- what ---------------------------------------------------------------------------------
    table = sdata.tables[tkey] if tkey is not None else None
    if table is not None:
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
    else:
        if inplace and table_key_added in sdata.tables and not overwrite:
            raise ValueError(
                f"`table_key_added={table_key_added!r}` already exists in `sdata.tables`. Pass `overwrite=True` "
                "to replace it, or another `table_key_added`."
            )
        channels = np.arange(model.n_genes) if genes is None else np.asarray(model.gene_index(list(genes)))
        out_genes = (model.genes or [f"channel_{i}" for i in range(model.n_genes)])
        out_genes = [out_genes[c] for c in channels]
    dense_idx = None
    if dense_genes is not None:
        dense_genes = [dense_genes] if isinstance(dense_genes, str) else list(dense_genes)
        dense_idx = np.asarray(model.gene_index(dense_genes), dtype=np.int64)
        if inplace and dense_key_added in sdata.images and not overwrite:
            raise ValueError(
                f"`dense_key_added={dense_key_added!r}` already exists in `sdata.images`. Pass `overwrite=True` "
                "or another `dense_key_added`."
            )
        if layout == "shapes":
            logger.info("dense_genes needs a tiling; using layout='tiles'")
        layout = "tiles"

    # ---- tiles --------------------------------------------------------------------------------
    from squall_sd.pp import extract_patches

    tile_um = cfg.img_size * mpp
    centers, half = centers_and_extent(shapes)
    plan = plan_tiles(centers, half, tile_um=tile_um, token_um=cfg.patch_size * mpp, layout=layout)
    if float(half.max(initial=0)) > tile_um / 2:
        logger.warning(
            "Some regions (up to %.4g µm across) are larger than a %.4g µm tile; they are predicted from the "
            "part inside their tile (scaled by their cell count)", 2 * float(half.max()), tile_um,
        )
    patches = extract_patches(sdata, plan.centers, image_key=image_key, patch_px=cfg.img_size, mpp=mpp)
    dataset = TileDataset(patches, shapes, plan, patch_px=cfg.img_size, mpp=mpp, grid=cfg.expr_size)
    dev = resolve_device(device)
    use_autocast = (dev.type == "cuda") if autocast is None else bool(autocast)
    from functools import partial

    loader = make_loader(
        dataset, batch_size=batch_size, num_workers=num_workers, device=dev,
        collate=partial(collate_tiles, grid=cfg.expr_size, plan=plan, sparse=True),
    )
    n_regions = len(shapes)
    logger.info(
        "predict_expression: %d %s of %r at %g µm/px -> %d tiles (%s layout, %.1f regions/tile), %d genes, on %s",
        n_regions, region.kind, region.key, mpp, len(plan), plan.layout, n_regions / max(len(plan), 1),
        len(channels), dev,
    )

    pred = np.full((n_regions, len(channels)), np.nan, dtype=np.float32)
    canvas = None
    if dense_idx is not None:
        core_cells = int(round(plan.core_um / (tile_um / cfg.expr_size)))
        margin_cells = (cfg.expr_size - core_cells) // 2
        lo = plan.origin.min(axis=0)
        hi = plan.origin.max(axis=0)
        canvas = Canvas((len(dense_idx), int(hi[1] - lo[1] + 1) * core_cells, int(hi[0] - lo[0] + 1) * core_cells))
    was_training = model.training
    prev_device = model.device
    model.eval()
    if model.device != dev:
        model.to(dev)
    dense_t = None if dense_idx is None else [int(i) for i in dense_idx]  # channel indices
    genes_arg = channels.tolist() if len(channels) < model.n_genes else None
    bar = progress_bar(len(plan), desc="predict_expression", enabled=progress)
    if loader.num_workers == 0 and hasattr(patches, "warm"):
        # nothing else runs yet: decode the first batch's image chunks with all cores
        patches.warm(np.arange(min(len(plan), int(batch_size))))
    batches = _Prefetch(loader) if loader.num_workers == 0 and len(plan) > batch_size else None
    try:
        for k_batch, (tids, rgb, w, ridx) in enumerate(batches if batches is not None else loader):
            if k_batch % TRIM_EVERY == TRIM_EVERY - 1:
                trim_heap()
            if dense_t is None:
                agg = model.predict(rgb, mpp, genes=genes_arg, aggregate=w, reduce=reduce, autocast=use_autocast)
            else:
                # spot values and dense maps from one forward pass
                agg, dense = model.predict(
                    rgb, mpp, genes=genes_arg, aggregate=w, reduce=reduce, autocast=use_autocast, dense_genes=dense_t
                )
                dn = dense[:, margin_cells : margin_cells + core_cells, margin_cells : margin_cells + core_cells]
                dn = dn.permute(0, 3, 1, 2).cpu().numpy()
                for k, t in enumerate(tids.numpy()):
                    ox, oy = (plan.origin[t] - lo) * core_cells
                    canvas.data[:, oy : oy + core_cells, ox : ox + core_cells] = dn[k]
            ridx_np = ridx.numpy()
            ok = ridx_np >= 0
            pred[ridx_np[ok]] = agg.float().cpu().numpy()[ok]
            bar.update(len(tids))
    except BaseException:
        if canvas is not None:
            canvas.cleanup()
        raise
    finally:
        if batches is not None:
            batches.close()
        if hasattr(patches, "clear_cache"):
            patches.clear_cache()  # the decoded image chunks are not needed to build the table
        bar.close()
        if prev_device != dev:
            model.to(prev_device)
        model.train(was_training)

    # ---- assemble (nothing has touched sdata so far) -----------------------------------------
    params = {
        "image_key": image_key, "region": region.key, "region_kind": region.kind, "table_key": tkey,
        "mpp": mpp, "tile_px": cfg.img_size, "layout": plan.layout, "n_tiles": len(plan), "reduce": reduce,
        "spots": spots, "spot_size_um": spot_size_um, "dense_genes": dense_genes, "batch_size": batch_size,
        "device": str(dev), "autocast": use_autocast, "key_added": key_added,
    }
    prov = provenance_record(model, **params)
    undo: list[Any] = []
    if table is not None:
        layer = np.full((table.n_obs, table.n_vars), np.nan, dtype=np.float32)
        step = 8192  # rows at a time: no full-size temporary copy of ``pred`` beside it and the layer
        for a in range(0, len(rows), step):
            layer[np.ix_(rows[a : a + step], columns)] = pred[pos[a : a + step]]
        del pred
        mask = np.zeros(table.n_vars, dtype=bool)
        mask[columns] = True
        out_table = table if inplace else table.copy()
        if inplace:
            undo.append(_table_snapshot(table, key_added))
        out_table.layers[key_added] = layer
        out_table.var["squall_predicted"] = mask
        _set_uns(out_table, prov)
        logger.info(
            "Adding `sdata.tables[%r].layers[%r]` (%d of %d genes predicted)", tkey, key_added, len(columns),
            table.n_vars,
        )
        written_table = tkey
    else:
        out_table = new_table(pred, out_genes, region, shapes, centers)
        _set_uns(out_table, prov)
        written_table = table_key_added
    if not inplace:
        if canvas is not None:
            canvas.cleanup()
        return out_table

    new_images: dict[str, Any] = {}
    if canvas is not None:
        cell_um = tile_um / cfg.expr_size
        origin = (float(lo[0] * plan.core_um), float(lo[1] * plan.core_um))
        new_images[dense_key_added] = image_from_canvas(
            canvas.data, channels=dense_genes, pixel_um=cell_um, origin_um=origin
        )
        logger.info("Adding `sdata.images[%r]` (%s at %.3g µm/px)", dense_key_added, canvas.data.shape, cell_um)
    before = {
        "shapes": {k: sdata.shapes[k] for k in new_shapes if k in sdata.shapes},
        "images": {k: sdata.images[k] for k in new_images if k in sdata.images},
        "tables": (
            {written_table: sdata.tables[written_table]} if table is None and written_table in sdata.tables else {}
        ),
    }
    for k, v in new_shapes.items():
        sdata.shapes[k] = v
        logger.info("Adding `sdata.shapes[%r]` (%d shapes)", k, len(v))
    for k, v in new_images.items():
        sdata.images[k] = v
    if table is None:
        sdata.tables[written_table] = out_table
        logger.info("Adding `sdata.tables[%r]` (%d x %d)", written_table, out_table.n_obs, out_table.n_vars)
    try:
        persist(sdata, new=[*new_shapes, *new_images], replaced=[written_table], write_to_store=write_to_store)
    except BaseException:
        # the store is as it was: put the in-memory SpatialData back as well
        new_tables = [] if table is not None else [written_table]
        for kind, names in (("shapes", new_shapes), ("images", new_images), ("tables", new_tables)):
            container = getattr(sdata, kind)
            for k in names:
                if k in before[kind]:
                    container[k] = before[kind][k]
                elif k in container:
                    del container[k]
        for restore in undo:
            restore()
        raise
    return None


def _table_snapshot(table: AnnData, layer: str) -> Any:
    """Return a callable that restores ``layer``, ``var['squall_predicted']`` and ``uns['squall']`` of ``table``."""
    import copy

    old_layer = table.layers[layer] if layer in table.layers else None
    old_var = table.var["squall_predicted"].copy() if "squall_predicted" in table.var else None
    old_uns = copy.deepcopy(table.uns[ATTRS_KEY]) if ATTRS_KEY in table.uns else None

    def restore() -> None:
        if old_layer is None:
            table.layers.pop(layer, None)
        else:
            table.layers[layer] = old_layer
        if old_var is None:
            if "squall_predicted" in table.var:
                del table.var["squall_predicted"]
        else:
            table.var["squall_predicted"] = old_var
        if old_uns is None:
            table.uns.pop(ATTRS_KEY, None)
        else:
            table.uns[ATTRS_KEY] = old_uns

    return restore


def _set_uns(adata: AnnData, prov: dict[str, Any], name: str = "predict_expression") -> None:
    meta = adata.uns.get(ATTRS_KEY)
    meta = dict(meta) if isinstance(meta, dict) else {}
    meta[name] = prov
    adata.uns[ATTRS_KEY] = meta


def new_table(
    pred: np.ndarray, genes: Sequence[str], region: Region, shapes: gpd.GeoDataFrame, centers: np.ndarray
) -> AnnData:
    """Return a table annotating ``region`` with ``pred`` (regions × genes) as ``X``."""
    from anndata import AnnData
    from spatialdata.models import TableModel

    obs = pd.DataFrame(
        {
            "region": pd.Categorical([region.key] * len(shapes)),
            "instance_id": np.asarray(shapes.index),
        },
        index=pd.Index([str(i) for i in shapes.index]),
    )
    var = pd.DataFrame(index=pd.Index([str(g) for g in genes]))
    var["squall_predicted"] = True
    adata = AnnData(X=pred, obs=obs, var=var)
    adata.obsm["spatial"] = np.asarray(centers, dtype=np.float64)
    return TableModel.parse(adata, region=region.key, region_key="region", instance_key="instance_id")


def persist(sdata: SpatialData, *, new: Sequence[str], replaced: Sequence[str], write_to_store: bool | None) -> None:
    """Write elements to ``sdata``'s zarr store (when backed, unless disabled); undo new ones on failure.

    ``new`` are element names that did not exist on disk before; ``replaced`` may exist and are
    overwritten. On an error the new elements written so far are deleted again.
    """
    from squall_sd.io._common import table_write_settings

    backed = getattr(sdata, "path", None) is not None
    if write_to_store is None:
        write_to_store = backed
    if not write_to_store:
        return
    if not backed:
        raise ValueError("`write_to_store=True` but `sdata` is not backed by a zarr store (sdata.path is None).")
    on_disk = set(sdata.elements_paths_on_disk())
    written: list[str] = []
    backups: list[tuple[str, Any, Any]] = []
    tmp = Path(tempfile.mkdtemp(prefix="squall_backup_"))
    try:
        for name in [*new, *replaced]:
            rel = next((p for p in on_disk if p.split("/")[-1] == name), None)
            if rel is not None:
                # spatialdata refuses to overwrite inside its own store: back up, delete, write
                src = Path(sdata.path) / rel
                shutil.copytree(src, tmp / rel.replace("/", "__"))
                backups.append((name, src, tmp / rel.replace("/", "__")))
                sdata.delete_element_from_disk(name)
            with table_write_settings():  # no zarr v3 autosharding warning per table array
                sdata.write_element(name)
            written.append(name)
            logger.info("wrote %r to %s", name, sdata.path)
    except BaseException:
        for name in written:
            try:
                sdata.delete_element_from_disk(name)
            except Exception as err:  # noqa: BLE001 - best effort
                logger.warning("could not remove %r from %s after a failed write: %s", name, sdata.path, err)
        for _, src, bak in backups:
            if not src.exists():
                shutil.copytree(bak, src)
        try:
            sdata.write_consolidated_metadata()
        except Exception:  # noqa: BLE001
            pass
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
