"""Tissue detection on a coarse pyramid level of an H&E image."""

from __future__ import annotations

from typing import Literal

import dask.array as da
import geopandas as gpd
import numpy as np
import shapely
from scipy import ndimage
from skimage import color, filters, measure, morphology
from spatialdata import SpatialData
from spatialdata.models import ShapesModel

from squall_sd._logging import logger
from squall_sd.pp._utils import (
    Level,
    apply_affine,
    check_positive,
    image_levels,
    microns_transformations,
    pick_level,
    store_shapes,
)

#: The working resolution of tissue detection is chosen in this range (µm per pixel).
WORKING_MPP_RANGE = (8.0, 16.0)
#: Floor of the saturation threshold: empty glass (even tinted) stays below it, H&E tissue above.
MIN_SATURATION = 0.09


def coarse_image(
    sdata: SpatialData,
    image_key: str,
    *,
    scale: str | int | None = None,
    mpp_range: tuple[float, float] = WORKING_MPP_RANGE,
) -> tuple[np.ndarray, np.ndarray, Level]:
    """Return a coarse copy of an image for whole-slide statistics.

    The coarsest pyramid level at most ``mpp_range[1]`` µm/px is taken (or ``scale``), and when
    it is finer than ``mpp_range[0]`` it is block-averaged lazily (dask) by an integer factor to
    reach that range, so the full resolution never has to fit in memory.

    Returns
    -------
    ``(rgb, affine, level)``: ``rgb`` a float32 (h, w, 3) array in [0, 1]; ``affine`` the 3×3
    matrix mapping its intrinsic (x, y) (pixel ``k`` covers ``[k, k + 1)``) to ``microns``; the
    level it was computed from.

    """
    levels = image_levels(sdata, image_key)
    if scale is None or scale == "auto":
        level = pick_level(levels, mpp_range[1], "auto")
    else:
        level = pick_level(levels, mpp_range[1], scale)
    f = 1
    if (scale is None or scale == "auto") and level.mpp < mpp_range[0]:
        f = int(np.ceil(mpp_range[0] / level.mpp))
    data = level.data[:3]
    if f > 1:
        h, w = level.shape_yx
        if h < f or w < f:
            f = max(1, min(h, w))
        step = f * max(1, int(np.ceil(1024 / f)))
        data = data.rechunk((3, step, step))
        data = da.coarsen(np.mean, data.astype(np.float32), {1: f, 2: f}, trim_excess=True)
    rgb = np.asarray(data.compute(), dtype=np.float32)
    if level.data.dtype == np.uint8 or rgb.max() > 1.0:
        rgb = rgb / 255.0
    rgb = np.clip(np.moveaxis(rgb, 0, -1), 0.0, 1.0)
    affine = level.affine @ np.diag([f, f, 1.0])
    logger.debug(
        "coarse image of %r: level %s (%.3g µm/px) / %d -> %s at %.3g µm/px",
        image_key,
        level.name,
        level.mpp,
        f,
        rgb.shape[:2],
        level.mpp * f,
    )
    return rgb, affine, level


