"""µm per pixel of images: one formula (:func:`affine_mpp`), pyramid levels and level choice.

Every µm/px squall computes from a transformation goes through :func:`affine_mpp` (the geometric
mean of the x and y pixel sizes, ``sqrt(|det|)`` of the linear part of the pixel → ``microns``
affine). :func:`image_mpp` is the µm/px of an image element (its finest level) and
:func:`get_mpp` the one recorded by a squall reader, falling back to :func:`image_mpp`'s formula.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import dask.array as da
import numpy as np
from spatialdata import SpatialData
from spatialdata.transformations import get_transformation
from xarray import DataArray, DataTree

from squall_sd._constants import ATTRS_KEY, IMAGE_KEY, MICRONS
from squall_sd._sdata._transform import affine_to_microns
from squall_sd._sdata._validate import check_key

__all__ = ["Level", "affine_mpp", "get_mpp", "image_levels", "image_mpp", "pick_level"]


def affine_mpp(m: np.ndarray) -> float:
    """Return the (geometric mean) µm per pixel of a pixel → microns affine matrix."""
    return float(np.sqrt(abs(np.linalg.det(np.asarray(m)[:2, :2]))))


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
            f"Image {image_key!r} must be an RGB (c, y, x) image with 3 channels, got shape {tuple(data.shape)}."
        )
    return levels


def _as_dask(arr: DataArray) -> da.Array:
    data = arr.data
    if not isinstance(data, da.Array):
        data = da.from_array(np.asarray(data), chunks=(data.shape[0], 1024, 1024))
    return data


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
            raise ValueError(f"`scale={scale}` is out of range: the image has {len(levels)} levels.")
        return levels[int(scale)]
    for lv in levels:
        if lv.name == scale:
            return lv
    raise ValueError(
        f"`scale={scale!r}` is not a level of the image. Available: {[lv.name for lv in levels]} or 'auto'."
    )


def image_mpp(sdata: SpatialData, image_key: str) -> float:
    """Return the µm per pixel of the full-resolution RGB image, or raise if it is not registered in microns.

    Parameters
    ----------
    sdata
        The SpatialData.
    image_key
        The image (a key of ``sdata.images``).

    Returns
    -------
    µm per pixel of the finest pyramid level.
    """
    element = sdata.images[image_key]
    systems = list(get_transformation(element, get_all=True) or {})
    if MICRONS not in systems:
        raise ValueError(
            f"Image {image_key!r} has no µm per pixel: it is not registered in the {MICRONS!r} coordinate "
            f"system (it has {systems}). Read it with a `squall.io` reader (e.g. `squall.io.he(path, "
            "mpp=0.5)`), or add `spatialdata.transformations.set_transformation(sdata.images["
            f"{image_key!r}], Scale([mpp, mpp], axes=('y', 'x')), to_coordinate_system={MICRONS!r})`."
        )
    return float(image_levels(sdata, image_key)[0].mpp)


def get_mpp(sdata: SpatialData, image_key: str = IMAGE_KEY) -> float:
    """Return the µm per pixel of the full-resolution ``image_key`` recorded by a squall reader.

    Falls back to the scale of the image's ``microns`` transformation (:func:`affine_mpp`).

    Parameters
    ----------
    sdata
        SpatialData read by a :mod:`squall_sd.io` reader, or any with the image in ``microns``.
    image_key
        The H&E image in ``sdata.images``.

    Returns
    -------
    Micrometres per pixel of the image's full-resolution level.
    """
    meta = sdata.attrs.get(ATTRS_KEY, {})
    if meta.get("mpp") is not None and meta.get("image_key", IMAGE_KEY) == image_key:
        return float(meta["mpp"])
    if image_key not in sdata.images:
        raise KeyError(f"Image {image_key!r} not found in sdata.images. Available: {list(sdata.images)}.")
    t = get_transformation(sdata.images[image_key], to_coordinate_system=MICRONS)
    return affine_mpp(t.to_affine_matrix(input_axes=("x", "y"), output_axes=("x", "y")))
