from __future__ import annotations

import numpy as np
import pytest
import shapely
from scipy.spatial import cKDTree
from spatialdata.transformations import Identity, get_transformation

import squall_sd as squall


@pytest.fixture
def mob_with_tissue(mob_sdata):
    squall.pp.detect_tissue(mob_sdata)
    return mob_sdata


def test_visium_hex_grid(mob_with_tissue):
    sdata = mob_with_tissue
    squall.pp.make_spots(sdata)
    spots = sdata.shapes["virtual_spots"]
    assert isinstance(get_transformation(spots, "microns"), Identity)
    np.testing.assert_allclose(spots["radius"], 27.5)  # 55 µm discs, in microns
    xy = np.column_stack([spots.geometry.x, spots.geometry.y])
    d, _ = cKDTree(xy).query(xy, k=7)
    np.testing.assert_allclose(d[:, 1], 100.0, rtol=1e-9)  # nearest neighbour = pitch
    # interior spots have 6 neighbours at the pitch (hexagonal lattice)
    assert np.median((np.abs(d[:, 1:] - 100.0) < 1e-6).sum(1)) == 6
    # only over tissue: centres inside (or within a radius of) the tissue, fractions honoured
    tissue = sdata.shapes["he_tissue"].union_all()
    assert shapely.contains_xy(tissue.buffer(27.5), xy[:, 0], xy[:, 1]).all()
    assert (spots["tissue_fraction"] >= 0.5).all()
    n_area = tissue.area / (100.0**2 * np.sqrt(3) / 2)  # spots expected from the tissue area
    assert 0.85 < len(spots) / n_area < 1.15


def test_make_spots_existing_key(mob_with_tissue):
    squall.pp.make_spots(mob_with_tissue)
    with pytest.raises(ValueError, match="already exists"):
        squall.pp.make_spots(mob_with_tissue)
    squall.pp.make_spots(mob_with_tissue, size_um=100, pitch_um=200, overwrite=True)
    spots = mob_with_tissue.shapes["virtual_spots"]
    np.testing.assert_allclose(spots["radius"], 50.0)
    xy = np.column_stack([spots.geometry.x, spots.geometry.y])
    np.testing.assert_allclose(cKDTree(xy).query(xy, k=2)[0][:, 1], 200.0)


def test_bins_and_tiles(mob_with_tissue):
    bins = squall.pp.make_spots(mob_with_tissue, kind="bins", size_um=16, inplace=False)
    assert "virtual_spots" not in mob_with_tissue.shapes
    np.testing.assert_allclose(bins.area, 256.0)
    b = bins.bounds.to_numpy()
    np.testing.assert_allclose(np.mod(b, 16.0), 0.0, atol=1e-9)  # grid anchored at microns origin
    tiles = squall.pp.make_spots(
        mob_with_tissue, kind="tiles", inplace=False, min_tissue_fraction=0.0
    )
    np.testing.assert_allclose(tiles.area, 112.0**2)
    tissue = mob_with_tissue.shapes["he_tissue"].union_all()
    # with fraction 0 every tile touching tissue is kept, so the tiles cover the whole tissue
    assert tissue.difference(tiles.union_all()).area < 1e-6 * tissue.area


def test_make_spots_detects_tissue_when_missing(mob_sdata):
    squall.pp.make_spots(mob_sdata, kind="bins", size_um=50, key_added="b")
    assert "he_tissue" in mob_sdata.shapes and "b" in mob_sdata.shapes
    with pytest.raises(KeyError, match="not found in `sdata.shapes`"):
        squall.pp.make_spots(mob_sdata, tissue_key="missing", key_added="c")
    with pytest.raises(ValueError, match="`kind` must be one of"):
        squall.pp.make_spots(mob_sdata, kind="hexagons", key_added="c")


