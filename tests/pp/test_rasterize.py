from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from scipy import sparse

import squall_sd as squall
from squall_sd._sdata import identity
from squall_sd.io._common import circles_element, make_sdata, table_element

MOB_MPP = 3.0
MOB_SPOT_DIAMETER_UM = 55.0


def _spot_centres_um(sdata):
    g = sdata.shapes["spots"]
    return np.column_stack([g.geometry.x, g.geometry.y]) * MOB_MPP


def test_mass_conserved_per_spot(mob_sdata):
    """Real MOB spots (55 µm discs), 0.9 mm tiles at 4 µm/px: a spot's cells sum to its vector."""
    centres = _spot_centres_um(mob_sdata)[::40]
    kw = {"patch_px": 224, "mpp": 4.0, "grid": 56}
    tiles = squall.pp.rasterize_expression(
        mob_sdata, centres, shapes_key="spots", as_sparse=True, **kw
    )
    regions = squall.pp.region_weights(mob_sdata, centres, shapes_key="spots", **kw)
    table = mob_sdata.tables["table"]
    binary = (table.X.toarray() > 0).astype(np.float32)
    assert len(tiles) == len(centres) and tiles[0].shape == (56 * 56, table.n_vars)
    row_of = {k: i for i, k in enumerate(table.obs["instance_id"].astype(str))}
    n_checked = 0
    for b, tile in enumerate(tiles):
        valid = regions.index[b] >= 0
        masks = regions.weights[b, valid].reshape(int(valid.sum()), -1)
        sums = np.asarray(
            (sparse.csr_matrix(masks) @ tile).todense()
        )  # (R, G): sum over each spot's cells
        rows = [row_of[n] for n in regions.names[b, valid]]
        full = masks.sum(1) == regions.n_cells[b, valid]  # spots not cut by the tile border
        np.testing.assert_allclose(sums[full], binary[rows][full], rtol=1e-5, atol=1e-5)
        n_checked += int(full.sum())
        # total mass: sum over spots of binary vector x fraction of the spot inside the tile
        frac = masks.sum(1) / regions.n_cells[b, valid]
        np.testing.assert_allclose(
            np.asarray(tile.sum(0)).ravel(), frac @ binary[rows], rtol=1e-4, atol=1e-3
        )
    assert n_checked > 50
    # the dense layout is the same data, channels first
    dense = squall.pp.rasterize_expression(mob_sdata, centres[:1], shapes_key="spots", **kw)
    assert dense.shape == (1, table.n_vars, 56, 56) and dense.dtype == np.float32
    np.testing.assert_allclose(dense[0], tiles[0].toarray().T.reshape(-1, 56, 56))


def test_one_spot_tile_disc_of_true_radius(mob_raw):
    """One 55 µm spot on a 0.5 µm/px tile covers the 2 µm cells with centres within 27.5 µm."""
    counts = np.array([[0, 3, 1, 0, 7]], dtype=np.float32)
    centre = np.array([[1000.3, 2000.7]])
    spots = circles_element(centre, 27.5, {"microns": identity()})
    adata = ad.AnnData(X=counts, var=pd.DataFrame(index=["A", "B", "C", "D", "E"]))
    sdata = make_sdata(shapes={"spots": spots}, table=table_element(adata, "spots"))
    tile = np.array([[1010.0, 1990.0]])  # spot off-centre in the tile
    out = squall.pp.rasterize_expression(
        sdata, tile, shapes_key="spots", genes=["E", "B", "Z", "A"]
    )
    assert out.shape == (1, 4, 56, 56)
    cell = 224 * 0.5 / 56
    cxs = tile[0, 0] - 56 + (np.arange(56) + 0.5) * cell
    cys = tile[0, 1] - 56 + (np.arange(56) + 0.5) * cell
    inside = (cxs[None, :] - centre[0, 0]) ** 2 + (cys[:, None] - centre[0, 1]) ** 2 <= 27.5**2
    n = inside.sum()
    assert abs(n - np.pi * 27.5**2 / cell**2) < 0.03 * n
    np.testing.assert_array_equal(out[0, 0] > 0, inside)  # gene E, binary 1 / n on the disc
    np.testing.assert_allclose(out[0, 0][inside], 1.0 / n)
    np.testing.assert_allclose(out[0].sum(axis=(1, 2)), [1.0, 1.0, 0.0, 0.0], rtol=1e-5)
    # sparse layout: rows y-major, x-minor
    sp = squall.pp.rasterize_expression(
        sdata, tile, shapes_key="spots", genes=["E", "B", "Z", "A"], as_sparse=True
    )
    assert sparse.issparse(sp[0]) and sp[0].shape == (56 * 56, 4)
    np.testing.assert_allclose(sp[0].toarray().reshape(56, 56, 4).transpose(2, 0, 1), out[0])
    # a spot cut by the tile edge keeps its divisor: only its in-tile share of the mass is there
    edge = squall.pp.rasterize_expression(
        sdata, [[1000.3 + 56.0, 2000.7]], shapes_key="spots", genes=["E"]
    )
    assert 0.4 < edge.sum() < 0.6
    # log-normalised values are spread the same way
    lg = squall.pp.rasterize_expression(
        sdata, tile, shapes_key="spots", genes=["E"], method="log1p_cp10k"
    )
    np.testing.assert_allclose(lg[0, 0].sum(), np.log1p(7 / 11 * 1e4), rtol=1e-5)


