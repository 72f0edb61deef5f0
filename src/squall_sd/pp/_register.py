"""Registration of capture spots to the tissue of their H&E image."""

from __future__ import annotations

import functools
from typing import Any

import geopandas as gpd
import numpy as np
import shapely
from scipy import signal
from scipy.spatial import cKDTree
from spatialdata import SpatialData

from squall_sd._logging import logger
from squall_sd._sdata import affine_to_microns, apply_affine, check_key, check_positive
from squall_sd.pp._tissue import MAX_WORKING_PIXELS, _closing, _fill_holes, coarse_image, tissue_mask
from squall_sd.pp._utils import centers_from


def register_spots(
    sdata: SpatialData,
    *,
    spots_key: str = "spots",
    image_key: str = "he",
    table_key: str | None = "table",
    max_shift_um: float = 600.0,
    max_scale_change: float = 0.1,
    scale_step: float = 0.01,
    max_rotation_deg: float = 10.0,
    rotation_step_deg: float = 1.0,
    min_rotation_gain: float = 0.01,
    min_gain: float = 0.05,
    inplace: bool = True,
) -> dict[str, Any]:
    """Check that capture spots sit on their tissue, and move them there when they clearly do not.

    Spots that a dataset marks as under the tissue (legacy ST ``selected == 1``, Visium
    ``in_tissue``) should together cover it: the union of their grid cells (squares with the spot
    pitch, the median nearest-neighbour distance, as side) should match the tissue. This measures
    the intersection over union (IoU) of the two on the coarse Otsu tissue mask of
    :func:`~squall_sd.pp.detect_tissue` (8–16 µm/px, closed by half a pitch, holes filled), and
    searches every translation up to ``max_shift_um`` (every shift at once, by FFT
    cross-correlation of the two masks), rotations within ``± max_rotation_deg`` and isotropic scales
    within ``1 ± max_scale_change`` about the spots' centroid for the highest IoU (the scales without
    rotation; then the rotations at scale 1 and the scales at the best rotation, kept when they raise
    the IoU by at least ``min_rotation_gain`` over no rotation).

    A copy of an image that was cropped or padded differently from the one the spot positions were
    measured on is off by a translation; every tile cut around such spots then shows the wrong
    tissue; a copy that was also turned is off by a rotation, which moves the spots far from the
    centre most. When the best placement raises the IoU by at least ``min_gain``, the spots are moved
    (the shapes' positions and the table's ``obsm["spatial"]``), the change is recorded in
    ``sdata.attrs["squall"]["spot_registration"]`` and a warning gives the shift. Otherwise
    nothing changes. A SpatialData backed by a zarr store is changed in memory only; write the
    element with :meth:`~spatialdata.SpatialData.write_element` to keep it.

    Parameters
    ----------
    sdata
        SpatialData with the H&E image and the spots (a shapes element with a transformation to
        ``microns``, as every :mod:`squall_sd.io` reader writes).
    spots_key
        Shapes element of the spots.
    image_key
        The H&E image.
    table_key
        Table whose ``obsm["spatial"]`` (µm) holds the spot centres too and moves with them; ``None``
        to leave tables alone.
    max_shift_um
        Largest translation searched, in µm along each axis.
    max_scale_change
        Scales searched: ``1 - max_scale_change`` to ``1 + max_scale_change``.
    scale_step
        Step of the scale search.
    max_rotation_deg
        Rotations searched, in degrees: ``-max_rotation_deg`` to ``max_rotation_deg`` (0: none).
    rotation_step_deg
        Step of the rotation search.
    min_rotation_gain
        Smallest IoU gain over the best placement without rotation that turns the spots.
    min_gain
        Smallest IoU gain that moves the spots.
    inplace
        Move the spots when the gain is large enough (otherwise only report).

    Returns
    -------
    A dict with ``iou_before`` / ``iou_after`` (IoU of spot cells and tissue), ``on_tissue_before`` /
    ``on_tissue_after`` (share of spot centres on tissue), ``shift_um`` (x, y), ``scale``,
    ``rotation_deg`` (counter-clockwise in the x-right, y-up convention of :func:`shapely.affinity.rotate`;
    clockwise as the image is shown, y down), ``pitch_um`` and ``applied`` (whether the spots were moved).

    """
    check_positive(max_shift_um, "max_shift_um")
    check_positive(scale_step, "scale_step")
    check_positive(rotation_step_deg, "rotation_step_deg")
    if min_rotation_gain < 0:
        raise ValueError(f"`min_rotation_gain` must be >= 0, found {min_rotation_gain!r}.")
    if not 0 <= max_rotation_deg <= 45:
        raise ValueError(f"`max_rotation_deg` must be in [0, 45], found {max_rotation_deg!r}.")
    if not 0 <= max_scale_change < 1:
        raise ValueError(f"`max_scale_change` must be in [0, 1), found {max_scale_change!r}.")
    shapes = check_key(sdata, spots_key, "shapes")
    check_key(sdata, image_key, "images")
    to_um = affine_to_microns(shapes)
    xy_um = centers_from(sdata, spots_key)
    if len(xy_um) < 3:
        raise ValueError(f"`sdata.shapes[{spots_key!r}]` has {len(xy_um)} spots; registration needs at least 3.")
    dist, _ = cKDTree(xy_um).query(xy_um, k=2)
    pitch_um = float(np.median(dist[:, 1]))

    rgb, affine, _ = coarse_image(sdata, image_key, max_pixels=MAX_WORKING_PIXELS)
    px_um = float(np.sqrt(abs(np.linalg.det(affine[:2, :2]))))
    # the Otsu mask keeps the cell-dense tissue; a closing by half a pitch joins it across stroma and
    # fat, so the mask is the tissue the spots were selected under
    tissue = _fill_holes(_closing(tissue_mask(rgb), max(1, int(round(pitch_um / 2 / px_um)))))
    if not tissue.any():
        raise ValueError(f"No tissue found in `sdata.images[{image_key!r}]`: the spots cannot be registered to it.")
    to_px = np.linalg.inv(affine)
    xy_px = apply_affine(to_px, xy_um)
    centre_px = xy_px.mean(0)
    half = pitch_um / px_um / 2
    max_shift = int(np.ceil(max_shift_um / px_um))
    pad = max_shift + int(np.ceil(half * (1 + max_scale_change))) + 2
    canvas = np.pad(tissue, pad).astype(np.float32)
    n_t = float(tissue.sum())

    lin = affine[:2, :2]  # pixels -> µm (linear part)

    def turned(angle: float) -> np.ndarray:
        """Return the spots' offsets from their centre in pixels, turned by ``angle`` degrees in µm space."""
        d = xy_px - centre_px
        if not angle:
            return d
        return d @ (np.linalg.inv(lin) @ _rotation(angle) @ lin).T

    def cells(scale: float, angle: float) -> np.ndarray:
        m = np.zeros(canvas.shape, dtype=np.float32)
        p = centre_px + turned(angle) * scale + pad
        h = half * scale
        x0, x1 = np.round(p[:, 0] - h).astype(int), np.round(p[:, 0] + h).astype(int)
        y0, y1 = np.round(p[:, 1] - h).astype(int), np.round(p[:, 1] + h).astype(int)
        for a, b, e, f in zip(y0, y1, x0, x1, strict=True):
            m[max(a, 0) : max(b, 0), max(e, 0) : max(f, 0)] = 1.0
        return m

    @functools.cache  # the rotation search meets placements of the scale search again (angle 0)
    def iou_map(scale: float, angle: float) -> np.ndarray:
        m = cells(scale, angle)
        # inter[dy, dx] = sum over pixels of cells(y, x) * tissue(y + dy, x + dx)
        full = signal.correlate(canvas, m, mode="full", method="fft")
        zy, zx = m.shape[0] - 1, m.shape[1] - 1
        inter = np.round(full[zy - max_shift : zy + max_shift + 1, zx - max_shift : zx + max_shift + 1])
        return inter / (float(m.sum()) + n_t - inter)

    steps = int(round(max_scale_change / scale_step))
    scales = 1.0 + scale_step * np.arange(-steps, steps + 1)
    n_rot = int(round(max_rotation_deg / rotation_step_deg))
    # nearest to 0 first, so that a tie keeps the smaller rotation
    angles = sorted((rotation_step_deg * np.arange(-n_rot, n_rot + 1)).tolist(), key=lambda a: (abs(a), a))
    best = (-1.0, 1.0, 0, 0, 0.0)
    before = float(iou_map(1.0, 0.0)[max_shift, max_shift])

    def search(candidates: list[tuple[float, float]]) -> None:
        nonlocal best
        for s, a in candidates:
            iou = iou_map(s, a)
            k = int(np.argmax(iou))
            dy, dx = divmod(k, iou.shape[1])
            if iou.flat[k] > best[0] + 1e-9:
                best = (float(iou.flat[k]), s, dx - max_shift, dy - max_shift, a)

    search([(float(s), 0.0) for s in scales])  # no rotation
    if n_rot:
        # rotations at scale 1, then the scales at the best one; kept only when clearly better than none
        # (the coarse IoU is flat within a degree or two of the best placement)
        flat, best = best, (-1.0, 1.0, 0, 0, 0.0)
        search([(1.0, float(a)) for a in angles])
        search([(float(s), best[4]) for s in scales])
        if best[0] < flat[0] + min_rotation_gain:
            best = flat
    after, scale, dx, dy, angle = best
    shift_um = lin @ np.array([dx, dy], dtype=float)
    centre_um = xy_um.mean(0)
    rot = _rotation(angle)

    def move(points_um: np.ndarray) -> np.ndarray:
        d = points_um - centre_um
        if angle:
            d = d @ rot.T
        return centre_um + d * scale + shift_um

    def on_tissue(points_um: np.ndarray) -> float:
        p = np.floor(apply_affine(to_px, points_um)).astype(int)
        ok = (p[:, 0] >= 0) & (p[:, 1] >= 0) & (p[:, 0] < tissue.shape[1]) & (p[:, 1] < tissue.shape[0])
        hit = np.zeros(len(p), dtype=bool)
        hit[ok] = tissue[p[ok, 1], p[ok, 0]]
        return float(hit.mean())

    moves = after - before >= min_gain
    placed_um = move(xy_um) if moves else xy_um
    applied = bool(inplace and moves)
    result = {
        "iou_before": before,
        "iou_after": after if moves else before,
        "on_tissue_before": on_tissue(xy_um),
        "on_tissue_after": on_tissue(placed_um),
        "shift_um": (float(shift_um[0]), float(shift_um[1])),
        "scale": scale,
        "rotation_deg": angle,
        "pitch_um": pitch_um,
        "best_iou": after,
        "applied": applied,
    }
    if not applied:
        return result
    new_px = apply_affine(np.linalg.inv(to_um), placed_um)
    moved = shapes.copy()  # keeps the radius column and the transformations (in .attrs)
    moved["geometry"] = gpd.GeoSeries(shapely.points(new_px), index=moved.index, crs=moved.crs)
    sdata.shapes[spots_key] = moved
    if table_key is not None and table_key in sdata.tables and "spatial" in sdata.tables[table_key].obsm:
        t = sdata.tables[table_key]
        t.obsm["spatial"] = move(np.asarray(t.obsm["spatial"], dtype=float))
    attrs = sdata.attrs.setdefault("squall", {})
    attrs["spot_registration"] = {k: v for k, v in result.items() if k != "applied"}
    logger.warning(
        "`sdata.shapes[%r]` did not sit on the tissue of `sdata.images[%r]` (IoU %.2f, %.0f%% of spot "
        "centres on tissue); moved by (%.0f, %.0f) µm, turned by %.1f°, scale %.2f (IoU %.2f, %.0f%% on tissue).",
        spots_key,
        image_key,
        before,
        100 * result["on_tissue_before"],
        shift_um[0],
        shift_um[1],
        angle,
        scale,
        after,
        100 * result["on_tissue_after"],
    )
    return result


def _rotation(angle_deg: float) -> np.ndarray:
    """2 × 2 rotation by ``angle_deg`` degrees (counter-clockwise with x right and y up)."""
    t = np.deg2rad(angle_deg)
    return np.array([[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]])
