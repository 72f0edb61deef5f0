import math

import pytest
import torch

from squall_sd.train import (
    cosine_with_warmup,
    cox_partial_likelihood,
    info_nce,
    load_config,
    param_groups,
)


def test_param_groups_exempt_norms_biases_tokens():
    m = torch.nn.Module()
    m.lin = torch.nn.Linear(4, 4)
    m.norm = torch.nn.LayerNorm(4)
    m.cls_token = torch.nn.Parameter(torch.zeros(1, 1, 4))
    decay, no_decay = param_groups(m.named_parameters(), 0.05)
    assert decay["weight_decay"] == 0.05 and len(decay["params"]) == 1
    assert no_decay["weight_decay"] == 0.0 and len(no_decay["params"]) == 4


def test_cosine_schedule():
    kw = dict(total_steps=100, warmup_steps=10, lr=1e-4, warmup_start_lr=1e-6, min_lr=1e-6)
    assert cosine_with_warmup(0, **kw) == pytest.approx(1e-6)
    assert cosine_with_warmup(10, **kw) == pytest.approx(1e-4)
    assert cosine_with_warmup(55, **kw) == pytest.approx(1e-6 + 0.5 * (1e-4 - 1e-6))
    assert cosine_with_warmup(100, **kw) == pytest.approx(1e-6)


def test_cox_loss_matches_hand_computation():
    risk = torch.tensor([0.5, -0.2, 1.0])
    time = torch.tensor([3.0, 1.0, 2.0])
    event = torch.tensor([1.0, 1.0, 0.0])
    # event at t=1: risk set all three; event at t=3: only itself
    ll = (-0.2 - math.log(sum(math.exp(r) for r in (0.5, -0.2, 1.0)))) + (0.5 - 0.5)
    assert cox_partial_likelihood(risk, time, event).item() == pytest.approx(-ll / 2, rel=1e-5)
    # a correctly ordered risk scores better than the reversed one
    t = torch.tensor([1.0, 2.0, 3.0])
    good = cox_partial_likelihood(torch.tensor([3.0, 2.0, 1.0]), t, torch.ones(3))
    bad = cox_partial_likelihood(torch.tensor([1.0, 2.0, 3.0]), t, torch.ones(3))
    assert good < bad


def test_info_nce_prefers_matching_pairs():
    torch.manual_seed(0)
    z = torch.randn(4, 9, 16)
    assert info_nce(z, z).item() < info_nce(z, torch.randn(4, 9, 16)).item()


def test_config_rejects_unknown_keys_and_resolves_paths(tmp_path):
    with pytest.raises(KeyError, match="trainer.max_step"):
        load_config({"trainer": {"max_step": 3}})
    (tmp_path / "c.yaml").write_text("run_dir: runs/x\ndata: {train: shards}\n")
    cfg = load_config(tmp_path / "c.yaml", {"trainer.max_steps": 7})
    assert cfg["run_dir"] == str(tmp_path / "runs" / "x")
    assert cfg["data"]["train"] == str(tmp_path / "shards")
    assert cfg["trainer"]["max_steps"] == 7 and cfg["optim"]["lr"] == 1e-4


def test_dotted_override_merges_into_free_form_mappings(tmp_path):
    """`--set model.overrides.stem=conv` changes one override and keeps the config file's others."""
    from squall_sd.train import load_config

    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("model: {overrides: {mpp: 2.0, img_size: 112}}\noptim: {lr_scale: {model.: 0.1}}\n")
    cfg = load_config(cfg_file, {"model.overrides.stem": "conv", "optim.lr_scale": {"model.encoder.": 0.5}})
    assert cfg["model"]["overrides"] == {"mpp": 2.0, "img_size": 112, "stem": "conv"}
    assert cfg["optim"]["lr_scale"] == {"model.": 0.1, "model.encoder.": 0.5}


def test_prepare_tissue_test_is_pp_tissue_mask():
    """prepare's tissue test is pp's: the Otsu threshold of pp.tissue_mask, applied to a tile's pixels."""
    import numpy as np

    from squall_sd.pp._tissue import _features, _otsu_threshold, apply_tissue_threshold, tissue_mask

    rng = np.random.default_rng(0)
    img = np.full((64, 64, 3), 245, dtype=np.uint8)
    img[:, :30] = np.clip(np.array([200, 120, 170]) + rng.normal(0, 12, (64, 30, 3)), 0, 255).astype(np.uint8)
    chw = np.ascontiguousarray(np.moveaxis(img, -1, 0))
    rgb01 = img.astype(np.float32) / np.float32(255.0)
    thr = _otsu_threshold(*_features(np.moveaxis(rgb01, -1, 0), "saturation"), "saturation")
    mask = apply_tissue_threshold(chw, thr)
    assert np.array_equal(mask, tissue_mask(rgb01))
    assert mask[:, :30].mean() > 0.9 and not mask[:, 30:].any()
    assert not apply_tissue_threshold(chw, None).any()
