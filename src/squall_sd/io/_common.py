"""Building blocks shared by every reader: paths, images, shapes, tables, attrs and safe writes."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import anndata as ad
import dask.array as da
import numpy as np
import pandas as pd
from spatialdata import SpatialData
from spatialdata.models import Image2DModel, ShapesModel, TableModel
from spatialdata.transformations import BaseTransformation

from squall_sd._constants import ATTRS_KEY, IMAGE_KEY, MICRONS, TABLE_KEY
from squall_sd._sdata import write_sdata

#: Region / instance columns of every table a squall reader writes.
REGION_KEY = "region"
INSTANCE_KEY = "instance_id"
#: Chunk edge (pixels) of image elements built by the readers.
IMAGE_CHUNK = 1024
#: The pyramid stops once its coarsest level is smaller than this (pixels, longest side).
PYRAMID_MIN_SIZE = 1024


def pyramid_scale_factors(shape_yx: Sequence[int], *, min_size: int = PYRAMID_MIN_SIZE) -> list[int]:
    """Return factor-2 scale factors until the longest side falls below ``min_size`` pixels."""
    factors: list[int] = []
    size = max(int(s) for s in shape_yx)
    while size > min_size and len(factors) < 8:
        factors.append(2)
        size //= 2
    return factors


def to_cyx(arr: np.ndarray | da.Array) -> da.Array:
    """Return an RGB(A) image of shape (y, x, c), (c, y, x) or (y, x) as a 3-channel (c, y, x) dask array."""
    if not isinstance(arr, da.Array):
        arr = da.from_array(np.asarray(arr), chunks=IMAGE_CHUNK)
    if arr.ndim == 2:
        arr = da.stack([arr, arr, arr], axis=0)
    elif arr.ndim == 3:
        if arr.shape[-1] in (3, 4) and arr.shape[0] not in (3, 4):
            arr = da.moveaxis(arr, -1, 0)
        if arr.shape[0] == 4:  # drop alpha
            arr = arr[:3]
        if arr.shape[0] != 3:
            raise ValueError(f"Expected an RGB image, got an array of shape {arr.shape}.")
    else:
        raise ValueError(f"Expected a 2D or 3D image array, got shape {arr.shape}.")
    return arr


def image_element(
    arr: np.ndarray | da.Array,
    transformations: Mapping[str, BaseTransformation],
    *,
    scale_factors: Sequence[int] | None = None,
    chunks: int = IMAGE_CHUNK,
):
    """Build a multiscale RGB :class:`~spatialdata.models.Image2DModel` element from a (lazy) array.

    Parameters
    ----------
    arr
        Image array, (y, x, c), (c, y, x) or (y, x). A dask array stays lazy.
    transformations
        Mapping from coordinate-system name to the transformation of the full-resolution pixel grid.
    scale_factors
        Pyramid scale factors; by default factor-2 levels down to ~1024 px (at least one level, so that the
        element is always multiscale).
    chunks
        Chunk edge in pixels.
    """
    cyx = to_cyx(arr)
    if scale_factors is None:
        scale_factors = pyramid_scale_factors(cyx.shape[1:])
    if not scale_factors and min(cyx.shape[1:]) >= 2:
        scale_factors = [2]  # always multiscale (a DataTree), even for small images
    cyx = cyx.rechunk((3, chunks, chunks))
    return Image2DModel.parse(
        cyx,
        dims=("c", "y", "x"),
        c_coords=["r", "g", "b"],
        transformations=dict(transformations),
        scale_factors=list(scale_factors) or None,
        chunks=(3, chunks, chunks),
    )


def circles_element(
    centers: np.ndarray,
    radius: float | np.ndarray,
    transformations: Mapping[str, BaseTransformation],
    *,
    index: Sequence | None = None,
):
    """Build a circles :class:`~spatialdata.models.ShapesModel` element.

    ``centers`` are (x, y) in the intrinsic units of the element (pixels of the image the
    transformations map, or microns with an :class:`~spatialdata.transformations.Identity`), and
    ``radius`` is in the same units.
    """
    centers = np.asarray(centers, dtype=float)
    if centers.ndim != 2 or centers.shape[1] != 2:
        raise ValueError(f"Spot centres must be an (n, 2) array of x, y; got shape {centers.shape}.")
    radius_arr = np.broadcast_to(np.asarray(radius, dtype=float), (len(centers),)).copy()
    kwargs: dict[str, Any] = {"geometry": 0, "radius": radius_arr, "transformations": dict(transformations)}
    if index is not None:
        kwargs["index"] = np.asarray(index)
    gdf = ShapesModel.parse(centers, **kwargs)
    return gdf


def table_element(
    adata: ad.AnnData,
    region: str,
    *,
    instance_ids: Sequence | np.ndarray | None = None,
) -> ad.AnnData:
    """Annotate ``adata`` as a SpatialData table of the shapes element ``region``.

    ``instance_ids`` are the index values of the shapes element for each observation (default:
    ``0 .. n_obs-1``, i.e. row *i* of the table annotates shape *i*).
    """
    adata.obs[REGION_KEY] = pd.Categorical([region] * adata.n_obs)
    adata.obs[INSTANCE_KEY] = np.arange(adata.n_obs) if instance_ids is None else np.asarray(instance_ids)
    return TableModel.parse(adata, region=region, region_key=REGION_KEY, instance_key=INSTANCE_KEY)


def set_attrs(sdata: SpatialData, *, mpp: float | None, technology: str, **extra: Any) -> SpatialData:
    """Record squall metadata in ``sdata.attrs["squall"]``.

    ``mpp`` is the µm per pixel of the full-resolution H&E (``None`` when there is no H&E).
    """
    meta = dict(sdata.attrs.get(ATTRS_KEY, {}))
    meta.update(
        {
            "mpp": None if mpp is None else float(mpp),
            "image_key": IMAGE_KEY if mpp is not None else None,
            "coordinate_system": MICRONS,
            "technology": technology,
        }
    )
    meta.update({k: v for k, v in extra.items()})
    sdata.attrs[ATTRS_KEY] = meta
    return sdata


def write(sdata: SpatialData, path: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Write ``sdata`` to a zarr store so that a failure never leaves a half-written store behind.

    The store is written next to ``path`` under a temporary name and moved into place only when the
    write has finished; an existing store at ``path`` is replaced only with ``overwrite=True``, and
    only after the new one is complete.

    Parameters
    ----------
    sdata
        The SpatialData to write.
    path
        Target ``.zarr`` folder.
    overwrite
        Replace an existing store at ``path``.

    Returns
    -------
    The path of the written store.
    """
    return write_sdata(sdata, path, overwrite=overwrite)


def make_sdata(
    *,
    image=None,
    shapes: Mapping[str, Any] | None = None,
    table: ad.AnnData | None = None,
    points: Mapping[str, Any] | None = None,
    images: Mapping[str, Any] | None = None,
    table_key: str = TABLE_KEY,
    image_key: str = IMAGE_KEY,
) -> SpatialData:
    """Assemble a SpatialData from elements built by the helpers above."""
    imgs = dict(images or {})
    if image is not None:
        imgs[image_key] = image
    return SpatialData(
        images=imgs,
        shapes=dict(shapes or {}),
        points=dict(points or {}),
        tables={table_key: table} if table is not None else {},
    )
