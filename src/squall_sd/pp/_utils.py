"""Helpers of :mod:`squall_sd.pp`: the pyramid table, centres in microns, shapes writes.

Key checks, µm per pixel, pyramid levels and transformations live in :mod:`squall_sd._sdata`.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
from spatialdata import SpatialData

from squall_sd._logging import logger
from squall_sd._sdata import (
    affine_to_microns,
    apply_affine,
    check_key,
    image_levels,
)


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
