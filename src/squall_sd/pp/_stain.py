"""Stain augmentation and normalisation of RGB patches, and the Visium white balance."""

from __future__ import annotations

import functools
import warnings
from typing import Any, Literal

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


#: µm/px range and pixel budget of the image :func:`stain_statistics` measures (through
#: :func:`~squall_sd.pp._tissue.coarse_image`): fine enough that nuclei and stroma are still separate
#: colours, coarse enough that a whole slide stays a few million pixels.
STAIN_MPP_RANGE = (3.0, 6.0)
STAIN_MAX_PIXELS = 4_000_000
#: fewest tissue pixels that make a colour statistic
MIN_STAIN_PIXELS = 1_000


def _slide_threshold(sdata: SpatialData, image_key: str) -> float:
    """Return the slide's tissue threshold (HSV saturation, Otsu; see ``pp._tissue.tissue_threshold``)."""
    from squall_sd.pp._tissue import tissue_threshold

    thr = tissue_threshold(sdata, image_key)
    if thr is None:
        raise ValueError(
            f"Image {image_key!r} shows no tissue (its saturation has no Otsu split): there are no stained "
            "pixels to take colour statistics from. Check that it is an H&E image with tissue."
        )
    return float(thr)


def stain_statistics(
    sdata: SpatialData | list[SpatialData],
    *,
    image_key: str = "he",
) -> dict[str, list[float]]:
    """Colour statistics of the stained tissue of an H&E image: mean and s.d. of its CIELAB values.

    They are what :func:`match_stain` maps an image to (Reinhard et al., 2001, on tissue pixels only):
    measure them once on the slides a model was trained on, and bring a new slide to the same colours
    before predicting. Tissue pixels are those more saturated than the slide's tissue threshold (the
    Otsu threshold of :func:`detect_tissue`), so pale glass, slide background and blacked-out
    backgrounds do not count. The image is read at 3–6 µm/px (:data:`STAIN_MPP_RANGE`, at most
    :data:`STAIN_MAX_PIXELS` pixels, block-averaged from the pyramid level below), so slides of any
    resolution are measured alike and the whole slide never has to be in memory.

    Parameters
    ----------
    sdata
        SpatialData holding the image, or several: then the statistics of each, averaged with equal
        weight per image (``n_images`` in the result).
    image_key
        Key of the image in ``sdata.images``.

    Returns
    -------
    ``{"lab_mean": [L, a, b], "lab_std": [L, a, b], "n_images": n}``.

    """
    from squall_sd._sdata import check_key
    from squall_sd.pp._tissue import apply_tissue_threshold, coarse_image

    if isinstance(sdata, list | tuple):
        if not sdata:
            raise ValueError("`sdata` is an empty list: pass at least one SpatialData.")
        each = [stain_statistics(s, image_key=image_key) for s in sdata]
        return {
            "lab_mean": np.mean([e["lab_mean"] for e in each], axis=0).tolist(),
            "lab_std": np.mean([e["lab_std"] for e in each], axis=0).tolist(),
            "n_images": len(each),
        }
    check_key(sdata, image_key, "images")
    thr = _slide_threshold(sdata, image_key)
    rgb, _, _ = coarse_image(sdata, image_key, mpp_range=STAIN_MPP_RANGE, max_pixels=STAIN_MAX_PIXELS)
    tissue = apply_tissue_threshold(np.moveaxis(rgb, -1, 0), thr)
    if tissue.sum() < MIN_STAIN_PIXELS:
        raise ValueError(
            f"Image {image_key!r} has only {int(tissue.sum())} tissue pixels at 3-6 µm/px: too few for colour "
            "statistics. Check that it is an H&E image with tissue."
        )
    lab = color.rgb2lab(rgb[tissue][:, None, :].astype(np.float64)).reshape(-1, 3)
    return {"lab_mean": lab.mean(0).tolist(), "lab_std": lab.std(0).tolist(), "n_images": 1}


def _check_stats(stats: Any, name: str) -> tuple[np.ndarray, np.ndarray]:
    try:
        mu = np.asarray(stats["lab_mean"], dtype=np.float64).reshape(3)
        sd = np.asarray(stats["lab_std"], dtype=np.float64).reshape(3)
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(
            f"`{name}` must be the result of `squall.pp.stain_statistics` (a dict with 'lab_mean' and "
            f"'lab_std', three values each), a SpatialData or a list of them; got {type(stats).__name__}."
        ) from e
    if not (np.isfinite(mu).all() and np.isfinite(sd).all() and (sd > 0).all()):
        raise ValueError(f"`{name}` has non-finite values or a non-positive s.d.: {mu.tolist()}, {sd.tolist()}.")
    return mu, sd


