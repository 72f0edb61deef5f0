"""In-memory shards (``data.in_memory``), per-section target statistics and lr multipliers."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from squall_sd.train._data import ShardDataset, section_stats

from .conftest import base_config


def _assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(np.asarray(a[key]), np.asarray(b[key]), err_msg=key)


@pytest.mark.parametrize("augment", [None, {"flips": True, "rot90": True, "stain_jitter": 0.2}])
def test_in_memory_gives_the_same_examples_as_streaming(shards, augment):
    kw = {"batch_size": 3, "shuffle_buffer": 8, "seed": 3, "augment": augment}
    stream = ShardDataset(shards, **kw)
    memory = ShardDataset(shards, in_memory=True, **kw)
    assert stream.n_tiles == memory.n_tiles and len(stream.shard_paths) > 2
    for epoch in (0, 1):
        stream.set_epoch(epoch)
        memory.set_epoch(epoch)
        a, b = list(stream), list(memory)
        assert len(a) == len(b) == stream.n_batches() * 3
        for x, y in zip(a, b, strict=True):
            _assert_same(x, y)
    # every shard stays loaded (streaming keeps at most two open)
    assert len(memory._open) == len(memory.shard_paths)
    assert len(stream._open) <= 2


def test_in_memory_survives_pickling_and_resume_skip(shards):
    import pickle

    memory = ShardDataset(shards, batch_size=2, in_memory=True, augment=None)
    first = list(memory)
    clone = pickle.loads(pickle.dumps(memory))  # what a DataLoader worker receives
    assert len(clone._open) == len(memory._open)
    clone.set_epoch(0, skip_batches=1)
    _assert_same(first[2], next(iter(clone)))


def test_in_memory_config_key_reaches_the_dataset(shards, tmp_path):
    from squall_sd.train import load_config
    from squall_sd.train._data import ShardDataModule

    cfg = load_config(base_config(shards, tmp_path, data={"in_memory": True}))
    dm = ShardDataModule(cfg)
    dm.setup()
    assert dm.train_ds.in_memory
    assert load_config(base_config(shards, tmp_path))["data"]["in_memory"] is False


def test_section_stats_match_a_dense_computation(shards):
    ds = ShardDataset(shards, batch_size=1, shuffle=False)
    mean, std = section_stats(shards, [0, 5, 7])
    assert mean.shape == std.shape == (len(ds.slides), 3)
    # recompute from the unique spots met through the tiles
    seen: dict[tuple[int, int], np.ndarray] = {}
    import zarr

    for path, off in zip(ds.shard_paths, ds.shard_slide_offset, strict=True):
        g = zarr.open_group(path, mode="r")
        ptr, idx, val = g["spot_indptr"][:], g["spot_indices"][:], g["spot_log1p"][:]
        for k, sl in enumerate(g["spot_slide"][:]):
            row = np.zeros(len(ds.genes), np.float32)
            row[idx[ptr[k] : ptr[k + 1]]] = val[ptr[k] : ptr[k + 1]]
            seen[(int(sl) + off, len(seen))] = row[[0, 5, 7]]
    rows = np.stack(list(seen.values()))
    slides = np.array([k[0] for k in seen])
    for s in np.unique(slides):
        np.testing.assert_allclose(mean[s], rows[slides == s].mean(0), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(std[s], rows[slides == s].std(0), rtol=1e-4, atol=1e-5)


def test_lr_scale_groups_follow_the_schedule():
    from squall_sd.train._optim import build_optimizer

    m = torch.nn.Module()
    m.model = torch.nn.Linear(4, 4)
    m.head = torch.nn.Linear(4, 2)
    optim = {"lr": 1e-3, "weight_decay": 0.05, "warmup_steps": 0, "min_lr": 0.0, "lr_scale": {"model.": 0.1}}
    opt, sched = build_optimizer(m, optim, total_steps=10)
    lrs = sorted({round(g["lr"], 8) for g in opt.param_groups})
    assert lrs == [1e-4, 1e-3]
    for _ in range(5):
        opt.step()
        sched.step()
    by_scale = {g["lr_scale"]: g["lr"] for g in opt.param_groups}
    assert by_scale[0.1] == pytest.approx(0.1 * by_scale[1.0])
    assert by_scale[1.0] == pytest.approx(0.5e-3)


def test_finetune_standardize_section_folds_back_to_log1p(shards, tmp_path):
    import json

    from safetensors.torch import load_file

    from squall_sd import train

    genes = train.read_manifest(shards)["genes"][:16]
    cfg = base_config(
        shards,
        tmp_path / "z",
        task={"type": "expression", "genes": genes, "level": "spot", "standardize": "section"},
    )
    cfg["trainer"]["max_steps"] = 2
    res = train.finetune(cfg)
    mod = res.module
    ds = ShardDataset(shards, batch_size=1, shuffle=False)
    mean, std = section_stats(shards, mod.gene_idx.numpy())
    np.testing.assert_allclose(mod.train_mean.numpy(), mean)
    np.testing.assert_allclose(mod.train_std.numpy(), np.maximum(std, 0.1))
    assert mod.train_mean.shape[0] == len(ds.slides)
    # the training targets are the z-scores
    from squall_sd.train._data import collate_tiles

    batch = collate_tiles([ds.get(i) for i in range(3)])
    mod.train()
    _, target = mod.predict_regions(batch)
    from squall_sd.train._data import spot_matrix

    raw = spot_matrix(batch, mod.model.n_genes, binary=False)[:, mod.gene_idx]
    sl = batch["slide"][batch["spot_tile"]]
    expect = (raw - mod.train_mean[sl]) / mod.train_std[sl]
    # a spot is a training region where it owns a cell of the batch (not only nearest-filled cells)
    owned = batch["cell_spot"][(batch["cell_spot"] >= 0) & ~batch["cell_fill"]]
    torch.testing.assert_close(target, expect[torch.bincount(owned, minlength=len(expect)) > 0])
    # the exported head maps z back to log1p(CP10k) with the average section mean / sd
    head = load_file(str(res.model_dir / "head.safetensors"))
    meta = json.loads((res.model_dir / "head.json").read_text())
    assert meta["target"] == "log1p_cp10k" and "standardize" in meta
    torch.testing.assert_close(head["scale"], mod.head["scale"].detach() * mod.ref_std)
    torch.testing.assert_close(head["shift"], mod.head["shift"].detach() * mod.ref_std + mod.ref_mean)


def test_standardize_rejects_unknown_values(shards, tmp_path):
    from squall_sd.train import load_config

    with pytest.raises(ValueError, match="standardize"):
        load_config(base_config(shards, tmp_path, task={"standardize": "patient"}))


def test_preload_reads_every_shard_only_when_in_memory(shards):
    memory = ShardDataset(shards, batch_size=2, in_memory=True).preload()
    assert len(memory._open) == len(memory.shard_paths)
    assert all(isinstance(sh.group, dict) for sh in memory._open.values())
    assert len(ShardDataset(shards, batch_size=2).preload()._open) == 0


def test_datasets_of_different_scales_mix(shards, example_sdata, tmp_path):
    """Prepared sets at different µm/px train together (each tile keeps its own ``res``); a different tile
    size in pixels still raises."""
    import json
    import shutil

    from squall_sd.train import prepare

    coarse = prepare(example_sdata, tmp_path / "c2_8um", model_config_or_name="squall-tiny", mpp=8.0,
                     tile_stride_um=896, shard_size=16, min_tissue=0.2, progress=False)
    both = ShardDataset([shards, coarse], batch_size=2, shuffle=False, augment=None, drop_last=False)
    assert both.mpps == [4.0, 8.0]
    n4 = ShardDataset(shards, batch_size=2, shuffle=False).n_tiles
    res = np.array([float(item["res"]) for item in both])
    assert len(res) == both.n_tiles > n4
    np.testing.assert_array_equal(res, [4.0] * n4 + [8.0] * (both.n_tiles - n4))

    other = tmp_path / "other_size"
    shutil.copytree(coarse, other)
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["img_size"] = 2 * int(manifest["img_size"])
    (other / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=r"differ in 'img_size'.*same `img_size`"):
        ShardDataset([shards, other], batch_size=2)
