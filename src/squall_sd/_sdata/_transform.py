"""Coordinate transformations: every element squall reads or writes is registered in ``microns``.

Matrices are 3×3 affines acting on (x, y) points, as returned by
:meth:`spatialdata.transformations.BaseTransformation.to_affine_matrix`.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from spatialdata import SpatialData
from spatialdata.transformations import Affine, BaseTransformation, Identity, Scale, get_transformation

from squall_sd._constants import MICRONS
from squall_sd._sdata._validate import validate_mpp

__all__ = [
    "affine_to_microns",
    "apply_affine",
    "identity",
    "is_axis_aligned",
    "microns_scale",
    "microns_transformations",
]


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


def apply_affine(m: np.ndarray, xy: np.ndarray) -> np.ndarray:
    """Apply a 3×3 affine to (n, 2) points (x, y)."""
    xy = np.asarray(xy, dtype=float)
    return xy @ m[:2, :2].T + m[:2, 2]


def is_axis_aligned(m: np.ndarray, tol: float = 1e-9) -> bool:
    """Return whether a 3×3 affine only scales (or flips) and translates x and y separately."""
    m = np.asarray(m)
    scale = max(abs(m[0, 0]), abs(m[1, 1]), 1e-300)
    return abs(m[0, 1]) <= tol * scale and abs(m[1, 0]) <= tol * scale


def microns_scale(mpp: float) -> Scale:
    """Return the pixel → ``microns`` transformation of an image with ``mpp`` µm per pixel."""
    mpp = validate_mpp(mpp)
    return Scale([mpp, mpp], axes=("y", "x"))


def identity() -> Identity:
    """Return an identity transformation (for elements already in microns)."""
    return Identity()


def microns_transformations(sdata: SpatialData, image_key: str | None) -> dict[str, BaseTransformation]:
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
        to_um = np.asarray(all_t[MICRONS].to_affine_matrix(input_axes=("x", "y"), output_axes=("x", "y")))
        inv = np.linalg.inv(to_um)
    except Exception:  # noqa: BLE001 - extra systems are a convenience only
        return out
    for cs, t in all_t.items():
        if cs == MICRONS:
            continue
        m = np.asarray(t.to_affine_matrix(input_axes=("x", "y"), output_axes=("x", "y"))) @ inv
        out[cs] = Affine(m, input_axes=("x", "y"), output_axes=("x", "y"))
    return out
