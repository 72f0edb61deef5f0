"""The benchmark scripts' pieces that run away from this machine or join results of several runs.

``benchmarks/_cnn_job.py`` trains the CNN rows where there is a GPU and squall_sd is not installed, and
``her2st_expression_seeds.py`` joins its rows to the run they belong to; both can silently compare
unlike things, so they are checked here on tiny synthetic inputs (no ../shared needed).
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import numpy as np
import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))

import _cnn_job  # noqa: E402
import _models  # noqa: E402
import her2st_expression_seeds as seeds  # noqa: E402

from squall_sd.models._inference import DIHEDRAL  # noqa: E402


def test_cnn_job_tta_views_are_squalls():
    assert _models.DIHEDRAL == DIHEDRAL


def test_benchmark_degrade_is_squalls():
    """The GPU job's ``_models.degrade`` (channels last, no squall_sd) is ``squall_sd.pp.degrade_patches``."""
    from squall_sd.pp import degrade_patches

    tiles = np.random.default_rng(0).integers(0, 256, size=(3, 40, 40, 3), dtype=np.uint8)
    want = degrade_patches(tiles.transpose(0, 3, 1, 2), 2.0, 3.202).transpose(0, 2, 3, 1)
    np.testing.assert_array_equal(_models.degrade(tiles, 2.0, 3.202), want)


def test_models_see_test_tiles_at_their_effective_mpp():
    """``_squall_adapter.model_view``: the benchmark scores a model on tiles as tl.predict_expression cuts them."""
    from types import SimpleNamespace

    import _squall_adapter as SA

    from squall_sd.pp import degrade_patches

    tiles = np.random.default_rng(1).integers(0, 256, size=(2, 40, 40, 3), dtype=np.uint8)
    secs = {"C2": SimpleNamespace(patches=tiles, image_mpp=0.69), "A1": SimpleNamespace(patches=tiles, image_mpp=3.18)}
    soft = SimpleNamespace(config=SimpleNamespace(effective_mpp=3.202))
    view = SA.model_view(soft, secs, 2.0)
    assert view["A1"] is tiles  # A's scans are at the model's resolution already
    want = degrade_patches(tiles.transpose(0, 3, 1, 2), 2.0, 3.202).transpose(0, 2, 3, 1)
    np.testing.assert_array_equal(view["C2"], want)
    sharp = SimpleNamespace(config=SimpleNamespace(effective_mpp=None))
    assert all(v is tiles for v in SA.model_view(sharp, secs, 2.0).values())


def _pack(tmp_path: Path, test_degrade: dict | None = None) -> Path:
    rng = np.random.default_rng(0)
    n = {"A1": 6, "A2": 5, "C2": 7}
    tiles = rng.integers(0, 255, size=(sum(n.values()), 32, 32, 3), dtype=np.uint8)
    meta = {
        "sections": list(n),
        "n_per_section": list(n.values()),
        "splits": {"A→C": {"tag": "A2C", "train": ["A1", "A2"], "test": ["C2"], "targets": ["g0", "g1", "g2"]}},
    }
    if test_degrade is not None:  # her2st_expression.py --match-resolution
        meta["splits"]["A→C"].update(mpp=2.0, test_degrade=test_degrade)
    path = tmp_path / f"pack{'_degraded' if test_degrade else ''}.npz"
    _cnn_job.write_pack(path, tiles, meta, {"ytr_A2C": rng.normal(size=(11, 3)).astype(np.float32)})
    return path


def test_cnn_job_writes_predictions_tta_and_record(tmp_path):
    out = tmp_path / "preds.npz"
    _cnn_job.main(
        [
            str(_pack(tmp_path)),
            str(out),
            "--device",
            "cpu",
            "--arch",
            "resnet18",
            "--px",
            "32",
            "--epochs",
            "1",
            "--batch",
            "4",
            "--seed",
            "3",
            "--tta",
        ]
    )
    records, z = _cnn_job.read_preds(out)
    assert sorted(z) == ["A2C__C2", "A2C__C2__tta"]
    assert z["A2C__C2"].shape == z["A2C__C2__tta"].shape == (7, 3)
    assert not np.allclose(z["A2C__C2"], z["A2C__C2__tta"])  # the mean over 8 views is another prediction
    rec = records["A→C"]
    assert (rec["arch"], rec["seed"], rec["input_px"], rec["epochs_run"]) == ("resnet18", 3, 32, 1)


