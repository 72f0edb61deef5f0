"""Patch extraction at a target µm per pixel from lazily read multiscale H&E images."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

import dask
import dask.array as da
import dask.local
import dask.threaded
import numpy as np
from scipy import ndimage
from spatialdata import SpatialData

from squall_sd._docs import d
from squall_sd._logging import logger
from squall_sd._sdata import Level, check_positive, image_levels, is_axis_aligned, pick_level
from squall_sd.pp._resolution import degrade_patches, degrade_target
from squall_sd.pp._utils import centers_from

#: Value of pixels outside the image (white, like an empty slide).
PAD_VALUE = 255


class PatchDataset:
    """Square RGB patches around centres given in microns, read lazily from one pyramid level.

    A map-style dataset (``len(ds)``, ``ds[i]``) usable directly with
    :class:`torch.utils.data.DataLoader`; it does not import torch. Item ``i`` is a ``uint8``
    array of shape ``(3, patch_px, patch_px)``: the window of the image centred at
    ``centers_um[i]``, resampled to exactly ``mpp`` µm per pixel and axis-aligned with the
    ``microns`` coordinate system (row = +y, column = +x). Only the chunks under the window are
    read, so memory does not grow with the slide. Pixels outside the image are white.

    Build it with :func:`extract_patches`.

    Parameters
    ----------
    level
        The pyramid level to read from.
    centers_um
        (n, 2) patch centres, x and y in microns.
    patch_px
        Edge of the output patch in pixels.
    mpp
        µm per pixel of the output patch.
    white_point
        Optional per-channel (r, g, b) white point on the 0–255 scale; each channel is divided by
        it and clipped (Visium white balance, see :func:`estimate_white_point`).
    transform
        Optional callable applied to each ``uint8`` patch before it is returned (augmentation).
    effective_mpp
        Optional optical resolution in µm/px (coarser than ``mpp``) that the patches should carry:
        when the level read is sharper (:func:`~squall_sd.pp.is_sharper`), every patch is degraded to
        it with :func:`~squall_sd.pp.degrade_patches` (before ``transform``). ``None``: as read.
    cache_mb
        Decoded chunks of the level are kept in a least-recently-used cache of at most this many
        megabytes, so each chunk is decoded about once however many patches overlap it (small JPEG /
        PNG images are one chunk, so reading them window by window would decode the whole file for
        every patch); a level of at most ``cache_mb`` is thus read once. The cache is bounded by
        ``cache_mb`` whatever the slide size: centres visited in a local order (as
        :func:`squall_sd.tl.predict_expression` does, along a Hilbert curve) need only the chunks
        around the current patch, which the default (eight 3 MB chunks of 1024 px) holds. A level
        whose chunks are larger than ``cache_mb`` is read window by window. ``0`` never caches.

    """

    def __init__(
        self,
        level: Level,
        centers_um: np.ndarray,
        *,
        patch_px: int = 224,
        mpp: float = 0.5,
        white_point: Sequence[float] | None = None,
        transform: Callable[[np.ndarray], Any] | None = None,
        effective_mpp: float | None = None,
        cache_mb: float = 24.0,
    ) -> None:
        self.level = level
        self.cache_mb = float(cache_mb)
        self._cache: np.ndarray | None = None
        self._chunks: _ChunkCache | None = None
        self.centers_um = np.asarray(centers_um, dtype=float).reshape(-1, 2)
        self.patch_px = int(patch_px)
        if self.patch_px <= 0:
            raise ValueError(f"Expected `patch_px` to be positive, found {patch_px!r}.")
        self.mpp = check_positive(mpp, "mpp")
        self.white_point = None
        if white_point is not None:
            wp = np.asarray(white_point, dtype=np.float32).reshape(-1)
            if wp.shape != (3,) or np.any(wp <= 0):
                raise ValueError(
                    f"`white_point` must be 3 positive values (r, g, b), got {white_point!r}."
                )
            self.white_point = wp
        self.transform = transform
        self.effective_mpp = None if effective_mpp is None else check_positive(effective_mpp, "effective_mpp")
        #: µm/px every patch is degraded to (``effective_mpp`` when the level is sharper than it, else ``None``)
        self.degrade_to = degrade_target(level.mpp, self.mpp, self.effective_mpp)
        self._inv = np.linalg.inv(level.affine)  # microns (x, y) -> level intrinsic (x, y)
        ratio = self.mpp / level.mpp
        #: integer block-average factor applied before the bilinear resampling (anti-aliasing).
        self.block = max(1, int(np.floor(ratio + 1e-6))) if ratio >= 2 - 1e-6 else 1
        # output pixel centres relative to the patch centre (microns)
        off = (np.arange(self.patch_px) + 0.5 - self.patch_px / 2) * self.mpp
        self._off = off
        self._separable = is_axis_aligned(self._inv)

    # ------------------------------------------------------------------ dataset protocol
    def __len__(self) -> int:
        return len(self.centers_um)

    def __getitem__(self, i: int) -> Any:
        if not -len(self) <= int(i) < len(self):
            raise IndexError(f"Patch index {i} out of range for {len(self)} patches.")
        cx, cy = self.centers_um[int(i)]
        data, (x0, y0) = self._read(cx, cy)
        patch = self._resample(data, x0, y0, cx, cy)
        return self.transform(patch) if self.transform is not None else patch

    def __getstate__(self) -> dict[str, Any]:
        # DataLoader workers start with an empty cache (and their own lock)
        state = dict(self.__dict__)
        state["_cache"] = None
        state["_chunks"] = None
        return state

    def __repr__(self) -> str:
        return (
            f"PatchDataset(n={len(self)}, patch_px={self.patch_px}, mpp={self.mpp:g}, "
            f"level={self.level.name!r} at {self.level.mpp:.4g} µm/px, block={self.block}"
            + ("" if self.degrade_to is None else f", degraded to {self.degrade_to:g} µm/px")
            + ")"
        )

    # ------------------------------------------------------------------ batch access
    def get_batch(self, indices: Sequence[int] | np.ndarray | None = None) -> np.ndarray:
        """Return the patches ``indices`` (default: all) as one uint8 array (n, 3, px, px).

        The windows are read together with :func:`dask.compute` (in parallel); ``transform`` is not
        applied.
        """
        idx = (
            np.arange(len(self)) if indices is None else np.asarray(indices, dtype=int).reshape(-1)
        )
        if len(idx) == 0:
            return np.zeros((0, 3, self.patch_px, self.patch_px), dtype=np.uint8)
        out = np.empty((len(idx), 3, self.patch_px, self.patch_px), dtype=np.uint8)
        if self._chunk_cache() is not None or self._cache is not None:
            for k, i in enumerate(idx):  # cut from decoded chunks (each decoded about once)
                cx, cy = self.centers_um[i]
                data, (x0, y0) = self._read(cx, cy)
                out[k] = self._resample(data, x0, y0, cx, cy)
            return out
        wins = [self._window(*self.centers_um[i]) for i in idx]
        datas = dask.compute(*[w for w, _ in wins], scheduler=dask.threaded.get)
        for k, (i, data, (_, (x0, y0))) in enumerate(zip(idx, datas, wins, strict=True)):
            cx, cy = self.centers_um[i]
            out[k] = self._resample(np.asarray(data), x0, y0, cx, cy)
        return out

    def warm(self, indices: Sequence[int] | np.ndarray) -> int:
        """Decode the chunks under the patches ``indices`` into the cache, several at a time.

        Returns the number of chunks decoded (0 without a chunk cache). Only as many chunks as the
        cache holds are decoded. Used to read the first batch with all cores while nothing else runs.
        """
        cache = self._chunk_cache()
        if cache is None:
            return 0
        keys: dict[tuple[int, int], None] = {}
        for i in np.asarray(indices, dtype=int).reshape(-1):
            x0, y0, x1, y1 = self._window_bounds(*self.centers_um[i])
            for key in cache.keys(x0, y0, x1, y1):
                keys.setdefault(key, None)
        return cache.load(list(keys))

    def clear_cache(self) -> None:
        """Drop the decoded chunks (or the in-memory level) held for cutting patches; ``decodes`` is kept."""
        self._cache = None
        if self._chunks is not None:
            self._chunks.clear()

    # ------------------------------------------------------------------ internals
    @property
    def cached(self) -> bool:
        """Whether patches are cut from decoded chunks held in memory (see ``cache_mb``)."""
        return self._cache is not None or (self._chunks is not None and self._chunks.nbytes > 0)

    @property
    def decodes(self) -> int:
        """Chunks decoded into the chunk cache so far (0 without one; a chunk evicted and read again counts twice)."""
        return 0 if self._chunks is None else int(self._chunks.decoded)

    def _chunk_cache(self) -> _ChunkCache | None:
        """Return the chunk cache of a dask level whose chunks fit ``cache_mb`` (``None`` otherwise)."""
        if self._chunks is None and self._cache is None:
            src = self.level.data[:3]
            if not isinstance(src, da.Array):
                self._cache = np.asarray(src)  # already in memory
            elif _ChunkCache.chunk_bytes(src) <= self.cache_mb * 1e6:
                self._chunks = _ChunkCache(src, self.cache_mb * 1e6)
        return self._chunks

    def _read(self, cx: float, cy: float) -> tuple[np.ndarray, tuple[int, int]]:
        """Return the (c, h, w) window around ``(cx, cy)`` µm as an array and its pixel origin (x0, y0)."""
        cache = self._chunk_cache()
        if cache is not None:
            x0, y0, x1, y1 = self._window_bounds(cx, cy)
            return cache.window(x0, y0, x1, y1, PAD_VALUE), (x0, y0)
        window, origin = self._window(cx, cy)
        # the scheduler function itself: a scheduler *name* makes dask import distributed (slow)
        data = window.compute(scheduler=dask.local.get_sync) if hasattr(window, "compute") else window
        return np.asarray(data), origin

    def _level_coords(self, cx: float, cy: float) -> tuple[np.ndarray, np.ndarray]:
        """Return continuous level pixel indices (row, col; centres at integers) of the output."""
        inv = self._inv
        x = cx + self._off  # columns
        y = cy + self._off  # rows
        # q = inv @ (x, y, 1) for every (row, col): separable sums
        qx = inv[0, 0] * x[None, :] + inv[0, 1] * y[:, None] + inv[0, 2]
        qy = inv[1, 0] * x[None, :] + inv[1, 1] * y[:, None] + inv[1, 2]
        return qy - 0.5, qx - 0.5

    def _window_bounds(self, cx: float, cy: float) -> tuple[int, int, int, int]:
        """Pixel bounds ``(x0, y0, x1, y1)`` of the window around ``(cx, cy)`` µm (may exceed the level)."""
        half = self.patch_px * self.mpp / 2
        corners = np.array(
            [
                [cx - half, cy - half, 1],
                [cx + half, cy - half, 1],
                [cx - half, cy + half, 1],
                [cx + half, cy + half, 1],
            ]
        )
        q = corners @ self._inv.T
        f = self.block
        x0 = int(np.floor((q[:, 0].min() - 2) / f)) * f
        y0 = int(np.floor((q[:, 1].min() - 2) / f)) * f
        x1 = int(np.ceil((q[:, 0].max() + 2) / f)) * f
        y1 = int(np.ceil((q[:, 1].max() + 2) / f)) * f
        return x0, y0, x1, y1

    def _window(self, cx: float, cy: float) -> tuple[Any, tuple[int, int]]:
        """Return the lazy (c, h, w) window (padded with white) and its pixel origin (x0, y0)."""
        x0, y0, x1, y1 = self._window_bounds(cx, cy)
        h_img, w_img = self.level.shape_yx
        xa, xb = max(x0, 0), min(x1, w_img)
        ya, yb = max(y0, 0), min(y1, h_img)
        data = self.level.data if self._cache is None else self._cache
        if xa >= xb or ya >= yb:  # entirely outside the image
            return np.full((3, y1 - y0, x1 - x0), PAD_VALUE, dtype=data.dtype), (x0, y0)
        win = data[:3, ya:yb, xa:xb]
        pad = da.pad if isinstance(win, da.Array) else np.pad
        if (xa, ya, xb, yb) != (x0, y0, x1, y1):
            win = pad(
                win,
                ((0, 0), (ya - y0, y1 - yb), (xa - x0, x1 - xb)),
                mode="constant",
                constant_values=PAD_VALUE,
            )
        return win, (x0, y0)

    def _resample(self, data: np.ndarray, x0: int, y0: int, cx: float, cy: float) -> np.ndarray:
        """Cut the patch at ``(cx, cy)`` µm from the window ``data`` at pixel origin ``(x0, y0)``."""
        patch = self._resample_window(data, x0, y0, cx, cy)
        return patch if self.degrade_to is None else degrade_patches(patch, self.mpp, self.degrade_to)

    def _resample_window(self, data: np.ndarray, x0: int, y0: int, cx: float, cy: float) -> np.ndarray:
        f = self.block
        data = np.asarray(data)
        # uint8 times float32 weights computes in float32: the same values as converting first
        keep = f == 1 and self._separable and data.dtype == np.uint8
        arr = data if keep else data.astype(np.float32)
        if f > 1:
            c, h, w = arr.shape
            arr = (
                arr[:, : h // f * f, : w // f * f]
                .reshape(c, h // f, f, w // f, f)
                .mean(axis=(2, 4))
            )
        if self._separable:
            # axis-aligned (scale / flip / translation): bilinear resampling as two small matmuls
            inv = self._inv
            rows = (inv[1, 1] * (cy + self._off) + inv[1, 2] - y0) / f - 0.5
            cols = (inv[0, 0] * (cx + self._off) + inv[0, 2] - x0) / f - 0.5
            i0, i1, ty = _linear_taps(rows, arr.shape[1])
            j0, j1, tx = _linear_taps(cols, arr.shape[2])
            if f == 1 and self.white_point is None and data.dtype == np.uint8 and not ty.any() and not tx.any():
                # output pixels on level pixel centres (tiles at the level's own µm/px): the bilinear
                # weights are exactly 1 and 0, so the result is the integer crop, bit for bit
                return np.ascontiguousarray(data[:, i0][:, :, j0])
            tmp = arr[:, i0, :] * (1 - ty)[None, :, None] + arr[:, i1, :] * ty[None, :, None]
            out = tmp[:, :, j0] * (1 - tx) + tmp[:, :, j1] * tx
        else:
            rows, cols = self._level_coords(cx, cy)
            # window index of level pixel centre r: (r + 0.5 - origin) / f - 0.5
            rows = (rows + 0.5 - y0) / f - 0.5
            cols = (cols + 0.5 - x0) / f - 0.5
            coords = np.stack([rows, cols])
            out = np.empty((3, self.patch_px, self.patch_px), dtype=np.float32)
            for ch in range(3):
                ndimage.map_coordinates(
                    arr[ch], coords, output=out[ch], order=1, mode="nearest", prefilter=False
                )
        if self.white_point is not None:
            out *= (255.0 / self.white_point)[:, None, None]
        np.clip(np.rint(out, out=out), 0, 255, out=out)
        return out.astype(np.uint8)


class _ChunkCache:
    """Least-recently-used cache of the decoded chunks of a lazy (c, y, x) level, at most ``max_bytes``.

    Windows are assembled from whole chunks, each decoded once while it stays in the cache; the
    memory held is bounded by ``max_bytes`` (at least one chunk) whatever the level size.
    Thread-safe (a prefetch thread and the main thread may read at the same time).
    """

    def __init__(self, src: da.Array, max_bytes: float) -> None:
        self.src = src
        self.max_bytes = float(max_bytes)
        self.ybounds = np.concatenate([[0], np.cumsum(src.chunks[1])]).astype(np.int64)
        self.xbounds = np.concatenate([[0], np.cumsum(src.chunks[2])]).astype(np.int64)
        self.nbytes = 0
        #: number of chunks decoded so far (a chunk evicted and read again counts again)
        self.decoded = 0
        self._lru: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()
        self._lock = threading.Lock()

    @staticmethod
    def chunk_bytes(src: da.Array) -> int:
        """Bytes of the largest chunk (all channels)."""
        return int(src.shape[0]) * max(src.chunks[1]) * max(src.chunks[2]) * src.dtype.itemsize

    def chunk(self, i: int, j: int) -> np.ndarray:
        """Return the decoded chunk at chunk row ``i``, column ``j``."""
        key = (i, j)
        with self._lock:
            arr = self._lru.get(key)
            if arr is not None:
                self._lru.move_to_end(key)
                return arr
        # the scheduler function itself: a scheduler *name* makes dask import distributed (slow)
        arr = np.asarray(self._part(i, j).compute(scheduler=dask.local.get_sync))
        with self._lock:
            self.decoded += 1
            self._insert(key, arr)
        return arr

    def _part(self, i: int, j: int) -> da.Array:
        """Return the lazy chunk at chunk row ``i``, column ``j`` (chunk-aligned: dask reads exactly that chunk)."""
        return self.src[:, self.ybounds[i] : self.ybounds[i + 1], self.xbounds[j] : self.xbounds[j + 1]]

    def keys(self, x0: int, y0: int, x1: int, y1: int) -> list[tuple[int, int]]:
        """Return the (row, column) of the chunks under the window (clipped to the level)."""
        h, w = int(self.ybounds[-1]), int(self.xbounds[-1])
        ya, yb, xa, xb = max(y0, 0), min(y1, h), max(x0, 0), min(x1, w)
        if ya >= yb or xa >= xb:
            return []
        i0 = int(np.searchsorted(self.ybounds, ya, side="right")) - 1
        i1 = int(np.searchsorted(self.ybounds, yb, side="left"))
        j0 = int(np.searchsorted(self.xbounds, xa, side="right")) - 1
        j1 = int(np.searchsorted(self.xbounds, xb, side="left"))
        return [(i, j) for i in range(i0, i1) for j in range(j0, j1)]

    def load(self, keys: Sequence[tuple[int, int]]) -> int:
        """Decode the chunks ``keys`` not yet cached, in parallel (at most what the cache holds)."""
        with self._lock:
            todo = [k for k in keys if k not in self._lru]
        todo = todo[: max(1, int(self.max_bytes // max(self.chunk_bytes(self.src), 1)))]
        if not todo:
            return 0
        datas = dask.compute(*[self._part(i, j) for i, j in todo], scheduler=dask.threaded.get)
        with self._lock:
            self.decoded += len(todo)
            for key, arr in zip(todo, datas, strict=True):
                self._insert(key, np.asarray(arr))
        return len(todo)

    def clear(self) -> None:
        """Drop every cached chunk (the ``decoded`` counter is kept)."""
        with self._lock:
            self._lru.clear()
            self.nbytes = 0

    def _insert(self, key: tuple[int, int], arr: np.ndarray) -> None:
        # under the lock
        if key not in self._lru:
            self._lru[key] = arr
            self.nbytes += arr.nbytes
            while self.nbytes > self.max_bytes and len(self._lru) > 1:
                _, old = self._lru.popitem(last=False)
                self.nbytes -= old.nbytes

    def window(self, x0: int, y0: int, x1: int, y1: int, fill: int) -> np.ndarray:
        """Return the (c, y1 - y0, x1 - x0) window, ``fill`` outside the level."""
        out = np.full((self.src.shape[0], y1 - y0, x1 - x0), fill, dtype=self.src.dtype)
        h, w = int(self.ybounds[-1]), int(self.xbounds[-1])
        ya, yb, xa, xb = max(y0, 0), min(y1, h), max(x0, 0), min(x1, w)
        for i, j in self.keys(x0, y0, x1, y1):
            cy0, cy1 = max(ya, self.ybounds[i]), min(yb, self.ybounds[i + 1])
            cx0, cx1 = max(xa, self.xbounds[j]), min(xb, self.xbounds[j + 1])
            by, bx = self.ybounds[i], self.xbounds[j]
            part = self.chunk(i, j)[:, cy0 - by : cy1 - by, cx0 - bx : cx1 - bx]
            out[:, cy0 - y0 : cy1 - y0, cx0 - x0 : cx1 - x0] = part
        return out


def _linear_taps(pos: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Return linear-interpolation taps at fractional indices ``pos`` of an axis of ``n`` pixels."""
    pos = np.clip(pos, 0, n - 1)
    i0 = np.floor(pos).astype(np.int64)
    i1 = np.minimum(i0 + 1, n - 1)
    t = (pos - i0).astype(np.float32)
    return i0, i1, t


