"""`prepare` on every SpatialData geometry: spots (circles), bins and cells (polygons), sub-cell regions.

Known-answer tests on small synthetic slides (1 µm/px image, squall-tiny at 0.5 µm/px: 2 µm expression
cells, 112 µm tiles), real Visium HD bins and Xenium cells from ../shared/data/fixtures, and a check that
spots (circles) are rasterised exactly as the disc-only implementation did.
"""

from __future__ import annotations

import json

import geopandas as gpd
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import shapely
import spatialdata as sd
import zarr
from anndata import AnnData
from spatialdata.models import Image2DModel, ShapesModel, TableModel
from spatialdata.transformations import Identity, Scale, get_transformation

from squall_sd.train import prepare, read_manifest

GENES = [f"g{i}" for i in range(8)]
CELL = 2.0  # µm per expression cell of squall-tiny at mpp 0.5
PINK = (200, 110, 170)


# ------------------------------------------------------------------------------------ helpers
def _slide(geoms=None, *, circles=None, counts, tissue_x=240, extent=300, technology=None):
    """A synthetic slide: pink tissue left of ``tissue_x`` µm (white beyond), one region per counts row.

    The white part gives the slide the tissue contrast that pp's tissue test (a slide-wide Otsu
    threshold) needs; a uniform image has no tissue.
    """
    img = np.full((3, extent, extent), 255, dtype=np.uint8)
    img[:, :, :tissue_x] = np.asarray(PINK, dtype=np.uint8)[:, None, None]
    image = Image2DModel.parse(img, dims=("c", "y", "x"), transformations={"microns": Identity()})
    if circles is not None:
        xy, r = np.asarray(circles[0], dtype=float), np.asarray(circles[1], dtype=float)
        shapes = ShapesModel.parse(xy, geometry=0, radius=r, transformations={"microns": Identity()})
    else:
        shapes = ShapesModel.parse(gpd.GeoDataFrame(geometry=list(geoms)), transformations={"microns": Identity()})
    X = sp.csr_matrix(np.asarray(counts, dtype=np.float32))
    adata = AnnData(X=X)
    adata.var_names = GENES
    adata.obs_names = [f"r{i}" for i in range(X.shape[0])]
    adata.obs["region"] = pd.Categorical(["regions"] * X.shape[0])
    adata.obs["instance_id"] = np.arange(X.shape[0])
    table = TableModel.parse(adata, region="regions", region_key="region", instance_key="instance_id")
    sdata = sd.SpatialData(images={"he": image}, shapes={"regions": shapes}, tables={"table": table})
    if technology is not None:
        sdata.attrs["squall"] = {"technology": technology}
    return sdata


def _prepare(sdata, out, **kw):
    kw.setdefault("min_tissue", 0.0)
    kw.setdefault("expr_format", "dense")
    kw.setdefault("fill", None)
    return prepare(
        sdata,
        out,
        model_config_or_name="squall-tiny",
        mpp=0.5,
        genes=GENES,
        n_genes=len(GENES),
        shapes_key=kw.pop("shapes_key", "regions"),
        **kw,
    )


def _tiles(out):
    """All tiles of a prepared folder as numpy arrays (shards concatenated, spot indices made global)."""
    man = read_manifest(out)
    cols: dict[str, list] = {}
    offset = 0
    for sh in man["shards"]:
        g = zarr.open_group(f"{out}/{sh['path']}", mode="r")
        for k in g.array_keys():
            a = np.asarray(g[k][:])
            if k == "cell_spot":
                a = np.where(a >= 0, a + offset, -1)
            if k == "spot_indptr":
                continue
            cols.setdefault(k, []).append(a)
        ptr = np.asarray(g["spot_indptr"][:])
        cols.setdefault("spot_nnz", []).append(np.diff(ptr))
        offset += int(sh["n_spots"])
    return man, {k: np.concatenate(v) for k, v in cols.items()}


