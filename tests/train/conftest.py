"""Fixtures for the training tests: real her2st tiles (the bundled example, no download needed)."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

#: tiny-model geometry used in every training test: 224 px tiles at 4 µm/px (896 µm, ~20 spots).
MPP = 4.0


@pytest.fixture(scope="session")
def example_sdata():
    import squall_sd as squall

    return squall.datasets.example()


@pytest.fixture(scope="session")
def shards(example_sdata, tmp_path_factory):
    """Prepared shards of the bundled her2st C2 section for squall-tiny (with tile classes)."""
    from squall_sd.train import prepare

    out = tmp_path_factory.mktemp("shards") / "c2"
    return prepare(
        example_sdata,
        out,
        model_config_or_name="squall-tiny",
        mpp=MPP,
        tile_stride_um=448,
        shard_size=16,
        label_key="her2st_cluster",
        min_tissue=0.2,
    )


def base_config(shards, run_dir, **sections):
    """A tiny CPU config over a fixed small set of tiles (no augmentation, a few steps)."""
    cfg = {
        "seed": 0,
        "run_dir": str(run_dir),
        "model": {"name": "squall-tiny", "overrides": {"mpp": MPP}},
        "data": {
            "train": [str(s) for s in shards] if isinstance(shards, list) else str(shards),
            "batch_size": 2,
            "max_tiles": 2,
            "augment": None,
        },
        "optim": {"lr": 1.0e-3, "warmup_steps": 0, "min_lr": 1.0e-3},
        "trainer": {
            "max_steps": 6,
            "accelerator": "cpu",
            "devices": 1,
            "log_every_n_steps": 1,
            "enable_progress_bar": False,
        },
        "checkpoint": {"every_n_steps": 4},
    }
    for key, value in sections.items():
        cfg.setdefault(key, {})
        cfg[key].update(value)
    return cfg