def tissue_mask(
    rgb: np.ndarray,
    *,
    method: Literal["saturation", "greyscale"] = "saturation",
) -> np.ndarray:
    """Return a raw Otsu tissue mask of an (h, w, 3) RGB image in [0, 1] (no cleanup).

    ``"saturation"`` keeps pixels more saturated than the Otsu threshold of the HSV saturation;
    ``"greyscale"`` keeps pixels darker than the Otsu threshold of the grey values. Near-black
    pixels (value < 0.1, e.g. blacked-out backgrounds or scanner borders) are never tissue, and
    nearly uniform images give an empty mask. The saturation threshold is at least
    :data:`MIN_SATURATION`, so a slide region without tissue gives an empty mask.
    """
    hsv = color.rgb2hsv(rgb)
    value = hsv[..., 2]
    valid = value > 0.1
    if valid.sum() < 16:
        return np.zeros(rgb.shape[:2], dtype=bool)
    if method == "saturation":
        feat = hsv[..., 1]
        vals = feat[valid]
        if np.percentile(vals, 99.5) - np.percentile(vals, 0.5) < 0.05:
            return np.zeros(rgb.shape[:2], dtype=bool)
        thr = max(float(filters.threshold_otsu(vals)), MIN_SATURATION)
        mask = feat > thr
    elif method == "greyscale":
        feat = color.rgb2gray(rgb)
        vals = feat[valid]
        if np.percentile(vals, 99.5) - np.percentile(vals, 0.5) < 0.05:
            return np.zeros(rgb.shape[:2], dtype=bool)
        thr = min(float(filters.threshold_otsu(vals)), 0.95)
        mask = feat < thr
    else:
        raise ValueError(f"`method` must be 'saturation' or 'greyscale', got {method!r}.")
    return mask & valid


def detect_tissue(
    sdata: SpatialData,
    *,
    image_key: str = "he",
    scale: str | int | None = None,
    method: Literal["saturation", "greyscale"] = "saturation",
    min_area_um2: float = 10_000.0,
    max_hole_area_um2: float | None = None,
    key_added: str | None = None,
    overwrite: bool = False,
    inplace: bool = True,
) -> gpd.GeoDataFrame | None:
    """Detect tissue in an H&E image and store it as polygons in microns.

    The image is read at a coarse resolution (the coarsest pyramid level at most 16 µm/px, block
    averaged to at least 8 µm/px), thresholded with Otsu's method on the HSV saturation (or on the
    grey value), cleaned with a morphological closing and opening, its holes are filled and pieces
    smaller than ``min_area_um2`` are dropped. Each remaining piece becomes one polygon.

    Parameters
    ----------
    sdata
        SpatialData holding the image.
    image_key
        Key of the H&E image in ``sdata.images``; it needs a transformation to ``microns``.
    scale
        Pyramid level to work on (name such as ``"scale3"`` or index); by default chosen
        automatically as described above.
    method
        ``"saturation"`` (robust to white and black backgrounds) or ``"greyscale"`` (darker than
        Otsu = tissue, as the SQUALL Visium preprocessing).
    min_area_um2
        Tissue pieces smaller than this area (µm²) are dropped.
    max_hole_area_um2
        Holes up to this area (µm²) are filled; ``None`` fills all holes.
    key_added
        Name of the shapes element to write; default ``f"{image_key}_tissue"``.
    overwrite
        Replace an existing element ``key_added``.
    inplace
        Write the element into ``sdata`` (and return ``None``); otherwise return it and leave
        ``sdata`` unchanged.

    Returns
    -------
    With ``inplace=False`` the GeoDataFrame; otherwise ``None`` and

    - ``sdata.shapes[f"{image_key}_tissue" | key_added]`` - polygons in microns (an ``Identity``
      to ``microns``) with columns ``area_um2`` and ``tissue_id``.

    Raises
    ------
    ValueError
        When no tissue is found.

    """
    min_area_um2 = float(min_area_um2)
    if min_area_um2 < 0:
        raise ValueError(f"Expected `min_area_um2` to be >= 0, found {min_area_um2!r}.")
    key = key_added if key_added is not None else f"{image_key}_tissue"
    if inplace and key in sdata.shapes and not overwrite:
        raise ValueError(
            f"`key_added={key!r}` already exists in `sdata.shapes`. Pass `overwrite=True` to "
            "replace it, or choose another `key_added`."
        )
    rgb, affine, _ = coarse_image(sdata, image_key, scale=scale)
    px_um = float(np.sqrt(abs(np.linalg.det(affine[:2, :2]))))  # µm per working pixel
    mask = tissue_mask(rgb, method=method)
    # morphological cleanup at the working resolution (~8-16 µm per pixel)
    mask = _closing(mask, 2)
    mask = ndimage.binary_opening(mask, structure=morphology.disk(1))
    if max_hole_area_um2 is None:
        mask = ndimage.binary_fill_holes(mask)
    else:
        check_positive(max_hole_area_um2, "max_hole_area_um2")
        mask = _fill_small_holes(mask, max(1, int(max_hole_area_um2 / px_um**2)))
    polys = mask_to_polygons(mask, affine, min_area_um2=min_area_um2)
    if not polys:
        raise ValueError(
            f"no tissue detected in image {image_key!r} — check the image, or lower min_area_um2 "
            f"(now {min_area_um2:g} µm²) or try `method='greyscale'`."
        )
    areas = np.array([p.area for p in polys])
    order = np.argsort(-areas)
    gdf = gpd.GeoDataFrame(
        {"tissue_id": np.arange(len(polys)), "area_um2": areas[order]},
        geometry=[polys[i] for i in order],
    )
    gdf = ShapesModel.parse(gdf, transformations=microns_transformations(sdata, image_key))
    logger.info(
        "detect_tissue: %d piece(s), %.3g mm² of tissue in %r",
        len(gdf),
        areas.sum() / 1e6,
        image_key,
    )
    if not inplace:
        return gdf
    store_shapes(sdata, key, gdf, overwrite=overwrite)
    return None


