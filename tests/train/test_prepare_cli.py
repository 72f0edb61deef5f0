"""``squall prepare`` on a SpatialData store: element keys and the fill rule reach ``prepare``."""

from __future__ import annotations

import pytest

from squall_sd.cli import main
from squall_sd.train import read_manifest

from .conftest import MPP


@pytest.fixture(scope="module")
def store(example_sdata, tmp_path_factory):
    import squall_sd as squall

    path = tmp_path_factory.mktemp("cli") / "c2.zarr"
    squall.io.write(example_sdata, path)
    return path


@pytest.mark.parametrize(("fill", "expected"), [("none", None), ("auto", "nearest")])
def test_prepare_cli_keys_and_fill(store, tmp_path, fill, expected):
    out = tmp_path / "shards"
    argv = ["prepare", str(store), "--out", str(out), "--mpp", str(MPP), "--tile-stride-um", "896"]
    argv += ["--image-key", "he", "--shapes-key", "spots", "--table-key", "table", "--fill", fill]
    assert main(argv) == 0
    man = read_manifest(out)
    assert man["n_tiles"] > 0 and man["mpp"] == MPP
    assert man["slides"][0]["fill"] == expected


def test_prepare_cli_unknown_shapes_key(store, tmp_path, capsys):
    argv = ["prepare", str(store), "--out", str(tmp_path / "s"), "--mpp", str(MPP), "--shapes-key", "nope"]
    assert main(argv) != 0
    err = capsys.readouterr().err
    assert "No shapes element 'nope'" in err and "available: ['spots']" in err
    assert not (tmp_path / "s").exists()
