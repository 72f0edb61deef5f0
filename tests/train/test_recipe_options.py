"""Small-data options of the training recipe: spot-centred tiles, early stopping, colour/blur
augmentation and the convolutional stem, on real her2st tiles of the bundled example."""

import json

import numpy as np
import pytest
import torch

import squall_sd as squall
from squall_sd import train
from squall_sd.train import ShardDataset, augment_tile, read_manifest

from .conftest import base_config

#: spot-centred geometry: 112 px at 2 µm/px = a 224 µm field around each 100 µm spot
SPOT_MODEL = {"img_size": 112, "expr_size": 28, "mpp": 2.0}


@pytest.fixture(scope="module")
def spot_shards(example_sdata, tmp_path_factory):
    return train.prepare(
        example_sdata,
        tmp_path_factory.mktemp("spots") / "c2",
        model_config_or_name="squall-tiny",
        tile_centers="spots",
        tiles_per_spot=2,
        jitter_um=30.0,
        min_tissue=0.0,
        **SPOT_MODEL,
    )


def _validated_expression_config(spot_shards, run_dir, **sections):
    """The recipe's model (conv stem) on 8 spot tiles, validated on them, spot-level expression."""
    return base_config(
        spot_shards,
        run_dir,
        model={"name": "squall-tiny", "overrides": {**SPOT_MODEL, "stem": "conv", "init": "trunc_normal"}},
        data={"val": str(spot_shards), "max_tiles": 8, "batch_size": 4},
        task={"type": "expression", "level": "spot", "standardize": "section"},
        **sections,
    )


