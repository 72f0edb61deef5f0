"""Regions of a slide (spots, bins, cells) rasterised onto its lattice of expression cells.

Used by :func:`squall_sd.train.prepare`; the shard format that stores the result is in
:mod:`squall_sd.train._shards`. Regions are whatever the shapes element holds, rasterised by their
true geometry in microns on one lattice of expression cells per slide (tiles are cut on that lattice):

* **Regions of at least one cell in area** (Visium / legacy ST spots as discs of their radius, Visium HD
  8 / 16 µm bins, cell polygons at a fine grid) own the cells whose centre they contain; where regions
  overlap the nearest centre wins. Each of its cells holds the region's vector divided by the number of
  cells it owns, so the cells of a region sum to its vector.
* **Sub-cell regions** (smaller than one cell, e.g. 2 µm bins or small cells on a coarse grid, or a region
  that happens to contain no cell centre) go to the cell under their centre (disc centre, polygon
  centroid), where they take precedence over a larger region containing that cell's centre (which then
  owns one cell less; one left with no cell becomes sub-cell in turn). Several sub-cell regions in one
  cell are **pooled**: their raw counts are summed into one region (``spot_obs == -1``) whose binary
  vector and log1p(CP10k) come from the summed counts, as if the data had been binned at the cell size.
  So every region contributes, and the target of a grid of 2 µm bins at 8 µm cells equals that of 8 µm
  bins.
* **Nearest fill** (``fill``): in-tissue cells outside every region get the nearest region's vector,
  undivided (weight 1, ``cell_fill`` set), as the published Visium grid does; all other cells are 0.
  "Nearest" is the region owning the nearest covered cell (between cell centres); a cell is in tissue
  when at least half of its pixels pass the tissue test of ``min_tissue``. ``fill="auto"`` (default) fills
  slides whose regions are capture spots (circles, unless the reader recorded a single-cell technology
  such as Xenium or CosMx) and leaves bins and cells unfilled: the spec describes the fill only for Visium
  spots, and filling the gaps between cells with undivided vectors would outweigh the cells themselves.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import scipy.sparse as sp

from squall_sd._constants import ATTRS_KEY, SPOTS_KEY
from squall_sd._logging import logger

#: Reader technologies whose circles are cells, not capture spots (``fill="auto"`` does not fill them).
_CELL_TECHNOLOGIES = frozenset({"xenium", "cosmx", "merscope", "vizgen", "cosmx_smi"})
#: Upper bound on the (region, lattice cell) pairs labelled at once (memory of the labelling).
_MAX_PAIRS = 1 << 22


@dataclass
class _Regions:
    """Regions (spots, bins or cells) of one slide in microns, with expression over the vocabulary.

    Rows ``0 .. n_table - 1`` are the table's regions in table order; :func:`_label_slide` appends
    the pooled sub-cell regions after them (``obs == -1``).
    """

    grid: Any  # squall_sd.pp.RegionGrid over the whole shapes element (geometry in microns)
    shape_pos: np.ndarray  # (n_table,) position of each table region in the shapes element
    center: np.ndarray  # (n, 2) x, y µm: disc centre or polygon centroid
    area: np.ndarray  # (n,) µm²
    obs: np.ndarray  # (n,) table row (-1: no table, or a pooled region)
    counts: sp.csr_matrix | None  # (n, G) raw counts over the vocabulary, None for H&E only
    lib: np.ndarray | None  # (n,) total counts over all genes of the table
    label: np.ndarray | None  # (n,) int codes, -1 unknown
    csr: sp.csr_matrix | None = None  # (n, G) log1p CP10k (float32), set by _label_slide

    @property
    def kind(self) -> str:
        """``"circles"`` or ``"polygons"``."""
        return self.grid.kind

    @property
    def bounds(self) -> np.ndarray:
        """(n_table, 4) bounding boxes (xmin, ymin, xmax, ymax) of the table regions, µm."""
        return self.grid.bounds[self.shape_pos]


def _table_for_shapes(sdata: Any, shapes_key: str, table_key: str) -> Any:
    if table_key not in sdata.tables:
        return None
    adata = sdata.tables[table_key]
    attrs = adata.uns.get("spatialdata_attrs", {})
    region = attrs.get("region")
    regions = [region] if isinstance(region, str) else list(region or [])
    if regions and shapes_key not in regions:
        raise ValueError(
            f"Table {table_key!r} annotates {regions}, not the shapes {shapes_key!r}; pass "
            "`shapes_key=` / `table_key=` that belong together."
        )
    return adata


def _read_regions(
    sdata: Any,
    *,
    shapes_key: str | None,
    table_key: str,
    gene_index: Mapping[str, int] | None,
    n_genes: int,
    label_key: str | None,
    categories: list[str] | None,
    cfg: Any,
) -> _Regions | None:
    """Read the shapes ``shapes_key`` (circles or polygons) and their table's raw counts."""
    from squall_sd.pp import RegionGrid

    if shapes_key is None:
        if SPOTS_KEY not in sdata.shapes:
            return None  # image-only slide
        shapes_key = SPOTS_KEY
    elif shapes_key not in sdata.shapes:
        raise KeyError(
            f"No shapes element {shapes_key!r}; available: {list(sdata.shapes)}. Pass `shapes_key=` naming "
            "the spots, bins or cells annotated by the table (or leave it unset for image-only slides)."
        )
    if len(sdata.shapes[shapes_key]) == 0:
        return None
    gdf = sdata.shapes[shapes_key]
    rg = RegionGrid(gdf, patch_px=int(cfg.img_size), mpp=float(cfg.mpp), grid=int(cfg.expr_size))
    if rg.kind == "circles":
        area_all = np.pi * rg.radius**2
    else:
        import shapely

        area_all = shapely.area(rg.geoms)
    adata = _table_for_shapes(sdata, shapes_key, table_key)
    if adata is None:
        pos = np.arange(rg.n)
        return _Regions(rg, pos, rg.center, area_all, np.full(rg.n, -1), None, None, None)
    attrs = adata.uns.get("spatialdata_attrs", {})
    inst_key = attrs.get("instance_key")
    if inst_key is not None and inst_key in adata.obs:
        lookup = {k: i for i, k in enumerate(gdf.index)}
        shape_pos = np.array([lookup.get(k, -1) for k in adata.obs[inst_key].tolist()], dtype=np.int64)
    else:
        shape_pos = np.arange(adata.n_obs)
    keep = shape_pos >= 0
    if not keep.any():
        raise ValueError(f"No row of table {table_key!r} matches a shape of {shapes_key!r}.")
    rows = np.flatnonzero(keep)
    shape_pos = shape_pos[keep]
    X = adata.X
    X = sp.csr_matrix(X) if not sp.issparse(X) else X.tocsr()
    X = X[rows]
    if X.nnz and (X.data.min() < 0 or not np.allclose(X.data, np.round(X.data))):
        logger.warning(
            "Table %r does not look like raw counts (negative or non-integer values); prepare expects "
            "raw counts and computes the binary target and log1p(CP10k) itself.",
            table_key,
        )
    lib = np.asarray(X.sum(axis=1), dtype=np.float64).ravel()
    var = [str(v) for v in adata.var_names]
    cols = np.array([gene_index.get(v, -1) if gene_index is not None else -1 for v in var])
    sel = np.flatnonzero(cols >= 0)
    if len(sel) == 0:
        raise ValueError(
            f"No gene of table {table_key!r} is in the model vocabulary (e.g. table genes {var[:5]}). "
            "Check that gene symbols are used, or build the vocabulary from the data (genes=None)."
        )
    Xs = X[:, sel].tocoo()
    nz = Xs.data > 0
    counts = sp.csr_matrix(
        (Xs.data[nz].astype(np.float32), (Xs.row[nz], cols[sel][Xs.col[nz]])), shape=(len(rows), n_genes)
    )
    counts.sum_duplicates()
    counts.sort_indices()
    label = None
    if label_key is not None:
        if label_key not in adata.obs:
            raise KeyError(f"label_key {label_key!r} not found in the table's obs columns {list(adata.obs)}.")
        lab = adata.obs[label_key].astype(str).to_numpy()[rows]
        cat_index = {c: i for i, c in enumerate(categories or [])}
        label = np.array([cat_index.get(v, -1) for v in lab])
    return _Regions(rg, shape_pos, rg.center[shape_pos], area_all[shape_pos], rows.astype(np.int64), counts, lib, label)


