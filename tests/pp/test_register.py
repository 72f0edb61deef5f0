"""pp.register_spots: spots moved off their tissue are found and moved back (real her2st H&E)."""

from __future__ import annotations

import numpy as np
import pytest

import squall_sd as squall
from squall_sd._sdata import affine_to_microns, apply_affine


def _move_spots(sdata, move):
    """Move the spots (shapes and table) by ``move`` (µm positions -> µm positions), as an offset or
    turned image copy would."""
    import geopandas as gpd
    import shapely

    shapes = sdata.shapes["spots"]
    m = affine_to_microns(shapes)
    c = shapes.geometry.centroid
    um = move(apply_affine(m, np.column_stack([c.x.to_numpy(), c.y.to_numpy()])))
    moved = shapes.copy()
    moved["geometry"] = gpd.GeoSeries(shapely.points(apply_affine(np.linalg.inv(m), um)), index=moved.index)
    sdata.shapes["spots"] = moved
    t = sdata.tables["table"]
    t.obsm["spatial"] = move(np.asarray(t.obsm["spatial"], dtype=float))


def _shift_spots(sdata, shift_um):
    _move_spots(sdata, lambda xy: xy + shift_um)


def _turn_spots(sdata, angle_deg):
    """Turn the spots by ``angle_deg`` about their centre (the convention of ``rotation_deg``)."""
    t = np.deg2rad(angle_deg)
    rot = np.array([[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]])
    centre = np.asarray(sdata.tables["table"].obsm["spatial"], dtype=float).mean(0)
    _move_spots(sdata, lambda xy: centre + (xy - centre) @ rot.T)


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


@pytest.mark.parametrize("angle", [8.0, -10.0])
def test_turned_spots_are_turned_back(angle):
    """A copy of the image turned by a few degrees: the spots far from the centre are off the most."""
    sdata = squall.datasets.example()
    truth = np.asarray(sdata.tables["table"].obsm["spatial"]).copy()
    _turn_spots(sdata, angle)
    off = np.abs(np.asarray(sdata.tables["table"].obsm["spatial"]) - truth).max()
    assert off > 100  # more than half a spot pitch at the edge
    no_turn = squall.pp.register_spots(sdata, inplace=False, max_rotation_deg=0)
    assert no_turn["rotation_deg"] == 0.0
    res = squall.pp.register_spots(sdata)
    # within one step (1°) of the truth: the coarse IoU is flat within a degree of the best placement
    assert res["applied"] and res["rotation_deg"] == pytest.approx(-angle, abs=1.0)
    assert res["iou_after"] > no_turn["best_iou"]
    err = np.abs(np.asarray(sdata.tables["table"].obsm["spatial"]) - truth).max()
    assert err < 50, (err, off)  # 1° at the crop's edge, ~2.4 mm from its centre, is ~42 µm
    s = sdata.shapes["spots"]
    c = s.geometry.centroid
    xy = apply_affine(affine_to_microns(s), np.column_stack([c.x.to_numpy(), c.y.to_numpy()]))
    np.testing.assert_allclose(xy, sdata.tables["table"].obsm["spatial"], atol=1e-6)
    assert sdata.attrs["squall"]["spot_registration"]["rotation_deg"] == res["rotation_deg"]


def test_register_spots_errors():
    sdata = squall.datasets.example()
    with pytest.raises(ValueError, match="max_scale_change"):
        squall.pp.register_spots(sdata, max_scale_change=1.5)
    with pytest.raises(ValueError, match="max_shift_um"):
        squall.pp.register_spots(sdata, max_shift_um=0)
    with pytest.raises(ValueError, match="max_rotation_deg"):
        squall.pp.register_spots(sdata, max_rotation_deg=60)
    with pytest.raises(ValueError, match="rotation_step_deg"):
        squall.pp.register_spots(sdata, rotation_step_deg=0)
    with pytest.raises(KeyError, match="cells"):
        squall.pp.register_spots(sdata, spots_key="cells")


def test_her2st_a2_is_registered_and_the_others_are_not(shared_data):
    """The A2 PNG copy of the shared data is offset from its spot table and turned by about 5°; A1 and C2
    are not."""
    root = shared_data / "her2st"
    a2 = squall.datasets.her2st("A2", root)
    reg = a2.attrs["squall"]["spot_registration"]
    assert reg["iou_after"] > reg["iou_before"] + 0.15 and reg["on_tissue_after"] > 0.9
    assert 250 < reg["shift_um"][0] < 450 and -600 < reg["shift_um"][1] < -400
    assert -7 <= reg["rotation_deg"] <= -3
    raw = squall.datasets.her2st("A2", root, register_spots=False)
    assert "spot_registration" not in raw.attrs["squall"]
    # without the rotation search the best placement fits the tissue less well
    flat = squall.pp.register_spots(raw, inplace=False, max_rotation_deg=0)
    assert flat["rotation_deg"] == 0.0 and reg["iou_after"] > flat["iou_after"] + 0.01
    for sec in ("A1", "C2"):
        assert "spot_registration" not in squall.datasets.her2st(sec, root).attrs["squall"]