def _closing(mask: np.ndarray, radius_px: int) -> np.ndarray:
    """Binary closing with a disk, padded so that tissue touching the border is not eroded."""
    padded = np.pad(mask, radius_px + 1)
    closed = ndimage.binary_closing(padded, structure=morphology.disk(radius_px))
    r = radius_px + 1
    return closed[r:-r, r:-r]


def _fill_small_holes(mask: np.ndarray, max_px: int) -> np.ndarray:
    """Fill holes of at most ``max_px`` pixels."""
    holes = ndimage.binary_fill_holes(mask) & ~mask
    lab, n = ndimage.label(holes)
    if n == 0:
        return mask
    sizes = np.bincount(lab.ravel())
    small = sizes <= max_px
    small[0] = False
    return mask | small[lab]


def mask_to_polygons(
    mask: np.ndarray, affine: np.ndarray, *, min_area_um2: float = 0.0
) -> list[shapely.Polygon]:
    """Turn a boolean mask into polygons in microns, one per connected piece.

    ``affine`` maps the mask's intrinsic (x, y) (pixel ``k`` covers ``[k, k + 1)``) to microns.
    Pieces smaller than ``min_area_um2`` are dropped.
    """
    px_um = float(np.sqrt(abs(np.linalg.det(affine[:2, :2]))))
    labels = measure.label(mask, connectivity=2)
    out: list[shapely.Polygon] = []
    for region in measure.regionprops(labels):
        if region.area * px_um**2 < min_area_um2:
            continue
        r0, c0, _, _ = region.bbox
        img = np.pad(region.image, 1)
        rings = []
        for contour in measure.find_contours(img.astype(np.float32), 0.5):
            if len(contour) < 4:
                continue
            xy = np.column_stack([contour[:, 1] + c0 - 1 + 0.5, contour[:, 0] + r0 - 1 + 0.5])
            ring = shapely.Polygon(apply_affine(affine, xy))
            if not ring.is_valid:
                ring = shapely.make_valid(ring)
            rings.append(ring)
        if not rings:
            continue
        rings.sort(key=lambda p: -p.area)
        poly = rings[0]
        for hole in rings[1:]:
            poly = poly.difference(hole)
        poly = poly.simplify(px_um * 0.5)
        if poly.is_empty or poly.area < min_area_um2:
            continue
        if isinstance(poly, shapely.MultiPolygon | shapely.GeometryCollection):
            parts = [g for g in poly.geoms if isinstance(g, shapely.Polygon) and not g.is_empty]
            out.extend(p for p in parts if p.area >= min_area_um2)
        else:
            out.append(poly)
    return out