def _binary(c):
    return (np.asarray(c) > 0).astype(np.float32)


def _box(x0, y0, x1, y1):
    return shapely.box(x0, y0, x1, y1)


# ------------------------------------------------------------------------------------ synthetic
def test_square_bins_cover_k_cells(tmp_path):
    """A square bin covering k cell centres holds value / k in each of those cells, 0 elsewhere."""
    counts = np.zeros((2, 8))
    counts[0, [0, 2]] = [3, 1]
    counts[1, [1, 2, 5]] = [1, 1, 4]
    # lattice origin = floor(min bound / 2 µm) * 2 µm = (10, 10); cell centres at 11, 13, 15, ...
    a = _box(10, 10, 16, 16)  # 3 x 3 cells: x, y in 0..2
    b = _box(20, 10, 28, 14)  # 4 x 2 cells: x in 5..8, y in 0..1
    out = _prepare(_slide([a, b], counts=counts), tmp_path / "p")
    man, t = _tiles(out)
    assert man["n_tiles"] == 1 and man["slides"][0]["regions"]["kind"] == "polygons"
    expected = np.zeros((8, 56, 56), dtype=np.float32)
    expected[:, 0:3, 0:3] = _binary(counts[0])[:, None, None] / 9
    expected[:, 0:2, 5:9] = _binary(counts[1])[:, None, None] / 8
    np.testing.assert_allclose(t["expr_dense"][0].astype(np.float32), expected, rtol=1e-3, atol=0)
    np.testing.assert_array_equal(t["spot_obs"][t["cell_spot"][0, 0, 0]], 0)
    np.testing.assert_array_equal(t["spot_obs"][t["cell_spot"][0, 1, 8]], 1)
    assert not t["cell_fill"].any()
    np.testing.assert_allclose(t["center_um"][0], [10 + 56, 10 + 56])


def test_subcell_regions_go_to_their_centroid_cell(tmp_path):
    """Regions smaller than a cell land in the cell under their centroid; several there are pooled."""
    rng = np.random.default_rng(0)
    counts = rng.integers(0, 3, size=(5, 8)).astype(float)
    counts[:, 7] = 0
    counts[2, 7] = 5  # only S2 detects g7: the pool of S2 + S3 must detect it
    big = _box(10, 10, 16, 16)  # 9 cells, minus the one S4 takes
    s1 = _box(31.1, 11.1, 31.6, 11.6)  # centroid (31.35, 11.35) -> cell (y 0, x 10), alone
    s2 = _box(40.2, 14.2, 40.8, 14.8)  # centroid (40.5, 14.5) -> cell (2, 15)
    s3 = _box(41.2, 15.2, 41.8, 15.8)  # centroid (41.5, 15.5) -> cell (2, 15): pooled with S2
    s4 = _box(13.0, 12.6, 13.4, 13.0)  # centroid (13.2, 12.8) -> cell (1, 1), inside the big square
    out = _prepare(_slide([big, s1, s2, s3, s4], counts=counts), tmp_path / "p")
    man, t = _tiles(out)
    reg = man["slides"][0]["regions"]
    assert reg == {"kind": "polygons", "n_subcell": 4, "n_pooled": 1, "n_regions": 3}
    grid = t["expr_dense"][0].astype(np.float32)
    cs, w = t["cell_spot"][0], t["cell_weight"][0].astype(np.float32)
    # the big square keeps 8 cells (S4 took (1, 1)) and holds its vector / 8
    big_cells = np.zeros((56, 56), dtype=bool)
    big_cells[0:3, 0:3] = True
    big_cells[1, 1] = False
    assert (t["spot_obs"][cs[big_cells]] == 0).all()
    np.testing.assert_allclose(grid[:, big_cells], np.repeat(_binary(counts[0])[:, None] / 8, 8, 1), rtol=1e-3)
    # S4 and S1 alone in their cells: their own vector, undivided
    np.testing.assert_allclose(grid[:, 1, 1], _binary(counts[4]))
    np.testing.assert_allclose(grid[:, 0, 10], _binary(counts[1]))
    assert t["spot_obs"][cs[1, 1]] == 4 and t["spot_obs"][cs[0, 10]] == 1
    # S2 + S3 pooled: binary of the summed counts, log1p(CP10k) of the pool, no table row
    pool = counts[2] + counts[3]
    np.testing.assert_allclose(grid[:, 2, 15], _binary(pool))
    p = cs[2, 15]
    assert t["spot_obs"][p] == -1 and w[2, 15] == 1
    start = int(t["spot_nnz"][:p].sum())
    idx = t["spot_indices"][start : start + t["spot_nnz"][p]]
    np.testing.assert_array_equal(idx, np.flatnonzero(pool))
    vals = t["spot_log1p"][start : start + t["spot_nnz"][p]]
    np.testing.assert_allclose(vals, np.log1p(pool[idx] / pool.sum() * 1e4), rtol=1e-6)
    np.testing.assert_allclose(t["spot_center_um"][p], [41.0, 15.0])
    # nothing else is covered
    assert (cs >= 0).sum() == 8 + 3


