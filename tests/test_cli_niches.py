"""`squall niches STORE.zarr`: niches written into the store atomically; bad input leaves it untouched."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import scanpy as sc
import spatialdata as sd

import squall_sd as squall
from squall_sd.cli import main


@pytest.fixture
def store(tmp_path):
    """The bundled example with a layer shaped like `squall predict`'s, written to a zarr store.

    The layer ``squall`` holds log1p(CP10k) and, as predictions do, NaN for the genes "not predicted".
    """
    sdata = squall.datasets.example()
    adata = sdata.tables["table"]
    pred = sc.pp.normalize_total(adata, target_sum=1e4, inplace=False)["X"]
    pred = np.log1p(np.asarray(pred.todense() if hasattr(pred, "todense") else pred, dtype=np.float32))
    pred[:, ::3] = np.nan
    adata.layers["squall"] = pred
    path = tmp_path / "example.zarr"
    sdata.write(path)
    return path


def _snapshot(path: Path) -> dict[str, str]:
    """Relative path -> sha256 of every file under ``path``."""
    return {
        str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(path.rglob("*"))
        if p.is_file()
    }


def test_cli_niches_writes_into_store(store):
    args = ["niches", str(store), "--use-rep", "squall", "--n-niches", "3", "--n-runs", "2"]
    assert main(args) == 0
    assert sorted(p.name for p in store.parent.iterdir()) == ["example.zarr"]  # no temporary leftovers
    back = sd.read_zarr(store)
    adata = back.tables["table"]
    assert adata.obs["squall_niche"].nunique() == 3
    assert adata.obs["squall_niche"].notna().all()
    assert adata.obsm["X_squall_niche"].shape[0] == adata.n_obs
    assert adata.uns["squall_niche"]["use_rep"] == "squall"
    # the rest of the store is kept
    assert set(back.images) == {"he"} and set(back.shapes) == {"spots"}
    assert back.attrs["squall"]["section"] == "C2"
    original = squall.datasets.example().tables["table"]
    np.testing.assert_array_equal(adata.obs["her2st_cluster"].astype(str), original.obs["her2st_cluster"].astype(str))
    # a second run refuses to replace the niches unless asked
    assert main(args) == 2
    assert main([*args, "--overwrite", "--key-added", "squall_niche", "--method", "leiden"]) == 0
    assert sd.read_zarr(store).tables["table"].uns["squall_niche"]["method"] == "leiden"


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--table-key", "nope"], "Table 'nope' not found"),
        (["--use-rep", "X_nope"], "Representation 'X_nope' not found"),
        (["--use-rep", "squall", "--library-key", "nope"], "--library-key 'nope' not found"),
        (["--use-rep", "squall", "--n-niches", "500"], "Expected `n_niches` in"),  # fails in tl.niches itself
    ],
)
def test_cli_niches_bad_key_leaves_store_unchanged(store, capsys, extra, message):
    before = _snapshot(store)
    assert main(["niches", str(store), *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("squall niches: error: ") and message in err
    assert _snapshot(store) == before
    assert sorted(p.name for p in store.parent.iterdir()) == ["example.zarr"]


def test_cli_niches_missing_store(tmp_path, capsys):
    assert main(["niches", str(tmp_path / "missing.zarr")]) == 2
    err = capsys.readouterr().err
    assert "does not exist" in err and "Check the path" in err
    (tmp_path / "plain").mkdir()
    assert main(["niches", str(tmp_path / "plain")]) == 2
    assert "not a zarr store" in capsys.readouterr().err