def test_make_spots_not_inplace_never_mutates(mob_sdata):
    # tissue_key=None and no tissue yet: detected on the fly, but not written with inplace=False
    before = set(mob_sdata.shapes)
    gdf = squall.pp.make_spots(mob_sdata, kind="bins", size_um=50, inplace=False)
    assert set(mob_sdata.shapes) == before
    assert "he_tissue" not in mob_sdata.shapes and "virtual_spots" not in mob_sdata.shapes
    # the same spots as with the stored tissue
    squall.pp.detect_tissue(mob_sdata)
    ref = squall.pp.make_spots(mob_sdata, kind="bins", size_um=50, inplace=False)
    assert len(gdf) == len(ref)
    assert shapely.equals_exact(gdf.geometry.to_numpy(), ref.geometry.to_numpy(), 0).all()


def test_make_spots_tissue_argument(mob_sdata):
    tissue = squall.pp.detect_tissue(mob_sdata, inplace=False)
    before = set(mob_sdata.shapes)
    gdf = squall.pp.make_spots(mob_sdata, tissue=tissue, inplace=False)
    assert set(mob_sdata.shapes) == before
    mob_sdata.shapes["he_tissue"] = tissue
    ref = squall.pp.make_spots(mob_sdata, inplace=False)
    np.testing.assert_array_equal(gdf["array_row"].to_numpy(), ref["array_row"].to_numpy())
    np.testing.assert_array_equal(gdf["tissue_fraction"].to_numpy(), ref["tissue_fraction"].to_numpy())
    with pytest.raises(ValueError, match="not both"):
        squall.pp.make_spots(mob_sdata, tissue=tissue, tissue_key="he_tissue", inplace=False)


@pytest.mark.parametrize("kind", ["visium", "bins"])
def test_make_spots_fraction_matches_polygons(mob_with_tissue, kind):
    # the boundary shortcut gives exactly the fractions of intersecting every lattice polygon
    from squall_sd.pp._spots import _tissue_fraction, _tissue_union

    gdf = squall.pp.make_spots(
        mob_with_tissue, kind=kind, size_um=40, inplace=False, min_tissue_fraction=0.0
    )
    tissue = _tissue_union(mob_with_tissue, "he", "he_tissue")
    if kind == "visium":
        shapes = shapely.buffer(gdf.geometry.to_numpy(), 20.0, quad_segs=16)
    else:
        shapes = gdf.geometry.to_numpy()
    ref = _tissue_fraction(tissue, shapes).astype(np.float32)
    np.testing.assert_array_equal(gdf["tissue_fraction"].to_numpy(), ref)


@pytest.mark.parametrize("kind", ["visium", "bins"])
def test_lattice_shortcuts_equal_direct_shapely(mob_with_tissue, kind):
    # the candidate grid of _near_boundary and the per-block clipping of _local_intersection give
    # exactly what testing every lattice point / intersecting with the whole tissue gives
    from squall_sd.pp._spots import _local_intersection, _near_boundary, _tissue_union

    tissue = _tissue_union(mob_with_tissue, "he", "he_tissue")
    xmin, ymin, xmax, ymax = tissue.bounds
    # several pieces: the tissue and a shifted copy
    tissue = shapely.union(tissue, shapely.affinity.translate(tissue, xoff=xmax - xmin + 50.0))
    assert len(shapely.get_parts(tissue)) > 1
    xmin, ymin, xmax, ymax = tissue.bounds
    rng = np.random.default_rng(0)
    cx = rng.uniform(xmin - 100, xmax + 100, 4000)
    cy = rng.uniform(ymin - 100, ymax + 100, 4000)
    for dist in (5.0, 27.5, 80.0):
        ref = shapely.dwithin(tissue.boundary, shapely.points(cx, cy), dist)
        np.testing.assert_array_equal(_near_boundary(tissue.boundary, cx, cy, dist), ref)
    near = _near_boundary(tissue.boundary, cx, cy, 20.0)
    if kind == "visium":
        shapes = shapely.buffer(shapely.points(cx[near], cy[near]), 20.0, quad_segs=16)
    else:
        shapes = shapely.box(cx[near] - 14, cy[near] - 14, cx[near] + 14, cy[near] + 14)
    assert len(shapes) > 64  # several blocks
    got = shapely.area(_local_intersection(shapes, tissue, per_block=16))  # per piece
    np.testing.assert_array_equal(got, shapely.area(shapely.intersection(shapes, tissue)))
