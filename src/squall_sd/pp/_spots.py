"""Virtual spots, bins and tiles over detected tissue (for H&E-only slides)."""

from __future__ import annotations

from typing import Literal

import geopandas as gpd
import numpy as np
import pandas as pd
import shapely
from scipy import ndimage
from spatialdata import SpatialData
from spatialdata.models import ShapesModel

from squall_sd._docs import d
from squall_sd._logging import logger
from squall_sd._sdata import affine_to_microns, check_key, check_positive, microns_transformations
from squall_sd.pp._utils import store_shapes

#: Default size (µm) per kind: Visium spot diameter, bin edge, tile edge (224 px at 0.5 µm/px).
DEFAULT_SIZE_UM = {"visium": 55.0, "bins": 16.0, "tiles": 112.0}
#: Visium centre-to-centre distance / spot diameter (100 µm / 55 µm).
VISIUM_PITCH_RATIO = 100.0 / 55.0


@d.dedent
def make_spots(  # noqa: D417 - parameters from squall_sd._docs
    sdata: SpatialData,
    *,
    kind: Literal["visium", "bins", "tiles"] = "visium",
    size_um: float | None = None,
    pitch_um: float | None = None,
    image_key: str = "he",
    tissue_key: str | None = None,
    tissue: gpd.GeoDataFrame | None = None,
    key_added: str = "virtual_spots",
    min_tissue_fraction: float = 0.5,
    overwrite: bool = False,
    inplace: bool = True,
) -> gpd.GeoDataFrame | None:
    """Lay virtual spots, bins or tiles over the tissue of an H&E slide.

    All sizes are in microns and the result lives in the ``microns`` coordinate system, so the
    same call gives the same physical layout whatever the scan resolution. Grids are anchored at
    the ``microns`` origin (so two calls on the same slide give the same grid).

    Parameters
    ----------
    sdata
        SpatialData with an image (and its tissue polygons, see ``tissue_key``).
    kind
        ``"visium"``: discs of diameter ``size_um`` on a hexagonal lattice whose nearest-neighbour
        distance is ``pitch_um`` (rows ``pitch_um * sqrt(3) / 2`` apart, every other row shifted by
        ``pitch_um / 2``), as Visium's 55 µm spots on a 100 µm pitch. ``"bins"``: squares of edge
        ``size_um`` on a square lattice (Visium HD-like 8 or 16 µm bins). ``"tiles"``: squares of
        edge ``size_um`` (default 112 µm = 224 px at 0.5 µm/px, a SQUALL tile).
    size_um
        Disc diameter or square edge in µm; default 55 (visium), 16 (bins), 112 (tiles).
    pitch_um
        Centre-to-centre distance in µm; default ``size_um * 100 / 55`` for visium and
        ``size_um`` (contiguous) for bins and tiles.
    image_key
        The image whose tissue is used (for the default ``tissue_key`` and for the extra
        coordinate systems of the result).
    tissue_key
        Shapes element with the tissue polygons; default ``f"{image_key}_tissue"``, which is
        computed with :func:`detect_tissue` when absent (and stored in ``sdata`` only when
        ``inplace=True``; with ``inplace=False`` the input is never modified).
    tissue
        Tissue polygons to use directly (a shapes element with a transformation to ``microns``,
        e.g. ``detect_tissue(..., inplace=False)``), instead of ``tissue_key``. Not stored.
    key_added
        Name of the new shapes element.
    min_tissue_fraction
        Keep a spot when at least this fraction of its area lies on tissue (0–1).
    %(overwrite_element)s
    inplace
        Write into ``sdata`` and return ``None``; otherwise return the element only.

    Returns
    -------
    With ``inplace=False`` the GeoDataFrame; otherwise ``None`` and

    - ``sdata.shapes[key_added]`` - circles (``radius`` column, µm) for visium, square polygons for
      bins/tiles, in microns (``Identity`` to ``microns``), with columns ``array_row``,
      ``array_col`` (lattice indices) and ``tissue_fraction``.

    """
    if kind not in DEFAULT_SIZE_UM:
        raise ValueError(f"`kind` must be one of {sorted(DEFAULT_SIZE_UM)}, got {kind!r}.")
    size = check_positive(DEFAULT_SIZE_UM[kind] if size_um is None else size_um, "size_um")
    if pitch_um is None:
        pitch = size * VISIUM_PITCH_RATIO if kind == "visium" else size
    else:
        pitch = check_positive(pitch_um, "pitch_um")
    if not 0.0 <= float(min_tissue_fraction) <= 1.0:
        raise ValueError(
            f"Expected `min_tissue_fraction` in [0, 1], found {min_tissue_fraction!r}."
        )
    if inplace and key_added in sdata.shapes and not overwrite:
        raise ValueError(
            f"`key_added={key_added!r}` already exists in `sdata.shapes`. Pass `overwrite=True` to "
            "replace it, or choose another `key_added`."
        )
    if tissue is not None and tissue_key is not None:
        raise ValueError("Pass `tissue_key=` or `tissue=`, not both.")
    tissue = _tissue_union(sdata, image_key, tissue_key, tissue=tissue, store=inplace)

    xmin, ymin, xmax, ymax = tissue.bounds
    r = size / 2
    if kind == "visium":
        dy = pitch * np.sqrt(3) / 2
        rows = np.arange(np.floor((ymin - r) / dy), np.ceil((ymax + r) / dy) + 1).astype(int)
        cols = np.arange(np.floor((xmin - r) / pitch) - 1, np.ceil((xmax + r) / pitch) + 1).astype(
            int
        )
        rr, cc = np.meshgrid(rows, cols, indexing="ij")
        rr, cc = rr.ravel(), cc.ravel()
        cx = (cc + 0.5 * (rr % 2)) * pitch
        cy = rr * dy
        # 64-gon of each disc (inscribed in it), built only for lattice points near the tissue edge
        make = lambda i: shapely.buffer(shapely.points(cx[i], cy[i]), r, quad_segs=16)  # noqa: E731
        reach = r
    else:
        rows = np.arange(np.floor((ymin - r) / pitch), np.ceil((ymax + r) / pitch) + 1).astype(int)
        cols = np.arange(np.floor((xmin - r) / pitch), np.ceil((xmax + r) / pitch) + 1).astype(int)
        rr, cc = np.meshgrid(rows, cols, indexing="ij")
        rr, cc = rr.ravel(), cc.ravel()
        cx = (cc + 0.5) * pitch
        cy = (rr + 0.5) * pitch
        make = lambda i: shapely.box(cx[i] - r, cy[i] - r, cx[i] + r, cy[i] + r)  # noqa: E731
        reach = r * np.sqrt(2.0)  # a square lies inside the disc through its corners
    frac = _lattice_tissue_fraction(tissue, cx, cy, reach, make)
    keep = frac >= float(min_tissue_fraction) - 1e-9
    keep &= frac > 0
    if not keep.any():
        raise ValueError(
            f"No {kind} of {size:g} µm has at least {min_tissue_fraction:g} of its area on tissue. "
            "Lower `min_tissue_fraction` or `size_um`, or check the tissue polygons."
        )
    meta = pd.DataFrame(
        {
            "array_row": rr[keep],
            "array_col": cc[keep],
            "tissue_fraction": frac[keep].astype(np.float32),
        }
    )
    transformations = microns_transformations(sdata, image_key)
    if kind == "visium":
        centers = np.column_stack([cx[keep], cy[keep]])
        gdf = ShapesModel.parse(
            centers,
            geometry=0,
            radius=np.full(int(keep.sum()), r),
            index=np.arange(int(keep.sum())),
            transformations=transformations,
        )
        for col in meta:
            gdf[col] = meta[col].to_numpy()
    else:
        gdf = gpd.GeoDataFrame(meta, geometry=make(np.flatnonzero(keep)))
        gdf = ShapesModel.parse(gdf, transformations=transformations)
    logger.info("make_spots: %d %s of %g µm (pitch %g µm) over tissue", len(gdf), kind, size, pitch)
    if not inplace:
        return gdf
    store_shapes(sdata, key_added, gdf, overwrite=overwrite)
    return None


