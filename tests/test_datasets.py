"""squall.datasets: the bundled example (no ../shared needed) and the loaders for ../shared data."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import dask.array as da
import numpy as np
import pandas as pd
import pytest

import squall_sd as squall
from squall_sd.datasets._datasets import _bundle_dir

PACKAGE_DIR = Path(squall.__file__).resolve().parent


@pytest.fixture(scope="module")
def example():
    return squall.datasets.example()


def test_example_uses_only_bundled_files(example):
    files = example.attrs["squall"]["source_files"]
    for path in files.values():
        assert Path(path).resolve().is_relative_to(PACKAGE_DIR), path
    assert "shared" not in json.dumps(files)


def test_example_content(example):
    adata = example.tables["table"]
    assert adata.shape == (187, 985)
    assert adata.obs_names[0] == "10x21" and adata.obs_names.is_unique
    hvg_present = {"ERBB2", "CD74"} & set(adata.var_names)
    assert hvg_present == {"ERBB2", "CD74"}
    assert np.issubdtype(adata.X.dtype, np.integer) and adata.X.sum() > 100_000
    assert example.attrs["squall"]["mpp"] == pytest.approx(2.0, rel=0.01)
    assert example.attrs["squall"]["section"] == "C2"
    assert "her2st_cluster" in adata.obs and adata.obs["her2st_cluster"].notna().mean() > 0.9
    assert isinstance(example.images["he"]["scale0"]["image"].data, da.Array)
    assert set(example.shapes) == {"spots"}


def test_bundle_is_small_and_attributed():
    bundle = _bundle_dir()
    total = sum(f.stat().st_size for f in bundle.iterdir())
    assert total < 4e6
    readme = (bundle / "README.md").read_text()
    assert "Andersson" in readme and "github.com/almaan/her2st" in readme


def test_bundle_matches_shared_source(shared_data):
    """The bundled counts are the shared her2st C2 counts restricted to the kept genes."""
    bundle = _bundle_dir()
    meta = json.loads((bundle / "meta.json").read_text())
    src = shared_data / "her2st" / meta["sources"]["counts.tsv.gz"]["from"]
    assert (
        hashlib.sha256(src.read_bytes()).hexdigest() == meta["sources"]["counts.tsv.gz"]["sha256"]
    )
    full = pd.read_csv(src, sep="\t", index_col=0)
    small = pd.read_csv(bundle / "counts.tsv.gz", sep="\t", index_col=0)
    pd.testing.assert_frame_equal(small, full[small.columns])
    hvg = set(np.load(shared_data / "her2st" / "hvg785.npy", allow_pickle=True).astype(str))
    assert hvg <= set(small.columns)
    assert (bundle / "spots.tsv").read_bytes() == (
        shared_data / "her2st" / "spots" / "C2_selection.tsv"
    ).read_bytes()


def test_her2st_loader_with_labels(shared_data):
    sdata = squall.datasets.her2st("A1", shared_data)  # parent folder of her2st/ also works
    adata = sdata.tables["table"]
    labels = adata.obs["pathologist_label"]
    assert labels.notna().mean() > 0.95
    assert labels.value_counts().index[0] == "invasive cancer"
    assert "he" in sdata.images and sdata.attrs["squall"]["mpp"] == pytest.approx(3.2, rel=0.02)


def test_her2st_loader_without_image(shared_data):
    sdata = squall.datasets.her2st("C1", shared_data / "her2st")
    assert not sdata.images
    assert sdata.tables["table"].obs["pathologist_label"].notna().all()
    with pytest.raises(ValueError, match="No her2st section 'B1'.*Available"):
        squall.datasets.her2st("B1", shared_data)


def test_mob_loader(shared_data):
    sdata = squall.datasets.mob(1, shared_data)
    adata = sdata.tables["table"]
    assert adata.n_obs == 379
    assert "gene_ids" in adata.var and adata.var["gene_ids"].str.startswith("ENSMUSG").all()
    assert "mt-Rnr2" in adata.var_names and adata.var_names.is_unique


def test_xenium_lung_loader(shared_data):
    with pytest.raises(ValueError, match=r"NCBI858\.jpg.*Pass `mpp=`"):
        squall.datasets.xenium_lung(shared_data)
    sdata = squall.datasets.xenium_lung(shared_data, mpp=0.5)
    adata = sdata.tables["table"]
    assert adata.shape == (200, 338)
    assert set(sdata.shapes) == {"cells"} and "he" in sdata.images
    # axes are swapped in the file: the image column is obs.y_pixel
    height, width = sdata.images["he"]["scale0"]["image"].shape[1:]
    xy = sdata.shapes["cells"].geometry.get_coordinates().to_numpy()
    assert xy[:, 0].max() < width and xy[:, 1].max() < height
    assert xy[:, 0].max() > height  # would not fit the other way round


def test_loaders_need_a_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        squall.datasets.her2st("C2", tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="not a her2st folder"):
        squall.datasets.her2st("C2", tmp_path)


def test_attach_pathologist_labels_copy(shared_data):
    sdata = squall.datasets.her2st("C1", shared_data, labels=False)
    assert "pathologist_label" not in sdata.tables["table"].obs
    labels = shared_data / "her2st" / "labels" / "C1_labeled_coordinates.tsv"
    out = squall.datasets.attach_pathologist_labels(sdata, labels, copy=True)
    assert out is not sdata and "pathologist_label" not in sdata.tables["table"].obs
    assert out.tables["table"].obs["pathologist_label"].notna().all()
    assert squall.datasets.attach_pathologist_labels(sdata, labels) is sdata
    assert sdata.tables["table"].obs["pathologist_label"].notna().all()
