"""Visium HD reader on real binned outputs that lack feature_slice.h5 (../shared/data/fixtures)."""

from __future__ import annotations

import shutil

import numpy as np
import pandas as pd
import pytest
import spatialdata as sd
from spatialdata.transformations import get_transformation

import squall_sd as squall

SEURAT_HD = "fixtures/seurat/tests/testdata/visium_hd"
VISIUMIO_HD = "fixtures/visiumio/inst/extdata/binned_outputs"


@pytest.mark.parametrize("bin_size", [8, 16])
def test_visium_hd_bins_are_true_size_squares(shared_data, bin_size):
    sdata = squall.io.visium_hd(shared_data / SEURAT_HD, bin_size=bin_size)
    key = f"bins_{bin_size}um"
    assert list(sdata.shapes) == [key]
    table = sdata.tables["table"]
    assert table.uns["spatialdata_attrs"]["region"] == key
    assert np.array_equal(table.obs["instance_id"].to_numpy(), sdata.shapes[key].index.to_numpy())
    bins = sd.transform(sdata.shapes[key], to_coordinate_system="microns")
    np.testing.assert_allclose(bins.area, bin_size**2, rtol=1e-6)
    edges = np.diff(np.asarray(bins.geometry.iloc[0].exterior.coords), axis=0)
    np.testing.assert_allclose(np.hypot(*edges.T), bin_size, rtol=1e-6)
    # centres in obsm are the polygon centroids in microns
    np.testing.assert_allclose(
        table.obsm["spatial"], np.c_[bins.centroid.x, bins.centroid.y], rtol=1e-9
    )
    assert "microns" in get_transformation(sdata.images["he"], get_all=True)
    assert sdata.attrs["squall"]["fullres_mpp"] == pytest.approx(0.27376126715315274)
    assert squall.io.get_mpp(sdata) == pytest.approx(0.27376126715315274 / 0.25404352)


def test_visium_hd_2um_bins_match_array_grid(shared_data):
    """Distances between bin centres in microns equal 2 µm × distance on the bin array."""
    sdata = squall.io.visium_hd(shared_data / VISIUMIO_HD, bin_size=2)
    table = sdata.tables["table"]
    assert table.n_obs == 10 and sdata.attrs["squall"]["image_source"] == "tissue_lowres_image.png"
    xy = table.obsm["spatial"]
    grid = table.obs[["array_col", "array_row"]].to_numpy(float) * 2.0
    i, j = np.triu_indices(len(xy), 1)
    d_um = np.hypot(*(xy[i] - xy[j]).T)
    d_grid = np.hypot(*(grid[i] - grid[j]).T)
    np.testing.assert_allclose(d_um, d_grid, rtol=0.03)
    # the bin squares are aligned with the array grid: edge direction ⟂ / ∥ to array_col steps
    bins = sd.transform(sdata.shapes["bins_2um"], to_coordinate_system="microns")
    assert bins.area.to_numpy() == pytest.approx(4.0)


def test_visium_hd_square_folder_directly(shared_data):
    a = squall.io.visium_hd(
        shared_data / SEURAT_HD / "binned_outputs" / "square_016um", bin_size=16
    )
    b = squall.io.visium_hd(shared_data / SEURAT_HD, bin_size=16)
    assert list(a.tables["table"].obs_names) == list(b.tables["table"].obs_names)


def test_visium_hd_zarr_round_trip(shared_data, tmp_path):
    sdata = squall.io.visium_hd(shared_data / VISIUMIO_HD, bin_size=2)
    back = sd.read_zarr(squall.io.write(sdata, tmp_path / "hd.zarr"))
    t0, t1 = sdata.tables["table"], back.tables["table"]
    assert (t0.X != t1.X).nnz == 0
    pd.testing.assert_frame_equal(t0.obs, t1.obs)
    assert (
        sdata.shapes["bins_2um"]
        .geometry.geom_equals_exact(back.shapes["bins_2um"].geometry, 1e-9)
        .all()
    )
    np.testing.assert_array_equal(
        sdata.images["he"]["scale0"]["image"].values, back.images["he"]["scale0"]["image"].values
    )
    assert back.attrs["squall"] == sdata.attrs["squall"]


def test_visium_hd_bad_inputs(shared_data, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        squall.io.visium_hd(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match=r"No square_004um/ folder.*square_008um"):
        squall.io.visium_hd(shared_data / SEURAT_HD, bin_size=4)
    root = tmp_path / "binned_outputs"
    shutil.copytree(shared_data / VISIUMIO_HD, root)
    for p in root.rglob("*"):
        p.chmod(0o755 if p.is_dir() else 0o644)
    pos_file = root / "square_002um" / "spatial" / "tissue_positions.parquet"
    pos = pd.read_parquet(pos_file)
    pos["barcode"] = "X" + pos["barcode"]
    pos.to_parquet(pos_file)
    with pytest.raises(ValueError, match="None of the 10 barcodes"):
        squall.io.visium_hd(root, bin_size=2)
