"""The whole-slide token map of :func:`squall_sd.tl.embed` (SQUALL spec §6.3): overlapping windows, averaged."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import numpy as np

from squall_sd._logging import logger
from squall_sd.tl._engine import Canvas, make_loader, run_batches

if TYPE_CHECKING:
    from spatialdata import SpatialData

    from squall_sd.models import Squall

__all__ = ["token_map"]


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


def token_map(
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
    """Overlapping-window token map over the regions' bounding box (see :func:`squall_sd.tl.embed`).

    Returns
    -------
    The (embed_dim, H, W) canvas (one pixel per token; NaN where no window reached) and the
    (x, y) µm origin of its pixel (0, 0).
    """
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
    patches = extract_patches(
        sdata, win_centers, image_key=image_key, patch_px=cfg.img_size, mpp=mpp, effective_mpp=cfg.effective_mpp
    )
    loader = make_loader(_Windows(patches), batch_size=batch_size, num_workers=num_workers, device=device,
                         collate=_collate_patches)

    def step(batch: Any) -> int:
        ids, rgb = batch
        tok = model.embed(rgb, mpp, pool=None, autocast=autocast).float().cpu().numpy()
        _add_windows(canvas.data, count, tok.reshape(len(ids), g, g, -1), tl[ids.numpy()] - lo)
        return len(ids)

    t0 = time.perf_counter()
    try:
        run_batches(loader, step, patches=patches, desc="token map", progress=progress)
    except BaseException:
        canvas.cleanup()
        raise
    canvas.data /= np.where(count > 0, count, np.nan)[None]
    logger.info("token map: %d windows in %.1f s", len(tl), time.perf_counter() - t0)
    return canvas, (float(lo[0] * token_um), float(lo[1] * token_um))


def _add_windows(data: np.ndarray, count: np.ndarray, tok: np.ndarray, top_left: np.ndarray) -> None:
    """Add the (B, g, g, D) tokens of windows at ``top_left`` (B, 2) canvas tokens (x, y) into ``data``; count them."""
    g = tok.shape[1]
    h, w = count.shape
    for k, (x0, y0) in enumerate(top_left):
        ya, yb = max(y0, 0), min(y0 + g, h)
        xa, xb = max(x0, 0), min(x0 + g, w)
        if ya >= yb or xa >= xb:
            continue
        block = tok[k, ya - y0 : yb - y0, xa - x0 : xb - x0]
        data[:, ya:yb, xa:xb] += np.moveaxis(block, -1, 0)
        count[ya:yb, xa:xb] += 1