def _label_large(grid: Any, pos: np.ndarray, x0: float, y0: float, h: int, w: int) -> np.ndarray:
    """Label the (h, w) slide lattice (origin ``x0``, ``y0``) with the regions ``pos`` (shape positions).

    A cell gets the index into ``pos`` of the region holding its centre (nearest centre wins, ties to the
    lower index), else -1. Uses :class:`squall_sd.pp.RegionGrid`'s vectorised labelling in bands of rows
    so that memory stays bounded on whole slides.
    """
    out = np.full((h, w), -1, dtype=np.int32)
    if len(pos) == 0:
        return out
    cell = grid.cell_um
    b = grid.bounds[pos]
    # the lattice rows / columns whose centres may lie in each region's bounding box
    ax = np.clip(np.ceil((b[:, 0] - x0) / cell - 0.5), 0, w).astype(np.int64)
    bx = np.clip(np.floor((b[:, 2] - x0) / cell - 0.5) + 1, 0, w).astype(np.int64)
    ay = np.clip(np.ceil((b[:, 1] - y0) / cell - 0.5), 0, h).astype(np.int64)
    by = np.clip(np.floor((b[:, 3] - y0) / cell - 0.5) + 1, 0, h).astype(np.int64)
    nx = np.maximum(bx - ax, 0)
    live = (nx > 0) & (by > ay)
    per_row = np.zeros(h + 1, dtype=np.int64)
    np.add.at(per_row, ay[live], nx[live])
    np.add.at(per_row, by[live], -nx[live])
    cum = np.concatenate([[0], np.cumsum(np.cumsum(per_row)[:h])])  # pairs in rows [0, r)
    r0 = 0
    while r0 < h:
        r1 = int(np.searchsorted(cum, cum[r0] + _MAX_PAIRS, side="right")) - 1
        r1 = min(max(r1, r0 + 1), h)
        sel = np.flatnonzero(live & (ay < r1) & (by > r0))
        if len(sel):
            lab, _ = grid._label_lattice(pos[sel], x0, y0, 0, r0, r1 - r0, w)
            band = out[r0:r1]
            hit = lab >= 0
            band[hit] = sel[lab[hit]]
        r0 = r1
    return out


