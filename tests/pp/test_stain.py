from __future__ import annotations

import numpy as np
import pytest
from skimage import color

import squall_sd as squall
from squall_sd._sdata import microns_scale
from squall_sd.io._common import image_element, make_sdata


@pytest.fixture(scope="module")
def patch(c2_raw):
    """A 224 px real H&E patch (her2st C2 tissue), (3, h, w) uint8."""
    arr = c2_raw[0]
    return np.ascontiguousarray(np.moveaxis(arr[1300:1524, 1300:1524], -1, 0))


def test_he_stain_jitter(patch):
    a = squall.pp.he_stain_jitter(patch, rng=0)
    b = squall.pp.he_stain_jitter(patch, rng=0)
    assert a.shape == patch.shape and a.dtype == np.uint8
    np.testing.assert_array_equal(a, b)
    assert np.abs(a.astype(int) - patch).mean() > 0.5
    # no jitter: the HED round trip returns the image
    same = squall.pp.he_stain_jitter(patch, sigma=0.0, bias=0.0)
    assert np.abs(same.astype(int) - patch).max() <= 2
    hwc = squall.pp.he_stain_jitter(np.moveaxis(patch, 0, -1) / 255.0, rng=1)
    assert hwc.shape == (224, 224, 3) and hwc.dtype == np.float64


def test_normalize_stain(patch, c2_raw):
    out = squall.pp.normalize_stain(patch)
    assert out.shape == patch.shape and out.dtype == np.uint8
    # Reinhard: the LAB means of the result match the reference's
    ref = np.ascontiguousarray(np.moveaxis(c2_raw[0][900:1124, 1500:1724], -1, 0))
    rh = squall.pp.normalize_stain(patch, method="reinhard", reference=ref)
    lab = color.rgb2lab(np.moveaxis(rh, 0, -1) / 255.0).reshape(-1, 3).mean(0)
    rlab = color.rgb2lab(np.moveaxis(ref, 0, -1) / 255.0).reshape(-1, 3).mean(0)
    np.testing.assert_allclose(lab, rlab, atol=1.5)
    # Macenko against itself changes little
    self_norm = squall.pp.normalize_stain(patch, reference=patch)
    assert np.abs(self_norm.astype(int) - patch).mean() < 6
    with pytest.raises(ValueError, match="needs a `reference`"):
        squall.pp.normalize_stain(patch, method="reinhard")
    with pytest.raises(ValueError, match="Too few stained pixels"):
        squall.pp.normalize_stain(np.full((3, 32, 32), 250, np.uint8))


def test_estimate_white_point(mob_raw):
    sdata = make_sdata(image=image_element(mob_raw[0], {"microns": microns_scale(3.0)}))
    wp = squall.pp.estimate_white_point(sdata)
    assert wp.shape == (3,) and (wp > 180).all() and (wp <= 255).all()


@pytest.fixture
def example():
    return squall.datasets.example()


def _scale0(sdata, key):
    return np.asarray(sdata.images[key]["scale0"]["image"].data)


def test_stain_statistics(example):
    st = squall.pp.stain_statistics(example)
    assert set(st) == {"lab_mean", "lab_std", "n_images"} and st["n_images"] == 1
    # H&E tissue: mid lightness, pink-purple (a > 0, b < 0)
    assert 30 < st["lab_mean"][0] < 80 and st["lab_mean"][1] > 5 and st["lab_mean"][2] < 0
    both = squall.pp.stain_statistics([example, example])
    assert both["n_images"] == 2
    np.testing.assert_allclose(both["lab_mean"], st["lab_mean"])
    white = make_sdata(image=image_element(np.full((3, 256, 256), 250, np.uint8), {"microns": microns_scale(4.0)}))
    with pytest.raises(ValueError, match="shows no tissue"):
        squall.pp.stain_statistics(white)
    with pytest.raises(KeyError):
        squall.pp.stain_statistics(example, image_key="nope")


def test_match_stain(example):
    from spatialdata.transformations import get_transformation

    original = _scale0(example, "he").copy()
    ref = {"lab_mean": [40.0, 18.0, -29.0], "lab_std": [12.0, 6.0, 9.0]}  # about her2st A1's colours
    rec = squall.pp.match_stain(example, ref)
    key = rec["image_key"]
    assert key == "he_stain_matched"
    # the new image has the reference's tissue statistics; the original is untouched
    got = squall.pp.stain_statistics(example, image_key=key)
    # (within about one CIELAB unit: the matched image's own tissue mask is not exactly the original's)
    np.testing.assert_allclose(got["lab_mean"], ref["lab_mean"], atol=1.5)
    np.testing.assert_allclose(got["lab_std"], ref["lab_std"], atol=1.5)
    before = squall.pp.stain_statistics(example)
    assert abs(before["lab_mean"][0] - ref["lab_mean"][0]) > 8
    np.testing.assert_array_equal(_scale0(example, "he"), original)
    # same pyramid, coordinates and transformations; pixels that are not tissue as they were
    assert list(example.images[key].children) == list(example.images["he"].children)
    assert get_transformation(example.images[key], get_all=True) == get_transformation(
        example.images["he"], get_all=True
    )
    new = _scale0(example, key)
    assert new.shape == original.shape and new.dtype == original.dtype
    from squall_sd.pp._tissue import apply_tissue_threshold, tissue_threshold

    bg = ~apply_tissue_threshold(original, tissue_threshold(example, "he"))
    assert bg.any() and (~bg).any()
    np.testing.assert_array_equal(new[:, bg], original[:, bg])
    assert np.abs(new[:, ~bg].astype(int) - original[:, ~bg]).mean() > 3
    assert example.attrs["squall"]["stain_matching"][key]["reference"] == ref
    # the matched image feeds the rest of the package
    tiles = np.asarray(squall.pp.extract_patches(example, "spots", image_key=key, patch_px=32, mpp=4.0).get_batch())
    assert tiles.shape == (187, 3, 32, 32)
    # matched to its own statistics, an image stays (up to rounding through CIELAB)
    squall.pp.match_stain(example, example, key_added="same")
    assert np.abs(_scale0(example, "same").astype(int) - original).max() <= 2


def test_match_stain_errors(example):
    ref = squall.pp.stain_statistics(example)
    with pytest.raises(ValueError, match="must differ"):
        squall.pp.match_stain(example, ref, key_added="he")
    squall.pp.match_stain(example, ref)
    with pytest.raises(ValueError, match="already exists"):
        squall.pp.match_stain(example, ref)
    squall.pp.match_stain(example, ref, overwrite=True)
    with pytest.raises(ValueError, match="stain_statistics"):
        squall.pp.match_stain(example, {"lab_mean": [1, 2]}, key_added="x")
    with pytest.raises(ValueError, match="non-positive"):
        squall.pp.match_stain(example, {"lab_mean": [50, 0, 0], "lab_std": [1, 0, 1]}, key_added="x")
    assert "x" not in example.images
