"""One optical resolution for every image: ``degrade_patches``, ``SquallConfig.effective_mpp`` and
the inference paths that honour it (bundled her2st example, no download)."""

from __future__ import annotations

import json

import numpy as np
import pytest

import squall_sd as squall
from squall_sd._sdata import microns_scale
from squall_sd.io._common import image_element, make_sdata
from squall_sd.pp import degrade_patches, is_sharper


@pytest.fixture(scope="module")
def example():
    return squall.datasets.example()


def _centres(sdata, n=6):
    spots = sdata.shapes["spots"]
    from spatialdata.transformations import get_transformation

    aff = get_transformation(spots, "microns").to_affine_matrix(("x", "y"), ("x", "y"))
    xy = np.c_[spots.geometry.x.to_numpy(), spots.geometry.y.to_numpy(), np.ones(len(spots))] @ aff.T
    return xy[:n, :2]


def test_degrade_removes_detail_finer_than_the_target_and_keeps_coarser():
    yy, xx = np.mgrid[:64, :64]
    checker = np.where((yy + xx) % 2 == 0, 40, 220).astype(np.uint8)  # one-pixel detail
    ramp = (xx * 3 + 20).astype(np.uint8)  # smooth over the whole tile
    tiles = np.stack([np.stack([checker] * 3), np.stack([ramp] * 3)])
    out = degrade_patches(tiles, 2.0, 4.0)
    assert out.shape == tiles.shape and out.dtype == np.uint8
    assert out[0].std() < 0.05 * checker.std()  # the 2 µm checkerboard is gone at 4 µm/px
    assert np.abs(out[1, :, 4:-4, 4:-4].astype(int) - ramp[4:-4, 4:-4]).max() <= 3  # the ramp stays
    # one patch (3, P, P) gives what it gives inside a batch
    np.testing.assert_array_equal(degrade_patches(tiles[1], 2.0, 4.0), out[1])


def test_degrade_refuses_what_it_cannot_do():
    tile = np.zeros((3, 16, 16), np.uint8)
    with pytest.raises(ValueError, match="coarser"):
        degrade_patches(tile, 2.0, 2.0)
    with pytest.raises(TypeError, match="uint8"):
        degrade_patches(tile.astype(np.float32), 2.0, 4.0)
    with pytest.raises(ValueError, match="shape"):
        degrade_patches(np.zeros((16, 16, 3), np.uint8), 2.0, 4.0)


def test_is_sharper_counts_near_equal_scans_as_the_same_resolution():
    assert is_sharper(0.69, 3.202)
    assert not is_sharper(3.1847, 3.202)  # her2st A1's copy: the resolution it names
    assert not is_sharper(4.0, 3.202)
    assert not is_sharper(0.25, None)


def test_config_effective_mpp_is_checked_and_saved(tmp_path):
    cfg = squall.models.get_config("squall-tiny")
    assert cfg.effective_mpp is None
    with pytest.raises(ValueError, match="coarser than `mpp`"):
        cfg.replace(effective_mpp=cfg.mpp)
    model = squall.models.create("squall-tiny", img_size=64, expr_size=16, mpp=4.0, effective_mpp=8)
    assert model.config.effective_mpp == 8.0
    model.save_pretrained(tmp_path / "m")
    assert squall.models.load(tmp_path / "m").config.effective_mpp == 8.0
    # a model folder written before the field existed loads as "as sharp as mpp"
    meta = json.loads((tmp_path / "m" / "config.json").read_text())
    del meta["config"]["effective_mpp"]
    (tmp_path / "m" / "config.json").write_text(json.dumps(meta))
    assert squall.models.load(tmp_path / "m").config.effective_mpp is None


def test_extract_patches_degrades_only_images_sharper_than_effective_mpp(example):
    xy = _centres(example)
    plain = squall.pp.extract_patches(example, xy, patch_px=64, mpp=4.0)
    soft = squall.pp.extract_patches(example, xy, patch_px=64, mpp=4.0, effective_mpp=8.0)
    assert plain.degrade_to is None and soft.degrade_to == 8.0 and "degraded to 8" in repr(soft)
    want = degrade_patches(plain.get_batch(), 4.0, 8.0)
    np.testing.assert_array_equal(soft.get_batch(), want)
    np.testing.assert_array_equal(np.stack([soft[i] for i in range(len(xy))]), want)
    assert not np.array_equal(want, plain.get_batch())
    # an image scanned at 8 µm/px already carries no finer detail: nothing to degrade
    cyx = np.asarray(example.images["he"]["scale2"]["image"].data)
    coarse = make_sdata(image=image_element(cyx, {"microns": microns_scale(8.0)}))
    centres = np.array([[2000.0, 2000.0], [3000.0, 2500.0]])
    a = squall.pp.extract_patches(coarse, centres, patch_px=32, mpp=4.0, effective_mpp=8.0)
    b = squall.pp.extract_patches(coarse, centres, patch_px=32, mpp=4.0)
    assert a.degrade_to is None
    np.testing.assert_array_equal(a.get_batch(), b.get_batch())


def test_predict_and_embed_see_tiles_at_the_models_effective_mpp(example, monkeypatch):
    import torch

    torch.manual_seed(0)
    genes = list(example.tables["table"].var_names[:8])
    sharp = squall.models.create("squall-tiny", img_size=64, expr_size=16, genes=genes, mpp=4.0).eval()
    soft = squall.models.create("squall-tiny", img_size=64, expr_size=16, genes=genes, mpp=4.0, effective_mpp=8.0)
    soft.load_state_dict(sharp.state_dict())
    soft.eval()
    seen = []
    real = squall.pp.extract_patches

    def spy(*args, **kwargs):
        seen.append(kwargs.get("effective_mpp"))
        return real(*args, **kwargs)

    monkeypatch.setattr(squall.pp, "extract_patches", spy)
    kw = {"progress": False, "inplace": False}
    pred = squall.tl.predict_expression(example, sharp, **kw)
    keep = pred.var["squall_predicted"].to_numpy()
    p_sharp = pred.layers["squall"][:, keep]
    p_soft = squall.tl.predict_expression(example, soft, **kw).layers["squall"][:, keep]
    e_soft = squall.tl.embed(example, soft, **kw).obsm["X_squall"]
    e_sharp = squall.tl.embed(example, sharp, **kw).obsm["X_squall"]
    assert seen == [None, 8.0, 8.0, None]
    assert np.isfinite(p_soft).all() and not np.allclose(p_soft, p_sharp)
    assert not np.allclose(e_soft, e_sharp)