def test_bins_as_polygons(mob_sdata):
    """Square 16 µm bins (polygons) on a 2 µm grid: 64 cells each, values = binary / 64."""
    squall.pp.detect_tissue(mob_sdata)
    squall.pp.make_spots(mob_sdata, kind="bins", size_um=16, key_added="bins")
    bins = mob_sdata.shapes["bins"]
    rng = np.random.default_rng(0)
    X = sparse.random(len(bins), 20, density=0.3, format="csr", random_state=1, dtype=np.float32)
    adata = ad.AnnData(X=X, var=pd.DataFrame(index=[f"g{i}" for i in range(20)]))
    mob_sdata.tables["bins_table"] = table_element(
        adata, "bins", instance_ids=bins.index.to_numpy()
    )
    c = bins.geometry.iloc[int(rng.integers(len(bins)))].centroid
    centre = np.array(
        [[np.round(c.x / 2) * 2, np.round(c.y / 2) * 2]]
    )  # even microns: cells align with bins
    regions = squall.pp.region_weights(mob_sdata, centre, shapes_key="bins")
    full = regions.weights[0].sum(axis=(1, 2)) == regions.n_cells[0]
    assert full.sum() >= 36 and (regions.n_cells[0][regions.index[0] >= 0] == 64).all()
    out = squall.pp.rasterize_expression(
        mob_sdata, centre, shapes_key="bins", table_key="bins_table"
    )
    binary = (X.toarray() > 0).astype(np.float32)
    for r in np.flatnonzero(full):
        got = (out[0] * regions.weights[0, r]).sum(axis=(1, 2))
        np.testing.assert_allclose(got, binary[regions.index[0, r]], atol=1e-6)


def test_rasterize_errors(mob_sdata):
    with pytest.raises(KeyError, match="not found in `sdata.shapes`"):
        squall.pp.rasterize_expression(mob_sdata, [[0.0, 0.0]], shapes_key="cells")
    with pytest.raises(ValueError, match="annotates \\['spots'\\], not 'he_tissue'"):
        squall.pp.detect_tissue(mob_sdata)
        squall.pp.rasterize_expression(mob_sdata, [[0.0, 0.0]], shapes_key="he_tissue")
    with pytest.raises(ValueError, match="match the"):
        squall.pp.rasterize_expression(
            mob_sdata, [[0.0, 0.0]], shapes_key="spots", genes=["NOPE1", "NOPE2"]
        )
    # a tile far from any spot is all zeros
    out = squall.pp.rasterize_expression(
        mob_sdata, [[-5000.0, -5000.0]], shapes_key="spots", genes=["Actb"]
    )
    assert out.shape == (1, 1, 56, 56) and not out.any()
    assert MOB_SPOT_DIAMETER_UM == 55.0


