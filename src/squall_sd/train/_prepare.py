"""Write sharded, streamable training datasets from SpatialData objects (:func:`prepare`).

On-disk layout of ``out_dir``::

    manifest.json                 # geometry, genes, slides, shards, parameters, provenance
    shards/00000.zarr             # one zarr v3 group per shard of at most ``shard_size`` tiles
        rgb            uint8   (N, 3, P, P)  tile at the model's µm/px (chunk = 1 tile)
        res            float32 (N,)          µm per pixel of the tile (the model's ``res`` input)
        slide          int32   (N,)          index into manifest["slides"]
        center_um      float32 (N, 2)        tile centre (x, y) in the slide's ``microns`` frame
        label          int32   (N,)          tile class (-1: none), see manifest["labels"]
        cell_spot      int32   (N, g, g)     shard-local region ("spot") of each expression cell (-1: none)
        cell_weight    float16 (N, g, g)     value multiplier of each cell (1 / cells of the region, or 1)
        cell_fill      bool    (N, g, g)     the cell lies outside every region and was filled (weight 1)
        spot_indptr    int64   (M + 1,)      CSR over the shard's M regions × G model genes
        spot_indices   int32   (nnz,)        gene (vocabulary) index of each detected gene
        spot_log1p     float32 (nnz,)        log1p(CP10k) of that gene in that region
        spot_slide     int32   (M,)          slide of each region
        spot_obs       int64   (M,)          row of the region in its slide's table (-1: pooled region)
        spot_center_um float32 (M, 2)        region centre (x, y; centroid for polygons), microns
        expr_dense     float16 (N, G, g, g)  only with ``expr_format="dense"``

The expression grid of tile ``i`` is ``grid[:, y, x] = cell_weight[i, y, x] * b[cell_spot[i, y, x]]``
where ``b`` is the region's binary detection vector over the model vocabulary (1 where the gene has at
least one count). That is the published binary target (spec §4.10). Regions are whatever the shapes
element holds, rasterised by their true geometry in microns on one lattice of expression cells per slide
(tiles are cut on that lattice):

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

The factored form stores each region's vector once per shard instead of once per cell, which is what
makes cohort-sized datasets fit on disk; the same CSR also holds log1p(CP10k) values for region-level
regression (use ``cell_fill`` to leave filled cells out of a region). Memory holds one slide's cell
lattice (int32, e.g. 200 MB for 20 × 10 mm at 2 µm cells) and one shard of tiles at a time.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp

from squall_sd._constants import ATTRS_KEY, IMAGE_KEY, MICRONS, SPOTS_KEY, TABLE_KEY
from squall_sd._logging import logger

__all__ = ["prepare", "resolve_model_config", "FORMAT_VERSION"]

#: Version of the shard format written by :func:`prepare`.
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
#: Tiles whose windows are read together (one decode of lazily read JPEG/PNG images).
_READ_BATCH = 64


# ------------------------------------------------------------------------------------ model config
def resolve_model_config(model_config_or_name: Any, **overrides: Any) -> Any:
    """Return a :class:`~squall_sd.models.SquallConfig` from a config, name or model folder.

    Parameters
    ----------
    model_config_or_name
        A ``SquallConfig``, a mapping of its fields, a registered name (``"squall-tiny"``), a
        folder written by ``save_pretrained`` (its ``config.json`` and ``genes.txt``), or a model
        (anything with a ``config`` attribute).
    **overrides
        Fields to change (e.g. ``mpp=4.0``).

    Returns
    -------
    The configuration.

    """
    from squall_sd.models._config import SquallConfig, get_config

    obj = model_config_or_name
    if hasattr(obj, "config") and isinstance(obj.config, SquallConfig):
        cfg = obj.config
    elif isinstance(obj, SquallConfig):
        cfg = obj
    elif isinstance(obj, Mapping):
        cfg = SquallConfig.from_dict(dict(obj))
    elif isinstance(obj, (str, os.PathLike)) and Path(obj).expanduser().is_dir():
        folder = Path(obj).expanduser()
        cfg_file = folder / "config.json"
        if not cfg_file.is_file():
            raise FileNotFoundError(
                f"{str(folder)!r} is not a model folder: it has no config.json. Pass a registered "
                "model name (e.g. 'squall-tiny') or a folder written by `model.save_pretrained`."
            )
        data = json.loads(cfg_file.read_text())
        data = data.get("config", data) if isinstance(data, dict) else data
        genes_file = folder / "genes.txt"
        if data.get("genes") is None and genes_file.is_file():
            data["genes"] = [g for g in genes_file.read_text().splitlines() if g.strip()]
        cfg = SquallConfig.from_dict(data)
    elif isinstance(obj, str):
        cfg = get_config(obj)
    else:
        raise TypeError(
            f"Expected a SquallConfig, a model name or a model folder, got {type(obj).__name__}."
        )
    overrides = {k: v for k, v in overrides.items() if v is not None}
    return cfg.replace(**overrides) if overrides else cfg


# ------------------------------------------------------------------------------------ inputs
def _as_sdata(obj: Any) -> tuple[Any, str]:
    from spatialdata import SpatialData, read_zarr

    if isinstance(obj, SpatialData):
        meta = obj.attrs.get(ATTRS_KEY, {}) if obj.attrs else {}
        sid = (
            meta.get("sample")
            or meta.get("section")
            or meta.get("sample_id")
            or meta.get("dataset_id")
        )
        if sid is None and obj.path is not None:
            sid = Path(obj.path).stem
        return obj, (str(sid) if sid is not None else None)
    path = Path(obj).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"SpatialData store {str(path)!r} does not exist.")
    return read_zarr(path), path.stem


def _affine(element: Any) -> np.ndarray:
    from spatialdata.transformations import get_transformation

    try:
        t = get_transformation(element, to_coordinate_system=MICRONS)
    except (KeyError, ValueError):
        t = None
    if t is None:
        raise ValueError(
            f"An element has no transformation to the {MICRONS!r} coordinate system. Read the data "
            "with a `squall.io` reader so that every element is registered in microns."
        )
    return np.asarray(
        t.to_affine_matrix(input_axes=("x", "y"), output_axes=("x", "y")), dtype=float
    )


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
    return _Regions(
        rg, shape_pos, rg.center[shape_pos], area_all[shape_pos], rows.astype(np.int64), counts, lib, label
    )


def _vocab_from_data(sdatas: Sequence[Any], table_key: str, n_genes: int) -> list[str]:
    """Return the ``n_genes`` genes detected in the most spots over all inputs (ties by name)."""
    freq: dict[str, float] = {}
    for sdata in sdatas:
        if table_key not in sdata.tables:
            continue
        adata = sdata.tables[table_key]
        X = adata.X
        det = np.asarray((X > 0).sum(axis=0)).ravel() / max(adata.n_obs, 1)
        for g, d in zip(adata.var_names, det, strict=True):
            freq[str(g)] = freq.get(str(g), 0.0) + float(d)
    if not freq:
        raise ValueError("No table with counts found; pass `genes=` or a model with a gene vocabulary.")
    ranked = sorted(freq, key=lambda g: (-freq[g], g))
    if len(ranked) < n_genes:
        raise ValueError(f"The data hold only {len(ranked)} genes; the model needs {n_genes}.")
    return ranked[:n_genes]


# ------------------------------------------------------------------------------------ geometry
def _tissue_mask(rgb: np.ndarray) -> np.ndarray:
    """Return the (h, w) mask of the pixels of a (3, h, w) uint8 tile that look like stained tissue."""
    x = rgb.astype(np.float32) / 255.0
    mx, mn = x.max(axis=0), x.min(axis=0)
    sat = (mx - mn) / np.maximum(mx, 1e-6)
    return (sat > 0.08) & (mx > 0.1) & (mx - mn > 0.03)


def _tissue_fraction(rgb: np.ndarray) -> float:
    """Return the share of a (3, h, w) uint8 tile that looks like stained tissue."""
    return float(_tissue_mask(rgb).mean())


def _tissue_cells(rgb: np.ndarray, g: int) -> np.ndarray:
    """Return the (g, g) mask of the expression cells of a tile of which at least half is tissue."""
    mask = _tissue_mask(rgb)
    p = mask.shape[-1] // g
    if p == 0:
        raise ValueError(f"A tile of {mask.shape[-1]} px cannot hold {g} expression cells per side.")
    return mask[: g * p, : g * p].reshape(g, p, g, p).mean(axis=(1, 3)) >= 0.5


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


# ------------------------------------------------------------------------------------ writer
class _ShardWriter:
    def __init__(self, root: Path, *, shard_size: int, g: int, n_genes: int, dense: bool) -> None:
        self.root = root
        self.shard_size = int(shard_size)
        self.g = g
        self.n_genes = n_genes
        self.dense = dense
        self.shards: list[dict[str, Any]] = []
        self._reset()

    def _reset(self) -> None:
        self.tiles: list[dict[str, Any]] = []
        self.spot_pos: dict[tuple[int, int], int] = {}
        self.spot_rows: list[tuple[int, int]] = []  # (slide, slide-spot index)
        self.spot_src: dict[int, _Regions] = {}

    def add(self, *, rgb, res, slide, center, label, idx, weight, fill, regions: _Regions | None) -> None:
        local = np.full(idx.shape, -1, dtype=np.int32)
        if regions is not None and regions.csr is not None:
            self.spot_src[slide] = regions
            has = idx >= 0
            uniq, inv = np.unique(idx[has], return_inverse=True)
            pos = np.empty(len(uniq), dtype=np.int32)
            for j, s in enumerate(uniq.tolist()):
                key = (slide, s)
                if key not in self.spot_pos:
                    self.spot_pos[key] = len(self.spot_rows)
                    self.spot_rows.append(key)
                pos[j] = self.spot_pos[key]
            local[has] = pos[inv.reshape(-1)]
        else:
            weight = np.zeros_like(weight)
            fill = np.zeros_like(fill)
        self.tiles.append(
            dict(
                rgb=rgb,
                res=res,
                slide=slide,
                center=center,
                label=label,
                cell_spot=local,
                cell_weight=weight,
                cell_fill=fill,
            )
        )
        if len(self.tiles) >= self.shard_size:
            self.flush()

    def flush(self) -> None:
        import zarr

        if not self.tiles:
            return
        k = len(self.shards)
        name = f"shards/{k:05d}.zarr"
        grp = zarr.open_group(self.root / name, mode="w", zarr_format=3)
        n, g = len(self.tiles), self.g
        rgb = np.stack([t["rgb"] for t in self.tiles])
        p = rgb.shape[-1]
        grp.create_array("rgb", data=rgb, chunks=(1, 3, p, p))
        grp.create_array("res", data=np.array([t["res"] for t in self.tiles], dtype=np.float32))
        grp.create_array("slide", data=np.array([t["slide"] for t in self.tiles], dtype=np.int32))
        grp.create_array(
            "center_um", data=np.array([t["center"] for t in self.tiles], dtype=np.float32)
        )
        grp.create_array("label", data=np.array([t["label"] for t in self.tiles], dtype=np.int32))
        cell_spot = np.stack([t["cell_spot"] for t in self.tiles]).astype(np.int32)
        cell_weight = np.stack([t["cell_weight"] for t in self.tiles]).astype(np.float16)
        grp.create_array("cell_spot", data=cell_spot, chunks=(1, g, g))
        grp.create_array("cell_weight", data=cell_weight, chunks=(1, g, g))
        cell_fill = np.stack([t["cell_fill"] for t in self.tiles]).astype(bool)
        grp.create_array("cell_fill", data=cell_fill, chunks=(1, g, g))
        keys = np.asarray(self.spot_rows, dtype=np.int64).reshape(-1, 2)
        slides, index = keys[:, 0], keys[:, 1]
        obs = np.zeros(len(keys), dtype=np.int64)
        centers = np.zeros((len(keys), 2), dtype=np.float32)
        blocks, order = [], []
        for slide in np.unique(slides).tolist():  # one row gather per slide
            at = np.flatnonzero(slides == slide)
            src = self.spot_src[slide]
            blocks.append(src.csr[index[at]])
            order.append(at)
            obs[at] = src.obs[index[at]]
            centers[at] = src.center[index[at]]
        if blocks:
            csr = sp.vstack(blocks, format="csr")[np.argsort(np.concatenate(order))]
            csr.sort_indices()
        else:
            csr = sp.csr_matrix((0, self.n_genes), dtype=np.float32)
        chunk = max(1, min(len(csr.data), 1 << 20))
        grp.create_array("spot_indptr", data=csr.indptr.astype(np.int64))
        grp.create_array("spot_indices", data=csr.indices.astype(np.int32), chunks=(chunk,))
        grp.create_array("spot_log1p", data=csr.data.astype(np.float32), chunks=(chunk,))
        grp.create_array("spot_slide", data=slides.astype(np.int32))
        grp.create_array("spot_obs", data=obs)
        grp.create_array("spot_center_um", data=centers)
        if self.dense:
            dense = np.zeros((n, self.n_genes, g, g), dtype=np.float16)
            binary = csr.copy()
            binary.data[:] = 1.0
            for i in range(n):
                cs, w = cell_spot[i].reshape(-1), cell_weight[i].reshape(-1).astype(np.float32)
                has = np.flatnonzero(cs >= 0)
                if len(has):
                    vals = binary[cs[has]].toarray() * w[has, None]
                    flat = np.zeros((g * g, self.n_genes), dtype=np.float32)
                    flat[has] = vals
                    dense[i] = flat.T.reshape(self.n_genes, g, g)
            grp.create_array("expr_dense", data=dense, chunks=(1, self.n_genes, g, g))
        self.shards.append(
            {"path": name, "n_tiles": n, "n_spots": len(self.spot_rows), "nnz": int(csr.nnz)}
        )
        logger.info("prepare: wrote %s (%d tiles, %d spots)", name, n, len(self.spot_rows))
        self._reset()


# ------------------------------------------------------------------------------------ main
def prepare(
    sdatas_or_paths: Any | Iterable[Any],
    out_dir: str | os.PathLike,
    *,
    model_config_or_name: Any = "squall-tiny",
    shard_size: int = 256,
    tile_stride_um: float | None = None,
    tile_centers: str = "grid",
    jitter_um: float = 0.0,
    tiles_per_spot: int = 1,
    seed: int = 0,
    min_tissue: float = 0.25,
    min_spot_cells: int = 1,
    genes: Sequence[str] | None = None,
    label_key: str | None = None,
    slide_ids: Sequence[str] | None = None,
    image_key: str = IMAGE_KEY,
    shapes_key: str | None = None,
    table_key: str = TABLE_KEY,
    expr_format: str = "factored",
    fill: str | None = "auto",
    max_tiles_per_slide: int | None = None,
    overwrite: bool = False,
    show_progress: bool = False,
    **model_overrides: Any,
) -> Path:
    """Tile SpatialData slides and write a sharded training dataset (zarr v3) plus a manifest.

    Every slide is covered by a grid of tiles of ``img_size`` pixels at the model's µm/px
    (``config.mpp``), stepping ``tile_stride_um``; a tile is kept when at least ``min_tissue`` of
    it is tissue and (for slides with expression) at least ``min_spot_cells`` of its expression
    cells are covered by a region. The RGB tile is read lazily from the multiscale image with
    :func:`squall_sd.pp.extract_patches`. The regions of ``shapes_key`` (spots as circles, Visium HD
    bins as squares, cell boundaries as polygons) are rasterised by their true geometry onto the
    tile's ``expr_size`` × ``expr_size`` grid with the published binary target (spec §4.10): a grid
    cell whose centre lies in a region holds the region's binary vector divided by the number of cells
    the region covers; a region smaller than a cell goes to the cell under its centre, several such
    regions in one cell being pooled (counts summed); optionally in-tissue cells outside every region
    get the nearest region's vector undivided (``fill``). The module docstring states the rules and the
    stored form. Genes are aligned to the model vocabulary by symbol. Tiles are written in shards of
    ``shard_size`` as they are produced, so memory holds one slide's cell lattice and one shard at a
    time. The folder is built under a temporary name and moved into place only when complete.

    Parameters
    ----------
    sdatas_or_paths
        One or several :class:`~spatialdata.SpatialData` objects or paths of SpatialData zarr
        stores. Each needs the H&E image ``image_key`` registered in ``microns``; the ``shapes_key``
        regions (circles or polygons) and the ``table_key`` raw-count table annotating them are
        optional (H&E-only slides give image-only tiles).
    out_dir
        Folder to create.
    model_config_or_name
        The model the data are for: a registered name, a :class:`~squall_sd.models.SquallConfig`,
        or a ``save_pretrained`` folder. It fixes the tile size, µm/px, grid and gene vocabulary.
    shard_size
        Tiles per shard.
    tile_stride_um
        Step between tile centres in microns (default: the tile edge, i.e. no overlap). It is
        rounded to a whole number of expression cells so that all tiles share one cell lattice.
    tile_centers
        ``"grid"`` (default): tiles on a regular grid stepping ``tile_stride_um``. ``"spots"``: one
        tile centred on each region of the table (spot, bin or cell) plus ``tiles_per_spot - 1``
        copies shifted at random by up to ``jitter_um`` on each axis; the whole tile is still
        rasterised (neighbouring regions included). Slides without expression are always tiled on
        the grid. Spot-centred tiles put every spot at a tile's centre, which suits spot-level
        regression with a small field of view.
    jitter_um
        Largest random shift (microns, each axis) of the extra spot-centred tiles.
    tiles_per_spot
        Tiles per region with ``tile_centers="spots"`` (the first one unshifted).
    seed
        Seed of the random shifts.
    min_tissue
        Minimum tissue share of a tile (0–1).
    min_spot_cells
        Minimum number of expression cells covered by regions (filled cells do not count) for a
        tile of a slide with expression.
    genes
        Vocabulary to use when the model has none (``squall-tiny``): a list of symbols. By default
        the ``n_genes`` genes detected in the most spots over all inputs.
    label_key
        Optional column of the table's ``obs`` holding a region class; each tile gets the class
        covering most of its covered cells (for tile classification; a pooled region has the
        majority class of its members).
    slide_ids
        Names of the slides (default: ``sdata.attrs["squall"]["sample"]``, the store name, or
        ``slide{i}``).
    image_key, shapes_key, table_key
        Element names: e.g. ``shapes_key="bins_8um"`` for :func:`squall_sd.io.visium_hd` output
        (8 or 16 µm bins), ``"cells"`` for :func:`squall_sd.io.xenium` / :func:`squall_sd.io.cosmx`.
        ``shapes_key=None`` (default) uses ``"spots"`` where a slide has it and treats a slide
        without it as image-only (H&E pretraining); a ``shapes_key`` that is given must exist.
    expr_format
        ``"factored"`` (default; per-cell spot index and weight plus a spot CSR) or ``"dense"``
        (additionally a dense float16 ``(N, G, g, g)`` grid; only for small vocabularies).
    fill
        In-tissue cells outside every region: ``"nearest"`` gives them the nearest region's binary
        vector, undivided (spec §4.10, marked in ``cell_fill``); ``None`` leaves them 0; ``"auto"``
        (default) is ``"nearest"`` for capture spots (circles, unless
        ``sdata.attrs["squall"]["technology"]`` is a single-cell platform such as ``"xenium"`` or
        ``"cosmx"``) and ``None`` for bins and cells. The choice per slide is recorded in
        ``manifest["slides"][i]["fill"]``.
    max_tiles_per_slide
        Keep at most this many tiles per slide (the first in raster order; for quick tests).
    overwrite
        Replace an existing ``out_dir``.
    show_progress
        Show a progress bar over the tiles.
    **model_overrides
        :class:`~squall_sd.models.SquallConfig` fields to override (e.g. ``mpp=4.0``).

    Returns
    -------
    The path of the written folder (``manifest.json`` inside).

    """
    from squall_sd import __version__

    if fill not in ("auto", "nearest", None):
        raise ValueError(f"fill must be 'auto', 'nearest' or None, found {fill!r}.")
    if expr_format not in ("factored", "dense"):
        raise ValueError(f"expr_format must be 'factored' or 'dense', found {expr_format!r}.")
    if tile_centers not in ("grid", "spots"):
        raise ValueError(f"tile_centers must be 'grid' or 'spots', found {tile_centers!r}.")
    if int(tiles_per_spot) < 1 or float(jitter_um) < 0:
        raise ValueError(
            f"tiles_per_spot must be >= 1 and jitter_um >= 0, found {tiles_per_spot!r} and {jitter_um!r}."
        )
    if not 0 <= float(min_tissue) <= 1:
        raise ValueError(f"min_tissue must lie in [0, 1], found {min_tissue!r}.")
    target = Path(out_dir).expanduser().resolve()
    if target.exists() and not overwrite:
        raise FileExistsError(
            f"{str(target)!r} already exists; pass overwrite=True or choose another folder."
        )
    if not target.parent.is_dir():
        raise FileNotFoundError(f"The folder {str(target.parent)!r} to write into does not exist.")

    items = [sdatas_or_paths] if _is_single(sdatas_or_paths) else list(sdatas_or_paths)
    if not items:
        raise ValueError("No SpatialData given.")
    loaded = [_as_sdata(x) for x in items]
    sdatas = [s for s, _ in loaded]
    ids = (
        list(slide_ids)
        if slide_ids is not None
        else [sid or f"slide{i}" for i, (_, sid) in enumerate(loaded)]
    )
    if len(ids) != len(sdatas):
        raise ValueError(f"Got {len(ids)} slide_ids for {len(sdatas)} slides.")
    if len(set(ids)) != len(ids):
        ids = [f"{s}_{i}" for i, s in enumerate(ids)]

    cfg = resolve_model_config(model_config_or_name, **model_overrides)
    if cfg.genes is None:
        vocab = (
            list(genes) if genes is not None else _vocab_from_data(sdatas, table_key, cfg.n_genes)
        )
        cfg = cfg.replace(genes=tuple(vocab))
    elif genes is not None and list(genes) != list(cfg.genes):
        raise ValueError(
            "`genes` was given but the model already has a vocabulary; leave `genes` unset."
        )
    vocab = list(cfg.genes)
    gene_index = {g: i for i, g in enumerate(vocab)}
    n_genes = len(vocab)
    g = int(cfg.expr_size)
    mpp = float(cfg.mpp)
    cell_um = float(cfg.cell_px) * mpp
    tile_um = float(cfg.img_size) * mpp
    stride = tile_um if tile_stride_um is None else float(tile_stride_um)
    stride = max(1, int(round(stride / cell_um))) * cell_um

    categories: list[str] | None = None
    if label_key is not None:
        cats: set[str] = set()
        for s in sdatas:
            if table_key in s.tables and label_key in s.tables[table_key].obs:
                cats.update(s.tables[table_key].obs[label_key].astype(str).unique().tolist())
        if not cats:
            raise KeyError(f"label_key {label_key!r} is not an obs column of any input table.")
        categories = sorted(cats)

    from squall_sd.io._common import move_into_place, temp_sibling

    tmp = temp_sibling(target)
    tmp.mkdir()
    try:
        writer = _ShardWriter(
            tmp, shard_size=shard_size, g=g, n_genes=n_genes, dense=expr_format == "dense"
        )
        slides_meta = []
        n_total = 0
        for si, (sdata, sid) in enumerate(zip(sdatas, ids, strict=True)):
            info = _tile_slide(
                sdata,
                si,
                writer,
                cfg=cfg,
                gene_index=gene_index,
                n_genes=n_genes,
                stride=stride,
                cell_um=cell_um,
                tile_um=tile_um,
                min_tissue=float(min_tissue),
                min_spot_cells=int(min_spot_cells),
                label_key=label_key,
                categories=categories,
                image_key=image_key,
                shapes_key=shapes_key,
                table_key=table_key,
                fill=fill,
                max_tiles=max_tiles_per_slide,
                show_progress=show_progress,
                slide_name=sid,
                tile_centers=tile_centers,
                jitter_um=float(jitter_um),
                tiles_per_spot=int(tiles_per_spot),
                seed=int(seed),
            )
            n_kept = info.pop("n_tiles")
            n_total += n_kept
            meta = sdata.attrs.get(ATTRS_KEY, {}) if sdata.attrs else {}
            slides_meta.append({"id": sid, "n_tiles": n_kept, "mpp_image": meta.get("mpp"), **info})
            logger.info("prepare: slide %s -> %d tiles", sid, n_kept)
        writer.flush()
        if n_total == 0:
            raise ValueError(
                "No tile passed the filters (min_tissue, min_spot_cells); lower them or check "
                "that the "
                "image and spots overlap in the 'microns' coordinate system."
            )
        manifest = {
            "format": "squall-sd-shards",
            "format_version": FORMAT_VERSION,
            "squall_sd_version": __version__,
            "model": cfg.to_dict(include_genes=False),
            "genes": vocab,
            "img_size": int(cfg.img_size),
            "expr_size": g,
            "mpp": mpp,
            "cell_um": cell_um,
            "tile_um": tile_um,
            "tile_stride_um": stride,
            "normalization": "binary",
            "expr_format": expr_format,
            "n_tiles": n_total,
            "shards": writer.shards,
            "slides": slides_meta,
            "labels": {"key": label_key, "categories": categories},
            "params": {
                "tile_centers": tile_centers,
                "jitter_um": float(jitter_um),
                "tiles_per_spot": int(tiles_per_spot),
                "seed": int(seed),
                "min_tissue": float(min_tissue),
                "min_spot_cells": int(min_spot_cells),
                "shard_size": int(shard_size),
                "image_key": image_key,
                "shapes_key": shapes_key,
                "table_key": table_key,
                "fill": fill,
            },
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    move_into_place(tmp, target)
    logger.info("prepare: wrote %d tiles from %d slides to %s", n_total, len(sdatas), target)
    return target


def _is_single(x: Any) -> bool:
    from spatialdata import SpatialData

    return isinstance(x, (SpatialData, str, os.PathLike))


def _extract(sdata: Any, centers: np.ndarray, *, image_key: str, patch_px: int, mpp: float) -> Any:
    try:
        from squall_sd.pp import extract_patches
    except ImportError:  # pp still being assembled
        from squall_sd.pp._patches import extract_patches
    return extract_patches(sdata, centers, image_key=image_key, patch_px=patch_px, mpp=mpp)


def _tile_slide(
    sdata: Any,
    si: int,
    writer: _ShardWriter,
    *,
    cfg: Any,
    gene_index: Mapping[str, int],
    n_genes: int,
    stride: float,
    cell_um: float,
    tile_um: float,
    min_tissue: float,
    min_spot_cells: int,
    label_key: str | None,
    categories: list[str] | None,
    image_key: str,
    shapes_key: str | None,
    table_key: str,
    fill: str | None,
    max_tiles: int | None,
    show_progress: bool,
    slide_name: str,
    tile_centers: str = "grid",
    jitter_um: float = 0.0,
    tiles_per_spot: int = 1,
    seed: int = 0,
) -> dict[str, Any]:
    """Tile one slide into ``writer``; return its manifest entry (without ``id``)."""
    from tqdm.auto import tqdm

    if image_key not in sdata.images:
        raise KeyError(f"Slide {slide_name!r} has no image {image_key!r}; available: {list(sdata.images)}.")
    regions = _read_regions(
        sdata,
        shapes_key=shapes_key,
        table_key=table_key,
        gene_index=gene_index,
        n_genes=n_genes,
        label_key=label_key,
        categories=categories,
        cfg=cfg,
    )
    if regions is not None and not np.isclose(regions.grid.cell_um, cell_um):
        raise ValueError(
            f"The model's expression cell ({cell_um} µm) is not img_size * mpp / expr_size "
            f"({regions.grid.cell_um} µm)."
        )
    has_expr = regions is not None and regions.counts is not None
    g = int(cfg.expr_size)
    if regions is not None:
        lo, hi = regions.bounds[:, :2].min(axis=0), regions.bounds[:, 2:].max(axis=0)
    else:
        el = sdata.images[image_key]
        arr = el["scale0"]["image"] if hasattr(el, "children") and "scale0" in el.children else el
        m = _affine(arr)
        h, w = arr.shape[-2:]
        corners = np.array([[0, 0], [w, 0], [0, h], [w, h]], dtype=float) @ m[:2, :2].T + m[:2, 2]
        lo, hi = corners.min(axis=0), corners.max(axis=0)
    spot_mode = tile_centers == "spots" and has_expr
    margin = tile_um / 2 + jitter_um if spot_mode else 0.0
    # one cell lattice per slide, anchored at the lower corner of the covered area (widened by half a
    # tile plus the jitter for spot-centred tiles, so that every tile lies on the lattice)
    x0 = float(np.floor((lo[0] - margin) / cell_um) * cell_um)
    y0 = float(np.floor((lo[1] - margin) / cell_um) * cell_um)
    if spot_mode:
        tile_cells = _spot_tile_cells(regions.center, x0, y0, tile_um, cell_um, jitter_um, tiles_per_spot, seed + si)
        origins = np.column_stack([x0 + tile_cells[:, 0] * cell_um, y0 + tile_cells[:, 1] * cell_um])
        nx = int(tile_cells[:, 0].max()) + g if len(tile_cells) else g
        ny = int(tile_cells[:, 1].max()) + g if len(tile_cells) else g
    else:
        nx = max(1, int(np.ceil((hi[0] - x0 - tile_um) / stride)) + 1)
        ny = max(1, int(np.ceil((hi[1] - y0 - tile_um) / stride)) + 1)
        step = int(round(stride / cell_um))  # tile stride in lattice cells
        tile_ij = np.array([(i, j) for j in range(ny) for i in range(nx)], dtype=np.int64).reshape(-1, 2)
        tile_cells = tile_ij * step  # tile origins in lattice cells (column, row)
        origins = np.column_stack([x0 + tile_ij[:, 0] * stride, y0 + tile_ij[:, 1] * stride])
        nx, ny = (nx - 1) * step + g, (ny - 1) * step + g
    meta: dict[str, Any] = {"regions": None, "fill": None}
    filler = None
    if has_expr:
        w = max(nx, int(np.ceil((hi[0] - x0) / cell_um)) + 1)
        h = max(ny, int(np.ceil((hi[1] - y0) / cell_um)) + 1)
        lattice, n_cells, regions, stats = _label_slide(regions, x0, y0, h, w)
        weight_of = (1.0 / np.maximum(n_cells, 1)).astype(np.float32)
        # drop tiles without enough covered cells before reading any pixels
        covered = np.array([(lattice[j : j + g, i : i + g] >= 0).sum() for i, j in tile_cells])
        cand = np.flatnonzero(covered >= max(min_spot_cells, 1))
        mode = _resolve_fill(fill, regions, sdata)
        if mode == "nearest":
            filler = _NearestFill(lattice, regions, n_cells, g, x0, y0)
        meta = {"regions": {"kind": regions.kind, **stats}, "fill": mode}
    else:
        cand = np.arange(len(origins))
    centers = origins[cand] + tile_um / 2
    ds = _extract(sdata, centers, image_key=image_key, patch_px=int(cfg.img_size), mpp=float(cfg.mpp))
    kept = 0
    bar = tqdm(total=len(cand), disable=not show_progress, desc=f"tiles {slide_name}")
    for b0 in range(0, len(cand), _READ_BATCH):
        if max_tiles is not None and kept >= max_tiles:
            break
        batch = ds.get_batch(np.arange(b0, min(b0 + _READ_BATCH, len(cand))))  # windows read together
        bar.update(len(batch))
        for j, rgb in enumerate(batch):
            k = b0 + j
            if max_tiles is not None and kept >= max_tiles:
                break
            if _tissue_fraction(rgb) < min_tissue:
                continue
            idx = np.full((g, g), -1, dtype=np.int64)
            weight = np.zeros((g, g), dtype=np.float32)
            filled = np.zeros((g, g), dtype=bool)
            label = -1
            if has_expr:
                ix0, iy0 = (int(v) for v in tile_cells[cand[k]])
                idx = lattice[iy0 : iy0 + g, ix0 : ix0 + g].astype(np.int64)
                label = _tile_label(regions, idx)
                if filler is not None:
                    need = (idx < 0) & _tissue_cells(rgb, g)
                    if need.any():
                        near = filler(iy0, ix0, need)
                        filled = need & (near >= 0)
                        idx[filled] = near[filled]
                has = idx >= 0
                weight[has] = weight_of[idx[has]]
                weight[filled] = 1.0
            writer.add(
                rgb=np.ascontiguousarray(rgb, dtype=np.uint8),
                res=float(cfg.mpp),
                slide=si,
                center=centers[k],
                label=label,
                idx=idx,
                weight=weight.astype(np.float16),
                fill=filled,
                regions=regions if has_expr else None,
            )
            kept += 1
    bar.close()
    meta["n_tiles"] = kept
    if spot_mode:
        meta["tiles"] = {"centers": "spots", "jitter_um": float(jitter_um), "tiles_per_spot": int(tiles_per_spot)}
    return meta


def _spot_tile_cells(
    centers: np.ndarray,
    x0: float,
    y0: float,
    tile_um: float,
    cell_um: float,
    jitter_um: float,
    copies: int,
    seed: int,
) -> np.ndarray:
    """Origins (lattice column, row) of tiles centred on each region, ``copies`` per region.

    The first copy of a region is centred on it (to the nearest lattice cell); further copies are
    shifted by a uniform random offset in [-``jitter_um``, ``jitter_um``] on each axis, drawn from
    ``seed`` so that a dataset is reproducible.
    """
    rng = np.random.default_rng(seed)
    centers = np.asarray(centers, dtype=np.float64).reshape(-1, 2)
    out = []
    for c in range(int(copies)):
        off = np.zeros_like(centers) if c == 0 else rng.uniform(-jitter_um, jitter_um, size=centers.shape)
        org = centers + off - tile_um / 2 - np.array([x0, y0])
        out.append(np.round(org / cell_um).astype(np.int64))
    return np.clip(np.concatenate(out), 0, None) if out else np.zeros((0, 2), np.int64)


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


def read_manifest(path: str | os.PathLike) -> dict[str, Any]:
    """Read the ``manifest.json`` of a folder written by :func:`prepare`.

    Parameters
    ----------
    path
        The folder (or the manifest file itself).

    Returns
    -------
    The manifest, with ``"root"`` set to the folder.

    """
    p = Path(path).expanduser()
    f = p / MANIFEST if p.is_dir() else p
    if not f.is_file():
        raise FileNotFoundError(
            f"{str(p)!r} is not a prepared dataset (no {MANIFEST}); create one with "
            "`squall_sd.train.prepare(...)` or `squall prepare`."
        )
    man = json.loads(f.read_text())
    if man.get("format") != "squall-sd-shards":
        raise ValueError(f"{str(f)!r} is not a squall-sd shard manifest.")
    if int(man.get("format_version", 0)) > FORMAT_VERSION:
        raise ValueError(
            f"{str(f)!r} was written by a newer squall-sd (format {man['format_version']}); "
            "upgrade squall-sd."
        )
    man["root"] = str(f.parent.resolve())
    return man
