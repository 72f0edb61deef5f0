"""GPU correctness: prediction, embeddings and a training phase on CUDA agree with the CPU.

Skipped without a CUDA device (CI has none); run on a GPU machine with ``pytest tests/test_gpu.py``.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import squall_sd as squall

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(scope="module")
def example():
    return squall.datasets.example()


def _bundled_or_tiny(sdata):
    if "squall-tiny-her2st" in squall.models.list_models(pretrained=True):
        return squall.models.load("squall-tiny-her2st")
    torch.manual_seed(0)
    genes = list(sdata.tables["table"].var_names[:32])
    return squall.models.create("squall-tiny", genes=genes, mpp=4.0, img_size=128, expr_size=32)


def _predict(sdata, model, **kw):
    out = squall.tl.predict_expression(sdata, model, progress=False, inplace=False, **kw)
    return out.layers["squall"][:, out.var["squall_predicted"].to_numpy()]


def test_predict_expression_cuda_matches_cpu(example):
    model = _bundled_or_tiny(example)
    cpu = _predict(example, model, device="cpu")
    fp32 = _predict(example, model, device="cuda", autocast=False)
    bf16 = _predict(example, model, device="cuda")
    assert model.device.type == "cpu"  # moved back afterwards
    np.testing.assert_allclose(fp32, cpu, rtol=1e-3, atol=1e-3)
    # bf16 autocast: per-gene correlation across spots with the fp32 CPU result
    keep = cpu.std(0) > 1e-3
    r = [np.corrcoef(cpu[:, j], bf16[:, j])[0, 1] for j in np.flatnonzero(keep)]
    assert np.median(r) > 0.99 and np.min(r) > 0.9, (np.median(r), np.min(r))
    assert np.abs(bf16 - cpu).max() < 0.05 * (np.abs(cpu).max() + 1)


def test_geometry_mark_on_cuda(example):
    """A black square at one spot changes that spot only, on the GPU too (tiles independent)."""
    import spatialdata as sd

    from squall_sd._sdata import microns_scale
    from squall_sd.io._common import image_element

    torch.manual_seed(0)
    genes = list(example.tables["table"].var_names[:16])
    model = squall.models.create("squall-tiny", genes=genes, mpp=2.0, img_size=64, expr_size=16)
    small = sd.SpatialData(
        images={"he": example.images["he"]},
        shapes={"spots": example.shapes["spots"].iloc[:12].copy()},
        tables={"table": example.tables["table"][:12].copy()},
    )
    small.attrs.update(example.attrs)
    ref = _predict(small, model, device="cuda", autocast=False, layout="shapes")
    arr = np.asarray(example.images["he"]["scale0"]["image"].data.compute()).copy()
    mpp = squall.io.get_mpp(small)
    cx, cy = squall.pp._utils.centers_from(small, "spots")[5] / mpp
    arr[:, int(cy) - 8 : int(cy) + 8, int(cx) - 8 : int(cx) + 8] = 0
    marked = sd.SpatialData(
        images={"he": image_element(arr, {"microns": microns_scale(mpp)})},
        shapes={"spots": small.shapes["spots"]},
        tables={"table": small.tables["table"].copy()},
    )
    got = _predict(marked, model, device="cuda", autocast=False, layout="shapes")
    changed = np.flatnonzero(np.abs(ref - got).max(axis=1) > 1e-5)
    assert changed.tolist() == [5]


def test_embed_cuda_matches_cpu(example):
    model = _bundled_or_tiny(example)
    a = squall.tl.embed(example, model, device="cpu", progress=False, inplace=False)
    b = squall.tl.embed(example, model, device="cuda", autocast=False, progress=False, inplace=False)
    np.testing.assert_allclose(b.obsm["X_squall"], a.obsm["X_squall"], rtol=1e-3, atol=1e-3)


def test_finetune_on_gpu_bf16(example, tmp_path):
    from squall_sd import train

    shards = train.prepare(example, tmp_path / "c2", model_config_or_name="squall-tiny", mpp=4.0,
                           tile_stride_um=448, shard_size=16, min_tissue=0.2)
    genes = train.read_manifest(shards)["genes"][:16]
    cfg = {
        "seed": 0,
        "run_dir": str(tmp_path / "run"),
        "model": {"name": "squall-tiny", "overrides": {"mpp": 4.0}},
        "data": {"train": str(shards), "batch_size": 4, "max_tiles": 4, "augment": None},
        "optim": {"lr": 1.0e-3, "warmup_steps": 0, "min_lr": 1.0e-3},
        "task": {"type": "expression", "genes": genes, "level": "spot"},
        "trainer": {"max_steps": 12, "accelerator": "gpu", "devices": 1, "precision": "bf16-mixed",
                    "log_every_n_steps": 1, "enable_progress_bar": False},
        "checkpoint": {"every_n_steps": 6},
    }
    res = train.finetune(cfg)
    losses = [h["loss"] for h in res.history]
    assert all(np.isfinite(losses)) and np.mean(losses[-3:]) < np.mean(losses[:3]), losses
    head = json.loads((res.model_dir / "head.json").read_text())
    assert head["task"] == "expression" and head["genes"] == genes
    assert squall.models.load(res.model_dir).device.type == "cpu"
