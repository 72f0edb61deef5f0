from __future__ import annotations

import dask.array as da
import numpy as np
import pytest
from scipy import ndimage
from spatialdata.models import Image2DModel
from spatialdata.transformations import Affine, Sequence

import squall_sd as squall
from squall_sd._sdata import microns_scale
from squall_sd.io._common import circles_element, image_element, make_sdata


@pytest.fixture(scope="module")
def he2048(c2_raw):
    """A 2048 x 2048 real H&E crop (her2st C2 at ~2.76 µm/px), (c, y, x) uint8, and its µm/px."""
    arr, mpp, _, _ = c2_raw
    return np.ascontiguousarray(np.moveaxis(arr[200:2248, 100:2148], -1, 0)), mpp


def _sdata(cyx, transformation, **kw):
    return make_sdata(image=image_element(cyx, {"microns": transformation}, **kw))


def test_pyramid_levels(he2048):
    cyx, mpp = he2048
    levels = squall.pp.pyramid_levels(_sdata(cyx, microns_scale(mpp)))
    assert list(levels.index) == ["scale0", "scale1"]
    np.testing.assert_allclose(levels["mpp"], [mpp, 2 * mpp])
    np.testing.assert_allclose(levels["downsample"], [1, 2])
    assert levels.loc["scale1", "width_px"] == 1024


def test_patch_equals_full_res_crop(he2048):
    cyx, mpp = he2048
    ds = squall.pp.extract_patches(
        _sdata(cyx, microns_scale(mpp)), [[900 * mpp, 700 * mpp]], patch_px=224, mpp=mpp
    )
    assert ds.level.name == "scale0" and ds.block == 1
    patch = ds[0]
    assert patch.dtype == np.uint8 and patch.shape == (3, 224, 224)
    np.testing.assert_array_equal(patch, cyx[:, 700 - 112 : 700 + 112, 900 - 112 : 900 + 112])


def test_patch_from_pyramid_level(he2048):
    cyx, mpp = he2048
    sdata = _sdata(cyx, microns_scale(mpp))
    level1 = np.asarray(sdata.images["he"]["scale1"]["image"].data)
    # at twice the µm/px the patch is read from scale1, and equals its crop
    ds = squall.pp.extract_patches(
        sdata, [[400 * 2 * mpp, 500 * 2 * mpp]], patch_px=128, mpp=2 * mpp
    )
    assert ds.level.name == "scale1"
    np.testing.assert_array_equal(ds[0], level1[:, 500 - 64 : 500 + 64, 400 - 64 : 400 + 64])
    # at 3x the µm/px read from full resolution: exactly the 3x3 block means of the full-res crop
    cx, cy = 1200, 903  # full-res pixel corners of the patch centre, (cx - 3 * 112) % 3 == 0
    ds = squall.pp.extract_patches(
        sdata, [[cx * mpp, cy * mpp]], patch_px=224, mpp=3 * mpp, scale="scale0"
    )
    assert ds.block == 3
    crop = cyx[:, cy - 336 : cy + 336, cx - 336 : cx + 336].astype(float)
    ref = crop.reshape(3, 224, 3, 224, 3).mean(axis=(2, 4))
    assert np.abs(ds[0].astype(float) - ref).max() <= 0.5 + 1e-6
    # the automatic level choice (scale1 + bilinear) gives nearly the same picture
    auto = squall.pp.extract_patches(sdata, [[cx * mpp, cy * mpp]], patch_px=224, mpp=3 * mpp)
    assert auto.level.name == "scale1"
    assert np.abs(auto[0].astype(float) - ref).mean() < 6.0


def test_flipped_and_rotated_images_give_the_same_tissue(he2048):
    cyx, mpp = he2048
    h, w = cyx.shape[1:]
    center = np.array([[1000 * mpp, 1100 * mpp]])
    ref = squall.pp.extract_patches(_sdata(cyx, microns_scale(mpp)), center, patch_px=160, mpp=mpp)[
        0
    ]
    # stored mirrored in x; the Affine to microns mirrors it back
    flip_x = Affine(np.array([[-mpp, 0, w * mpp], [0, mpp, 0], [0, 0, 1]]), ("x", "y"), ("x", "y"))
    flipped = _sdata(np.ascontiguousarray(cyx[:, :, ::-1]), flip_x)
    np.testing.assert_array_equal(
        squall.pp.extract_patches(flipped, center, patch_px=160, mpp=mpp)[0], ref
    )
    # stored rotated by 90° (np.rot90: new[i, j] = old[j, w - 1 - i]);
    # microns x = (w - y') mpp, y = x' mpp
    rot = Affine(np.array([[0, -mpp, w * mpp], [mpp, 0, 0], [0, 0, 1]]), ("x", "y"), ("x", "y"))
    rotated = _sdata(np.ascontiguousarray(np.rot90(cyx, axes=(1, 2))), rot)
    np.testing.assert_array_equal(
        squall.pp.extract_patches(rotated, center, patch_px=160, mpp=mpp)[0], ref
    )


