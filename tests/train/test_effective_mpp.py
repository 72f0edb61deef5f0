"""``data.effective_mpp``: training tiles of sharper scans degraded as inference degrades them, and the
setting carried into the exported model (real her2st tiles of the bundled example)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

import squall_sd as squall
from squall_sd import train
from squall_sd.pp import degrade_patches

from .conftest import MPP, base_config


def test_shard_tiles_of_sharper_slides_are_degraded(shards):
    plain = train.ShardDataset(shards, shuffle=False)
    soft = train.ShardDataset(shards, shuffle=False, effective_mpp=2 * MPP)
    assert plain.slides[0]["mpp_image"] < MPP and soft.slide_degrade.tolist() == [True]
    for i in range(3):
        a, b = plain.get(i), soft.get(i)
        np.testing.assert_array_equal(b["rgb"], degrade_patches(a["rgb"], MPP, 2 * MPP))
        assert not np.array_equal(a["rgb"], b["rgb"])
        np.testing.assert_array_equal(a["spot_log1p"], b["spot_log1p"])  # only the pixels change
    # a slide scanned coarser than the target keeps its tiles
    kept = train.ShardDataset(shards, shuffle=False, effective_mpp=plain.slides[0]["mpp_image"] * 1.01)
    np.testing.assert_array_equal(kept.get(0)["rgb"], plain.get(0)["rgb"])


def test_shards_without_image_resolution_are_refused(shards, tmp_path):
    copy = tmp_path / "old"
    shutil.copytree(shards, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    for slide in manifest["slides"]:
        del slide["mpp_image"]
    (copy / "manifest.json").write_text(json.dumps(manifest))
    train.ShardDataset(copy)  # fine without the setting
    with pytest.raises(ValueError, match="mpp_image"):
        train.ShardDataset(copy, effective_mpp=8.0)


def test_run_writes_effective_mpp_into_the_model_and_a_finetune_inherits_it(shards, tmp_path):
    cfg = base_config(shards, tmp_path / "p1", loss={"mask_ratio": 0.5}, data={"effective_mpp": 2 * MPP})
    cfg["trainer"]["max_steps"] = 2
    res = train.pretrain_image(cfg)
    assert res.module.model.config.effective_mpp == 2 * MPP
    assert res.module.trainer.datamodule.train_ds.slide_degrade.all()  # the run's tiles were degraded
    assert squall.models.load(res.model_dir).config.effective_mpp == 2 * MPP
    # fine-tuning the soft model without naming the setting keeps it, for its tiles and its export
    genes = train.read_manifest(shards)["genes"][:4]
    cfg2 = base_config(shards, tmp_path / "p3", task={"type": "expression", "genes": genes, "level": "spot"})
    cfg2["model"] = {"init_from": str(res.model_dir)}
    cfg2["trainer"]["max_steps"] = 2
    res2 = train.finetune(cfg2)
    assert res2.module.model.config.effective_mpp == 2 * MPP
    assert res2.module.trainer.datamodule.train_ds.effective_mpp == 2 * MPP
    assert squall.models.load(res2.model_dir).config.effective_mpp == 2 * MPP
    assert train.load_config(res2.run_dir / "config.yaml")["data"]["effective_mpp"] == 2 * MPP