def _tissue_union(
    sdata: SpatialData,
    image_key: str,
    tissue_key: str | None,
    *,
    tissue: gpd.GeoDataFrame | None = None,
    store: bool = True,
) -> shapely.Geometry:
    """Return the union of the tissue polygons in microns (detecting tissue when needed).

    Detected tissue is written to ``sdata`` only when ``store`` is true.
    """
    if tissue is not None:
        gdf = tissue
        tissue_key = "tissue"
    else:
        if tissue_key is None:
            tissue_key = f"{image_key}_tissue"
            if tissue_key not in sdata.shapes:
                from squall_sd.pp._tissue import detect_tissue

                logger.info("make_spots: no %r yet, running detect_tissue", tissue_key)
                if store:
                    detect_tissue(sdata, image_key=image_key, key_added=tissue_key)
                else:
                    tissue = detect_tissue(sdata, image_key=image_key, key_added=tissue_key, inplace=False)
        gdf = tissue if tissue is not None else check_key(sdata, tissue_key, "shapes")
    m = affine_to_microns(gdf)
    geoms = gdf.geometry.to_numpy()
    if "radius" in gdf.columns:  # circles as tissue (unusual, but allowed)
        geoms = shapely.buffer(geoms, gdf["radius"].to_numpy(dtype=float))
    coeffs = [m[0, 0], m[0, 1], m[1, 0], m[1, 1], m[0, 2], m[1, 2]]
    from shapely import affinity

    union = shapely.union_all([affinity.affine_transform(g, coeffs) for g in geoms])
    if union.is_empty:
        raise ValueError(f"The tissue element {tissue_key!r} is empty.")
    return union


