"""One optical resolution for every image: tiles of sharper scans degraded to a model's ``effective_mpp``."""

from __future__ import annotations

import numpy as np

from squall_sd._sdata import check_positive

__all__ = ["degrade_patches", "degrade_target", "is_sharper"]

#: Images within this relative margin of ``effective_mpp`` count as scanned at it: her2st's patient-A
#: copies measure 3.18-3.20 µm/px, and re-blurring them by half a percent would only add resampling noise.
SAME_RESOLUTION_RTOL = 0.05


def is_sharper(image_mpp: float, effective_mpp: float | None) -> bool:
    """Whether an image scanned at ``image_mpp`` is sharper than ``effective_mpp``.

    Parameters
    ----------
    image_mpp
        µm per pixel of the image (or of the pyramid level read).
    effective_mpp
        The resolution to compare with, or ``None``.

    Returns
    -------
    ``True`` when ``image_mpp`` is finer than ``effective_mpp`` by more than 5 %
    (:data:`SAME_RESOLUTION_RTOL`); always ``False`` when ``effective_mpp`` is ``None``.

    """
    if effective_mpp is None:
        return False
    return float(image_mpp) < float(effective_mpp) * (1.0 - SAME_RESOLUTION_RTOL)


def degrade_target(image_mpp: float, mpp: float, effective_mpp: float | None) -> float | None:
    """Return the µm/px to degrade tiles at ``mpp`` cut from an image of ``image_mpp`` to.

    ``effective_mpp`` when the image is sharper than it (:func:`is_sharper`) and it is coarser than
    ``mpp``; else ``None`` (the tiles are used as read).
    """
    if is_sharper(image_mpp, effective_mpp) and float(effective_mpp) > float(mpp):
        return float(effective_mpp)
    return None


def degrade_patches(patches: np.ndarray, mpp: float, effective_mpp: float) -> np.ndarray:
    """Return RGB patches at ``mpp`` µm/px as if they had been read from an image of ``effective_mpp``.

    Each patch is box-averaged down to ``round(size * mpp / effective_mpp)`` pixels and resampled
    bilinearly back to its size (Pillow's ``BOX`` and ``BILINEAR`` filters), so its pixels keep the
    geometry of ``mpp`` but carry only the detail of an ``effective_mpp`` scan. This is how a model
    with :attr:`~squall_sd.models.SquallConfig.effective_mpp` sees tiles of sharper images, in training
    and in inference alike.

    Parameters
    ----------
    patches
        ``uint8`` RGB patches, channels first: one ``(3, P, P)`` or a batch ``(n, 3, P, P)``.
    mpp
        µm per pixel of the patches.
    effective_mpp
        The coarser µm per pixel to degrade them to (``> mpp``).

    Returns
    -------
    A new ``uint8`` array of the input's shape.

    """
    from PIL import Image

    mpp = check_positive(mpp, "mpp")
    effective_mpp = check_positive(effective_mpp, "effective_mpp")
    if effective_mpp <= mpp:
        raise ValueError(
            f"`effective_mpp` ({effective_mpp:g}) must be coarser than the patches' {mpp:g} µm/px; nothing to degrade."
        )
    arr = np.asarray(patches)
    single = arr.ndim == 3
    batch = arr[None] if single else arr
    if batch.ndim != 4 or batch.shape[1] != 3 or batch.shape[2] != batch.shape[3]:
        raise ValueError(f"Expected square uint8 RGB patches (3, P, P) or (n, 3, P, P), got shape {arr.shape}.")
    if batch.dtype != np.uint8:
        raise TypeError(f"Expected uint8 patches (as extract_patches returns them), got {batch.dtype}.")
    size = batch.shape[-1]
    small = max(1, round(size * mpp / effective_mpp))
    out = np.empty_like(batch)
    for i, tile in enumerate(batch):
        im = Image.fromarray(np.ascontiguousarray(tile.transpose(1, 2, 0)))
        im = im.resize((small, small), Image.Resampling.BOX).resize((size, size), Image.Resampling.BILINEAR)
        out[i] = np.asarray(im).transpose(2, 0, 1)
    return out[0] if single else out
