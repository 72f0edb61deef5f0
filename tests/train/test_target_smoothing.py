"""``data.target_smoothing_um``: training targets averaged over neighbouring spots (real her2st spots of
the bundled example), validation left on the measured values."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
import zarr

from squall_sd import train
from squall_sd.train._data import _gaussian_weights

from .conftest import base_config


def _slide_spots(shards):
    """Every spot of the prepared section once: {obs: (centre µm, dense log1p row)}."""
    ds = train.ShardDataset(shards, shuffle=False)
    spots = {}
    for path in ds.shard_paths:
        g = zarr.open_group(path, mode="r")
        x = sp.csr_matrix(
            (g["spot_log1p"][:], g["spot_indices"][:], g["spot_indptr"][:]),
            shape=(len(g["spot_obs"][:]), len(ds.genes)),
        ).toarray()
        for k, obs in enumerate(g["spot_obs"][:].tolist()):
            spots.setdefault(obs, (np.asarray(g["spot_center_um"][k], float), x[k]))
    return ds, spots


def test_gaussian_weights():
    xy = np.array([[0.0, 0.0], [200.0, 0.0], [0.0, 200.0], [1000.0, 0.0]])
    w = _gaussian_weights(xy, 100.0).toarray()
    np.testing.assert_allclose(w.sum(axis=1), 1.0)
    e = np.exp(-2.0)  # a neighbour at 2σ
    np.testing.assert_allclose(w[0, :3], np.array([1.0, e, e]) / (1 + 2 * e))
    assert w[0, 3] == 0 and w[3, 3] == 1.0  # beyond 3σ: no weight; an isolated spot keeps its value


def test_smoothed_targets_are_the_neighbour_mean_of_the_measured_spots(shards):
    plain, spots = _slide_spots(shards)
    sigma = 150.0
    smooth = train.ShardDataset(shards, shuffle=False, target_smoothing_um=sigma)
    assert len(plain.shard_paths) > 1  # spots are repeated across shards: each must get one value
    obs = np.array(sorted(spots))
    xy = np.stack([spots[o][0] for o in obs])
    x = np.stack([spots[o][1] for o in obs])
    d2 = ((xy[:, None] - xy[None]) ** 2).sum(-1)
    w = np.where(d2 <= (3 * sigma) ** 2, np.exp(-d2 / (2 * sigma**2)), 0.0)
    expected = dict(zip(obs.tolist(), (w / w.sum(1, keepdims=True)) @ x, strict=True))
    assert any((w > 0).sum(1) > 1)  # some spots do have neighbours
    checked = 0
    for i in range(0, plain.n_tiles, 5):
        a, b = plain.get(i), smooth.get(i)
        np.testing.assert_array_equal(a["rgb"], b["rgb"])  # only the targets change
        np.testing.assert_array_equal(a["cell_spot"], b["cell_spot"])
        s, t = plain._locate(i)
        g = zarr.open_group(plain.shard_paths[s], mode="r")
        cs = np.asarray(g["cell_spot"][t])
        tile_obs = np.asarray(g["spot_obs"][:])[np.unique(cs[cs >= 0])]  # the sample's spot order
        n_sp = len(b["spot_indptr"]) - 1
        rows = np.zeros((n_sp, len(plain.genes)))
        for k in range(n_sp):
            lo, hi = b["spot_indptr"][k], b["spot_indptr"][k + 1]
            rows[k, b["spot_indices"][lo:hi]] = b["spot_log1p"][lo:hi]
        np.testing.assert_allclose(rows, np.stack([expected[o] for o in tile_obs]), rtol=1e-5, atol=1e-6)
        checked += n_sp
    assert checked > 0


def test_only_the_training_data_are_smoothed_and_other_phases_refuse_it(shards, tmp_path):
    genes = train.read_manifest(shards)["genes"][:4]
    cfg = base_config(
        shards, tmp_path / "ft", task={"type": "expression", "genes": genes, "level": "spot"},
        data={"val": str(shards), "target_smoothing_um": 100.0},
    )
    cfg["trainer"]["max_steps"] = 1
    res = train.finetune(cfg)
    dm = res.module.trainer.datamodule
    assert dm.train_ds.target_smoothing_um == 100.0 and dm.train_ds._spot_tables is not None
    assert dm.val_ds.target_smoothing_um is None and dm.val_ds._spot_tables is None
    with pytest.raises(ValueError, match="target_smoothing_um"):
        train.pretrain_image(base_config(shards, tmp_path / "p1", data={"target_smoothing_um": 100.0}))
    for bad in (0, -5, "100", True):
        with pytest.raises(ValueError, match="target_smoothing_um"):
            train.load_config(base_config(shards, tmp_path / "x", data={"target_smoothing_um": bad}))
    with pytest.raises(ValueError, match="positive"):
        train.ShardDataset(shards, target_smoothing_um=0.0)
