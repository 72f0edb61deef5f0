"""pp.register_spots: spots moved off their tissue are found and moved back (real her2st H&E)."""

from __future__ import annotations

import numpy as np
import pytest

import squall_sd as squall
from squall_sd._sdata import affine_to_microns, apply_affine


def _shift_spots(sdata, shift_um):
    """Move the spots (shapes and table) by ``shift_um`` µm, as an offset image copy would."""
    import geopandas as gpd
    import shapely

    shapes = sdata.shapes["spots"]
    m = affine_to_microns(shapes)
    c = shapes.geometry.centroid
    um = apply_affine(m, np.column_stack([c.x.to_numpy(), c.y.to_numpy()])) + shift_um
    moved = shapes.copy()
    moved["geometry"] = gpd.GeoSeries(shapely.points(apply_affine(np.linalg.inv(m), um)), index=moved.index)
    sdata.shapes["spots"] = moved
    t = sdata.tables["table"]
    t.obsm["spatial"] = np.asarray(t.obsm["spatial"], dtype=float) + shift_um


def test_aligned_spots_are_left_alone():
    sdata = squall.datasets.example()
    before = np.asarray(sdata.tables["table"].obsm["spatial"]).copy()
    geom = sdata.shapes["spots"].geometry.copy()
    res = squall.pp.register_spots(sdata)
    assert not res["applied"] and res["iou_after"] == res["iou_before"] > 0.7
    assert res["on_tissue_before"] > 0.95 and 150 < res["pitch_um"] < 220  # legacy ST: 200 µm pitch
    assert np.array_equal(np.asarray(sdata.tables["table"].obsm["spatial"]), before)
    assert sdata.shapes["spots"].geometry.equals(geom) and "spot_registration" not in sdata.attrs["squall"]


@pytest.mark.parametrize("shift", [(300.0, -200.0), (-150.0, 400.0)])
def test_offset_spots_are_moved_back(shift):
    sdata = squall.datasets.example()
    truth = np.asarray(sdata.tables["table"].obsm["spatial"]).copy()
    _shift_spots(sdata, np.array(shift))
    report = squall.pp.register_spots(sdata, inplace=False)  # report only: nothing moves
    assert not report["applied"] and np.allclose(sdata.tables["table"].obsm["spatial"], truth + shift)
    res = squall.pp.register_spots(sdata)
    assert res["applied"] and res["iou_after"] > res["iou_before"] + 0.05
    assert res["on_tissue_after"] > res["on_tissue_before"]
    # back within two working pixels (8-16 µm each) of where the spots were, shapes and table alike
    err = np.abs(np.asarray(sdata.tables["table"].obsm["spatial"]) - truth).max()
    assert err < 35, err
    s = sdata.shapes["spots"]
    c = s.geometry.centroid
    xy = apply_affine(affine_to_microns(s), np.column_stack([c.x.to_numpy(), c.y.to_numpy()]))
    np.testing.assert_allclose(xy, sdata.tables["table"].obsm["spatial"], atol=1e-6)
    assert "radius" in s and sdata.attrs["squall"]["spot_registration"]["shift_um"] == res["shift_um"]


def test_register_spots_errors():
    sdata = squall.datasets.example()
    with pytest.raises(ValueError, match="max_scale_change"):
        squall.pp.register_spots(sdata, max_scale_change=1.5)
    with pytest.raises(ValueError, match="max_shift_um"):
        squall.pp.register_spots(sdata, max_shift_um=0)
    with pytest.raises(KeyError, match="cells"):
        squall.pp.register_spots(sdata, spots_key="cells")


def test_her2st_a2_is_registered_and_the_others_are_not(shared_data):
    """The A2 PNG copy of the shared data is offset from its spot table; A1 and C2 are not."""
    root = shared_data / "her2st"
    a2 = squall.datasets.her2st("A2", root)
    reg = a2.attrs["squall"]["spot_registration"]
    assert reg["iou_after"] > reg["iou_before"] + 0.15 and reg["on_tissue_after"] > 0.9
    assert 250 < reg["shift_um"][0] < 450 and -600 < reg["shift_um"][1] < -400
    raw = squall.datasets.her2st("A2", root, register_spots=False)
    assert "spot_registration" not in raw.attrs["squall"]
    for sec in ("A1", "C2"):
        assert "spot_registration" not in squall.datasets.her2st(sec, root).attrs["squall"]
