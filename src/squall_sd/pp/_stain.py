"""Stain augmentation and normalisation of RGB patches, and the Visium white balance."""

from __future__ import annotations

from typing import Literal

import numpy as np
from skimage import color
from spatialdata import SpatialData

from squall_sd._logging import logger

#: Reference H&E stain vectors (columns: haematoxylin, eosin; rows: optical density of R, G, B)
#: and their 99th-percentile concentrations, the values commonly used with Macenko's method.
REFERENCE_STAINS = np.array([[0.5626, 0.2159], [0.7201, 0.8012], [0.4062, 0.5581]])
REFERENCE_MAX_CONC = np.array([1.9705, 1.0308])


def _to_hwc(rgb: np.ndarray) -> tuple[np.ndarray, bool]:
    """Return an (h, w, 3) view and whether the input was channels-first (3, h, w)."""
    arr = np.asarray(rgb)
    if arr.ndim != 3:
        raise ValueError(f"Expected an RGB image (3, h, w) or (h, w, 3), got shape {arr.shape}.")
    if arr.shape[0] == 3 and arr.shape[-1] != 3:
        return np.moveaxis(arr, 0, -1), True
    if arr.shape[-1] != 3:
        raise ValueError(f"Expected an RGB image (3, h, w) or (h, w, 3), got shape {arr.shape}.")
    return arr, False


def _from_float(out: np.ndarray, like: np.ndarray, channels_first: bool) -> np.ndarray:
    """Cast a float (h, w, 3) image in [0, 1] back to the dtype and layout of ``like``."""
    out = np.clip(out, 0.0, 1.0)
    if np.issubdtype(like.dtype, np.integer):
        out = np.rint(out * 255.0).astype(like.dtype)
    else:
        out = out.astype(like.dtype if np.issubdtype(like.dtype, np.floating) else np.float32)
    return np.moveaxis(out, -1, 0) if channels_first else out


def _as_float(arr: np.ndarray) -> np.ndarray:
    a = arr.astype(np.float64)
    return a / 255.0 if np.issubdtype(arr.dtype, np.integer) else a


def he_stain_jitter(
    rgb: np.ndarray,
    *,
    sigma: float = 0.05,
    bias: float = 0.05,
    rng: np.random.Generator | int | None = None,
) -> np.ndarray:
    """Randomly perturb the haematoxylin, eosin and DAB intensities of an RGB image (augmentation).

    The image is converted to optical density and unmixed into H, E and DAB concentrations with
    the Ruifrok & Johnston stain matrix (:data:`skimage.color.hed_from_rgb`); each concentration
    ``s`` becomes ``alpha * s + beta`` with ``alpha ~ U(1 - sigma, 1 + sigma)`` and
    ``beta ~ U(-bias, bias)`` (one draw per stain per call), and the image is re-rendered
    (:data:`skimage.color.rgb_from_hed`). Unlike :func:`skimage.color.rgb2hed`, negative
    concentrations are kept, so ``sigma = bias = 0`` returns the image unchanged.

    Parameters
    ----------
    rgb
        Image, (3, h, w) or (h, w, 3); uint8 (0–255) or float (0–1).
    sigma
        Half-width of the multiplicative jitter per stain.
    bias
        Half-width of the additive jitter per stain, in optical-density units (natural log).
    rng
        Random generator or seed.

    Returns
    -------
    The jittered image, same shape, layout and dtype as ``rgb``.

    """
    hwc, cf = _to_hwc(rgb)
    rng = np.random.default_rng(rng)
    alpha = rng.uniform(1 - sigma, 1 + sigma, size=3)
    beta = rng.uniform(-bias, bias, size=3)
    img = _as_float(hwc)
    od = -np.log(np.clip(img, 1.0 / 512, 1.0))
    hed = od @ color.hed_from_rgb
    out = np.exp(-((hed * alpha + beta) @ color.rgb_from_hed))
    return _from_float(out, hwc, cf)


def _macenko_fit(od: np.ndarray, *, beta: float, alpha: float) -> tuple[np.ndarray, np.ndarray]:
    """Fit the stain matrix (3, 2: H, E) and 99th-percentile concentrations to ODs (n, 3)."""
    tissue = od[np.all(od > beta, axis=1)]
    if len(tissue) < 10:
        raise ValueError(
            "Too few stained pixels to estimate stain vectors (is the patch background only?)."
        )
    _, vecs = np.linalg.eigh(np.cov(tissue.T))
    plane = vecs[:, 1:3]
    proj = tissue @ plane
    phi = np.arctan2(proj[:, 1], proj[:, 0])
    lo, hi = np.percentile(phi, alpha), np.percentile(phi, 100 - alpha)
    v1 = plane @ np.array([np.cos(lo), np.sin(lo)])
    v2 = plane @ np.array([np.cos(hi), np.sin(hi)])
    v1 *= np.sign(v1.sum()) or 1.0
    v2 *= np.sign(v2.sum()) or 1.0
    # haematoxylin has the larger red OD component
    stains = np.column_stack([v1, v2]) if v1[0] > v2[0] else np.column_stack([v2, v1])
    stains /= np.linalg.norm(stains, axis=0, keepdims=True)
    conc = np.linalg.lstsq(stains, od.T, rcond=None)[0]
    max_c = np.percentile(conc, 99, axis=1)
    return stains, max_c