def _label_slide(
    regions: _Regions, x0: float, y0: float, h: int, w: int
) -> tuple[np.ndarray, np.ndarray, _Regions, dict[str, int]]:
    """Assign every cell of the slide's (h, w) expression-cell lattice to at most one region.

    Rules (the module docstring states them for users):

    1. Regions of at least one cell in area own the cells whose centre they contain (nearest centre wins
       where they overlap).
    2. Sub-cell regions (smaller than a cell, or containing no cell centre) go to the cell under their
       centre (disc centre / polygon centroid), where they take precedence over rule 1 (a rule-1 region
       left without cells becomes sub-cell in turn). Several sub-cell regions in one cell are pooled:
       their raw counts are summed into one pooled region (appended to the regions, ``obs == -1``).

    Returns
    -------
    ``(lattice, n_cells, regions, stats)``: the (h, w) int32 region index of each cell (-1: none), the
    number of cells of each region (the divisor of the binary target), the regions with the pooled
    ones appended and their ``log1p(CP10k)`` CSR set, and counts for the manifest.
    """
    n = len(regions.center)
    cell = regions.grid.cell_um
    subcell = regions.area < cell * cell * (1 - 1e-6)  # a bin of exactly one cell is not sub-cell
    large = np.flatnonzero(~subcell)
    local = _label_large(regions.grid, regions.shape_pos[large], x0, y0, h, w)
    lattice = np.full((h, w), -1, dtype=np.int32)
    lattice[local >= 0] = large[local[local >= 0]]
    flat = lattice.reshape(-1)
    counts = np.bincount(flat[flat >= 0], minlength=n)
    sub = subcell | (counts == 0)
    ix = np.floor((regions.center[:, 0] - x0) / cell).astype(np.int64)
    iy = np.floor((regions.center[:, 1] - y0) / cell).astype(np.int64)
    on = (ix >= 0) & (ix < w) & (iy >= 0) & (iy < h)
    placed = np.zeros(n, dtype=bool)
    while True:
        new = sub & on & ~placed
        if not new.any():
            break
        cells = np.unique(iy[new] * w + ix[new])
        lost = flat[cells]
        lost = lost[lost >= 0]
        counts -= np.bincount(lost, minlength=n)
        flat[cells] = -2  # reserved for sub-cell regions
        placed |= new
        sub |= counts <= 0
    members = np.flatnonzero(placed)
    cells = iy[members] * w + ix[members]
    ucells, group, size = np.unique(cells, return_inverse=True, return_counts=True)
    group = group.reshape(-1)
    pooled = np.flatnonzero(size > 1)
    order = np.argsort(group, kind="stable")
    gid = members[order[np.cumsum(size) - size]]  # a lone sub-cell region keeps its own index
    gid[pooled] = n + np.arange(len(pooled))
    flat[ucells] = gid
    stats = {"n_subcell": int(placed.sum()), "n_pooled": int(len(pooled))}
    if len(pooled):
        regions = _append_pooled(regions, members, group, pooled)
    n_cells = np.bincount(flat[flat >= 0], minlength=len(regions.center)).astype(np.int64)
    if regions.counts is not None:
        regions.csr = _log1p_cp10k(regions.counts, regions.lib)
    stats["n_regions"] = int((n_cells[:n] > 0).sum())
    return lattice, n_cells, regions, stats