def test_spot_centred_tiles_hold_their_spot_at_the_centre(example_sdata, spot_shards):
    man = read_manifest(spot_shards)
    n_spots = example_sdata.tables["table"].n_obs
    assert man["n_tiles"] == 2 * n_spots  # every spot, twice (min_tissue=0)
    assert man["params"]["tile_centers"] == "spots" and man["slides"][0]["tiles"]["tiles_per_spot"] == 2
    ds = ShardDataset(spot_shards, batch_size=1, shuffle=False, augment=None)
    g = man["expr_size"]
    for i in (0, 5, n_spots + 5):  # first copies are centred, second copies shifted by <= 30 µm
        s = ds.get(i)
        spot = s["cell_spot"][g // 2, g // 2]
        assert spot >= 0 and not s["cell_fill"][g // 2, g // 2]
        own = (s["cell_spot"] == spot) & ~s["cell_fill"]
        # a whole 100 µm disc at 8 µm cells (~123 cells) lies inside the 224 µm tile
        assert 100 <= own.sum() <= 140
        yy, xx = np.nonzero(own)
        off_um = (np.array([xx.mean(), yy.mean()]) + 0.5 - g / 2) * man["cell_um"]
        assert np.abs(off_um).max() <= (man["cell_um"] if i < n_spots else 30 + man["cell_um"])


def test_spot_tiles_argument_errors(example_sdata, tmp_path):
    with pytest.raises(ValueError, match="tile_centers"):
        train.prepare(example_sdata, tmp_path / "x", tile_centers="cells", **SPOT_MODEL)
    with pytest.raises(ValueError, match="tiles_per_spot"):
        train.prepare(example_sdata, tmp_path / "y", tile_centers="spots", tiles_per_spot=0, **SPOT_MODEL)
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_grid_tiles_unchanged_by_default(shards):
    """The default stays the stride grid (the fixture's shards were written without the new options)."""
    man = read_manifest(shards)
    assert man["params"]["tile_centers"] == "grid" and "tiles" not in man["slides"][0]


def test_colour_and_blur_augmentation(spot_shards):
    ds = ShardDataset(spot_shards, batch_size=1, shuffle=False, augment=None)
    s = ds.get(0)
    plain = augment_tile(s, np.random.default_rng(0), flips=False, rot90=False)
    np.testing.assert_array_equal(plain["rgb"], s["rgb"])  # nothing asked, nothing changed
    col = augment_tile(s, np.random.default_rng(0), flips=False, rot90=False, color=0.3)
    assert col["rgb"].dtype == np.uint8 and not np.array_equal(col["rgb"], s["rgb"])
    np.testing.assert_array_equal(col["cell_spot"], s["cell_spot"])  # colour never moves the target
    blurred = [
        augment_tile(s, np.random.default_rng(k), flips=False, rot90=False, blur=2.0)["rgb"] for k in range(8)
    ]
    changed = [not np.array_equal(b, s["rgb"]) for b in blurred]
    assert any(changed) and not all(changed)  # half of the tiles are blurred
    b = blurred[changed.index(True)].astype(float)
    # blur removes fine detail: less total variation
    assert np.abs(np.diff(b, axis=2)).mean() < np.abs(np.diff(s["rgb"].astype(float), axis=2)).mean()


def test_early_stopping_keeps_the_best_checkpoint(spot_shards, tmp_path):
    cfg = _validated_expression_config(
        spot_shards,
        tmp_path / "run",
        trainer={"max_steps": 40, "early_stopping": {"monitor": "val/loss", "patience": 1, "min_delta": 10.0}},
        checkpoint={"every_n_steps": 0, "best": "val/loss"},
    )
    result = train.finetune(cfg)
    # max_tiles 8 / batch 4 = 2 steps an epoch; min_delta 10 means no epoch counts as an improvement, so
    # the run stops after 1 + patience validation runs, far before max_steps
    steps = [h["step"] for h in result.history]
    assert max(steps) == 4, steps
    ckdir = result.run_dir / "checkpoints"
    assert (ckdir / "best.ckpt").is_file() and (ckdir / "best" / "model.safetensors").is_file()
    best = squall.models.load(ckdir / "best")
    assert best.config.stem == "conv" and best.config.img_size == 112
    metrics = json.loads((result.run_dir / "metrics.json").read_text())
    assert np.isfinite(metrics["val/loss"]) and -1 <= metrics["val/pearson"] <= 1


def test_validation_metric_needs_a_validation_set(spot_shards, tmp_path):
    cfg = base_config(
        spot_shards,
        tmp_path / "run",
        trainer={"early_stopping": {"monitor": "val/loss", "patience": 2}},
        task={"type": "expression"},
    )
    with pytest.raises(ValueError, match="data.val"):
        train.finetune(cfg)
    cfg["trainer"]["early_stopping"] = {"monitor": "val/loss", "patients": 2}
    cfg["data"]["val"] = str(spot_shards)
    with pytest.raises(KeyError, match="patients"):
        train.finetune(cfg)


def test_conv_stem():
    cfg = squall.models.get_config("squall-tiny", stem="conv", img_size=112, expr_size=28)
    m = squall.models.create(cfg)
    stem = m.encoder.patch_embed_rgb
    assert [c.stride for c in stem.stem if isinstance(c, torch.nn.Conv2d)] == [(2, 2)] * 4  # 16 px per token
    z = m.forward_rgb(torch.rand(2, 3, 112, 112), res=2.0)
    assert z.shape == (2, 49, 128)
    with pytest.raises(ValueError, match="112"):
        m.forward_rgb(torch.rand(1, 3, 96, 96), res=2.0)
    with pytest.raises(ValueError, match="stem"):
        squall.models.get_config("squall-tiny", stem="resnet")
    with pytest.raises(ValueError, match="power-of-two"):
        squall.models.get_config("squall-tiny", stem="conv", patch_size=12, img_size=96, expr_size=24, embed_dim=96)
    # the published layout keeps its strided patchify projection
    assert squall.models.get_config("squall-555m").stem == "patchify"


def test_conv_stem_roundtrip(tmp_path):
    m = squall.models.create(squall.models.get_config("squall-tiny", stem="conv", img_size=112, expr_size=28))
    m.eval()
    m.save_pretrained(tmp_path / "m")
    back = squall.models.load(tmp_path / "m")
    assert back.config.stem == "conv"
    x = torch.rand(2, 3, 112, 112)
    torch.testing.assert_close(back.forward_rgb(x, res=2.0), m.forward_rgb(x, res=2.0))


def test_early_stopping_and_best_checkpoint_share_the_metric_direction(spot_shards, tmp_path):
    """Without `mode`, early stopping follows the metric like `checkpoint.best`: r is maximised."""
    from lightning.pytorch.callbacks import EarlyStopping

    from squall_sd.train._config import load_config
    from squall_sd.train._run import _build_trainer

    cfg = load_config(
        base_config(
            spot_shards,
            tmp_path / "run",
            data={"val": str(spot_shards)},
            trainer={"early_stopping": {"monitor": "val/pearson", "patience": 2}},
            checkpoint={"best": "val/pearson"},
        )
    )
    trainer, _, _ = _build_trainer(cfg, tmp_path / "run", [])
    es = [c for c in trainer.callbacks if isinstance(c, EarlyStopping)]
    best = [c for c in trainer.callbacks if getattr(c, "monitor", None) == "val/pearson" and c not in es]
    assert es[0].mode == "max" and best[0].mode == "max"
    cfg["trainer"]["early_stopping"] = {"monitor": "val/loss", "patience": 2}
    trainer, _, _ = _build_trainer(cfg, tmp_path / "run", [])
    assert [c for c in trainer.callbacks if isinstance(c, EarlyStopping)][0].mode == "min"


def test_ema_weights_are_checkpointed_and_exported(spot_shards, tmp_path):
    """optim.ema_decay: checkpoints and their exports hold the moving average, not the raw weights."""
    cfg = _validated_expression_config(
        spot_shards,
        tmp_path / "run",
        optim={"ema_decay": 0.5},
        trainer={"max_steps": 6},
        checkpoint={"every_n_steps": 4, "best": "val/pearson"},
    )
    result = train.finetune(cfg)
    ckdir = result.run_dir / "checkpoints"
    # mid-run checkpoints keep both; at the end Lightning copies the average into the model, so the
    # final last.ckpt holds the average twice
    for name, mid_run in (("step=4", True), ("best", True), ("last", False)):
        ck = torch.load(ckdir / f"{name}.ckpt", map_location="cpu", weights_only=False)
        averaged, raw = ck["state_dict"], ck["current_model_state"]
        weights = [k for k in averaged if k.startswith("model.") and averaged[k].is_floating_point()]
        differ = [k for k in weights if not torch.equal(averaged[k], raw[k])]
        assert weights and bool(differ) == mid_run, name
        exported = squall.models.load(ckdir / name).state_dict()
        for k in weights:
            torch.testing.assert_close(exported[k[len("model."):]], averaged[k], rtol=0, atol=0)
    # the run resumes from last.ckpt with its average (Lightning restores it) and goes on
    cfg["trainer"]["max_steps"] = 8
    assert max(h["step"] for h in train.finetune(cfg).history) == 8


def test_ema_decay_is_checked():
    from squall_sd.train._config import load_config

    for bad in (1.0, 0, -0.5, "fast"):
        with pytest.raises(ValueError, match="ema_decay"):
            load_config({"optim": {"ema_decay": bad}})


def test_validation_pearson_per_section_and_collapsed_predictions():
    from squall_sd.train._modules import section_pearson

    rng = np.random.default_rng(0)
    target = torch.tensor(rng.normal(size=(30, 5)))
    pred = target + torch.tensor(rng.normal(size=(30, 5)))
    slide = torch.tensor([0] * 12 + [1] * 16 + [2] * 2)  # section 2 has too few spots to score
    expect = np.mean([
        np.mean([np.corrcoef(pred[slide == s, g], target[slide == s, g])[0, 1] for g in range(5)]) for s in (0, 1)
    ])
    assert float(section_pearson(pred, target, slide)) == pytest.approx(expect, abs=1e-12)
    # a model that collapsed to one output scores 0 (no skill), not "no value" that early stopping would skip
    assert float(section_pearson(torch.ones_like(pred), target, slide)) == 0.0
    flat = target.clone()
    flat[:, 0] = 1.0  # a gene that does not vary is left out
    assert float(section_pearson(pred, flat, slide)) == pytest.approx(
        np.mean([np.mean([np.corrcoef(pred[slide == s, g], flat[slide == s, g])[0, 1] for g in range(1, 5)])
                 for s in (0, 1)]), abs=1e-12)
    assert section_pearson(pred[:2], target[:2], slide[:2]) is None


def test_each_validation_section_has_its_own_curve(example_sdata, tmp_path):
    """With several validation sections, val/pearson/<slide id> per section (their mean is val/pearson),
    and early stopping / the best checkpoint can follow one of them."""
    folders = [
        train.prepare(example_sdata, tmp_path / sid, model_config_or_name="squall-tiny", slide_ids=[sid],
                      tile_centers="spots", tiles_per_spot=1, min_tissue=0.0, **SPOT_MODEL)
        for sid in ("s1", "s2")
    ]
    cfg = base_config(
        folders[0],
        tmp_path / "run",
        model={"name": "squall-tiny", "overrides": {**SPOT_MODEL, "stem": "conv", "init": "trunc_normal"}},
        data={"val": [str(f) for f in folders], "max_tiles": None, "batch_size": 8},
        task={"type": "expression", "level": "spot", "standardize": "section"},
        trainer={"max_steps": 2, "val_check_interval": 2, "early_stopping": {"monitor": "val/pearson/s2",
                                                                              "patience": 3}},
        checkpoint={"every_n_steps": 0, "best": "val/pearson/s2"},
    )
    result = train.finetune(cfg)
    metrics = json.loads((result.run_dir / "metrics.json").read_text())
    per = [metrics["val/pearson/s1"], metrics["val/pearson/s2"]]
    assert all(np.isfinite(per)) and metrics["val/pearson"] == pytest.approx(np.mean(per), abs=1e-6)
    assert (result.run_dir / "checkpoints" / "best" / "model.safetensors").is_file()
