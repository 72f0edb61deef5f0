"""CosMx reader on real CosMx flat files (../shared/data/fixtures)."""

from __future__ import annotations

import shutil

import numpy as np
import pandas as pd
import pytest
import spatialdata as sd
from spatialdata.transformations import get_transformation

import squall_sd as squall

SPE = "fixtures/spatialexperiment_3f497ac/inst/extdata/NanostringCosMx"
SFE = "fixtures/sfe_8fa1e84/inst/extdata/cosmx"
GIOTTO = "fixtures/giottodata/inst/Mini_datasets/CosMx/Raw"
PX = 0.12028


def _check_contract(sdata):
    table = sdata.tables["table"]
    assert table.uns["spatialdata_attrs"]["region"] == "cells"
    assert np.array_equal(
        table.obs["instance_id"].to_numpy(), sdata.shapes["cells"].index.to_numpy()
    )
    for el in [sdata.shapes["cells"], *sdata.points.values()]:
        assert "microns" in get_transformation(el, get_all=True)
    assert sdata.attrs["squall"]["mpp"] is None and sdata.attrs["squall"]["technology"] == "cosmx"
    assert not sdata.images


def test_cosmx_circles_in_microns(shared_data):
    sdata = squall.io.cosmx(shared_data / SPE)
    _check_contract(sdata)
    table = sdata.tables["table"]
    meta = pd.read_csv(shared_data / SPE / "small_Lung9_Rep1_metadata_file.csv")
    assert table.n_obs == len(meta) and table.n_vars == 20
    assert list(table.obs_names[:2]) == [
        f"{c}_{f}" for f, c in meta[["fov", "cell_ID"]].to_numpy()[:2]
    ]
    cells = sd.transform(sdata.shapes["cells"], to_coordinate_system="microns")
    np.testing.assert_allclose(
        np.c_[cells.geometry.x, cells.geometry.y],
        meta[["CenterX_global_px", "CenterY_global_px"]].to_numpy() * PX,
    )
    np.testing.assert_allclose(cells["radius"], np.sqrt(meta["Area"] / np.pi) * PX)
    np.testing.assert_allclose(table.obsm["spatial"], np.c_[cells.geometry.x, cells.geometry.y])
    counts = pd.read_csv(shared_data / SPE / "small_Lung9_Rep1_exprMat_file.csv")
    counts = counts[counts["cell_ID"] != 0]
    assert table.X.sum() == counts.drop(columns=["fov", "cell_ID"]).to_numpy().sum()


def test_cosmx_polygons_and_transcripts(shared_data):
    sdata = squall.io.cosmx(shared_data / SFE, pixel_size=0.18)
    _check_contract(sdata)
    assert sdata.attrs["squall"]["cell_shape"] == "polygons"
    table = sdata.tables["table"]
    cells = sd.transform(sdata.shapes["cells"], to_coordinate_system="microns")
    # polygon centroids sit on the metadata cell centres (within a few µm)
    d = np.hypot(*(np.c_[cells.centroid.x, cells.centroid.y] - table.obsm["spatial"]).T)
    assert np.median(d) < 3.0
    tx = sd.transform(sdata.points["transcripts"], to_coordinate_system="microns").compute()
    raw = pd.read_csv(shared_data / SFE / "Run5642_S3_Quarter_tx_file.csv")
    assert len(tx) == len(raw)
    np.testing.assert_allclose(
        np.sort(tx["x"].to_numpy()), np.sort(raw["x_global_px"].to_numpy() * 0.18)
    )


def test_cosmx_transcripts_only(shared_data):
    """The Giotto mini dataset has only tx + fov files: counts and cells come from the transcripts."""
    sdata = squall.io.cosmx(shared_data / GIOTTO)
    _check_contract(sdata)
    tx = pd.read_csv(shared_data / GIOTTO / "Lung12_tx_file.csv")
    assigned = tx[tx["cell_ID"] != 0]
    table = sdata.tables["table"]
    assert table.X.sum() == len(assigned)
    assert table.n_obs == assigned.groupby(["fov", "cell_ID"]).ngroups
    cells = sd.transform(sdata.shapes["cells"], to_coordinate_system="microns")
    assert 1 < np.median(cells["radius"]) < 20  # cell-sized discs (µm)


def test_cosmx_zarr_round_trip(shared_data, tmp_path):
    sdata = squall.io.cosmx(shared_data / SFE)
    back = sd.read_zarr(squall.io.write(sdata, tmp_path / "c.zarr"))
    t0, t1 = sdata.tables["table"], back.tables["table"]
    assert (t0.X != t1.X).nnz == 0
    pd.testing.assert_frame_equal(t0.obs, t1.obs)
    np.testing.assert_allclose(t0.obsm["spatial"], t1.obsm["spatial"])
    assert (
        sdata.shapes["cells"].geometry.geom_equals_exact(back.shapes["cells"].geometry, 1e-9).all()
    )
    assert back.attrs["squall"] == sdata.attrs["squall"]


def test_cosmx_bad_inputs(shared_data, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        squall.io.cosmx(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="CosMx flat-file export"):
        squall.io.cosmx(tmp_path)
    with pytest.raises(ValueError, match="positive number"):
        squall.io.cosmx(shared_data / SPE, pixel_size=-1)
    root = tmp_path / "cosmx"
    root.mkdir()
    shutil.copy(shared_data / SPE / "small_Lung9_Rep1_exprMat_file.csv", root)
    meta = pd.read_csv(shared_data / SPE / "small_Lung9_Rep1_metadata_file.csv")
    meta["fov"] += 100
    meta.to_csv(root / "small_Lung9_Rep1_metadata_file.csv", index=False)
    with pytest.raises(ValueError, match="same CosMx export"):
        squall.io.cosmx(root)