def _append_pooled(regions: _Regions, members: np.ndarray, group: np.ndarray, pooled: np.ndarray) -> _Regions:
    """Return ``regions`` with one pooled region per entry of ``pooled`` (groups of ``members``)."""
    n, m = len(regions.center), len(pooled)
    row_of = np.full(int(group.max()) + 1, -1, dtype=np.int64)
    row_of[pooled] = np.arange(m)
    rows = row_of[group]
    keep = rows >= 0
    rows, mem = rows[keep], members[keep]
    P = sp.csr_matrix((np.ones(len(mem)), (rows, mem)), shape=(m, n))
    size = np.asarray(P.sum(axis=1)).ravel()
    center = np.asarray(P @ regions.center) / size[:, None]
    area = P @ regions.area
    counts = lib = label = None
    if regions.counts is not None:
        counts = sp.vstack([regions.counts, sp.csr_matrix(P.astype(np.float32) @ regions.counts)], format="csr")
        lib = np.concatenate([regions.lib, P @ regions.lib])
    if regions.label is not None:
        lab = regions.label[mem]
        ok = lab >= 0
        out = np.full(m, -1, dtype=np.int64)
        if ok.any():  # majority class of the members (ties: the lower code)
            ncat = int(lab.max()) + 1
            key, cnt = np.unique(rows[ok] * ncat + lab[ok], return_counts=True)
            grp, code = key // ncat, key % ncat
            order = np.lexsort((-cnt, grp))
            firsts = np.r_[True, grp[order][1:] != grp[order][:-1]]
            out[grp[order][firsts]] = code[order][firsts]
        label = np.concatenate([regions.label, out])
    return _Regions(
        regions.grid,
        regions.shape_pos,
        np.concatenate([regions.center, center]),
        np.concatenate([regions.area, area]),
        np.concatenate([regions.obs, np.full(m, -1, dtype=np.int64)]),
        counts,
        lib,
        label,
    )


