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
