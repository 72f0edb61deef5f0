from __future__ import annotations

import numpy as np
import pytest
import shapely
from spatialdata.transformations import Affine, Identity, get_transformation

import squall_sd as squall
from squall_sd._sdata import microns_scale
from squall_sd.io._common import image_element, make_sdata


def _spots_um(sdata, key="spots"):
    gdf = sdata.shapes[key]
    m = get_transformation(gdf, "microns").to_affine_matrix(("x", "y"), ("x", "y"))
    xy = np.column_stack([gdf.geometry.x, gdf.geometry.y])
    return xy @ m[:2, :2].T + m[:2, 2]


def _inside(tissue, xy):
    return shapely.contains_xy(tissue.union_all(), xy[:, 0], xy[:, 1])


def test_detect_tissue_her2st(c2_sdata):
    squall.pp.detect_tissue(c2_sdata)
    tissue = c2_sdata.shapes["he_tissue"]
    assert isinstance(get_transformation(tissue, "microns"), Identity)
    area_mm2 = tissue["area_um2"].sum() / 1e6
    # C2 is a ~3 x 4 mm piece on a ~6.4 x 6.8 mm image
    assert 3.0 < area_mm2 < 15.0
    inside = _inside(tissue, _spots_um(c2_sdata))
    assert inside.mean() > 0.9


def test_detect_tissue_mob(mob_sdata):
    gdf = squall.pp.detect_tissue(mob_sdata, inplace=False)
    assert "he_tissue" not in mob_sdata.shapes  # inplace=False leaves sdata alone
    assert 1.0 < gdf["area_um2"].sum() / 1e6 < 10.0
    assert _inside(gdf, _spots_um(mob_sdata)).mean() > 0.9


def test_detect_tissue_flipped_transformation(mob_raw):
    """An image stored flipped in x, with an Affine flipping back, gives the same tissue."""
    arr = mob_raw[0]
    w = arr.shape[1]
    plain = make_sdata(image=image_element(arr, {"microns": microns_scale(3.0)}))
    flip = Affine(
        np.array([[-3.0, 0, w * 3.0], [0, 3.0, 0], [0, 0, 1]]),
        input_axes=("x", "y"),
        output_axes=("x", "y"),
    )
    flipped = make_sdata(image=image_element(arr[:, ::-1].copy(), {"microns": flip}))
    a = squall.pp.detect_tissue(plain, inplace=False).union_all()
    b = squall.pp.detect_tissue(flipped, inplace=False).union_all()
    assert a.symmetric_difference(b).area / a.area < 0.02


def test_no_tissue_raises(mob_raw):
    white = np.full((600, 600, 3), 255, dtype=np.uint8)
    sdata = make_sdata(image=image_element(white, {"microns": microns_scale(3.0)}))
    with pytest.raises(ValueError, match="no tissue detected in image 'he'"):
        squall.pp.detect_tissue(sdata)
    # a real patch of empty slide (top left of MOB1) has no tissue either
    background = mob_raw[0][:500, :450]
    sdata = make_sdata(image=image_element(background, {"microns": microns_scale(3.0)}))
    with pytest.raises(ValueError, match="lower min_area_um2"):
        squall.pp.detect_tissue(sdata)


def test_detect_tissue_keys(mob_sdata):
    squall.pp.detect_tissue(mob_sdata, key_added="tissue")
    with pytest.raises(ValueError, match="already exists"):
        squall.pp.detect_tissue(mob_sdata, key_added="tissue")
    squall.pp.detect_tissue(mob_sdata, key_added="tissue", overwrite=True, min_area_um2=1e6)
    assert (mob_sdata.shapes["tissue"]["area_um2"] >= 1e6).all()
    with pytest.raises(KeyError, match="not found in `sdata.images`"):
        squall.pp.detect_tissue(mob_sdata, image_key="nope")


def test_backed_sdata_gets_the_element_on_disk(mob_raw, tmp_path):
    import spatialdata as sd

    small = mob_raw[0][::2, ::2]
    make_sdata(image=image_element(small, {"microns": microns_scale(6.0)})).write(
        tmp_path / "s.zarr"
    )
    sdata = sd.read_zarr(tmp_path / "s.zarr")
    squall.pp.detect_tissue(sdata)
    squall.pp.detect_tissue(sdata, overwrite=True, min_area_um2=1e6)
    on_disk = sd.read_zarr(tmp_path / "s.zarr")
    assert "he_tissue" in on_disk.shapes
    assert (on_disk.shapes["he_tissue"]["area_um2"] >= 1e6).all()