def normalize_stain(
    rgb: np.ndarray,
    *,
    method: Literal["macenko", "reinhard"] = "macenko",
    reference: np.ndarray | None = None,
    background: float = 240.0,
) -> np.ndarray:
    """Normalise the H&E staining of an RGB image to a reference.

    Parameters
    ----------
    rgb
        Image, (3, h, w) or (h, w, 3); uint8 (0–255) or float (0–1).
    method
        ``"macenko"``: estimate the image's haematoxylin and eosin vectors in optical-density space
        (Macenko et al., 2009) and re-render the stain concentrations with the reference vectors
        and intensities. ``"reinhard"``: match the per-channel mean and standard deviation in
        CIELAB (Reinhard et al., 2001).
    reference
        Reference RGB image (same conventions). For ``"macenko"`` it defaults to commonly used H&E
        reference vectors; ``"reinhard"`` needs one.
    background
        Background (white) intensity on the 0–255 scale used for optical densities.

    Returns
    -------
    The normalised image, same shape, layout and dtype as ``rgb``.

    """
    hwc, cf = _to_hwc(rgb)
    img = _as_float(hwc)
    if method == "reinhard":
        if reference is None:
            raise ValueError("`method='reinhard'` needs a `reference` image.")
        ref = _as_float(_to_hwc(reference)[0])
        lab, rlab = color.rgb2lab(img), color.rgb2lab(ref)
        mu, sd = lab.reshape(-1, 3).mean(0), lab.reshape(-1, 3).std(0) + 1e-8
        rmu, rsd = rlab.reshape(-1, 3).mean(0), rlab.reshape(-1, 3).std(0)
        out = color.lab2rgb((lab - mu) / sd * rsd + rmu)
        return _from_float(out, hwc, cf)
    if method != "macenko":
        raise ValueError(f"`method` must be 'macenko' or 'reinhard', got {method!r}.")
    bg = float(background) / 255.0
    od = -np.log(np.clip(img.reshape(-1, 3), 1 / 255.0, None) / bg)
    od = np.clip(od, 0, None)
    stains, max_c = _macenko_fit(od, beta=0.15, alpha=1.0)
    if reference is None:
        ref_stains, ref_max = REFERENCE_STAINS, REFERENCE_MAX_CONC
    else:
        ref = _as_float(_to_hwc(reference)[0]).reshape(-1, 3)
        ref_od = np.clip(-np.log(np.clip(ref, 1 / 255.0, None) / bg), 0, None)
        ref_stains, ref_max = _macenko_fit(ref_od, beta=0.15, alpha=1.0)
    conc = np.linalg.lstsq(stains, od.T, rcond=None)[0]
    conc *= (ref_max / np.maximum(max_c, 1e-8))[:, None]
    out = bg * np.exp(-(ref_stains @ conc)).T.reshape(img.shape)
    return _from_float(out, hwc, cf)


def estimate_white_point(
    sdata: SpatialData,
    *,
    image_key: str = "he",
    percentile: float = 95.0,
) -> np.ndarray:
    """Per-channel white point of an H&E image for the SQUALL Visium white balance.

    Following the SQUALL Visium preprocessing, tissue (pixels darker than the Otsu threshold of
    the grey values) is set to 0 and the ``percentile`` of each channel is taken over the whole
    image; dividing each channel by it (and clipping) white-balances the image. The statistic is
    computed on a coarse pyramid level (about 8–16 µm per pixel). Pass the result as
    ``white_point=`` to :func:`extract_patches`.

    Parameters
    ----------
    sdata
        SpatialData holding the image.
    image_key
        Key of the image in ``sdata.images``.
    percentile
        Percentile (0–100) of each channel.

    Returns
    -------
    (3,) float array, r, g, b on the 0–255 scale.

    """
    from squall_sd.pp._tissue import coarse_image, tissue_mask

    rgb, _, _ = coarse_image(sdata, image_key)
    mask = tissue_mask(rgb, method="greyscale")
    vals = rgb.copy()
    vals[mask] = 0.0
    wp = np.percentile(vals.reshape(-1, 3), percentile, axis=0) * 255.0
    if np.any(wp <= 0):
        raise ValueError(
            f"The white point of image {image_key!r} is 0 in some channel (the image is mostly "
            "tissue or black); white balance cannot be estimated."
        )
    logger.info("estimate_white_point(%r): %s", image_key, np.round(wp, 1).tolist())
    return wp.astype(np.float64)