def test_region_left_without_cells_is_pooled(tmp_path):
    """A one-cell bin whose only cell a sub-cell region takes joins that region's pool (nothing is lost)."""
    counts = np.zeros((2, 8))
    counts[0, 0] = 1
    counts[1, 3] = 2
    one = _box(10, 10, 12, 12)  # exactly one cell: (0, 0)
    tiny = _box(10.5, 10.5, 11.0, 11.0)  # centroid in (0, 0) too
    out = _prepare(_slide([one, tiny], counts=counts), tmp_path / "p")
    man, t = _tiles(out)
    assert man["slides"][0]["regions"] == {"kind": "polygons", "n_subcell": 2, "n_pooled": 1, "n_regions": 0}
    np.testing.assert_allclose(t["expr_dense"][0][:, 0, 0].astype(np.float32), _binary(counts[0] + counts[1]))
    assert (t["cell_spot"][0] >= 0).sum() == 1 and t["spot_obs"][t["cell_spot"][0, 0, 0]] == -1


def test_subcell_circles(tmp_path):
    """Tiny discs (e.g. cells as circles on a coarse grid) contribute to their centre's cell."""
    counts = np.eye(8)[:3] * 2
    xy = [(10.0, 10.0), (10.9, 10.9), (25.0, 13.0)]  # lattice origin (9.6 -> 8, 8): cells (1, 1), (1, 1), (2, 8)
    out = _prepare(_slide(circles=(xy, [0.4, 0.4, 0.4]), counts=counts), tmp_path / "p")
    man, t = _tiles(out)
    assert man["slides"][0]["regions"] == {"kind": "circles", "n_subcell": 3, "n_pooled": 1, "n_regions": 1}
    grid = t["expr_dense"][0].astype(np.float32)
    np.testing.assert_allclose(grid[:, 1, 1], _binary(counts[0] + counts[1]))
    np.testing.assert_allclose(grid[:, 2, 8], _binary(counts[2]))
    assert (t["cell_spot"][0] >= 0).sum() == 2


