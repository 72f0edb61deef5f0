"""squall.io.write: zarr round trip of the bundled example and the atomic-write guarantees."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import spatialdata as sd
from spatialdata.transformations import get_transformation

import squall_sd as squall


@pytest.fixture(scope="module")
def example():
    sdata = squall.datasets.example()
    adata = sdata.tables["table"]
    adata.obs["total_counts"] = np.asarray(adata.X.sum(axis=1)).ravel()
    return sdata


@pytest.fixture(scope="module")
def written(example, tmp_path_factory):
    path = tmp_path_factory.mktemp("w") / "example.zarr"
    assert squall.io.write(example, path) == path.resolve()
    return path


def _digest(folder: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(folder.rglob("*")):
        if f.is_file():
            h.update(str(f.relative_to(folder)).encode())
            h.update(f.read_bytes())
    return h.hexdigest()


def _affine(element):
    t = get_transformation(element, to_coordinate_system="microns")
    return t.to_affine_matrix(input_axes=("x", "y"), output_axes=("x", "y"))


def test_round_trip_identical(example, written):
    back = sd.read_zarr(written)
    assert set(back.images) == set(example.images)
    assert set(back.shapes) == set(example.shapes)
    assert set(back.tables) == set(example.tables)
    # table
    a, b = example.tables["table"], back.tables["table"]
    assert (a.X != b.X).nnz == 0 and a.X.dtype == b.X.dtype
    pd.testing.assert_frame_equal(a.obs, b.obs)
    pd.testing.assert_frame_equal(a.var, b.var)
    np.testing.assert_array_equal(a.obsm["spatial"], b.obsm["spatial"])
    assert b.uns["squall"] == a.uns["squall"]
    assert b.uns["spatialdata_attrs"] == a.uns["spatialdata_attrs"]
    # shapes
    sa, sb = example.shapes["spots"], back.shapes["spots"]
    np.testing.assert_allclose(
        sa.geometry.get_coordinates().to_numpy(), sb.geometry.get_coordinates().to_numpy()
    )
    np.testing.assert_allclose(sa["radius"].to_numpy(), sb["radius"].to_numpy())
    # images: every level, pixel for pixel
    ia, ib = example.images["he"], back.images["he"]
    assert sorted(ia.children) == sorted(ib.children)
    for level in ia.children:
        np.testing.assert_array_equal(ia[level]["image"].values, ib[level]["image"].values)
    # transformations (same map; the stored axis order may differ) and attrs
    for ea, eb in (
        (sa, sb),
        (ia["scale0"]["image"], ib["scale0"]["image"]),
        (ia["scale1"]["image"], ib["scale1"]["image"]),
    ):
        np.testing.assert_allclose(_affine(ea), _affine(eb))
    assert back.attrs["squall"] == example.attrs["squall"]
    assert squall.io.get_mpp(back) == pytest.approx(squall.io.get_mpp(example))


def test_existing_store_needs_overwrite(example, written):
    before = _digest(written)
    with pytest.raises(FileExistsError, match="already exists. Pass `overwrite=True`"):
        squall.io.write(example, written)
    assert _digest(written) == before


def test_overwrite_replaces(example, tmp_path):
    path = tmp_path / "s.zarr"
    squall.io.write(sd.SpatialData(shapes={"spots": example.shapes["spots"]}), path)
    squall.io.write(sd.SpatialData(tables={"table": example.tables["table"]}), path, overwrite=True)
    back = sd.read_zarr(path)
    assert set(back.tables) == {"table"} and not back.shapes and not back.images
    assert [p.name for p in tmp_path.iterdir()] == ["s.zarr"]  # no temp or old copies left


def test_failure_mid_write_leaves_store_untouched(example, written, monkeypatch):
    before = _digest(written)
    original = sd.SpatialData.write

    def failing(self, file_path, *args, **kwargs):
        # write part of the new store, then fail (a full disk, a killed worker, ...)
        small = sd.SpatialData(shapes={"spots": self.shapes["spots"]})
        original(small, file_path, *args, **kwargs)
        raise OSError("simulated failure mid-write")

    monkeypatch.setattr(sd.SpatialData, "write", failing)
    with pytest.raises(OSError, match="simulated failure"):
        squall.io.write(example, written, overwrite=True)
    assert _digest(written) == before
    assert sorted(p.name for p in written.parent.iterdir()) == [written.name]  # no temp dirs left
    # and a new path: nothing left behind at all
    with pytest.raises(OSError, match="simulated failure"):
        squall.io.write(example, written.parent / "new.zarr")
    assert sorted(p.name for p in written.parent.iterdir()) == [written.name]


def test_missing_parent_folder(example, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        squall.io.write(example, tmp_path / "no" / "such" / "x.zarr")


def test_write_no_autosharding_warning(example, tmp_path):
    """Our writes pin anndata's zarr v3 sharding to off instead of printing its warning once per array."""
    import warnings

    import anndata as ad

    if getattr(ad.settings, "auto_shard_zarr_v3", False) is not None:
        pytest.skip("this anndata has no unset `auto_shard_zarr_v3` option (nothing to warn about)")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        squall.io.write(example, tmp_path / "a.zarr")
    assert not [w for w in caught if "autosharding" in str(w.message)]
    assert ad.settings.auto_shard_zarr_v3 is None  # the user's setting is restored
    # a choice the user made is kept: with autosharding on, the table arrays are sharded
    with ad.settings.override(auto_shard_zarr_v3=True):
        squall.io.write(example, tmp_path / "b.zarr")
    meta = (tmp_path / "b.zarr" / "tables" / "table" / "obs" / "total_counts" / "zarr.json").read_text()
    assert "sharding" in meta
    meta = (tmp_path / "a.zarr" / "tables" / "table" / "obs" / "total_counts" / "zarr.json").read_text()
    assert "sharding" not in meta