def _reinhard_block(block: np.ndarray, *, src, ref, threshold: float) -> np.ndarray:
    """Map the tissue pixels of a (3, h, w) block from ``src`` to ``ref`` LAB statistics; others as they are."""
    from squall_sd.pp._tissue import apply_tissue_threshold

    hwc = np.moveaxis(block, 0, -1)
    img = _as_float(hwc)
    tissue = apply_tissue_threshold(block, threshold)
    if not tissue.any():
        return block
    lab = color.rgb2lab(img[tissue][:, None, :]).reshape(-1, 3)
    lab = (lab - src[0]) / src[1] * ref[1] + ref[0]
    out = img.copy()
    with warnings.catch_warnings():  # colours mapped out of the sRGB gamut are clipped, as intended
        warnings.filterwarnings("ignore", message="Conversion from CIE-LAB", category=UserWarning)
        out[tissue] = color.lab2rgb(lab[:, None, :]).reshape(-1, 3)
    return _from_float(out, hwc, True)


def _map_image(element: Any, fn: Any) -> Any:
    """Apply ``fn`` lazily to every (3, h, w) chunk of every scale of an image element.

    ``element`` is a DataArray or a multiscale DataTree with dims (c, y, x); the result keeps its
    coordinates, transformations and chunking.
    """
    import dask.array as da
    import xarray as xr

    def one(arr: xr.DataArray) -> xr.DataArray:
        if tuple(arr.dims) != ("c", "y", "x") or arr.sizes["c"] != 3:
            raise ValueError(f"Expected an RGB image with dims (c, y, x) and 3 channels, got {dict(arr.sizes)}.")
        data = arr.data if isinstance(arr.data, da.Array) else da.from_array(np.asarray(arr.data))
        data = data.rechunk({0: -1})
        return arr.copy(data=data.map_blocks(fn, dtype=data.dtype))

    if isinstance(element, xr.DataArray):
        return one(element)
    scales = {}
    for name, node in element.children.items():
        ds = node.to_dataset()
        var = next(iter(ds.data_vars))
        scales[name] = ds.assign({var: one(ds[var])})
    return xr.DataTree.from_dict(scales)


def match_stain(
    sdata: SpatialData,
    reference: Any,
    *,
    image_key: str = "he",
    key_added: str | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Bring the colours of an H&E image to those of reference slides (Reinhard colour transfer on tissue).

    Every tissue pixel's CIELAB value is shifted and scaled so that the image's tissue statistics
    (:func:`stain_statistics`) become the reference's; pixels below the slide's tissue threshold
    (background, glass, black) are left as they are, and colours pushed out of the sRGB gamut are
    clipped. The result is a new image element, computed lazily chunk by chunk (dask) at every scale of
    the pyramid, with the original's coordinates and transformations: pass ``image_key=key_added`` to
    :func:`~squall_sd.tl.predict_expression`, :func:`~squall_sd.tl.embed` or
    :func:`~squall_sd.pp.extract_patches`. The original image is never changed. Nothing is written to
    a backed store: save the element with ``sdata.write_element(key_added)`` if you want it on disk.

    Use it when a slide was stained or scanned differently from the slides a model was trained on:
    the statistics of the training slides are the reference. On her2st the cross-patient benchmark
    measures its effect (``docs/benchmarks/her2st_expression.md``).

    Parameters
    ----------
    sdata
        SpatialData holding the image.
    reference
        The colours to match: the result of :func:`stain_statistics`, or a SpatialData (or a list of
        them) to measure it on (their ``image_key`` images).
    image_key
        Key of the image in ``sdata.images``.
    key_added
        Key of the new image (default ``f"{image_key}_stain_matched"``).
    overwrite
        Replace an existing ``key_added`` image.

    Returns
    -------
    ``{"image_key": key_added, "source": ..., "reference": ...}`` with both statistics. The same
    record is stored in ``sdata.attrs["squall"]["stain_matching"][key_added]``.

    """
    from squall_sd._sdata import check_key

    element = check_key(sdata, image_key, "images")
    key = key_added or f"{image_key}_stain_matched"
    if key == image_key:
        raise ValueError("`key_added` must differ from `image_key`: the original image is never replaced.")
    if key in sdata.images and not overwrite:
        raise ValueError(
            f"`key_added={key!r}` already exists in `sdata.images`. Pass `overwrite=True` to replace it, "
            "or choose another `key_added`."
        )
    if isinstance(reference, SpatialData) or (
        isinstance(reference, list | tuple) and reference and isinstance(reference[0], SpatialData)
    ):
        reference = stain_statistics(reference, image_key=image_key)
    ref = _check_stats(reference, "reference")
    source = stain_statistics(sdata, image_key=image_key)
    src = _check_stats(source, "source")
    fn = functools.partial(_reinhard_block, src=src, ref=ref, threshold=_slide_threshold(sdata, image_key))
    sdata.images[key] = _map_image(element, fn)
    record = {"image_key": key, "source": source, "reference": {k: reference[k] for k in ("lab_mean", "lab_std")}}
    sdata.attrs.setdefault("squall", {}).setdefault("stain_matching", {})[key] = {
        "from": image_key,
        "source": record["source"],
        "reference": record["reference"],
    }
    logger.info(
        "match_stain: `sdata.images[%r]` = %r with its tissue's LAB mean %s / s.d. %s mapped to %s / %s",
        key,
        image_key,
        np.round(src[0], 1).tolist(),
        np.round(src[1], 1).tolist(),
        np.round(ref[0], 1).tolist(),
        np.round(ref[1], 1).tolist(),
    )
    return record