def test_nearest_fill(tmp_path):
    """In-tissue cells outside every spot get the nearest spot's vector undivided; the rest stays 0."""
    counts = np.zeros((2, 8))
    counts[0, [0, 1]] = 1
    counts[1, [4]] = 2
    circles = ([(30.0, 30.0), (80.0, 30.0)], [8.0, 8.0])
    # lattice origin (22, 22); tissue for x < 100 µm, i.e. cells x <= 38 (cell 38 covers [98, 100))
    plain = _prepare(_slide(circles=circles, counts=counts, tissue_x=100), tmp_path / "none")
    filled = _prepare(_slide(circles=circles, counts=counts, tissue_x=100), tmp_path / "fill", fill="nearest")
    _, a = _tiles(plain)
    man, b = _tiles(filled)
    assert man["slides"][0]["fill"] == "nearest" and man["params"]["fill"] == "nearest"
    cov = a["cell_spot"][0] >= 0
    f = b["cell_fill"][0]
    # covered cells are untouched; filled cells are exactly the uncovered in-tissue ones
    np.testing.assert_array_equal(b["cell_spot"][0][cov], a["cell_spot"][0][cov])
    np.testing.assert_array_equal(b["cell_weight"][0][cov], a["cell_weight"][0][cov])
    expect_fill = ~cov
    expect_fill[:, 39:] = False
    np.testing.assert_array_equal(f, expect_fill)
    assert (b["cell_weight"][0][f] == 1).all()
    assert (b["expr_dense"][0][:, :, 39:] == 0).all()
    # the nearest spot (away from the bisector x = 55 µm, where both are equally near)
    ys, xs = np.nonzero(f)
    cx = 22 + (xs + 0.5) * CELL
    cy = 22 + (ys + 0.5) * CELL
    d = np.stack([np.hypot(cx - 30, cy - 30), np.hypot(cx - 80, cy - 30)])
    clear = np.abs(d[0] - d[1]) > 2 * CELL
    got = b["spot_obs"][b["cell_spot"][0][ys, xs]]
    np.testing.assert_array_equal(got[clear], d.argmin(0)[clear])
    grid = b["expr_dense"][0].astype(np.float32)
    np.testing.assert_allclose(grid[:, ys[clear], xs[clear]], _binary(counts[d.argmin(0)[clear]]).T)
    # one spot's cells: its divided vector; summed over the spot, the vector itself
    spot0 = (b["cell_spot"][0] == b["cell_spot"][0][4, 4]) & ~f
    np.testing.assert_allclose(grid[:, spot0].sum(1), _binary(counts[0]), rtol=2e-3)


def test_nearest_fill_uses_geometry(tmp_path):
    """The nearest region is the one with the nearest covered cell, not the nearest centroid."""
    counts = np.zeros((2, 8))
    counts[0, 0] = 1
    counts[1, 1] = 1
    long = _box(22, 22, 60, 30)  # centroid (41, 26)
    small = _box(70, 40, 74, 44)  # centroid (72, 42)
    out = _prepare(_slide([long, small], counts=counts), tmp_path / "p", fill="nearest")
    _, t = _tiles(out)
    # cell (y 3, x 21), centre (65, 29): 6 µm from the long bin's nearest cell (13.4 µm from the small
    # bin's), but 24.2 µm from the long bin's centroid (14.8 µm from the small bin's)
    cs = t["cell_spot"][0]
    assert t["cell_fill"][0, 3, 21] and t["spot_obs"][cs[3, 21]] == 0
    np.testing.assert_allclose(t["expr_dense"][0][:, 3, 21].astype(np.float32), _binary(counts[0]))


@pytest.mark.parametrize(
    ("kind", "technology", "expected"),
    [("circles", None, "nearest"), ("circles", "xenium", None), ("polygons", None, None)],
)
def test_fill_auto(tmp_path, kind, technology, expected):
    """``fill="auto"`` fills capture spots (spec §4.10) but not bins or cells."""
    counts = np.ones((1, 8))
    if kind == "circles":
        sdata = _slide(circles=([(40.0, 40.0)], [10.0]), counts=counts, technology=technology)
    else:
        sdata = _slide([_box(30, 30, 50, 50)], counts=counts, technology=technology)
    out = _prepare(sdata, tmp_path / "p", fill="auto", expr_format="factored")
    man, t = _tiles(out)
    assert man["slides"][0]["fill"] == expected and man["params"]["fill"] == "auto"
    assert t["cell_fill"].any() == (expected == "nearest")


def test_fill_rejects_unknown(tmp_path):
    with pytest.raises(ValueError, match="fill"):
        _prepare(_slide([_box(0, 0, 4, 4)], counts=np.ones((1, 8))), tmp_path / "p", fill="zeros")