def _lattice_tissue_fraction(
    tissue: shapely.Geometry, cx: np.ndarray, cy: np.ndarray, reach: float, make
) -> np.ndarray:
    """Return :func:`_tissue_fraction` of the shapes ``make(i)`` centred at ``(cx[i], cy[i])``.

    Each shape lies inside the disc of radius ``reach`` around its centre.

    Centres farther than ``reach`` from the tissue boundary are wholly inside (fraction 1) or
    wholly outside (0), exactly as the polygon test would find; only the shapes near the boundary
    are built and intersected, so time and memory follow the tissue outline, not the slide area.
    """
    frac = np.zeros(len(cx), dtype=float)
    if len(cx) == 0:
        return frac
    boundary = tissue.boundary
    shapely.prepare(tissue)
    shapely.prepare(boundary)
    # a little slack: anything within reach (up to rounding) takes the exact polygon path
    near = _near_boundary(boundary, cx, cy, reach * (1 + 1e-6) + 1e-9)
    far = ~near
    frac[far & shapely.contains_xy(tissue, cx, cy)] = 1.0
    idx = np.flatnonzero(near)
    if len(idx):
        frac[idx] = _tissue_fraction(tissue, make(idx))
    return frac


def _near_boundary(boundary: shapely.Geometry, cx: np.ndarray, cy: np.ndarray, dist: float) -> np.ndarray:
    """``shapely.dwithin(boundary, points(cx, cy), dist)``, testing only the candidate points.

    The boundary is cut into pieces of at most ``dist`` (:func:`shapely.segmentize`), so every
    boundary point lies within ``dist / 2`` of a vertex; a point within ``dist`` of the boundary is
    thus within ``1.5 * dist`` of a vertex, and so in one of the grid cells (of edge ``dist``) at
    most two cells from a vertex's cell. Only the points in those cells are built and tested
    exactly; the others are farther than ``dist`` from the boundary.
    """
    near = np.zeros(len(cx), dtype=bool)
    if boundary.is_empty or len(cx) == 0:
        return near
    verts = shapely.get_coordinates(shapely.segmentize(boundary, dist))
    px = np.floor(np.asarray(cx) / dist).astype(np.int64)
    py = np.floor(np.asarray(cy) / dist).astype(np.int64)
    x0, y0 = int(px.min()) - 2, int(py.min()) - 2
    nx, ny = int(px.max()) - x0 + 3, int(py.max()) - y0 + 3
    vx = np.floor(verts[:, 0] / dist).astype(np.int64) - x0
    vy = np.floor(verts[:, 1] / dist).astype(np.int64) - y0
    ok = (vx >= 0) & (vx < nx) & (vy >= 0) & (vy < ny)  # vertices farther from every point do not matter
    grid = np.zeros((ny, nx), dtype=bool)  # one byte per lattice-sized cell of the lattice's box
    grid[vy[ok], vx[ok]] = True
    grid = ndimage.maximum_filter(grid, size=5, mode="constant", cval=False)  # cells within two of a vertex cell
    cand = np.flatnonzero(grid[py - y0, px - x0])
    if len(cand):
        near[cand] = shapely.dwithin(boundary, shapely.points(cx[cand], cy[cand]), dist)
    return near


def _tissue_fraction(tissue: shapely.Geometry, shapes: np.ndarray) -> np.ndarray:
    """Fraction of each shape's area that lies inside ``tissue``."""
    shapely.prepare(tissue)
    frac = np.zeros(len(shapes), dtype=float)
    inside = shapely.contains_properly(tissue, shapes)
    frac[inside] = 1.0
    edge = ~inside & shapely.intersects(tissue, shapes)
    if edge.any():
        sub = shapes[edge]
        frac[edge] = shapely.area(_local_intersection(sub, tissue)) / shapely.area(sub)
    return frac


def _local_intersection(shapes: np.ndarray, tissue: shapely.Geometry, per_block: int = 64) -> np.ndarray:
    """``shapely.intersection(shapes, tissue)``, each shape against only the tissue pieces it meets.

    Intersecting every small shape with the whole (multi-piece) tissue costs time in the vertex
    count of all pieces. A shape that meets a single piece is intersected with that piece alone
    (the same polygon, with the same coordinates); the others with the whole tissue.
    """
    pieces = np.asarray(shapely.get_parts(tissue))
    if len(pieces) <= 1 or len(shapes) <= per_block:
        return shapely.intersection(shapes, tissue)
    tree = shapely.STRtree(pieces)
    src, dst = tree.query(shapes, predicate="intersects")
    n_hit = np.bincount(src, minlength=len(shapes))
    out = np.empty(len(shapes), dtype=object)
    one = n_hit == 1
    first = np.full(len(shapes), -1, dtype=np.int64)
    first[src] = dst
    for k in np.unique(first[one]):
        sel = np.flatnonzero(one & (first == k))
        out[sel] = shapely.intersection(shapes[sel], pieces[k])
    rest = np.flatnonzero(~one)
    if len(rest):
        out[rest] = shapely.intersection(shapes[rest], tissue)
    return out
