"""Maps accumulated tile by tile (dense expression, token maps) and their image elements."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Sequence

import numpy as np

from squall_sd._constants import MICRONS
from squall_sd._logging import logger

__all__ = ["MEMMAP_BYTES", "Canvas", "image_from_canvas"]

#: A dense map or token map larger than this (bytes) is accumulated in a memory-mapped temporary file.
MEMMAP_BYTES = 256 * 2**20


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
