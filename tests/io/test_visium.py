"""Visium reader on real Space Ranger outputs (../shared/data/fixtures)."""

from __future__ import annotations

import shutil

import numpy as np
import pandas as pd
import pytest
import spatialdata as sd
from scipy.spatial import cKDTree
from spatialdata.transformations import get_transformation

import squall_sd as squall

SEURAT = "fixtures/seurat/tests/testdata/visium"
CYTASSIST = "fixtures/coexpressdeconvolve_visium_cytassist"
VISIUMIO = "fixtures/visiumio/inst/extdata/10xVisium/section1/outs"


def _spot_centres_um(sdata) -> np.ndarray:
    shapes = sd.transform(sdata.shapes["spots"], to_coordinate_system="microns")
    return np.column_stack([shapes.geometry.x, shapes.geometry.y])


def _nn_median(xy: np.ndarray) -> float:
    d, _ = cKDTree(xy).query(xy, k=2)
    return float(np.median(d[:, 1]))


def _check_contract(sdata, n_obs: int, n_vars: int) -> None:
    table = sdata.tables["table"]
    assert table.shape == (n_obs, n_vars)
    attrs = table.uns["spatialdata_attrs"]
    assert attrs["region"] == "spots" and attrs["instance_key"] == "instance_id"
    assert np.array_equal(
        table.obs["instance_id"].to_numpy(), sdata.shapes["spots"].index.to_numpy()
    )
    assert "microns" in get_transformation(sdata.shapes["spots"], get_all=True)
    assert "microns" in get_transformation(sdata.images["he"], get_all=True)
    assert squall.io.get_mpp(sdata) == pytest.approx(sdata.attrs["squall"]["mpp"], rel=1e-6)
    # image is lazy
    import dask.array as da

    assert isinstance(sdata.images["he"]["scale0"]["image"].data, da.Array)
    # spots are 55 µm discs
    shapes = sd.transform(sdata.shapes["spots"], to_coordinate_system="microns")
    assert np.allclose(shapes["radius"], 27.5, rtol=1e-6)
    np.testing.assert_allclose(table.obsm["spatial"], _spot_centres_um(sdata), rtol=1e-9)


def _darkness_at(img: np.ndarray, xy_px: np.ndarray, r: int = 2) -> np.ndarray:
    """255 − mean RGB in a (2r+1)² window around each (x, y)."""
    h, w = img.shape[1:]
    out = []
    for x, y in np.round(xy_px).astype(int):
        win = img[:, max(y - r, 0) : min(y + r + 1, h), max(x - r, 0) : min(x + r + 1, w)]
        out.append(255 - float(win.mean()))
    return np.array(out)


def _saturation_at(img: np.ndarray, xy_px: np.ndarray, r: int = 2) -> np.ndarray:
    """HSV saturation (max − min) / max of the mean colour in a (2r+1)² window around each (x, y)."""
    h, w = img.shape[1:]
    out = []
    for x, y in np.round(xy_px).astype(int):
        rgb = img[:, max(y - r, 0) : min(y + r + 1, h), max(x - r, 0) : min(x + r + 1, w)].mean(
            axis=(1, 2)
        )
        out.append(0.0 if rgb.max() == 0 else float((rgb.max() - rgb.min()) / rgb.max()))
    return np.array(out)


def _tissue_contrast(sdata) -> tuple[float, float]:
    """Median saturation at the spot centres and at the four image corners (stained tissue is saturated)."""
    img = sdata.images["he"]["scale0"]["image"].values.astype(float)
    centres_px = _spot_centres_um(sdata) / squall.io.get_mpp(sdata)
    spots = float(np.median(_saturation_at(img, centres_px)))
    h, w = img.shape[1:]
    corners = np.array([[10, 10], [w - 11, 10], [10, h - 11], [w - 11, h - 11]], dtype=float)
    return spots, float(np.median(_saturation_at(img, corners, r=8)))


def test_visium_seurat_spacing_and_contract(shared_data):
    sdata = squall.io.visium(
        shared_data / SEURAT
    )  # note: this fixture's images are blank placeholders
    _check_contract(sdata, 2695, 100)
    assert _nn_median(_spot_centres_um(sdata)) == pytest.approx(100, abs=2)
    assert sdata.attrs["squall"]["image_source"] == "tissue_hires_image.png"
    # the lattice fit agrees with spot_diameter_fullres (65 µm spot) of Space Ranger 1.x
    assert sdata.attrs["squall"]["fullres_mpp"] == pytest.approx(65 / 89.47248494250101, rel=0.02)
    obs = sdata.tables["table"].obs
    assert {"in_tissue", "array_row", "array_col"} <= set(obs.columns)


def test_visium_spots_land_on_tissue(shared_data):
    """Raw counts hold on- and off-tissue spots: the on-tissue ones sit on darker (stained) pixels."""
    sdata = squall.io.visium(shared_data / VISIUMIO, counts_file="raw_feature_bc_matrix.h5")
    img = sdata.images["he"]["scale0"]["image"].values.astype(float)
    xy = _spot_centres_um(sdata) / squall.io.get_mpp(sdata)
    in_tissue = sdata.tables["table"].obs["in_tissue"].to_numpy() == 1
    assert in_tissue.sum() >= 10 and (~in_tissue).sum() >= 10
    dark = _darkness_at(img, xy)
    gap = np.median(dark[in_tissue]) - np.median(dark[~in_tissue])
    assert gap > 15, gap