def _log1p_cp10k(counts: sp.csr_matrix, lib: np.ndarray) -> sp.csr_matrix:
    """Return ``log1p(counts / lib * 1e4)`` (float32) with the sparsity of ``counts``."""
    lib = np.where(lib > 0, lib, 1.0)
    coo = counts.tocoo()
    vals = np.log1p(coo.data / lib[coo.row] * 1e4).astype(np.float32)
    out = sp.csr_matrix((vals, (coo.row, coo.col)), shape=counts.shape)
    out.sort_indices()
    return out


class _NearestFill:
    """Nearest region of the in-tissue cells of a tile that no region covers (spec §4.10).

    The nearest region is the one owning the nearest covered cell of the slide lattice (Euclidean distance
    between cell centres), searched in the tile's window widened by one tile on each side; cells with no
    covered cell that close fall back to the region with the nearest centre.
    """

    def __init__(
        self, lattice: np.ndarray, regions: _Regions, n_cells: np.ndarray, g: int, x0: float, y0: float
    ) -> None:
        self.lattice = lattice
        self.x0, self.y0 = x0, y0
        self.regions = regions
        self.n_cells = n_cells
        self.g = g
        self._tree = None

    def __call__(self, iy0: int, ix0: int, need: np.ndarray) -> np.ndarray:
        """Return the region index of each cell of ``need`` ((g, g) bool) of the tile at ``iy0, ix0``."""
        from scipy import ndimage

        g, m = self.g, self.g
        h, w = self.lattice.shape
        a0, b0 = max(iy0 - m, 0), max(ix0 - m, 0)
        win = self.lattice[a0 : min(iy0 + g + m, h), b0 : min(ix0 + g + m, w)]
        out = np.full((g, g), -1, dtype=np.int64)
        if (win >= 0).any():
            dist, (yy, xx) = ndimage.distance_transform_edt(win < 0, return_indices=True)
            ty, tx = iy0 - a0, ix0 - b0
            sl = (slice(ty, ty + g), slice(tx, tx + g))
            ok = need & (dist[sl] <= m)
            out[ok] = win[yy[sl][ok], xx[sl][ok]]
        rest = need & (out < 0)
        if rest.any():
            if self._tree is None:
                from scipy.spatial import cKDTree

                self._ids = np.flatnonzero(self.n_cells > 0)
                self._tree = cKDTree(self.regions.center[self._ids])
            cell = self.regions.grid.cell_um
            ry, rx = np.nonzero(rest)
            pts = np.column_stack([self.x0 + (ix0 + rx + 0.5) * cell, self.y0 + (iy0 + ry + 0.5) * cell])
            _, k = self._tree.query(pts)
            out[ry, rx] = self._ids[k]
        return out


def _resolve_fill(fill: str | None, regions: _Regions, sdata: Any) -> str | None:
    """Return the fill of one slide: ``"auto"`` fills capture spots, not bins or cells."""
    if fill is None or fill == "nearest":
        return fill
    meta = sdata.attrs.get(ATTRS_KEY, {}) if sdata.attrs else {}
    tech = str(meta.get("technology") or "").lower()
    return "nearest" if regions.kind == "circles" and tech not in _CELL_TECHNOLOGIES else None


def _tile_label(regions: _Regions, idx: np.ndarray) -> int:
    """Class of a tile: the most frequent class over its covered cells (-1: none)."""
    if regions.label is None or not (idx >= 0).any():
        return -1
    codes = regions.label[idx[idx >= 0]]
    codes = codes[codes >= 0]
    return int(np.bincount(codes).argmax()) if len(codes) else -1