def test_arbitrary_rotation_matches_direct_sampling(he2048):
    """With a 30° rotation to microns, patches are axis-aligned in microns (direct sampling)."""
    cyx, mpp = he2048
    theta = 30.0
    c, s = np.cos(np.deg2rad(theta)), np.sin(np.deg2rad(theta))
    rotate = Affine(np.array([[c, -s, 50.0], [s, c, -20.0], [0, 0, 1]]), ("x", "y"), ("x", "y"))
    t = Sequence([microns_scale(mpp), rotate])
    sdata = _sdata(cyx, t)
    m = t.to_affine_matrix(("x", "y"), ("x", "y"))
    c_px = np.array([1000.0, 1100.0])
    c_um = m[:2, :2] @ c_px + m[:2, 2]
    ds = squall.pp.extract_patches(sdata, c_um[None], patch_px=96, mpp=mpp)
    patch = ds[0].astype(float)
    # output pixel (i, j) sits at microns c + ((j, i) + 0.5 - 48) * mpp; image pixel via inverse
    off = (np.arange(96) + 0.5 - 48) * mpp
    xs, ys = np.meshgrid(c_um[0] + off, c_um[1] + off)
    inv = np.linalg.inv(m)
    qx = inv[0, 0] * xs + inv[0, 1] * ys + inv[0, 2]
    qy = inv[1, 0] * xs + inv[1, 1] * ys + inv[1, 2]
    ref = np.stack(
        [
            ndimage.map_coordinates(cyx[c].astype(float), [qy - 0.5, qx - 0.5], order=1)
            for c in range(3)
        ]
    )
    assert np.abs(patch - ref).max() <= 0.5 + 1e-6
    # and it is really rotated: not the unrotated crop
    straight = cyx[:, 1100 - 48 : 1100 + 48, 1000 - 48 : 1000 + 48].astype(float)
    assert np.abs(patch - straight).mean() > 5 * np.abs(patch - ref).mean() + 1


class _CountingArray:
    """Array-like that records every chunk read (dask calls __getitem__ once per chunk)."""

    def __init__(self, arr):
        self.arr, self.shape, self.dtype, self.ndim = arr, arr.shape, arr.dtype, arr.ndim
        self.reads = []

    def __getitem__(self, key):
        self.reads.append(key)
        return self.arr[key]


