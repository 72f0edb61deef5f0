import json

import numpy as np
import pytest
import torch
import zarr

from squall_sd.train import (
    ShardDataset,
    augment_tile,
    collate_tiles,
    expression_grid,
    read_manifest,
)


def test_manifest_and_shards(shards):
    man = read_manifest(shards)
    assert man["img_size"] == 224 and man["expr_size"] == 56 and man["mpp"] == 4.0
    assert man["cell_um"] == pytest.approx(16.0)
    assert len(man["genes"]) == 256 and man["normalization"] == "binary"
    assert man["slides"][0]["id"] == "C2"
    assert man["labels"]["key"] == "her2st_cluster" and man["labels"]["categories"]
    n = sum(s["n_tiles"] for s in man["shards"])
    assert n == man["n_tiles"] > 10 and len(man["shards"]) > 1  # several shards of <= 16 tiles
    g = zarr.open_group(shards / man["shards"][0]["path"], mode="r")
    assert g["rgb"].shape[1:] == (3, 224, 224) and g["rgb"].dtype == np.uint8
    assert g["cell_spot"].shape[1:] == (56, 56)
    assert (np.asarray(g["label"][:]) >= 0).any()
    json.dumps(man)


def test_binary_target_per_spot(shards):
    """A whole spot's cells sum to its binary vector (spec §4.10: divided by its cell count)."""
    ds = ShardDataset(shards, batch_size=1, shuffle=False, augment=None)
    s = ds.get(0)
    batch = collate_tiles([s])
    grid = expression_grid(batch, len(ds.genes))[0]  # (G, g, g)
    assert grid.shape == (256, 56, 56)
    cs = batch["cell_spot"][0]
    # cells outside every spot filled with the nearest spot's vector (fill="auto" on spots) are not
    # part of the spot
    man = read_manifest(shards)
    assert man["slides"][0]["fill"] == "nearest"
    filled = zarr.open_group(shards / man["shards"][0]["path"], mode="r")["cell_fill"][int(s["index"])]
    assert filled.any() and (np.asarray(batch["cell_weight"][0])[filled] == 1).all()
    # a 100 µm disc at 16 µm cells covers ~31 cells; the sum over its cells of any detected gene is
    # 1
    weight = np.asarray(batch["cell_weight"][0], dtype=np.float32)
    for k in range(int(cs.max()) + 1):
        cells = (cs == k) & ~torch.from_numpy(filled)
        # a complete spot has all its cells in the tile (its weight is 1 / its number of cells)
        if cells.sum() < 25 or int(cells.sum()) != round(1 / float(weight[cells.numpy()][0])):
            continue  # cut by the tile border
        total = grid[:, cells].sum(dim=1)
        detected = total > 0
        assert detected.any()
        np.testing.assert_allclose(total[detected].numpy(), 1.0, rtol=2e-3)
        break
    else:
        pytest.fail("no complete spot in the first tile")


def test_augmentation_is_joint(shards):
    ds = ShardDataset(shards, batch_size=1, shuffle=False, augment=None)
    s = ds.get(3)
    rng = np.random.default_rng(1)
    a = augment_tile(s, rng, flips=True, rot90=True)
    # find the applied transform on the rgb and check the grid got the same one
    for k in range(4):
        for flip in (False, True):
            r = np.rot90(s["rgb"], k, axes=(1, 2))
            c = np.rot90(s["cell_spot"], k)
            if flip:
                r, c = np.flip(r, 2), np.flip(c, 1)
            if np.array_equal(r, a["rgb"]):
                assert np.array_equal(c, a["cell_spot"])
                return
    pytest.fail("augmented tile is not a flip/rotation of the original")


def test_epoch_order_ranks_and_workers(shards):
    ds = ShardDataset(shards, batch_size=2, shuffle=True, shuffle_buffer=4, seed=3)
    full = ds.epoch_order(0)
    assert sorted(full.tolist()) == list(range(ds.n_tiles))
    assert not np.array_equal(full, ds.epoch_order(1))
    r0 = ShardDataset(shards, batch_size=2, rank=0, world_size=2, seed=3).epoch_order(0)
    r1 = ShardDataset(shards, batch_size=2, rank=1, world_size=2, seed=3).epoch_order(0)
    assert len(r0) == len(r1) == ds.n_tiles // 2 and not set(r0) & set(r1)
    # resuming mid-epoch skips exactly the batches already seen
    ds.set_epoch(0, skip_batches=2)
    got = [int(x["index"]) for x in ds]
    ds.set_epoch(0, skip_batches=0)
    ref = [int(x["index"]) for x in ds]
    assert got == ref[4:]


def test_prepare_refuses_existing(shards, example_sdata):
    from squall_sd.train import prepare

    with pytest.raises(FileExistsError, match="overwrite"):
        prepare(example_sdata, shards, model_config_or_name="squall-tiny", mpp=4.0)


def test_show_progress_is_deprecated(example_sdata, tmp_path):
    from squall_sd.train import prepare

    with pytest.warns(FutureWarning, match="progress"):
        out = prepare(
            example_sdata,
            tmp_path / "p",
            model_config_or_name="squall-tiny",
            mpp=4.0,
            min_tissue=0.2,
            max_tiles_per_slide=1,
            show_progress=False,
        )
    assert read_manifest(out)["n_tiles"] == 1


def test_resolve_model_config_reads_model_folder(tmp_path):
    import squall_sd as squall
    from squall_sd.train import resolve_model_config

    model = squall.models.create(
        "squall-tiny", genes=[f"G{i}" for i in range(squall.models.get_config("squall-tiny").n_genes)]
    )
    model.save_pretrained(tmp_path / "m")
    cfg = resolve_model_config(tmp_path / "m", mpp=4.0)
    assert cfg == model.config.replace(mpp=4.0)
    with pytest.raises(FileNotFoundError, match="config.json"):
        resolve_model_config(tmp_path)
