"""Each phase trains end to end on real her2st tiles with squall-tiny on CPU; checkpoints load."""

import json

import numpy as np
import pandas as pd
import torch

import squall_sd as squall
from squall_sd import train

from .conftest import MPP, base_config


def _drops(history, k=2):
    losses = [h["loss"] for h in history]
    assert len(losses) >= 2 * k and all(np.isfinite(losses))
    first, last = np.mean(losses[:k]), np.mean(losses[-k:])
    assert last < first, f"loss did not go down: {losses}"
    return losses


def _check_export(result, module_model):
    d = result.model_dir
    for f in (
        "config.json",
        "model.safetensors",
        "genes.txt",
        "config.yaml",
        "provenance.json",
        "metrics.json",
    ):
        assert (d / f).is_file(), f
    prov = json.loads((d / "provenance.json").read_text())
    assert prov["squall_sd_version"] == squall.__version__ and prov["global_step"] > 0
    loaded = squall.models.load(d)
    ref = module_model.state_dict()
    for k, v in loaded.state_dict().items():
        assert torch.equal(v, ref[k].cpu()), k
    assert loaded.genes == module_model.genes
    assert (result.run_dir / "checkpoints" / "last.ckpt").is_file()
    return loaded


def test_pretrain_image(shards, tmp_path):
    cfg = base_config(shards, tmp_path / "p1", loss={"mask_ratio": 0.5})
    res = train.pretrain_image(cfg)
    _drops(res.history)
    _check_export(res, res.module.model)
    # every periodic checkpoint is exported too
    assert squall.models.load(res.run_dir / "checkpoints" / "step=4").n_genes == 256


def test_align_with_contrastive(shards, tmp_path):
    cfg = base_config(shards, tmp_path / "p2", loss={"contrastive_weight": 0.1})
    cfg["trainer"]["max_steps"] = 4  # three encoder passes per step: keep it short
    res = train.align(cfg)
    _drops(res.history)
    assert "contrastive_loss" in res.history[-1] and "expr_loss" in res.history[-1]
    _check_export(res, res.module.model)


def test_finetune_expression(shards, tmp_path):
    genes = train.read_manifest(shards)["genes"][:16]
    cfg = base_config(
        shards, tmp_path / "p3", task={"type": "expression", "genes": genes, "level": "spot"}
    )
    res = train.finetune(cfg)
    _drops(res.history)
    _check_export(res, res.module.model)
    head = json.loads((res.model_dir / "head.json").read_text())
    assert head["task"] == "expression" and head["genes"] == genes


def test_finetune_classification(shards, tmp_path):
    cfg = base_config(shards, tmp_path / "p3c", task={"type": "classification"})
    cfg["data"]["max_tiles"] = 4
    cfg["data"]["batch_size"] = 4
    res = train.finetune(cfg)
    _drops(res.history)
    _check_export(res, res.module.model)
    assert json.loads((res.model_dir / "head.json").read_text())["classes"]


def test_finetune_mil_survival(example_sdata, tmp_path):
    """Gated-attention MIL with a Cox loss over 3 slides (real tiles, simulated outcomes)."""
    folders = []
    for i, stride in enumerate((896, 672, 448)):
        folders.append(
            train.prepare(
                example_sdata,
                tmp_path / f"s{i}",
                model_config_or_name="squall-tiny",
                mpp=MPP,
                tile_stride_um=stride,
                slide_ids=[f"C2_{stride}"],
                min_tissue=0.2,
                genes=train.read_manifest(folders[0])["genes"] if folders else None,
            )
        )
    labels = tmp_path / "outcomes.csv"
    pd.DataFrame(
        {"slide": ["C2_896", "C2_672", "C2_448"], "time": [10.0, 20.0, 30.0], "event": [1, 1, 0]}
    ).to_csv(labels, index=False)
    cfg = base_config(
        folders,
        tmp_path / "mil",
        task={
            "type": "mil",
            "outcome": "survival",
            "slide_labels": str(labels),
            "max_tiles_per_slide": 8,
            "dropout": 0.0,
        },
    )
    cfg["data"].update({"max_tiles": None, "batch_size": 8})
    cfg["trainer"]["max_steps"] = 20
    res = train.finetune(cfg)
    _drops(res.history, k=3)
    _check_export(res, res.module.model)
    assert json.loads((res.model_dir / "head.json").read_text())["task"] == "mil"