# ------------------------------------------------------------------------------------ circles: unchanged
def _cells_in_disc(cx, cy, r, x0, y0, cell):
    """Reference (the disc-only implementation): lattice cells whose centre lies in the disc."""
    i0, i1 = int(np.floor((cx - r - x0) / cell)) - 1, int(np.ceil((cx + r - x0) / cell)) + 1
    j0, j1 = int(np.floor((cy - r - y0) / cell)) - 1, int(np.ceil((cy + r - y0) / cell)) + 1
    xs = x0 + (np.arange(i0, i1) + 0.5) * cell
    ys = y0 + (np.arange(j0, j1) + 0.5) * cell
    return int((((xs[None, :] - cx) ** 2 + (ys[:, None] - cy) ** 2) <= r * r).sum())


def _reference_tile(origin, g, cell, center, radius, n_cells):
    """Reference rasterisation of one tile (nearest centre wins, ties to the lower spot)."""
    x0, y0 = origin
    xs = x0 + (np.arange(g) + 0.5) * cell
    ys = y0 + (np.arange(g) + 0.5) * cell
    idx = np.full((g, g), -1, dtype=np.int64)
    best = np.full((g, g), np.inf)
    for s in range(len(center)):
        d2 = (xs[None, :] - center[s, 0]) ** 2 + (ys[:, None] - center[s, 1]) ** 2
        hit = (d2 <= radius[s] ** 2) & (d2 < best)
        idx[hit] = s
        best[hit] = d2[hit]
    weight = np.zeros((g, g), dtype=np.float32)
    weight[idx >= 0] = 1.0 / np.maximum(n_cells[idx[idx >= 0]], 1)
    return idx, weight.astype(np.float16)


def test_circles_unchanged(example_sdata, tmp_path):
    """Spots are rasterised exactly as by the disc-only implementation (bundled her2st example)."""
    out = prepare(
        example_sdata, tmp_path / "c2", model_config_or_name="squall-tiny", mpp=4.0, fill=None, min_tissue=0.2
    )
    man, t = _tiles(out)
    shapes = example_sdata.shapes["spots"]
    table = example_sdata.tables["table"]
    m = get_transformation(shapes, "microns").to_affine_matrix(("x", "y"), ("x", "y"))
    xy = np.c_[shapes.geometry.x, shapes.geometry.y] @ m[:2, :2].T + m[:2, 2]
    r = shapes["radius"].to_numpy() * np.sqrt(abs(np.linalg.det(m[:2, :2])))
    pos = shapes.index.get_indexer(table.obs[table.uns["spatialdata_attrs"]["instance_key"]])
    center, radius = xy[pos], r[pos]  # in table order
    cell, g, tile = man["cell_um"], man["expr_size"], man["tile_um"]
    lo = (center - radius[:, None]).min(0)
    x0, y0 = np.floor(lo / cell) * cell
    n_cells = np.array([_cells_in_disc(*c, rr, x0, y0, cell) for c, rr in zip(center, radius, strict=True)])
    assert man["n_tiles"] > 10
    for i in range(man["n_tiles"]):
        # tile origins lie on the slide lattice; their float32 storage only rounds them
        base = np.array([x0, y0])
        origin = base + np.round((t["center_um"][i] - tile / 2 - base) / cell) * cell
        idx, weight = _reference_tile(origin, g, cell, center, radius, n_cells)
        got = t["cell_spot"][i]
        obs = np.where(got >= 0, t["spot_obs"][np.maximum(got, 0)], -1)
        np.testing.assert_array_equal(obs, idx)
        np.testing.assert_array_equal(t["cell_weight"][i], weight)
    assert not t["cell_fill"].any()


# ------------------------------------------------------------------------------------ real fixtures
SEURAT_HD = "fixtures/seurat/tests/testdata/visium_hd"
SFE_XENIUM = "fixtures/sfe_8fa1e84/inst/extdata/xenium"