def _assign_reference(rg, cx, cy):
    """The per-region loop RegionGrid.assign used before it was vectorised (the specification)."""
    import shapely

    g, cell = rg.grid, rg.cell_um
    ox, oy = cx - rg.tile_um / 2, cy - rg.tile_um / 2
    eps = cell * 1e-9
    cand = rg._tree.query(shapely.box(ox + eps, oy + eps, ox + rg.tile_um - eps, oy + rg.tile_um - eps))
    empty = np.zeros(0, dtype=np.int64)
    if len(cand) == 0:
        return empty, empty, empty
    b = rg.bounds[cand]
    ext = (min(b[:, 0].min(), ox), min(b[:, 1].min(), oy), max(b[:, 2].max(), ox + rg.tile_um),
           max(b[:, 3].max(), oy + rg.tile_um))
    every = rg._tree.query(shapely.box(*ext))
    b = rg.bounds[every]
    ext = (min(b[:, 0].min(), ext[0]), min(b[:, 1].min(), ext[1]), max(b[:, 2].max(), ext[2]),
           max(b[:, 3].max(), ext[3]))
    kx0, ky0 = int(np.floor((ext[0] - ox) / cell)) - 1, int(np.floor((ext[1] - oy) / cell)) - 1
    kx1, ky1 = int(np.ceil((ext[2] - ox) / cell)) + 1, int(np.ceil((ext[3] - oy) / cell)) + 1
    h, w = ky1 - ky0, kx1 - kx0
    label = np.full((h, w), -1, dtype=np.int64)
    best = np.full((h, w), np.inf)
    small = []
    for local, ridx in enumerate(every):
        x0, y0, x1, y1 = rg.bounds[ridx]
        ax = max(int(np.ceil((x0 - ox) / cell - 0.5)) - kx0, 0)
        bx = min(int(np.floor((x1 - ox) / cell - 0.5)) - kx0 + 1, w)
        ay = max(int(np.ceil((y0 - oy) / cell - 0.5)) - ky0, 0)
        by = min(int(np.floor((y1 - oy) / cell - 0.5)) - ky0 + 1, h)
        if ax >= bx or ay >= by:
            small.append(local)
            continue
        xs = ox + (np.arange(ax, bx) + kx0 + 0.5) * cell
        ys = oy + (np.arange(ay, by) + ky0 + 0.5) * cell
        ccx, ccy = rg.center[ridx]
        d2 = (xs[None, :] - ccx) ** 2 + (ys[:, None] - ccy) ** 2
        if rg.kind == "circles":
            inside = d2 <= rg.radius[ridx] ** 2
        else:
            inside = shapely.contains_xy(rg.geoms[ridx], *np.meshgrid(xs, ys))
        if not inside.any():
            small.append(local)
            continue
        sub_best = best[ay:by, ax:bx]
        win = inside & (d2 < sub_best)
        sub_best[win] = d2[win]
        label[ay:by, ax:bx][win] = local
    counts = np.bincount(label[label >= 0], minlength=len(every))
    tile_lab = label[-ky0 : -ky0 + g, -kx0 : -kx0 + g]
    yy, xx = np.nonzero(tile_lab >= 0)
    cells, local_ids = (yy * g + xx).astype(np.int64), tile_lab[yy, xx]
    extra_cells, extra_local = [], []
    for local in small + [int(i) for i in np.flatnonzero(counts == 0) if int(i) not in small]:
        ccx, ccy = rg.center[every[local]]
        x, y = int(np.floor((ccx - ox) / cell)), int(np.floor((ccy - oy) / cell))
        if 0 <= x < g and 0 <= y < g:
            extra_cells.append(y * g + x)
            extra_local.append(local)
    for local in extra_local:
        counts[local] = max(counts[local], 1)
    cells = np.concatenate([cells, np.asarray(extra_cells, dtype=np.int64)])
    local_ids = np.concatenate([local_ids, np.asarray(extra_local, dtype=np.int64)])
    return cells, np.asarray(every, dtype=np.int64)[local_ids], counts[local_ids].astype(np.int64)


@pytest.mark.parametrize("kind", ["circles", "polygons", "large_polygons"])
def test_region_grid_vectorised_equals_reference(kind):
    import geopandas as gpd
    import shapely
    from spatialdata.models import ShapesModel
    from spatialdata.transformations import Identity

    rng = np.random.default_rng(1)
    n = 400
    xy = rng.uniform(0, 600, (n, 2))
    xy[: n // 4] = np.round(xy[: n // 4] / 8) * 8  # lattice-aligned centres: equal-distance ties
    if kind == "circles":
        shapes = ShapesModel.parse(
            xy, geometry=0, radius=rng.uniform(0.3, 25, n), transformations={"microns": Identity()}
        )
    else:
        e = 12.0 if kind == "polygons" else 150.0
        geoms = shapely.box(
            xy[:, 0], xy[:, 1], xy[:, 0] + e * rng.uniform(0.1, 2, n), xy[:, 1] + e * rng.uniform(0.1, 2, n)
        )
        geoms = np.where(rng.random(n) < 0.3, shapely.buffer(shapely.points(xy), e / 2), geoms)
        shapes = ShapesModel.parse(gpd.GeoDataFrame(geometry=geoms), transformations={"microns": Identity()})
    rg = squall.pp.RegionGrid(shapes, patch_px=224, mpp=0.5, grid=56)
    for cx, cy in rng.uniform(-60, 660, (25, 2)):
        got, ref = rg.assign(cx, cy), _assign_reference(rg, cx, cy)
        for a, b in zip(got, ref, strict=True):
            np.testing.assert_array_equal(a, b)