def test_visium_cytassist_mex(shared_data):
    sdata = squall.io.visium(shared_data / CYTASSIST)
    _check_contract(sdata, 2898, 19465)
    assert _nn_median(_spot_centres_um(sdata)) == pytest.approx(100, abs=2)
    assert sdata.attrs["squall"]["image_source"] == "tissue_lowres_image.png"
    assert sdata.tables["table"].X.sum() > 0
    spots, background = _tissue_contrast(sdata)
    assert spots > background + 0.2, (spots, background)


def test_visium_raw_h5_and_mex_agree(shared_data):
    a = squall.io.visium(shared_data / VISIUMIO, counts_file="raw_feature_bc_matrix.h5")
    b = squall.io.visium(shared_data / VISIUMIO, counts_file="raw_feature_bc_matrix")
    ta, tb = a.tables["table"], b.tables["table"]
    assert ta.n_obs == 50
    assert list(ta.obs_names) == list(tb.obs_names)
    assert ta.X.dtype == np.float32 and tb.X.dtype == np.float32
    # this fixture's h5 and MEX hold different test matrices: check the MEX one against the file itself
    from scipy.io import mmread

    mtx = mmread(shared_data / VISIUMIO / "raw_feature_bc_matrix" / "matrix.mtx").tocsc()
    assert tb.X.sum() == pytest.approx(mtx.sum())
    assert tb.shape == (mtx.shape[1], mtx.shape[0])
    np.testing.assert_allclose(ta.obsm["spatial"], tb.obsm["spatial"])
    assert a.attrs["squall"]["dataset_id"] == "section1"


def test_visium_fullres_image(shared_data, tmp_path):
    """Positions rewritten into lowres pixels, so the lowres PNG becomes the full-resolution image."""
    outs = tmp_path / "outs"
    shutil.copytree(shared_data / CYTASSIST, outs)
    for p in outs.rglob("*"):
        p.chmod(0o755 if p.is_dir() else 0o644)
    scalef = 0.2  # tissue_lowres_scalef
    pos = pd.read_csv(outs / "spatial" / "tissue_positions.csv")
    pos[["pxl_row_in_fullres", "pxl_col_in_fullres"]] *= scalef
    pos.to_csv(outs / "spatial" / "tissue_positions.csv", index=False)
    (outs / "spatial" / "tissue_lowres_image.png").rename(outs / "he.png")

    ref = squall.io.visium(shared_data / CYTASSIST)
    sdata = squall.io.visium(outs, fullres_image_file="he.png")
    assert sdata.attrs["squall"]["image_source"] == "fullres"
    assert sdata.attrs["squall"]["mpp"] == pytest.approx(ref.attrs["squall"]["mpp"], rel=1e-3)
    assert sdata.attrs["squall"]["mpp"] == pytest.approx(sdata.attrs["squall"]["fullres_mpp"])
    np.testing.assert_allclose(_spot_centres_um(sdata), _spot_centres_um(ref), rtol=1e-3)
    spots, background = _tissue_contrast(sdata)
    assert spots > background + 0.2, (spots, background)


def test_visium_zarr_round_trip(shared_data, tmp_path):
    sdata = squall.io.visium(shared_data / CYTASSIST)
    store = squall.io.write(sdata, tmp_path / "v.zarr")
    back = sd.read_zarr(store)
    t0, t1 = sdata.tables["table"], back.tables["table"]
    assert (t0.X != t1.X).nnz == 0
    pd.testing.assert_frame_equal(t0.obs, t1.obs)
    assert list(t0.var_names) == list(t1.var_names)
    s0, s1 = sdata.shapes["spots"], back.shapes["spots"]
    assert s0.geometry.geom_equals(s1.geometry).all()
    np.testing.assert_array_equal(s0["radius"], s1["radius"])
    for level in ("scale0",):
        np.testing.assert_array_equal(
            sdata.images["he"][level]["image"].values, back.images["he"][level]["image"].values
        )
    assert back.attrs["squall"]["mpp"] == pytest.approx(sdata.attrs["squall"]["mpp"])
    assert squall.io.get_mpp(back) == pytest.approx(sdata.attrs["squall"]["mpp"])


def test_visium_bad_inputs(shared_data, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        squall.io.visium(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="No counts found"):
        squall.io.visium(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        squall.io.visium(shared_data / SEURAT, fullres_image_file="missing.tif")
    # counts whose barcodes are not in the positions
    outs = tmp_path / "outs"
    shutil.copytree(shared_data / SEURAT, outs)
    for p in outs.rglob("*"):
        p.chmod(0o755 if p.is_dir() else 0o644)
    pos = pd.read_csv(outs / "spatial" / "tissue_positions_list.csv", header=None)
    pos[0] = "X" + pos[0]
    pos.to_csv(outs / "spatial" / "tissue_positions_list.csv", header=False, index=False)
    with pytest.raises(ValueError, match="same Space Ranger run"):
        squall.io.visium(outs)