def _run(ridge: float) -> dict:
    metrics = {"hvg": {"mean_r": ridge, "n": 10}, "top50": {"mean_r": 0.1, "n": 10}}
    split = {
        "train": ["A1", "A2"],
        "test": ["C2"],
        "top50": ["g0"],
        "methods": {"ridge-hand": {"C2": metrics}},
        "notes": {"ridge-hand": "r"},
        "timing_s": {},
    }
    return {"splits": {"A→C": split}}


def test_merge_runs_adds_rows_and_refuses_runs_that_differ():
    base, extra = _run(0.02), _run(0.02 + 1e-15)  # another BLAS thread count: last digits differ
    extra["splits"]["A→C"]["methods"]["densenet121 (scratch, 112 px, cuda)"] = copy.deepcopy(
        extra["splits"]["A→C"]["methods"]["ridge-hand"]
    )
    merged = seeds.merge_runs(base, extra)
    assert list(merged["splits"]["A→C"]["methods"]) == ["ridge-hand", "densenet121 (scratch, 112 px, cuda)"]
    assert "densenet121 (scratch, 112 px, cuda)" not in base["splits"]["A→C"]["methods"]  # base untouched
    with pytest.raises(SystemExit, match="differs"):
        seeds.merge_runs(base, _run(0.03))
    other = _run(0.02)
    other["splits"]["A→C"]["test"] = ["C3"]
    with pytest.raises(SystemExit, match="another test"):
        seeds.merge_runs(base, other)
    # a run of one split joins a run of both; a split the base does not have is refused
    both = copy.deepcopy(base)
    both["splits"]["C→A"] = copy.deepcopy(base["splits"]["A→C"]) | {"train": ["C2"], "test": ["A1"]}
    merged = seeds.merge_runs(both, extra)
    assert "densenet121 (scratch, 112 px, cuda)" in merged["splits"]["A→C"]["methods"]
    assert list(merged["splits"]["C→A"]["methods"]) == ["ridge-hand"]
    with pytest.raises(SystemExit, match="not in the run"):
        seeds.merge_runs(base, both)


def test_cnn_job_degrades_the_test_tiles_it_is_told_to(tmp_path):
    args = ["--device", "cpu", "--arch", "resnet18", "--px", "32", "--epochs", "1", "--batch", "4"]
    _cnn_job.main([str(_pack(tmp_path)), str(tmp_path / "sharp.npz"), *args])
    _cnn_job.main([str(_pack(tmp_path, {"C2": 3.2})), str(tmp_path / "matched.npz"), *args])
    sharp, matched = np.load(tmp_path / "sharp.npz"), np.load(tmp_path / "matched.npz")
    assert json.loads(str(sharp["records"]))["A→C"]["test_degrade"] == {}
    assert json.loads(str(matched["records"]))["A→C"]["test_degrade"] == {"C2": 3.2}
    assert not np.allclose(sharp["A2C__C2"], matched["A2C__C2"])  # same network (seed), other test tiles


def test_stopping_rules_replay_early_stopping():
    import her2st_stopping_rules as rules

    r = np.array([0.1, 0.3, 0.2, 0.25, 0.29, 0.5, 0.1])
    assert rules.patience_pick(r, 3) == 1  # three epochs without beating 0.3: stops before the 0.5
    assert rules.patience_pick(r, 4) == 5
    np.testing.assert_allclose(rules.trailing_mean(np.array([1.0, 3.0, 5.0, 7.0]), 2), [1.0, 2.0, 4.0, 6.0])
