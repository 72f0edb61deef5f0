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