@d.dedent
def extract_patches(  # noqa: D417 - parameters from squall_sd._docs
    sdata: SpatialData,
    centers_um: np.ndarray | str | Any,
    *,
    image_key: str = "he",
    patch_px: int = 224,
    mpp: float = 0.5,
    scale: str | int | None = "auto",
    white_point: Sequence[float] | None = None,
    transform: Callable[[np.ndarray], Any] | None = None,
    effective_mpp: float | None = None,
    cache_mb: float = 24.0,
) -> PatchDataset:
    """Return a lazy dataset of RGB patches of ``patch_px`` pixels at ``mpp`` µm/px around centres.

    For every centre the window is read from the pyramid level chosen by ``scale`` (by default the
    coarsest level whose µm/px is at most ``mpp``; the full resolution when the target is finer),
    block-averaged by the integer part of the remaining down-sampling factor and resampled
    bilinearly onto an output grid of exactly ``patch_px`` × ``patch_px`` pixels of ``mpp`` µm,
    aligned with the ``microns`` axes. Any affine transformation of the image to ``microns``
    (scale, translation, flips, rotation, shear) is inverted exactly, so the same centre in
    microns always shows the same tissue. Output pixel ``(i, j)`` covers microns
    ``[cx - half + j * mpp, cx - half + (j + 1) * mpp)`` in x (likewise rows in y) with
    ``half = patch_px * mpp / 2``; an image pixel ``k`` covers ``[k, k + 1)`` of its intrinsic
    coordinates (the spatialdata convention).

    Parameters
    ----------
    sdata
        SpatialData holding the H&E image.
    centers_um
        Patch centres in microns: an (n, 2) array of x, y; or the key of a shapes element (or a
        GeoDataFrame) whose centroids, transformed to ``microns``, are used.
    %(image_key_pp)s
    patch_px
        Edge of each patch in pixels (224 for SQUALL).
    mpp
        µm per pixel of the patches (0.5 for 20× tiles; about 4 for Visium hires-image tiles).
    scale
        Pyramid level to read: ``"auto"`` (see above), a level name (``"scale1"``) or an index.
    white_point
        Optional (r, g, b) white point on the 0–255 scale applied to every patch (Visium white
        balance); see :func:`estimate_white_point`.
    transform
        Optional callable applied to each patch in ``__getitem__`` (e.g. :func:`he_stain_jitter`).
    effective_mpp
        Optional µm/px the patches should look as if scanned at (a model's
        :attr:`~squall_sd.models.SquallConfig.effective_mpp`): patches read from a level sharper than
        it are degraded to it (:func:`degrade_patches`); ``None`` leaves them as read.
    cache_mb
        Keep decoded chunks of the chosen level in a least-recently-used cache of at most this many
        megabytes, so each chunk is decoded about once (a level of at most ``cache_mb`` is read
        once; small JPEG / PNG images are one chunk). The cache is bounded whatever the slide size,
        so pass the centres in a local order (neighbours one after the other, not whole columns) to
        decode each chunk about once; a level whose chunks exceed it is read window by window.
        ``0`` disables the cache.

    Returns
    -------
    A :class:`PatchDataset`; ``ds[i]`` is a ``uint8`` array ``(3, patch_px, patch_px)`` and
    ``ds.get_batch(idx)`` reads several patches at once. Divide by 255 for the model input.

    """
    patch_px = int(patch_px)
    if patch_px <= 0:
        raise ValueError(f"Expected `patch_px` to be positive, found {patch_px!r}.")
    mpp = check_positive(mpp, "mpp")
    centers = centers_from(sdata, centers_um)
    levels = image_levels(sdata, image_key)
    level = pick_level(levels, mpp, scale)
    ds = PatchDataset(
        level,
        centers,
        patch_px=patch_px,
        mpp=mpp,
        white_point=white_point,
        transform=transform,
        effective_mpp=effective_mpp,
        cache_mb=cache_mb,
    )
    logger.info("extract_patches: %r", ds)
    return ds