def test_reads_only_the_window(he2048):
    cyx, mpp = he2048
    src = _CountingArray(cyx)
    lazy = da.from_array(src, chunks=(3, 256, 256))
    image = Image2DModel.parse(
        lazy, dims=("c", "y", "x"), transformations={"microns": microns_scale(mpp)}
    )
    assert image.data.chunksize == (3, 256, 256)
    sdata = make_sdata(image=image)
    # cache_mb=0: read window by window, as for any level larger than the cache (whole slides)
    ds = squall.pp.extract_patches(
        sdata, [[600 * mpp, 600 * mpp]], patch_px=224, mpp=mpp, cache_mb=0
    )
    src.reads.clear()
    patch = ds[0]
    n_chunks = (2048 // 256) ** 2
    assert 1 <= len(src.reads) <= 4 < n_chunks  # the window spans at most 2 x 2 chunks of 256 px
    assert not ds.cached
    np.testing.assert_array_equal(patch, cyx[:, 488:712, 488:712])
    # a small level is read once and then cut from memory, with identical patches
    cached = squall.pp.extract_patches(
        sdata, [[600 * mpp, 600 * mpp]], patch_px=224, mpp=mpp, cache_mb=64
    )
    np.testing.assert_array_equal(cached[0], patch)
    assert cached.cached
    src.reads.clear()
    cached[0]
    assert src.reads == []


def test_padding_batch_and_shapes_centres(he2048):
    cyx, mpp = he2048
    sdata = _sdata(cyx, microns_scale(mpp))
    # a patch centred on the image corner is white outside the image
    ds = squall.pp.extract_patches(
        sdata, [[0.0, 0.0], [500 * mpp, 400 * mpp]], patch_px=64, mpp=mpp
    )
    corner = ds[0]
    assert (corner[:, :32, :] == 255).all() and (corner[:, :, :32] == 255).all()
    np.testing.assert_array_equal(corner[:, 32:, 32:], cyx[:, :32, :32])
    batch = ds.get_batch()
    assert batch.shape == (2, 3, 64, 64)
    np.testing.assert_array_equal(batch[1], ds[1])
    # centres from a shapes element (in pixels, with a Scale to microns)
    sdata.shapes["spots"] = circles_element(
        np.array([[500.0, 400.0]]), 10.0, {"microns": microns_scale(mpp)}
    )
    from_shapes = squall.pp.extract_patches(sdata, "spots", patch_px=64, mpp=mpp)
    np.testing.assert_array_equal(from_shapes[0], ds[1])
    # white balance and transform hooks
    wb = squall.pp.extract_patches(
        sdata, [[500 * mpp, 400 * mpp]], patch_px=64, mpp=mpp, white_point=[200, 200, 200]
    )
    assert wb[0].astype(int).sum() >= ds[1].astype(int).sum()
    with pytest.raises(ValueError, match="`centers_um` must be an"):
        squall.pp.extract_patches(sdata, np.zeros((3, 3)))
    with pytest.raises(ValueError, match="not a level of the image"):
        squall.pp.extract_patches(sdata, [[0.0, 0.0]], scale="scale9")
    with pytest.raises(KeyError, match="not found in `sdata.images`"):
        squall.pp.extract_patches(sdata, [[0.0, 0.0]], image_key="hires")


def test_chunk_cache_is_bounded_and_exact(he2048):
    cyx, mpp = he2048
    lazy = da.from_array(cyx, chunks=(3, 256, 256))
    image = Image2DModel.parse(lazy, dims=("c", "y", "x"), transformations={"microns": microns_scale(mpp)})
    sdata = make_sdata(image=image)
    rng = np.random.default_rng(0)
    centers = rng.uniform(-50, 2100, (60, 2)) * mpp
    ref = squall.pp.extract_patches(sdata, centers, patch_px=96, mpp=mpp, cache_mb=0)
    # room for 4 chunks of 256 x 256 x 3 bytes: chunks are evicted and read again, patches unchanged
    ds = squall.pp.extract_patches(sdata, centers, patch_px=96, mpp=mpp, cache_mb=4 * 3 * 256 * 256 / 1e6)
    assert ds.warm(range(10)) > 0
    for i in range(len(centers)):
        np.testing.assert_array_equal(ds[i], ref[i])
        assert ds._chunks.nbytes <= 4 * 3 * 256 * 256
    np.testing.assert_array_equal(ds.get_batch(), ref.get_batch())
    # a pickled dataset (DataLoader workers) starts with an empty cache
    import pickle

    back = pickle.loads(pickle.dumps(ds))
    assert not back.cached
    np.testing.assert_array_equal(back[3], ref[3])


def test_chunk_cache_counts_decodes_and_clears(he2048):
    cyx, mpp = he2048
    lazy = da.from_array(cyx, chunks=(3, 256, 256))
    image = Image2DModel.parse(lazy, dims=("c", "y", "x"), transformations={"microns": microns_scale(mpp)})
    sdata = make_sdata(image=image)
    # a row of patches across two chunk rows, left to right, through a cache of 4 chunks: each decoded once
    centers = np.column_stack([np.arange(100, 2000, 40), np.full(48, 512)]) * mpp
    ds = squall.pp.extract_patches(sdata, centers, patch_px=96, mpp=mpp, cache_mb=4 * 3 * 256 * 256 / 1e6)
    assert ds.decodes == 0
    patches = [ds[i] for i in range(len(ds))]
    touched = {k for c in ds.centers_um for k in ds._chunks.keys(*ds._window_bounds(*c))}
    assert ds.decodes == len(touched) == 16  # 8 chunk columns x 2 chunk rows
    ds.clear_cache()
    assert not ds.cached and ds._chunks.nbytes == 0 and ds.decodes == 16
    np.testing.assert_array_equal(ds[0], patches[0])
    assert ds.decodes == 18
