"""he(): real H&E crops written as OME-TIFF, resolution-tagged TIFF, SVS-like TIFF and JPEG."""

from __future__ import annotations

import dask.array as da
import numpy as np
import pytest
import tifffile
from PIL import Image
from spatialdata.transformations import get_transformation

import squall_sd as squall
from squall_sd.datasets._datasets import _bundle_dir
from squall_sd.io import _he

SVS_DESCRIPTION = "Aperio Image Library v12.0.15 \n1536x1536 [0,0 1536x1536] (256x256) RGB|AppMag = 20|MPP = 0.4990"


@pytest.fixture(scope="module")
def crop() -> np.ndarray:
    """A 1536 x 1536 crop of real her2st H&E (the bundled section C2 image) with tissue in it."""
    with Image.open(_bundle_dir() / "he.jpg") as im:
        return np.asarray(im.convert("RGB"))[1000:2536, 1000:2536].copy()


def _scale0(sdata):
    return sdata.images["he"]["scale0"]["image"]


def _levels(sdata):
    return sorted(sdata.images["he"].children)


def test_ome_tiff_pyramid(crop, tmp_path):
    path = tmp_path / "slide.ome.tif"
    with tifffile.TiffWriter(path, ome=True) as tw:
        opts = dict(tile=(256, 256), compression="zlib", photometric="rgb")
        tw.write(
            crop,
            subifds=2,
            metadata={"axes": "YXS", "PhysicalSizeX": 0.5, "PhysicalSizeY": 0.5},
            **opts,
        )
        tw.write(crop[::2, ::2], subfiletype=1, **opts)
        tw.write(crop[::4, ::4], subfiletype=1, **opts)
    sdata = squall.io.he(path)
    meta = sdata.attrs["squall"]
    assert meta["mpp"] == pytest.approx(0.5)
    assert meta["mpp_source"] == "OME PhysicalSizeX" and meta["format"] == "OME-TIFF"
    # the file's own three levels are used, lazily
    assert len(_levels(sdata)) == 3
    img = _scale0(sdata)
    assert isinstance(img.data, da.Array) and img.shape == (3, 1536, 1536)
    np.testing.assert_array_equal(
        img.data[:, 300:400, 500:600].compute(), np.moveaxis(crop[300:400, 500:600], -1, 0)
    )
    coarse = sdata.images["he"]["scale2"]["image"]
    assert coarse.shape == (3, 384, 384)
    t = get_transformation(coarse, to_coordinate_system="microns")
    m = t.to_affine_matrix(input_axes=("x", "y"), output_axes=("x", "y"))
    assert m[0, 0] == pytest.approx(0.5 * 4)  # a level-2 pixel is 2 µm
    assert squall.io.get_mpp(sdata) == pytest.approx(0.5)


def test_tiff_resolution_centimeter(crop, tmp_path):
    path = tmp_path / "slide.tif"
    tifffile.imwrite(
        path,
        crop,
        photometric="rgb",
        tile=(256, 256),
        resolution=(1e4 / 0.25, 1e4 / 0.25),
        resolutionunit="CENTIMETER",
    )
    sdata = squall.io.he(path)
    assert sdata.attrs["squall"]["mpp"] == pytest.approx(0.25)
    assert sdata.attrs["squall"]["mpp_source"] == "TIFF XResolution/ResolutionUnit"
    assert isinstance(_scale0(sdata).data, da.Array)
    assert len(_levels(sdata)) == 2  # one level in the file: a lazy factor-2 pyramid is built


def test_svs_like_description(crop, tmp_path):
    path = tmp_path / "slide.svs"
    tifffile.imwrite(path, crop, photometric="rgb", tile=(256, 256), description=SVS_DESCRIPTION)
    assert tifffile.TiffFile(path).is_svs
    sdata = squall.io.he(path)
    meta = sdata.attrs["squall"]
    assert meta["mpp"] == pytest.approx(0.499)
    assert meta["format"] == "SVS" and meta["objective_power"] == 20
    assert isinstance(_scale0(sdata).data, da.Array)


def test_tiff_placeholder_dpi_needs_mpp(crop, tmp_path):
    path = tmp_path / "screen.tif"
    tifffile.imwrite(path, crop, photometric="rgb", resolution=(72, 72), resolutionunit="INCH")
    with pytest.raises(ValueError, match=r"Pass `mpp=`"):
        squall.io.he(path)
    assert squall.io.he(path, mpp=0.5).attrs["squall"]["mpp"] == 0.5


def test_jpeg_needs_mpp_and_is_lazy(crop, tmp_path, monkeypatch):
    path = tmp_path / "crop.jpg"
    Image.fromarray(crop).save(path, quality=90)
    with pytest.raises(ValueError, match=r"No µm per pixel known for crop\.jpg.*Pass `mpp=`"):
        squall.io.he(path)

    calls = []
    original = _he._pil_decode

    def counting(p, size=None):
        calls.append(size)
        return original(p, size)

    monkeypatch.setattr(_he, "_pil_decode", counting)
    sdata = squall.io.he(path, mpp=2.0)
    assert calls == []  # nothing decoded yet
    img = _scale0(sdata)
    assert isinstance(img.data, da.Array) and img.shape == (3, 1536, 1536)
    tile = img.data[:, :256, :256].compute()
    assert calls == [None]  # one full decode
    # JPEG is lossy: compare loosely with the source
    assert np.abs(tile.astype(int) - np.moveaxis(crop[:256, :256], -1, 0)).mean() < 6
    assert sdata.attrs["squall"]["mpp"] == 2.0
    t = get_transformation(img, to_coordinate_system="microns")
    assert np.allclose(t.scale, [2.0, 2.0])
    assert set(sdata.shapes) == set() and not sdata.tables


def test_given_mpp_overrides_metadata(crop, tmp_path):
    path = tmp_path / "slide.tif"
    tifffile.imwrite(
        path,
        crop,
        photometric="rgb",
        resolution=(1e4 / 0.25, 1e4 / 0.25),
        resolutionunit="CENTIMETER",
    )
    sdata = squall.io.he(path, mpp=0.3)
    assert sdata.attrs["squall"]["mpp"] == 0.3 and sdata.attrs["squall"]["mpp_source"] == "argument"


def test_bad_inputs(tmp_path):
    with pytest.raises(FileNotFoundError, match="H&E image .* does not exist"):
        squall.io.he(tmp_path / "missing.svs")
    (tmp_path / "slide.czi").write_bytes(b"\0" * 16)
    with pytest.raises(ValueError, match="Unsupported H&E image format '.czi'"):
        squall.io.he(tmp_path / "slide.czi", mpp=0.5)
    (tmp_path / "broken.tif").write_bytes(b"not a tiff")
    with pytest.raises(ValueError, match="Could not read .* as a TIFF"):
        squall.io.he(tmp_path / "broken.tif", mpp=0.5)
    with pytest.raises(ValueError, match="positive"):
        squall.io.he(_bundle_dir() / "he.jpg", mpp=0)
