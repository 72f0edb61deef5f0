"""Joint augmentation of a training tile and its expression grid (:func:`augment_tile`)."""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["augment_tile", "color_jitter", "stain_jitter"]


def stain_jitter(rgb: np.ndarray, strength: float, rng: np.random.Generator) -> np.ndarray:
    """Jitter the haematoxylin / eosin / DAB concentrations of a (3, h, w) uint8 tile.

    Uses :func:`squall_sd.pp.he_stain_jitter` with ``sigma = bias = strength``: each
    colour-deconvolution (HED) concentration is scaled by ``U(1 - s, 1 + s)`` and shifted by
    ``U(-s, s)`` optical-density units.

    Parameters
    ----------
    rgb
        Tile, (3, h, w) uint8.
    strength
        Jitter amplitude ``s`` (0 disables it).
    rng
        Random generator.

    Returns
    -------
    The jittered tile (uint8, same shape).

    """
    if strength <= 0:
        return rgb
    try:
        from squall_sd.pp import he_stain_jitter
    except ImportError:  # pragma: no cover - pp always ships it
        he_stain_jitter = None
    if he_stain_jitter is not None:
        return np.asarray(he_stain_jitter(rgb, sigma=strength, bias=strength, rng=rng), dtype=np.uint8)
    # same maths and random draws as squall_sd.pp.he_stain_jitter, for training nodes without
    # spatialdata (squall_sd.pp imports it); before, this fallback scaled the bias by 0.05
    from skimage import color

    alpha = rng.uniform(1 - strength, 1 + strength, size=3)
    beta = rng.uniform(-strength, strength, size=3)
    img = np.moveaxis(rgb, 0, -1).astype(np.float64) / 255.0
    od = -np.log(np.clip(img, 1.0 / 512, 1.0))
    out = np.exp(-((od @ color.hed_from_rgb * alpha + beta) @ color.rgb_from_hed))
    out = np.rint(np.clip(out, 0.0, 1.0) * 255.0).astype(np.uint8)
    return np.ascontiguousarray(np.moveaxis(out, -1, 0))


def augment_tile(
    sample: dict[str, Any],
    rng: np.random.Generator,
    *,
    flips: bool = True,
    rot90: bool = True,
    stain: float = 0.0,
    color: float = 0.0,
    blur: float = 0.0,
) -> dict[str, Any]:
    """Flip / rotate a tile's RGB and expression grids identically, then jitter stain, colour, focus.

    Parameters
    ----------
    sample
        A sample of :class:`ShardDataset` (``rgb`` (3, P, P), ``cell_spot``/``cell_weight`` (g, g)
        and
        optionally ``expr`` (G, g, g)).
    rng
        Random generator.
    flips
        Random horizontal flip.
    rot90
        Random multiple of 90°.
    stain
        Stain-jitter strength (0 disables it).
    color
        Brightness, contrast and saturation jitter: each factor is drawn uniformly from
        ``[1 - color, 1 + color]`` (0 disables it). Scanners and stain batches differ in all three.
    blur
        Largest Gaussian blur sigma in pixels, applied to half of the tiles with a sigma drawn
        uniformly from ``[0, blur]`` (0 disables it): other focus and scan resolutions.

    Returns
    -------
    The augmented sample (a new dict).

    """
    out = dict(sample)
    k = int(rng.integers(4)) if rot90 else 0
    flip = bool(rng.random() < 0.5) if flips else False
    for key, axes in (
        ("rgb", (1, 2)),
        ("cell_spot", (0, 1)),
        ("cell_weight", (0, 1)),
        ("cell_fill", (0, 1)),
        ("expr", (1, 2)),
    ):
        if key not in out or out[key] is None:
            continue
        a = out[key]
        if k:
            a = np.rot90(a, k, axes=axes)
        if flip:
            a = np.flip(a, axis=axes[1])
        out[key] = np.ascontiguousarray(a)
    if stain > 0:
        out["rgb"] = stain_jitter(out["rgb"], stain, rng)
    if color > 0:
        out["rgb"] = color_jitter(out["rgb"], color, rng)
    if blur > 0 and rng.random() < 0.5:
        from scipy.ndimage import gaussian_filter

        sigma = float(rng.uniform(0.0, blur))
        rgb = gaussian_filter(out["rgb"].astype(np.float32), sigma=(0, sigma, sigma), mode="reflect")
        out["rgb"] = np.clip(np.rint(rgb), 0, 255).astype(np.uint8)
    return out


def color_jitter(rgb: np.ndarray, strength: float, rng: np.random.Generator) -> np.ndarray:
    """Random brightness, contrast and saturation of a (3, P, P) uint8 tile (factors 1 ± strength)."""
    b, c, s = rng.uniform(1.0 - strength, 1.0 + strength, size=3)
    x = rgb.astype(np.float32) * b
    x = (x - x.mean()) * c + x.mean()
    grey = x.mean(axis=0, keepdims=True)
    x = (x - grey) * s + grey
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)