def test_tissue_features_equal_skimage():
    from skimage import color

    from squall_sd.pp._tissue import _features, tissue_mask

    rng = np.random.default_rng(0)
    rgb = rng.random((300, 200, 3)).astype(np.float32)
    rgb[:20] = 0.0  # black: value 0, saturation 0
    rgb[20:40] = 0.5  # grey: delta 0
    chw = np.ascontiguousarray(np.moveaxis(rgb, -1, 0))
    feat, valid = _features(chw, "saturation", rows=64)
    hsv = color.rgb2hsv(rgb)
    np.testing.assert_array_equal(feat, hsv[..., 1])
    np.testing.assert_array_equal(valid, hsv[..., 2] > 0.1)
    grey, _ = _features(chw, "greyscale", rows=64)
    np.testing.assert_array_equal(grey, color.rgb2gray(rgb))
    with pytest.raises(ValueError, match="`method` must be"):
        tissue_mask(rgb, method="nope")


def test_detect_tissue_bounded_working_image(mob_sdata, monkeypatch):
    from squall_sd.pp import _tissue

    feat, _, affine = _tissue._coarse_features(mob_sdata, "he", scale=None, method="saturation", max_pixels=None)
    full = squall.pp.detect_tissue(mob_sdata, inplace=False)
    cap = feat.size // 5
    small, _, affine_small = _tissue._coarse_features(mob_sdata, "he", scale=None, method="saturation", max_pixels=cap)
    assert small.size <= cap < feat.size
    assert abs(np.linalg.det(affine_small[:2, :2])) > abs(np.linalg.det(affine[:2, :2]))  # coarser
    # the public coarse image (block means in [0, 1]) honours the same cap
    rgb, _, _ = _tissue.coarse_image(mob_sdata, "he", max_pixels=cap)
    assert rgb.shape[0] * rgb.shape[1] <= cap and rgb.shape[2] == 3 and 0 <= rgb.min() <= rgb.max() <= 1
    # detection with the cap finds about the same tissue
    monkeypatch.setattr(_tissue, "MAX_WORKING_PIXELS", cap)
    capped = squall.pp.detect_tissue(mob_sdata, inplace=False)
    a, b = full.union_all(), capped.union_all()
    assert a.symmetric_difference(b).area < 0.15 * a.area


def test_morphology_equals_scipy():
    # the cross-based closing / opening and the labelling hole filling equal scipy's routines
    from scipy import ndimage
    from skimage import morphology

    from squall_sd.pp._tissue import _closing, _fill_holes, _opening_cross

    rng = np.random.default_rng(0)
    for trial in range(120):
        h, w = rng.integers(1, 48, 2)
        m = rng.random((h, w)) < rng.uniform(0.2, 0.9)
        if trial % 2:
            m = ndimage.binary_dilation(rng.random((h, w)) < 0.04, iterations=2)
        for r in (1, 2, 3):
            ref = ndimage.binary_closing(np.pad(m, r + 1), structure=morphology.disk(r))[r + 1 : -r - 1, r + 1 : -r - 1]
            np.testing.assert_array_equal(_closing(m, r), ref)
        np.testing.assert_array_equal(_opening_cross(m), ndimage.binary_opening(m, structure=morphology.disk(1)))
        np.testing.assert_array_equal(_fill_holes(m), ndimage.binary_fill_holes(m))


@pytest.mark.parametrize("f", [1, 2, 3, 4, 16, 17, 32])
def test_block_sum_uint8_is_the_exact_block_sum(f):
    from squall_sd.pp._tissue import _block_sum_uint8

    rng = np.random.default_rng(f)
    data = rng.integers(0, 256, (3, 5 * f, 7 * f), dtype=np.uint8)
    data[:, :f, :f] = 255  # a block at the maximum: no overflow
    expected = data.reshape(3, 5, f, 7, f).sum(axis=(2, 4), dtype=np.uint64)
    np.testing.assert_array_equal(_block_sum_uint8(data, f).astype(np.uint64), expected)
