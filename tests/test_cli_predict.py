"""`squall predict`: a cohort of 2 tiny slides, atomic outputs, resumable, dask LocalCluster."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import spatialdata as sd

from squall_sd.cli import main
from squall_sd.cli._predict import SlidesFailedError, is_complete, run_predict


@pytest.fixture(scope="module")
def cohort(tmp_path_factory, write_tiny_cohort):
    """Two tiny slides (6 spots each of the bundled example) and a saved model."""
    return write_tiny_cohort(tmp_path_factory.mktemp("cohort"), {"s1": slice(0, 6), "s2": slice(6, 12)})


def test_cli_predict_sync_and_resume(cohort, tmp_path):
    slides, model = cohort
    out = tmp_path / "out"
    assert main(["predict", str(slides), "--model", str(model), "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["s1.zarr", "s2.zarr"]  # no temporary leftovers
    for name in ("s1", "s2"):
        assert is_complete(out / f"{name}.zarr")
        back = sd.read_zarr(out / f"{name}.zarr")
        layer = back.tables["table"].layers["squall"]
        assert np.isfinite(layer[:, back.tables["table"].var["squall_predicted"].to_numpy()]).all()
        assert back.tables["table"].uns["squall"]["predict_expression"]["weights_sha256"] != "none (random weights)"
    # the inputs are untouched
    assert "squall" not in sd.read_zarr(slides / "s1.zarr").tables["table"].layers
    # resumable: complete outputs are skipped
    mtime = (out / "s1.zarr" / "zarr.json").stat().st_mtime_ns
    assert run_predict(slides, out, model=str(model), progress=False) == []
    assert (out / "s1.zarr" / "zarr.json").stat().st_mtime_ns == mtime


def test_cli_predict_local_cluster(cohort, tmp_path):
    from dask.distributed import Client, LocalCluster

    slides, model = cohort
    out = tmp_path / "out"
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=False, dashboard_address=None) as cluster, \
            Client(cluster) as client:
        done = run_predict(slides, out, model=str(model), scheduler="local", client=client)
    assert sorted(p.split("/")[-1] for p in done) == ["s1.zarr", "s2.zarr"]
    assert all(is_complete(out / n) for n in ("s1.zarr", "s2.zarr"))


def test_cli_predict_bad_slide_is_reported_and_the_others_finish(cohort, tmp_path, capsys):
    slides, model = cohort
    mixed = tmp_path / "slides"
    mixed.mkdir()
    shutil.copytree(slides / "s1.zarr", mixed / "s1.zarr")
    (mixed / "bad.png").write_bytes(b"not an image")
    out = tmp_path / "out"
    assert main(["predict", str(mixed), "--model", str(model), "--out", str(out), "--mpp", "1"]) == 1
    err = capsys.readouterr().err
    assert "1 of 2 slide(s) failed" in err and "bad.png" in err and "rerun the same command" in err
    assert is_complete(out / "s1.zarr") and not (out / "bad.zarr").exists()
    # the Python API raises once the others are written; the error carries the report
    with pytest.raises(SlidesFailedError, match="bad.png") as e:
        run_predict(mixed, out, model=str(model), mpp=1.0, progress=False)
    assert [r["status"] for r in e.value.records] == ["failed", "skipped"]


def test_cli_predict_errors(tmp_path, capsys):
    assert main(["predict", str(tmp_path / "missing"), "--model", "squall-tiny", "--out", str(tmp_path / "o")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_cli_predict_tta(cohort, tmp_path):
    slides, model = cohort
    out = tmp_path / "out"
    assert main(["predict", str(slides / "s1.zarr"), "--model", str(model), "--out", str(out), "--tta"]) == 0
    table = sd.read_zarr(out / "s1.zarr").tables["table"]
    assert table.uns["squall"]["predict_expression"]["params"]["tta"] is True
    assert np.isfinite(table.layers["squall"][:, table.var["squall_predicted"].to_numpy()]).all()
