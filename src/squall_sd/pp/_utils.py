"""Helpers of :mod:`squall_sd.pp`: element lookup, pyramid levels, transformations, writes."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import dask.array as da
import numpy as np
import pandas as pd
from spatialdata import SpatialData
from spatialdata.transformations import (
    Affine,
    BaseTransformation,
    Identity,
    get_transformation,
)
from xarray import DataArray, DataTree

from squall_sd._constants import MICRONS
from squall_sd._logging import logger

_NOUN = {
    "images": "Image",
    "shapes": "Shapes",
    "tables": "Table",
    "labels": "Labels",
    "points": "Points",
}


def check_key(sdata: SpatialData, key: str, kind: str) -> Any:
    """Return ``sdata.<kind>[key]`` or raise a :class:`KeyError` that lists the available keys."""
    container = getattr(sdata, kind)
    if key not in container:
        hint = ""
        if kind == "shapes" and str(key).endswith("_tissue"):
            img = str(key)[: -len("_tissue")]
            hint = f" Run `squall.pp.detect_tissue(sdata, image_key={img!r})` first."
        raise KeyError(
            f"{_NOUN.get(kind, kind)} {key!r} not found in `sdata.{kind}`. "
            f"Available: {sorted(container)}.{hint}"
        )
    return container[key]


def check_positive(value: float, name: str) -> float:
    """Return ``value`` as float; raise a :class:`ValueError` when it is not a positive number."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"Expected `{name}` to be a number, found {value!r}.") from None
    if not np.isfinite(v) or v <= 0:
        raise ValueError(f"Expected `{name}` to be positive, found {value!r}.")
    return v


def affine_to_microns(element: Any) -> np.ndarray:
    """Return the 3×3 matrix mapping the element's intrinsic (x, y) to ``microns`` (x, y)."""
    try:
        t = get_transformation(element, to_coordinate_system=MICRONS)
    except (KeyError, ValueError):
        t = None
    if t is None:
        try:
            available = list(get_transformation(element, get_all=True))
        except Exception:  # noqa: BLE001 - only used for the message
            available = []
        raise ValueError(
            f"The element has no transformation to the {MICRONS!r} coordinate system "
            f"(it has: {available}). Read the data with a `squall.io` reader, or add one with "
            "`spatialdata.transformations.set_transformation(element, Scale([mpp, mpp], "
            f"axes=('y', 'x')), to_coordinate_system={MICRONS!r})`."
        )
    m = np.asarray(t.to_affine_matrix(input_axes=("x", "y"), output_axes=("x", "y")), dtype=float)
    if abs(np.linalg.det(m[:2, :2])) < 1e-12:
        raise ValueError(f"The transformation to {MICRONS!r} is singular: {m.tolist()}.")
    return m


def affine_mpp(m: np.ndarray) -> float:
    """Return the (geometric mean) µm per pixel of a pixel → microns affine matrix."""
    return float(np.sqrt(abs(np.linalg.det(np.asarray(m)[:2, :2]))))


def is_axis_aligned(m: np.ndarray, tol: float = 1e-9) -> bool:
    """Return whether a 3×3 affine only scales (or flips) and translates x and y separately."""
    m = np.asarray(m)
    scale = max(abs(m[0, 0]), abs(m[1, 1]), 1e-300)
    return abs(m[0, 1]) <= tol * scale and abs(m[1, 0]) <= tol * scale


@dataclass(frozen=True)
class Level:
    """One pyramid level of an image element.

    Attributes
    ----------
    name
        Level name (``"scale0"``, ``"scale1"``, ...; ``"scale0"`` for a single-scale image).
    data
        The lazy (c, y, x) dask array of the level.
    affine
        3×3 matrix mapping the level's intrinsic (x, y) (pixel ``i`` covers ``[i, i + 1)``) to
        ``microns``.
    mpp
        µm per pixel of the level (geometric mean of the x and y pixel sizes).

    """

    name: str
    data: da.Array
    affine: np.ndarray
    mpp: float

    @property
    def shape_yx(self) -> tuple[int, int]:
        """Height and width of the level (pixels)."""
        return int(self.data.shape[-2]), int(self.data.shape[-1])