def _crop(sdata, shapes_key, box):
    """Keep the regions whose centroid lies in ``box`` (µm); the image is replaced by a decoded level."""
    shapes = sdata.shapes[shapes_key]
    um = sd.transform(shapes, to_coordinate_system="microns")
    c = um.geometry.centroid
    keep = ((c.x >= box[0]) & (c.x < box[2]) & (c.y >= box[1]) & (c.y < box[3])).to_numpy()
    table = sdata.tables["table"]
    rows = table.obs["instance_id"].isin(shapes.index[keep]).to_numpy()
    sub = sdata.tables["table"][rows].copy()
    images = {}
    if "he" in sdata.images:  # a decoded in-memory copy of a coarser level: fast to tile
        el = sdata.images["he"]
        full = el["scale0"]["image"]
        lvl = el["scale2"]["image"]
        f = np.array(full.shape[1:]) / np.array(lvl.shape[1:])
        m = get_transformation(full, "microns").to_affine_matrix(("x", "y"), ("x", "y"))
        images["he"] = Image2DModel.parse(
            np.asarray(lvl.values),
            dims=("c", "y", "x"),
            transformations={"microns": Scale([m[1, 1] * f[0], m[0, 0] * f[1]], axes=("y", "x"))},
        )
    out = sd.SpatialData(images=images, shapes={shapes_key: shapes[keep]}, tables={"table": sub})
    out.attrs.update(sdata.attrs)
    return out, um[keep]


def _check_mass_and_geometry(man, t, polys, cell):
    """Every region's cells sum to one whole vector over all tiles, and lie inside the region.

    A region's cells are those whose centre it contains, or (sub-cell rule) the one cell under its centroid.
    """
    real = t["spot_obs"][np.maximum(t["cell_spot"], 0)]
    covered = (t["cell_spot"] >= 0) & ~t["cell_fill"]
    w = t["cell_weight"].astype(np.float32)
    keys = np.where(covered, real, -9)
    # regions of the table: sum of weights over all tiles (non-overlapping tiles) = 1
    totals = np.bincount(keys[covered & (keys >= 0)], weights=w[covered & (keys >= 0)])
    present = np.flatnonzero(totals > 0)
    np.testing.assert_allclose(totals[present], 1.0, rtol=5e-3)
    # covered cell centres lie inside their (not sub-cell) region
    n, g = t["cell_spot"].shape[:2]
    ys, xs = np.mgrid[0:g, 0:g]
    origin = t["center_um"].astype(float) - man["tile_um"] / 2
    cx = origin[:, 0, None, None] + (xs + 0.5) * cell
    cy = origin[:, 1, None, None] + (ys + 0.5) * cell
    sel = covered & (keys >= 0)
    geoms = polys.geometry.to_numpy()[keys[sel]]
    inside = shapely.contains_xy(geoms, cx[sel], cy[sel])
    c = shapely.centroid(geoms)
    under = (np.abs(shapely.get_x(c) - cx[sel]) <= cell / 2) & (np.abs(shapely.get_y(c) - cy[sel]) <= cell / 2)
    assert (inside | under).all()
    return present


