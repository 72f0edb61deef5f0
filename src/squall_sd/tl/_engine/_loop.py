"""The batched forward loop: DataLoader, background prefetch, heap trimming, progress, device placement."""

from __future__ import annotations

import functools
import gc
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import torch

    from squall_sd.models import Squall

__all__ = [
    "TRIM_EVERY",
    "frozen_gc",
    "make_loader",
    "on_device",
    "progress_bar",
    "resolve_device",
    "resolve_workers",
    "run_batches",
    "trim_heap",
]


def resolve_device(device: str | torch.device) -> torch.device:
    """``"auto"`` → CUDA when available, else CPU; anything else is passed to :class:`torch.device`."""
    import torch

    if isinstance(device, str) and device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


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


def frozen_gc(func: Callable[..., Any]) -> Callable[..., Any]:
    """Run ``func`` with the objects that exist before the call frozen out of garbage collection.

    A prediction allocates enough Python objects (geometries, graphs, batches) to trigger full
    collections of the cyclic garbage collector, and each of those walks every object of the session:
    the modules, the SpatialData, the model. Frozen (:func:`gc.freeze`), those are skipped, so a full
    collection scans only what the call created; they are unfrozen when the call returns. In
    ``benchmarks/predict_throughput.py`` (worst case, 64x slide) the two full collections of a call
    took 0.41 s, frozen 0.002 s. Nothing is freed later than it would be otherwise except cyclic garbage
    that was already unreachable before the call, which the next collection after it finds. A caller
    that has frozen objects itself (a server after ``gc.freeze()``) is left as it is.
    """

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if gc.get_freeze_count() > 0 or not gc.isenabled():
            return func(*args, **kwargs)
        gc.freeze()
        try:
            return func(*args, **kwargs)
        finally:
            gc.unfreeze()

    return wrapper


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


@contextmanager
def on_device(model: Squall, device: torch.device) -> Iterator[None]:
    """Run the block with ``model`` in eval mode on ``device``; its mode and device are restored after."""
    was_training, prev_device = model.training, model.device
    model.eval()
    if prev_device != device:
        model.to(device)
    try:
        yield
    finally:
        if prev_device != device:
            model.to(prev_device)
        model.train(was_training)


def run_batches(loader: Any, step: Callable[[Any], int], *, patches: Any, desc: str, progress: bool) -> None:
    """Run the one batched loop of :func:`~squall_sd.tl.predict_expression` and :func:`~squall_sd.tl.embed`.

    Every batch of ``loader`` goes to ``step`` (the forward pass, storing its results), which
    returns the number of tiles it handled. Without worker processes the tiles are read in a
    background thread (:class:`_Prefetch`) while ``step`` runs, after the first batch's image chunks
    were decoded with all cores (``patches.warm``); the heap is trimmed every :data:`TRIM_EVERY`
    batches and the chunk cache of ``patches`` (a :class:`~squall_sd.pp.PatchDataset`) emptied at the end.

    Parameters
    ----------
    loader
        A :func:`make_loader` DataLoader.
    step
        Called with each batch in order.
    patches
        The patches the loader's dataset reads.
    desc
        Progress bar label.
    progress
        Show the progress bar.
    """
    n, batch_size = len(loader.dataset), int(loader.batch_size)
    if loader.num_workers > 0:
        # worker processes may be forked: finish the regions' index first (a fork copies no running thread)
        getattr(loader.dataset, "region_grid", None)
    bar = progress_bar(n, desc=desc, enabled=progress)
    if loader.num_workers == 0 and hasattr(patches, "warm"):
        # nothing else runs yet: decode the first batch's image chunks with all cores
        patches.warm(np.arange(min(n, batch_size)))
    batches = _Prefetch(loader) if loader.num_workers == 0 and n > batch_size else None
    try:
        for k_batch, batch in enumerate(batches if batches is not None else loader):
            if k_batch % TRIM_EVERY == TRIM_EVERY - 1:
                trim_heap()
            bar.update(step(batch))
    finally:
        if batches is not None:
            batches.close()
        if hasattr(patches, "clear_cache"):
            patches.clear_cache()  # the decoded image chunks are not needed any more
        bar.close()
