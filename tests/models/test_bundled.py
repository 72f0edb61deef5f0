"""The bundled model ships inside the package and loads by name, without ../shared or network."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch

import squall_sd.models as sm

NAME = "squall-tiny-her2st"


def test_bundled_model_is_listed_and_loads():
    assert NAME in sm.list_models(pretrained=True)
    model = sm.load(NAME)
    cfg = model.config
    # 112 px at 2 µm/px: a 224 µm field centred on a 100 µm spot, convolutional stem (model card)
    assert cfg.mpp == 2.0 and cfg.img_size == 112 and cfg.stem == "conv"
    assert len(model.genes) == cfg.n_genes == 848
    assert {"ERBB2", "GRB7"} & set(model.genes)
    n = sum(p.numel() for p in model.parameters())
    assert 1_000_000 < n < 6_000_000  # wheel stays small (<= 25 MB)


def test_bundled_weights_match_their_sha256():
    d = Path(sm.__file__).parent / "weights" / NAME
    expected = (d / "model.safetensors.sha256").read_text().split()[0]
    assert hashlib.sha256((d / "model.safetensors").read_bytes()).hexdigest() == expected
    assert (d / "model.safetensors").stat().st_size < 25 * 2**20


def test_bundled_model_predicts_on_a_real_tile():
    import squall_sd as squall

    sdata = squall.datasets.example()
    model = sm.load(NAME)
    centres = sdata.tables["table"].obsm["spatial"][:2]
    ds = squall.pp.extract_patches(sdata, centres, patch_px=model.config.img_size, mpp=model.config.mpp)
    rgb = torch.from_numpy(np.stack([ds[i] for i in range(len(ds))])).float() / 255.0
    out = model.predict(rgb, torch.full((2,), model.config.mpp), genes=["ERBB2"], aggregate="tile")
    assert out.shape[0] == 2 and torch.isfinite(out).all()


def test_bundled_model_averages_a_spot_in_log1p_cp10k():
    """Its cells each predict the spot's log1p(CP10k): a spot is their mean (``region_reduce``), not their sum."""
    import squall_sd as squall

    model = sm.load(NAME)
    assert model.config.region_reduce == "mean"
    assert sm.create("squall-tiny").config.region_reduce == "sum"  # the published binary target
    sdata = squall.datasets.example()
    centre = sdata.tables["table"].obsm["spatial"][:1]
    ds = squall.pp.extract_patches(sdata, centre, patch_px=model.config.img_size, mpp=model.config.mpp)
    rgb = torch.from_numpy(ds[0][None]).float() / 255.0
    g = model.config.expr_size
    yy, xx = np.mgrid[:g, :g]
    r_cells = 50.0 / (model.config.cell_px * model.config.mpp)  # the 100 µm spot
    disc = torch.from_numpy(((yy - g / 2 + 0.5) ** 2 + (xx - g / 2 + 0.5) ** 2 <= r_cells**2).astype(np.float32))
    default = model.predict(rgb, genes=["ERBB2", "GRB7"], aggregate=disc[None])
    mean = model.predict(rgb, genes=["ERBB2", "GRB7"], aggregate=disc[None], reduce="mean")
    torch.testing.assert_close(default, mean)
    summed = model.predict(rgb, genes=["ERBB2", "GRB7"], aggregate=disc[None], reduce="sum")
    assert ((default > 0) & (default < 12)).all()  # log1p(CP10k) range
    torch.testing.assert_close(summed, default * disc.sum(), rtol=1e-3, atol=1e-3)