def image_levels(sdata: SpatialData, image_key: str) -> list[Level]:
    """Return the pyramid levels of ``sdata.images[image_key]``, finest first."""
    element = check_key(sdata, image_key, "images")
    levels: list[Level] = []
    if isinstance(element, DataTree):
        for name in sorted(element.children, key=lambda n: int(str(n).replace("scale", "") or 0)):
            node = element[name]
            arr = next(iter(node.data_vars.values()))
            m = affine_to_microns(arr)
            levels.append(Level(str(name), _as_dask(arr), m, affine_mpp(m)))
    elif isinstance(element, DataArray):
        m = affine_to_microns(element)
        levels.append(Level("scale0", _as_dask(element), m, affine_mpp(m)))
    else:  # pragma: no cover - spatialdata only stores the two kinds
        raise TypeError(f"Unsupported image element type {type(element).__name__}.")
    if not levels:
        raise ValueError(f"Image {image_key!r} has no pyramid levels.")
    data = levels[0].data
    if data.ndim != 3 or data.shape[0] not in (3, 4):
        raise ValueError(
            f"Image {image_key!r} must be an RGB (c, y, x) image with 3 channels, got shape "
            f"{tuple(data.shape)}."
        )
    return levels


def _as_dask(arr: DataArray) -> da.Array:
    data = arr.data
    if not isinstance(data, da.Array):
        data = da.from_array(np.asarray(data), chunks=(data.shape[0], 1024, 1024))
    return data


def pyramid_levels(sdata: SpatialData, *, image_key: str = "he") -> pd.DataFrame:
    """Return the pyramid levels of an image and their µm per pixel.

    Parameters
    ----------
    sdata
        SpatialData holding the image.
    image_key
        Key of the image in ``sdata.images``.

    Returns
    -------
    One row per level (index: level name, finest first) with columns ``height_px``, ``width_px``
    (level size in pixels), ``mpp`` (µm per pixel of the level, from its transformation to
    ``microns``) and ``downsample`` (level µm/px divided by full-resolution µm/px).

    """
    levels = image_levels(sdata, image_key)
    base = levels[0].mpp
    rows = [
        {
            "height_px": lv.shape_yx[0],
            "width_px": lv.shape_yx[1],
            "mpp": lv.mpp,
            "downsample": lv.mpp / base,
        }
        for lv in levels
    ]
    return pd.DataFrame(rows, index=pd.Index([lv.name for lv in levels], name="level"))


def pick_level(levels: Sequence[Level], mpp: float, scale: str | int | None = None) -> Level:
    """Pick the level to read at ``mpp`` µm/px.

    ``scale=None``/``"auto"`` takes the coarsest level whose µm/px is at most ``mpp`` (1 % slack);
    when even the full resolution is coarser than ``mpp``, the full resolution is used (and
    up-sampled). A level name (``"scale2"``) or index selects that level.
    """
    if scale is None or scale == "auto":
        ok = [lv for lv in levels if lv.mpp <= mpp * 1.01]
        return ok[-1] if ok else levels[0]
    if isinstance(scale, (int, np.integer)):
        if not 0 <= int(scale) < len(levels):
            raise ValueError(
                f"`scale={scale}` is out of range: the image has {len(levels)} levels."
            )
        return levels[int(scale)]
    for lv in levels:
        if lv.name == scale:
            return lv
    raise ValueError(
        f"`scale={scale!r}` is not a level of the image. Available: {[lv.name for lv in levels]} "
        "or 'auto'."
    )


