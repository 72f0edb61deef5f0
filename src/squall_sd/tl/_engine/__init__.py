"""The inference engine of :func:`~squall_sd.tl.predict_expression` and :func:`~squall_sd.tl.embed`.

Tiles are planned over the regions (:mod:`._tiles`), read by a DataLoader and run through the model in
one batched loop (:mod:`._loop`); maps built tile by tile accumulate in a :class:`Canvas` (:mod:`._canvas`).
Each tool supplies only its forward step and assembles its own outputs.
"""

from squall_sd.tl._engine._canvas import MEMMAP_BYTES, Canvas, image_from_canvas
from squall_sd.tl._engine._loop import (
    AUTO_WORKERS,
    TRIM_EVERY,
    _malloc_trim,
    _Prefetch,
    frozen_gc,
    make_loader,
    on_device,
    progress_bar,
    resolve_device,
    resolve_workers,
    run_batches,
    trim_heap,
)
from squall_sd.tl._engine._tiles import (
    TileDataset,
    TilePlan,
    centers_and_extent,
    collate_tiles,
    hilbert_index,
    plan_tiles,
    region_grid_async,
)

__all__ = [
    "AUTO_WORKERS",
    "MEMMAP_BYTES",
    "TRIM_EVERY",
    "Canvas",
    "TileDataset",
    "TilePlan",
    "_Prefetch",
    "_malloc_trim",
    "centers_and_extent",
    "collate_tiles",
    "frozen_gc",
    "hilbert_index",
    "image_from_canvas",
    "make_loader",
    "on_device",
    "plan_tiles",
    "progress_bar",
    "region_grid_async",
    "resolve_device",
    "resolve_workers",
    "run_batches",
    "trim_heap",
]
