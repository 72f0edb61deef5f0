"""Rasterising spot / bin / cell expression onto the model's per-tile expression grid."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import geopandas as gpd
import numpy as np
import pandas as pd
import shapely
from anndata import AnnData
from scipy import sparse
from spatialdata import SpatialData
from spatialdata.models import get_table_keys

from squall_sd._docs import d
from squall_sd._logging import logger
from squall_sd._sdata import affine_mpp, affine_to_microns, apply_affine, check_key, check_positive
from squall_sd.pp._genes import align_genes, normalize_expression
from squall_sd.pp._utils import centers_from


@dataclass
class TileRegions:
    """Which regions (spots, bins, cells) cover which model-grid cells of each tile.

    Attributes
    ----------
    index
        (B, R) int64: position (row number) in the shapes element of each region of each tile;
        ``-1`` pads tiles with fewer than ``R`` regions.
    names
        (B, R) object: the shapes element's index labels (``None`` for padding).
    weights
        (B, R, grid, grid) float32: 1 on the grid cells assigned to the region, else 0. Summing a
        prediction map over a region's cells, and over all tiles that hold the region, gives the
        region's value in the target space (whose cells hold the region's vector divided by its
        cell count).
    n_cells
        (B, R) int64: number of grid cells the region covers in total (also outside the tile), the
        divisor used by :func:`rasterize_expression`.

    """

    index: np.ndarray
    names: np.ndarray
    weights: np.ndarray
    n_cells: np.ndarray

    def __len__(self) -> int:
        return int(self.index.shape[0])


@d.dedent
class RegionGrid:
    """Assign the model-grid cells of tiles to the regions of a shapes element.

    Every tile of ``patch_px`` pixels at ``mpp`` µm/px centred at ``(cx, cy)`` µm is split into
    ``grid`` × ``grid`` cells of ``cell_um = patch_px * mpp / grid`` µm; cell ``(y, x)`` covers
    microns ``[cx - half + x * cell_um, cx - half + (x + 1) * cell_um)`` in x (likewise y), with
    ``half = patch_px * mpp / 2``. A cell belongs to a region when its centre lies inside the
    region's true geometry in microns (discs of their own radius; polygons as drawn); where regions
    overlap, the one with the nearest centre wins. A region too small to contain any cell centre
    gets the cell under its centre (added on top of other regions there). Regions are rasterised
    on the tile's lattice extended beyond the tile, so a region cut by the tile border keeps the
    total cell count it has on the whole lattice.

    Parameters
    ----------
    shapes
        Shapes element (GeoDataFrame with a transformation to ``microns``).
    patch_px
        Tile edge in pixels.
    %(mpp_tile)s
    grid
        Number of grid cells per tile edge (56 for SQUALL: 4 × 4 px cells of a 224 px tile).

    """

    def __init__(
        self, shapes: gpd.GeoDataFrame, *, patch_px: int = 224, mpp: float = 0.5, grid: int = 56
    ) -> None:
        self.patch_px = int(patch_px)
        self.mpp = check_positive(mpp, "mpp")
        self.grid = int(grid)
        if self.patch_px <= 0 or self.grid <= 0:
            raise ValueError(f"`patch_px` and `grid` must be positive, got {patch_px!r}, {grid!r}.")
        self.tile_um = self.patch_px * self.mpp
        self.cell_um = self.tile_um / self.grid
        self.names = np.asarray(shapes.index)
        m = affine_to_microns(shapes)
        geoms = shapes.geometry.to_numpy()
        self.n = len(geoms)
        if self.n == 0:
            raise ValueError("The shapes element is empty.")
        if "radius" in shapes.columns:
            if not np.all(shapely.get_type_id(geoms) == 0):
                raise ValueError(
                    "A shapes element with a 'radius' column must hold points (circles)."
                )
            xy = np.column_stack([shapely.get_x(geoms), shapely.get_y(geoms)])
            self.kind = "circles"
            self.center = apply_affine(m, xy)
            scale = affine_mpp(m)
            self.radius = shapes["radius"].to_numpy(dtype=float) * scale
            r = self.radius
            self.bounds = np.column_stack(
                [
                    self.center[:, 0] - r,
                    self.center[:, 1] - r,
                    self.center[:, 0] + r,
                    self.center[:, 1] + r,
                ]
            )
            self.geoms = None
        else:
            self.kind = "polygons"
            if not np.allclose(m, np.eye(3)):
                geoms = shapely.transform(geoms, lambda p: apply_affine(m, p))
            self.geoms = geoms
            self.bounds = shapely.bounds(geoms)
            c = shapely.centroid(geoms)
            self.center = np.column_stack([shapely.get_x(c), shapely.get_y(c)])
            self.radius = None
        self._tree_: shapely.STRtree | None = None

    def build_index(self) -> RegionGrid:
        """Build the spatial index of the regions now (otherwise on first use) and return ``self``."""
        _ = self._tree
        return self

    @property
    def _tree(self) -> shapely.STRtree:
        """STRtree of the regions' bounding boxes (built on first use)."""
        if self._tree_ is None:
            self._tree_ = shapely.STRtree(shapely.box(*self.bounds.T))
        return self._tree_

    # ------------------------------------------------------------------ core
    def assign(self, cx: float, cy: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Return the cell-region pairs of the tile centred at ``(cx, cy)`` µm.

        Returns
        -------
        ``(cells, regions, n_cells)``: flat cell index ``y * grid + x`` and region position of every
        (cell, region) pair inside the tile, and each pair's region total cell count.

        """
        g, cell = self.grid, self.cell_um
        ox, oy = cx - self.tile_um / 2, cy - self.tile_um / 2
        eps = cell * 1e-9
        cand = self._tree.query(
            shapely.box(ox + eps, oy + eps, ox + self.tile_um - eps, oy + self.tile_um - eps)
        )
        empty = np.zeros(0, dtype=np.int64)
        if len(cand) == 0:
            return empty, empty, empty
        b = self.bounds[cand]
        ext = (
            min(b[:, 0].min(), ox),
            min(b[:, 1].min(), oy),
            max(b[:, 2].max(), ox + self.tile_um),
            max(b[:, 3].max(), oy + self.tile_um),
        )
        every = self._tree.query(shapely.box(*ext))
        b = self.bounds[every]
        ext = (
            min(b[:, 0].min(), ext[0]),
            min(b[:, 1].min(), ext[1]),
            max(b[:, 2].max(), ext[2]),
            max(b[:, 3].max(), ext[3]),
        )
        kx0 = int(np.floor((ext[0] - ox) / cell)) - 1
        ky0 = int(np.floor((ext[1] - oy) / cell)) - 1
        kx1 = int(np.ceil((ext[2] - ox) / cell)) + 1
        ky1 = int(np.ceil((ext[3] - oy) / cell)) + 1
        h, w = ky1 - ky0, kx1 - kx0
        label, small = self._label_lattice(every, ox, oy, kx0, ky0, h, w)
        counts = np.bincount(label[label >= 0], minlength=len(every))
        # the tile inside the extended lattice
        ty, tx = -ky0, -kx0
        tile_lab = label[ty : ty + g, tx : tx + g]
        yy, xx = np.nonzero(tile_lab >= 0)
        cells = (yy * g + xx).astype(np.int64)
        local_ids = tile_lab[yy, xx]
        extra_cells, extra_local = [], []
        for local in small + [int(i) for i in np.flatnonzero(counts == 0) if int(i) not in small]:
            ccx, ccy = self.center[every[local]]
            x = int(np.floor((ccx - ox) / cell))
            y = int(np.floor((ccy - oy) / cell))
            if 0 <= x < g and 0 <= y < g:
                extra_cells.append(y * g + x)
                extra_local.append(local)
        counts = counts.copy()
        for local in extra_local:
            counts[local] = max(counts[local], 1)
        if extra_cells:
            cells = np.concatenate([cells, np.asarray(extra_cells, dtype=np.int64)])
            local_ids = np.concatenate([local_ids, np.asarray(extra_local, dtype=np.int64)])
        regions = np.asarray(every, dtype=np.int64)[local_ids]
        return cells, regions, counts[local_ids].astype(np.int64)

    def _label_lattice(
        self, every: np.ndarray, ox: float, oy: float, kx0: int, ky0: int, h: int, w: int
    ) -> tuple[np.ndarray, list[int]]:
        """Label the (h, w) lattice cells (offset ``kx0``, ``ky0``) by the region holding their centre.

        The label is the local index in ``every`` (nearest centre wins, ties to the lower local
        index), all regions at once; also return the local indices of regions that hold no cell centre.
        """
        cell = self.cell_um
        every = np.asarray(every, dtype=np.int64)
        n = len(every)
        label = np.full((h, w), -1, dtype=np.int64)
        if n == 0:
            return label, []
        bnd = self.bounds[every]
        # lattice cells whose centres may fall inside each region's bounding box
        ax = np.maximum(np.ceil((bnd[:, 0] - ox) / cell - 0.5).astype(np.int64) - kx0, 0)
        bx = np.minimum(np.floor((bnd[:, 2] - ox) / cell - 0.5).astype(np.int64) - kx0 + 1, w)
        ay = np.maximum(np.ceil((bnd[:, 1] - oy) / cell - 0.5).astype(np.int64) - ky0, 0)
        by = np.minimum(np.floor((bnd[:, 3] - oy) / cell - 0.5).astype(np.int64) - ky0 + 1, h)
        nx = np.maximum(bx - ax, 0)
        ny = np.maximum(by - ay, 0)
        sizes = nx * ny
        total = int(sizes.sum())
        if total == 0:
            return label, list(range(n))
        # one row per (region, candidate cell) pair, regions in local order
        local = np.repeat(np.arange(n, dtype=np.int64), sizes)
        start = np.repeat(np.cumsum(sizes) - sizes, sizes)
        k = np.arange(total, dtype=np.int64) - start
        nxr = nx[local]
        iy = ay[local] + k // nxr
        ix = ax[local] + k % nxr
        xs = ox + (ix + kx0 + 0.5) * cell
        ys = oy + (iy + ky0 + 0.5) * cell
        ctr = self.center[every]
        d2 = (xs - ctr[local, 0]) ** 2 + (ys - ctr[local, 1]) ** 2
        if self.kind == "circles":
            inside = d2 <= self.radius[every][local] ** 2
        elif total <= 64 * n:  # small polygons: one vectorised call over all pairs
            inside = shapely.contains_xy(self.geoms[every][local], xs, ys)
        else:  # large polygons: one call per polygon (GEOS prepares each geometry once)
            inside = np.zeros(total, dtype=bool)
            ends = np.cumsum(sizes)
            for i in np.flatnonzero(sizes):
                lo, hi = int(ends[i] - sizes[i]), int(ends[i])
                inside[lo:hi] = shapely.contains_xy(self.geoms[every[i]], xs[lo:hi], ys[lo:hi])
        has = np.bincount(local[inside], minlength=n) > 0
        small = [int(i) for i in np.flatnonzero(~has)]
        if not inside.any():
            return label, small
        flat = (iy * w + ix)[inside]
        d2, local = d2[inside], local[inside]
        # nearest centre wins; equal distances go to the region met first (lowest local index)
        best = np.full(h * w, np.inf)
        np.minimum.at(best, flat, d2)
        win = d2 == best[flat]
        lab = np.full(h * w, n, dtype=np.int64)
        np.minimum.at(lab, flat[win], local[win])
        hit = lab < n
        label.reshape(-1)[hit] = lab[hit]
        return label, small

    def regions(self, centers_um: np.ndarray) -> TileRegions:
        """Region masks of every tile (see :class:`TileRegions`)."""
        centers = np.asarray(centers_um, dtype=float).reshape(-1, 2)
        per_tile = []
        for cx, cy in centers:
            cells, regs, n = self.assign(cx, cy)
            uniq, inv = np.unique(regs, return_inverse=True)
            per_tile.append((cells, uniq, inv, n))
        r_max = max([len(t[1]) for t in per_tile], default=0)
        b, g = len(centers), self.grid
        index = np.full((b, r_max), -1, dtype=np.int64)
        names = np.full((b, r_max), None, dtype=object)
        weights = np.zeros((b, r_max, g * g), dtype=np.float32)
        n_cells = np.zeros((b, r_max), dtype=np.int64)
        for i, (cells, uniq, inv, n) in enumerate(per_tile):
            index[i, : len(uniq)] = uniq
            names[i, : len(uniq)] = self.names[uniq]
            weights[i, inv, cells] = 1.0
            n_cells[i, inv] = n
        return TileRegions(index, names, weights.reshape(b, r_max, g, g), n_cells)


@d.get_sections(base="ExpressionRasterizer", sections=["Parameters"])
@d.dedent
class ExpressionRasterizer:
    """Rasterise the expression of a table's spots / bins / cells onto tiles' model grids.

    Build once, then call :meth:`tile` per tile (e.g. inside a training dataset) or
    :meth:`rasterize` for many. See :func:`rasterize_expression` for the semantics.

    Parameters
    ----------
    sdata
        SpatialData with the shapes and the table annotating them.
    shapes_key
        Shapes element of the spots / bins / cells.
    table_key
        Table annotating ``shapes_key`` (via its region / instance keys).
    genes
        Model vocabulary in channel order (see :func:`align_genes`); ``None`` keeps the table's
        genes.
    layer
        Layer of the table holding counts (default ``X``).
    patch_px
        Tile edge in pixels.
    %(mpp_tile)s
    grid
        Grid cells per tile edge.
    method
        Normalisation (see :func:`normalize_expression`); ``"binary"`` is the SQUALL target.
    """

    def __init__(
        self,
        sdata: SpatialData,
        *,
        shapes_key: str,
        table_key: str = "table",
        genes: Sequence[str] | pd.Index | pd.DataFrame | None = None,
        layer: str | None = None,
        patch_px: int = 224,
        mpp: float = 0.5,
        grid: int = 56,
        method: Literal["binary", "log1p_cp10k", "raw"] = "binary",
    ) -> None:
        shapes = check_key(sdata, shapes_key, "shapes")
        table = check_key(sdata, table_key, "tables")
        self.grid_assign = RegionGrid(shapes, patch_px=patch_px, mpp=mpp, grid=grid)
        self.grid = self.grid_assign.grid
        self.method = method
        adata = _table_rows_for(table, shapes_key, table_key)
        pos = pd.Index(shapes.index).get_indexer(adata.obs["_squall_instance"].to_numpy())
        if np.any(pos < 0):
            n_bad = int((pos < 0).sum())
            logger.warning(
                "%d rows of table %r annotate instances missing from shapes %r; they are ignored",
                n_bad,
                table_key,
                shapes_key,
            )
            adata = adata[pos >= 0]
            pos = pos[pos >= 0]
        if genes is None:
            X = adata.layers[layer] if layer is not None else adata.X
            X = (
                sparse.csr_matrix(X, dtype=np.float32)
                if sparse.issparse(X)
                else np.asarray(X, dtype=np.float32)
            )
            present = np.ones(adata.n_vars, dtype=bool)
            self.genes = list(map(str, adata.var_names))
        else:
            X, present = align_genes(adata, genes, layer=layer)
            self.genes = (
                list(genes.iloc[:, 0].astype(str))
                if isinstance(genes, pd.DataFrame)
                else list(map(str, genes))
            )
        raw = adata.layers[layer] if layer is not None else adata.X
        totals = np.asarray(raw.sum(axis=1), dtype=np.float64).reshape(-1)
        X = normalize_expression(X, method, total_counts=totals)
        X = sparse.csr_matrix(X, dtype=np.float32)
        # one row per shape position (regions without a table row stay empty)
        perm = sparse.csr_matrix(
            (np.ones(len(pos), dtype=np.float32), (pos, np.arange(len(pos)))),
            shape=(self.grid_assign.n, len(pos)),
        )
        self.X = sparse.csr_matrix(perm @ X)
        #: Boolean mask over ``genes``: measured in the data.
        self.present = present

    @property
    def n_genes(self) -> int:
        """Number of gene channels of the output."""
        return int(self.X.shape[1])

    def tile(
        self, cx: float, cy: float, *, as_sparse: bool = True
    ) -> sparse.csr_matrix | np.ndarray:
        """Expression grid of one tile centred at ``(cx, cy)`` µm.

        Returns
        -------
        With ``as_sparse=True`` a CSR matrix (grid * grid, G), rows y-major x-minor; otherwise a
        float32 array (G, grid, grid).

        """
        cells, regions, n = self.grid_assign.assign(cx, cy)
        g2 = self.grid * self.grid
        w = sparse.csr_matrix(
            (1.0 / n.astype(np.float32), (cells, regions)), shape=(g2, self.grid_assign.n)
        )
        out = sparse.csr_matrix(w @ self.X, dtype=np.float32)
        if as_sparse:
            return out
        return np.ascontiguousarray(out.toarray().T.reshape(-1, self.grid, self.grid))

    def rasterize(
        self, centers_um: np.ndarray, *, as_sparse: bool = False
    ) -> np.ndarray | list[sparse.csr_matrix]:
        """Expression grids of many tiles (see :func:`rasterize_expression`)."""
        centers = np.asarray(centers_um, dtype=float).reshape(-1, 2)
        if as_sparse:
            return [self.tile(cx, cy, as_sparse=True) for cx, cy in centers]
        out = np.zeros((len(centers), self.n_genes, self.grid, self.grid), dtype=np.float32)
        for i, (cx, cy) in enumerate(centers):
            out[i] = self.tile(cx, cy, as_sparse=False)
        return out


def _table_rows_for(table: AnnData, shapes_key: str, table_key: str) -> AnnData:
    """Return the rows of ``table`` annotating ``shapes_key`` (instance ids in ``obs``)."""
    try:
        regions, region_key, instance_key = get_table_keys(table)
    except Exception:  # noqa: BLE001
        regions, region_key, instance_key = None, None, None
    if region_key is None or instance_key is None:
        raise ValueError(
            f"Table {table_key!r} does not annotate a shapes element (no spatialdata region / "
            "instance keys). Build it with `spatialdata.models.TableModel.parse(adata, region=..., "
            "region_key=..., instance_key=...)`."
        )
    regions = [regions] if isinstance(regions, str) else list(regions)
    if shapes_key not in regions:
        raise ValueError(
            f"Table {table_key!r} annotates {regions}, not {shapes_key!r}. Pass the matching "
            "`shapes_key`."
        )
    mask = (table.obs[region_key].astype(str) == shapes_key).to_numpy()
    sub = table[mask]
    sub = AnnData(
        X=sub.X,
        obs=pd.DataFrame(
            {"_squall_instance": sub.obs[instance_key].to_numpy()}, index=sub.obs_names
        ),
        var=sub.var,
        layers=dict(sub.layers),
    )
    return sub


# the entries have no ``: type`` part, which docrep's keep_types / delete_types expect
d.keep_types("ExpressionRasterizer.parameters", "sdata", "sdata")
d.delete_types("ExpressionRasterizer.parameters", "no_sdata", "sdata")


@d.dedent
def rasterize_expression(  # noqa: D417 - parameters from squall_sd._docs
    sdata: SpatialData,
    centers_um: np.ndarray | str | Any,
    *,
    shapes_key: str,
    table_key: str = "table",
    genes: Sequence[str] | pd.Index | pd.DataFrame | None = None,
    layer: str | None = None,
    patch_px: int = 224,
    mpp: float = 0.5,
    grid: int = 56,
    method: Literal["binary", "log1p_cp10k", "raw"] = "binary",
    as_sparse: bool = False,
) -> np.ndarray | list[sparse.csr_matrix]:
    """Rasterise measured expression onto the model's expression grid of each tile.

    A tile is the ``patch_px`` × ``patch_px`` window at ``mpp`` µm/px centred at a point in
    microns (the same window :func:`extract_patches` reads); its ``grid`` × ``grid`` cells have an
    edge of ``cell_um = patch_px * mpp / grid`` µm and cell ``(y, x)`` covers microns
    ``[cx - half + x * cell_um, cx - half + (x + 1) * cell_um)`` (and likewise in y), with
    ``half = patch_px * mpp / 2``. Spots are discs of their true radius, bins and cells their
    polygons, all transformed to microns; a grid cell belongs to the region containing its centre
    (see :class:`RegionGrid`). Every cell of a region holds the region's normalised vector divided
    by the number of cells the region covers (SQUALL §4.10), so the sum over a region's cells is
    its vector: mass is conserved. Cells outside every region are 0.

    Parameters
    ----------
    %(ExpressionRasterizer.parameters.sdata)s
    centers_um
        Tile centres in microns: (n, 2) array of x, y, or a shapes key / GeoDataFrame (centroids).
    %(ExpressionRasterizer.parameters.no_sdata)s
    as_sparse
        Return one CSR matrix (grid * grid, G) per tile, rows y-major x-minor (the SQUALL
        pretraining layout) instead of a dense array. Use it for large vocabularies: one dense tile
        of 15,757 genes at 56 × 56 takes 198 MB.

    Returns
    -------
    A float32 array (B, G, grid, grid), or a list of B sparse matrices.

    """
    centers = centers_from(sdata, centers_um)
    r = ExpressionRasterizer(
        sdata,
        shapes_key=shapes_key,
        table_key=table_key,
        genes=genes,
        layer=layer,
        patch_px=patch_px,
        mpp=mpp,
        grid=grid,
        method=method,
    )
    return r.rasterize(centers, as_sparse=as_sparse)


@d.dedent
def region_weights(  # noqa: D417 - parameters from squall_sd._docs
    sdata: SpatialData,
    centers_um: np.ndarray | str | Any,
    *,
    shapes_key: str,
    patch_px: int = 224,
    mpp: float = 0.5,
    grid: int = 56,
) -> TileRegions:
    """Per-tile masks of the regions (spots / bins / cells) on the model grid.

    Uses the same geometry and cell assignment as :func:`rasterize_expression`, so predictions
    made on the grid can be aggregated back to the regions: a region's predicted vector is the sum
    of ``prediction * weights`` over the grid, summed over all tiles holding it.

    Parameters
    ----------
    sdata
        SpatialData with the shapes element.
    centers_um
        Tile centres in microns ((n, 2) x, y) or a shapes key / GeoDataFrame.
    shapes_key
        Shapes element of the regions.
    patch_px
        Tile edge in pixels.
    %(mpp_tile)s
    grid
        Grid cells per tile edge.

    Returns
    -------
    A :class:`TileRegions` with ``index`` (B, R), ``names`` (B, R), ``weights`` (B, R, grid,
    grid) and ``n_cells`` (B, R); R is the largest number of regions in a tile.

    """
    centers = centers_from(sdata, centers_um)
    shapes = check_key(sdata, shapes_key, "shapes")
    return RegionGrid(shapes, patch_px=patch_px, mpp=mpp, grid=grid).regions(centers)