@pytest.mark.parametrize(("bin_size", "mpp"), [(8, 0.5), (16, 1.0)])
def test_visium_hd_bins(shared_data, tmp_path, bin_size, mpp):
    """Real Visium HD bins (squares) cover (bin / cell)² cells each, every bin's cells summing to 1."""
    import squall_sd as squall

    hd = squall.io.visium_hd(shared_data / SEURAT_HD, bin_size=bin_size)
    key = f"bins_{bin_size}um"
    sdata, polys = _crop(hd, key, (2000, 2000, 3500, 3500))
    assert len(polys) > 20
    cell = 4 * mpp
    out = prepare(
        sdata,
        tmp_path / "hd",
        model_config_or_name="squall-tiny",
        mpp=mpp,
        n_genes=32,
        shapes_key=key,
        min_tissue=0.0,
        shard_size=64,
    )
    man, t = _tiles(out)
    info = man["slides"][0]
    assert info["regions"]["kind"] == "polygons" and info["fill"] is None  # auto: bins are not filled
    assert info["regions"]["n_subcell"] == 0 and info["regions"]["n_regions"] == len(polys)
    present = _check_mass_and_geometry(man, t, polys, cell)
    assert len(present) == len(polys)
    # a bin of (bin / cell)² cells in area covers that many cell centres
    cs = t["cell_spot"]
    per_region = np.bincount(t["spot_obs"][cs[cs >= 0]])
    assert np.median(per_region[per_region > 0]) == (bin_size / cell) ** 2
    # the binary vector of a bin is the table row's detected vocabulary genes
    vocab = man["genes"]
    tab = sdata.tables["table"]
    row = int(t["spot_obs"][0])
    start, stop = 0, int(t["spot_nnz"][0])
    x = tab[row, vocab].X.toarray().ravel()
    np.testing.assert_array_equal(t["spot_indices"][start:stop], np.flatnonzero(x > 0))


@pytest.mark.parametrize("mpp", [0.5, 4.0])
def test_xenium_cells(shared_data, tmp_path, mpp):
    """Real Xenium cell polygons: every cell contributes, large ones by geometry, small ones pooled."""
    import squall_sd as squall

    xe = squall.io.xenium(shared_data / SFE_XENIUM, transcripts=False)
    cells = sd.transform(xe.shapes["cells"], to_coordinate_system="microns")
    x0, y0, x1, y1 = cells.total_bounds
    n = int(max(x1, y1)) + 50
    img = np.full((3, n, n), 255, dtype=np.uint8)
    img[:, int(y0) : int(y1), int(x0) : int(x1)] = np.asarray(PINK, dtype=np.uint8)[:, None, None]
    xe.images["he"] = Image2DModel.parse(img, dims=("c", "y", "x"), transformations={"microns": Identity()})
    cell = 4 * mpp
    out = prepare(
        xe,
        tmp_path / "xe",
        model_config_or_name="squall-tiny",
        mpp=mpp,
        n_genes=16,
        shapes_key="cells",
        min_tissue=0.0,
        shard_size=64,
    )
    man, t = _tiles(out)
    info = man["slides"][0]
    assert info["regions"]["kind"] == "polygons" and info["fill"] is None  # auto: cells are not filled
    assert not t["cell_fill"].any()
    present = _check_mass_and_geometry(man, t, cells, cell)
    reg = info["regions"]
    small = int((cells.area < cell * cell).sum())
    assert reg["n_subcell"] >= small
    if mpp == 0.5:
        assert small == 0 and len(present) == len(cells) == reg["n_regions"]
    else:  # 16 µm cells: many cells are smaller; each lands in a cell alone or pooled
        assert small > 50 and reg["n_pooled"] > 0
        assert len(present) == reg["n_regions"] < len(cells)
        used = np.unique(t["cell_spot"][t["cell_spot"] >= 0])
        assert int((t["spot_obs"][used] == -1).sum()) == reg["n_pooled"]
        # the table's other cells are all in pools (of two or more)
        assert len(cells) - reg["n_regions"] >= 2 * reg["n_pooled"]
    json.dumps(man)


def test_labelling_in_bands_is_exact(example_sdata, tmp_path, monkeypatch):
    """Labelling the slide lattice in many row bands (bounded memory) gives the same shards."""
    from squall_sd.train import _regions

    kw = dict(model_config_or_name="squall-tiny", mpp=4.0, fill="auto", min_tissue=0.2)
    ref = prepare(example_sdata, tmp_path / "one", **kw)
    monkeypatch.setattr(_regions, "_MAX_PAIRS", 200)
    banded = prepare(example_sdata, tmp_path / "bands", **kw)
    _, a = _tiles(ref)
    _, b = _tiles(banded)
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