def microns_transformations(
    sdata: SpatialData, image_key: str | None
) -> dict[str, BaseTransformation]:
    """Return the transformations of a new element whose intrinsic coordinates are microns.

    Always ``{"microns": Identity()}``; when the image ``image_key`` is registered in further
    coordinate systems, the element gets a transformation to each of them as well (microns → image
    pixels → that system), so that it overlays the image everywhere.
    """
    out: dict[str, BaseTransformation] = {MICRONS: Identity()}
    if image_key is None or image_key not in sdata.images:
        return out
    element = sdata.images[image_key]
    try:
        all_t = get_transformation(element, get_all=True)
        to_um = np.asarray(
            all_t[MICRONS].to_affine_matrix(input_axes=("x", "y"), output_axes=("x", "y"))
        )
        inv = np.linalg.inv(to_um)
    except Exception:  # noqa: BLE001 - extra systems are a convenience only
        return out
    for cs, t in all_t.items():
        if cs == MICRONS:
            continue
        m = np.asarray(t.to_affine_matrix(input_axes=("x", "y"), output_axes=("x", "y"))) @ inv
        out[cs] = Affine(m, input_axes=("x", "y"), output_axes=("x", "y"))
    return out


def store_shapes(sdata: SpatialData, key: str, gdf: Any, *, overwrite: bool) -> None:
    """Put a shapes element into ``sdata`` (and write it to disk when ``sdata`` is backed)."""
    exists = key in sdata.shapes
    if exists and not overwrite:
        raise ValueError(
            f"`key_added={key!r}` already exists in `sdata.shapes`. Pass `overwrite=True` to "
            "replace it, or choose another `key_added`."
        )
    sdata.shapes[key] = gdf
    logger.info("Adding `sdata.shapes[%r]` (%d shapes)", key, len(gdf))
    backed = False
    try:
        backed = bool(sdata.is_backed()) and sdata.path is not None
    except Exception:  # noqa: BLE001
        backed = False
    if backed:
        try:
            if exists and key in _elements_on_disk(sdata):
                # spatialdata refuses to overwrite an element of the store it is backed by
                sdata.delete_element_from_disk(key)
            sdata.write_element(key)
            logger.info("wrote `shapes/%s` to %s", key, sdata.path)
        except Exception as e:  # noqa: BLE001 - the in-memory result is still valid
            logger.warning(
                "Could not write `shapes/%s` to %s (%s); it is in memory only. Write it with "
                "`sdata.write_element(%r)`.",
                key,
                sdata.path,
                e,
                key,
            )


def _elements_on_disk(sdata: SpatialData) -> list[str]:
    try:
        return [str(e).split("/")[-1] for e in sdata.elements_paths_on_disk()]
    except Exception:  # noqa: BLE001
        return []


def centers_from(sdata: SpatialData | None, centers: Any) -> np.ndarray:
    """Return (n, 2) centres (x, y) in microns from an array, a shapes key or a GeoDataFrame.

    A shapes element (given by key or as a GeoDataFrame with a transformation to ``microns``)
    contributes the centroids of its geometries, transformed to microns.
    """
    import geopandas as gpd

    if isinstance(centers, str):
        if sdata is None:
            raise TypeError("A shapes key as centres needs `sdata`.")
        centers = check_key(sdata, centers, "shapes")
    if isinstance(centers, gpd.GeoDataFrame):
        m = affine_to_microns(centers)
        c = centers.geometry.centroid
        xy = np.column_stack([c.x.to_numpy(), c.y.to_numpy()])
        return apply_affine(m, xy)
    arr = np.asarray(centers, dtype=float)
    if arr.ndim == 1 and arr.shape[0] == 2:
        arr = arr[None, :]
    if arr.ndim != 2 or arr.shape[1] != 2:
        raise ValueError(
            f"`centers_um` must be an (n, 2) array of x, y in microns; got shape {arr.shape}."
        )
    if not np.all(np.isfinite(arr)):
        raise ValueError("`centers_um` contains NaN or infinite values.")
    return arr


def apply_affine(m: np.ndarray, xy: np.ndarray) -> np.ndarray:
    """Apply a 3×3 affine to (n, 2) points (x, y)."""
    xy = np.asarray(xy, dtype=float)
    return xy @ m[:2, :2].T + m[:2, 2]
