"""Resumed runs match uninterrupted ones; DDP over 2 CPU processes completes a step."""

import os
import subprocess
import sys
from pathlib import Path

import torch
import yaml

import squall_sd as squall
from squall_sd import train

from .conftest import base_config


def _weights(model_dir):
    return squall.models.load(model_dir).state_dict()


def test_resume_matches_uninterrupted(shards, tmp_path):
    def cfg(run):
        c = base_config(shards, tmp_path / run)
        # 3 batches per epoch: the interruption falls mid-epoch and the resumed run crosses an epoch
        c["data"].update(
            {"max_tiles": 6, "augment": {"flips": True, "rot90": True, "stain_jitter": 0.05}}
        )
        c["optim"].update({"total_steps": 4, "warmup_steps": 1, "min_lr": 1.0e-5})
        c["checkpoint"]["every_n_steps"] = 10  # only the final last.ckpt
        return c

    full = train.pretrain_image(cfg("full"), overrides={"trainer.max_steps": 4})
    part = train.pretrain_image(cfg("split"), overrides={"trainer.max_steps": 2})
    assert part.history[-1]["step"] == 2
    resumed = train.pretrain_image(cfg("split"), overrides={"trainer.max_steps": 4})  # auto-resume
    assert [h["batches_seen"] for h in resumed.history] == [3, 4]
    a, b = _weights(full.model_dir), _weights(resumed.model_dir)
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6, rtol=0), k
    assert [round(h["loss"], 6) for h in full.history[2:]] == [
        round(h["loss"], 6) for h in resumed.history
    ]


def test_ddp_two_cpu_processes(shards, tmp_path):
    cfg = base_config(shards, tmp_path / "ddp")
    cfg["data"].update({"max_tiles": 4, "batch_size": 1})
    cfg["trainer"].update({"max_steps": 1, "strategy": "ddp", "devices": 2, "accelerator": "cpu"})
    path = tmp_path / "ddp.yaml"
    path.write_text(yaml.safe_dump(cfg))
    exe = Path(sys.executable).with_name("squall")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PL_DISABLE_FORK": "1"}
    proc = subprocess.run(
        [str(exe), "train", "pretrain_image", str(path)],
        capture_output=True,
        text=True,
        timeout=240,
        env=env,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    last = tmp_path / "ddp" / "checkpoints" / "last"
    prov = yaml.safe_load((last / "provenance.json").read_text())
    assert prov["world_size"] == 2 and prov["global_step"] == 1
    assert squall.models.load(last).n_genes == 256
