"""legacy_st on real her2st (C sections, A1 with its PNG + scale) and STUtility MOB data, plus bad inputs."""

from __future__ import annotations

import gzip

import dask.array as da
import numpy as np
import pandas as pd
import pytest
from scipy import sparse
from spatialdata.transformations import get_transformation

import squall_sd as squall
from squall_sd.datasets._datasets import _bundle_dir
from squall_sd.io import _he

A1_SCALE = 0.2876042565429968  # coord_scale_to_image of A1 in sections.csv


def _her2st(shared, sec, **kw):
    d = shared / "her2st"
    return squall.io.legacy_st(
        d / "counts" / f"{sec}.tsv.gz", d / "spots" / f"{sec}_selection.tsv", **kw
    )


@pytest.fixture(scope="module", params=["C2", "C3"])
def c_section(request, shared_data):
    sec = request.param
    sdata = _her2st(shared_data, sec, image=shared_data / "her2st" / "images" / f"{sec}.jpg")
    return sec, sdata


@pytest.fixture(scope="module")
def a1(shared_data):
    return _her2st(
        shared_data, "A1", image=shared_data / "her2st" / "images" / "A1.png", image_scale=A1_SCALE
    )


@pytest.fixture(scope="module")
def mob1(shared_data):
    d = shared_data / "mob"
    return squall.io.legacy_st(
        d / "MOB1.tsv", d / "alignment_table_MOB1.tsv", d / "MOB1.jpg", on_unmatched="drop"
    )


def _array_neighbour_distances(adata, steps):
    """Distances (µm) between spots whose array coordinates differ by one of ``steps``."""
    ax, ay = adata.obs["array_x"].to_numpy(), adata.obs["array_y"].to_numpy()
    pos = {(x, y): i for i, (x, y) in enumerate(zip(ax, ay, strict=True))}
    xy = np.asarray(adata.obsm["spatial"])
    out = []
    for i, (x, y) in enumerate(zip(ax, ay, strict=True)):
        for dx, dy in steps:
            j = pos.get((x + dx, y + dy))
            if j is not None:
                out.append(np.hypot(*(xy[i] - xy[j])))
    return np.asarray(out)


def _on_tissue_contrast(sdata, spots_key="spots"):
    """Mean saturation (max - min over RGB) at spot centres and in the four image corners."""
    image = sdata.images["he"]
    coarsest = sorted(image.children)[-1]
    arr = np.asarray(next(iter(image[coarsest].values())).values, dtype=float)
    full_h = next(iter(image["scale0"].values())).shape[1]
    f = arr.shape[1] / full_h
    sat = arr.max(0) - arr.min(0)
    xy = np.asarray(sdata.shapes[spots_key].geometry.get_coordinates()) * f
    xi = np.clip(xy[:, 0].astype(int), 0, sat.shape[1] - 1)
    yi = np.clip(xy[:, 1].astype(int), 0, sat.shape[0] - 1)
    c = max(3, int(0.05 * min(sat.shape)))
    corners = np.concatenate([sat[:c, :c], sat[:c, -c:], sat[-c:, :c], sat[-c:, -c:]]).ravel()
    return sat[yi, xi].mean(), corners.mean()


def _counts_ids(path):
    return pd.read_csv(path, sep="\t", usecols=[0], index_col=0).index.astype(str)


# ------------------------------------------------------------------------------------- her2st C
def test_c_section_structure(c_section, shared_data):
    sec, sdata = c_section
    adata = sdata.tables["table"]
    ids = _counts_ids(shared_data / "her2st" / "counts" / f"{sec}.tsv.gz")
    assert list(adata.obs_names) == list(ids)  # every counts spot is selected in these sections
    assert sparse.issparse(adata.X) and adata.X.format == "csr"
    assert np.issubdtype(adata.X.dtype, np.integer)
    assert {"array_x", "array_y"} <= set(adata.obs.columns)
    assert list(adata.obs_names[:3]) == [
        f"{x}x{y}" for x, y in adata.obs[["array_x", "array_y"]].to_numpy()[:3]
    ]
    assert set(sdata.images) == {"he"} and set(sdata.shapes) == {"spots"}
    assert sdata.tables["table"].uns["spatialdata_attrs"]["region"] == "spots"


def test_c_section_mpp_and_spacing(c_section):
    sec, sdata = c_section
    mpp = sdata.attrs["squall"]["mpp"]
    assert mpp == pytest.approx(0.69, rel=0.01)
    assert squall.io.get_mpp(sdata) == pytest.approx(mpp)
    t = get_transformation(sdata.shapes["spots"], to_coordinate_system="microns")
    assert np.allclose(t.scale, [mpp, mpp])
    # spots are 100 µm discs
    assert np.allclose(sdata.shapes["spots"]["radius"] * mpp, 50.0)
    # array neighbours 200 µm apart
    d = _array_neighbour_distances(sdata.tables["table"], [(1, 0), (0, 1)])
    assert len(d) > 100
    assert np.median(d) == pytest.approx(200.0, rel=0.03)


def test_c_section_spots_on_tissue(c_section):
    _, sdata = c_section
    on_spots, corners = _on_tissue_contrast(sdata)
    assert on_spots > 2 * corners + 10


def test_counts_match_file(shared_data):
    d = shared_data / "her2st"
    sdata = _her2st(shared_data, "C2")  # no image: spots and table only
    assert not sdata.images
    raw = pd.read_csv(d / "counts" / "C2.tsv.gz", sep="\t", index_col=0, nrows=5)
    adata = sdata.tables["table"]
    np.testing.assert_array_equal(adata[raw.index.astype(str)].X.toarray(), raw.to_numpy())
    assert sdata.attrs["squall"]["mpp"] is None
    assert sdata.attrs["squall"]["pixel_mpp"] == pytest.approx(0.69, rel=0.01)


def test_image_is_lazy(shared_data, monkeypatch):
    calls = []
    original = _he._pil_decode

    def counting(path, size=None):
        calls.append(path)
        return original(path, size)

    monkeypatch.setattr(_he, "_pil_decode", counting)
    sdata = _her2st(shared_data, "C4", image=shared_data / "her2st" / "images" / "C4.jpg")
    data = sdata.images["he"]["scale0"]["image"].data
    assert isinstance(data, da.Array)
    assert calls == []  # nothing decoded while reading
    coarsest = sdata.images["he"][sorted(sdata.images["he"].children)[-1]]["image"]
    thumb = coarsest.data.compute()  # the coarse level decodes at a reduced JPEG scale: cheap
    assert thumb.dtype == np.uint8 and thumb.shape[1] < 1024
    assert len(calls) == 1


# --------------------------------------------------------------------------------------- A1 PNG
def test_a1_png_with_scale(a1, shared_data):
    adata = a1.tables["table"]
    ids = _counts_ids(shared_data / "her2st" / "counts" / "A1.tsv.gz")
    assert list(adata.obs_names) == list(ids)
    assert a1.attrs["squall"]["mpp"] == pytest.approx(3.2, rel=0.02)  # approx_um_per_image_px
    d = _array_neighbour_distances(adata, [(1, 0), (0, 1)])
    assert np.median(d) == pytest.approx(200.0, rel=0.03)
    on_spots, corners = _on_tissue_contrast(a1)
    assert on_spots > 2 * corners + 10


def test_a1_without_scale_says_image_scale(shared_data):
    with pytest.raises(ValueError, match="image_scale"):
        _her2st(shared_data, "A1", image=shared_data / "her2st" / "images" / "A1.png")


# ------------------------------------------------------------------------------------------ MOB
def test_mob1(mob1, shared_data):
    adata = mob1.tables["table"]
    table = pd.read_csv(shared_data / "mob" / "alignment_table_MOB1.tsv", sep="\t")
    assert adata.n_obs == int((table["selected"] == 1).sum())
    ids = set(_counts_ids(shared_data / "mob" / "MOB1.tsv"))
    assert set(adata.obs_names) <= ids
    # 2k array: spots on a checkerboard of a 100 µm grid -> diagonal neighbours 141 µm, same-row 200 µm
    assert mob1.attrs["squall"]["array_unit_um"] == 100.0
    diag = _array_neighbour_distances(adata, [(1, 1), (1, -1)])
    assert np.median(diag) == pytest.approx(100 * np.sqrt(2), rel=0.03)
    row = _array_neighbour_distances(adata, [(2, 0), (0, 2)])
    assert np.median(row) == pytest.approx(200.0, rel=0.03)
    on_spots, corners = _on_tissue_contrast(mob1)
    assert on_spots > 2 * corners + 10


def test_mob_unmatched_spots_raise_by_default(shared_data):
    d = shared_data / "mob"
    with pytest.raises(ValueError, match=r"not in the spot table.*on_unmatched='drop'"):
        squall.io.legacy_st(d / "MOB1.tsv", d / "alignment_table_MOB1.tsv")


# ------------------------------------------------------------- bad inputs (bundled files only)
@pytest.fixture
def small_files(tmp_path):
    """A 20-spot counts file and the spot table of the bundled example."""
    bundle = _bundle_dir()
    counts = pd.read_csv(bundle / "counts.tsv.gz", sep="\t", index_col=0).iloc[:20, :50]
    return counts, bundle / "spots.tsv", tmp_path


def _write_counts(df, path):
    with gzip.open(path, "wt") as fh:
        df.to_csv(fh, sep="\t")
    return path


def test_small_counts_read(small_files):
    counts, spots, tmp = small_files
    sdata = squall.io.legacy_st(_write_counts(counts, tmp / "c.tsv.gz"), spots)
    assert list(sdata.tables["table"].obs_names) == list(counts.index)


def test_genes_by_spots_file_is_transposed(small_files):
    counts, spots, tmp = small_files
    sdata = squall.io.legacy_st(_write_counts(counts.T, tmp / "c.tsv.gz"), spots)
    assert list(sdata.tables["table"].obs_names) == list(counts.index)
    assert sdata.tables["table"].n_vars == counts.shape[1]


def test_unmatched_spot_ids(small_files):
    counts, spots, tmp = small_files
    bad = counts.copy()
    bad.index = list(bad.index[:-3]) + ["90x90", "91x91", "92x92"]
    path = _write_counts(bad, tmp / "c.tsv.gz")
    with pytest.raises(ValueError, match=r"3 of 20 spot ids .* not in the spot table .*'90x90'"):
        squall.io.legacy_st(path, spots)
    sdata = squall.io.legacy_st(path, spots, on_unmatched="drop")
    assert sdata.tables["table"].n_obs == 17


def test_no_overlap(small_files):
    counts, spots, tmp = small_files
    bad = counts.copy()
    bad.index = [f"spot_{i}" for i in range(len(bad))]
    with pytest.raises(ValueError, match="no overlap"):
        squall.io.legacy_st(_write_counts(bad, tmp / "c.tsv.gz"), spots, on_unmatched="drop")


def test_missing_paths(small_files):
    counts, spots, tmp = small_files
    path = _write_counts(counts, tmp / "c.tsv.gz")
    with pytest.raises(FileNotFoundError, match="counts file .* does not exist"):
        squall.io.legacy_st(tmp / "nope.tsv.gz", spots)
    with pytest.raises(FileNotFoundError, match="spot table .* does not exist"):
        squall.io.legacy_st(path, tmp / "nope.tsv")
    with pytest.raises(FileNotFoundError, match="H&E image .* does not exist"):
        squall.io.legacy_st(path, spots, tmp / "nope.jpg")


def test_spot_table_missing_columns(small_files):
    counts, spots, tmp = small_files
    table = pd.read_csv(spots, sep="\t").drop(columns=["pixel_x"])
    table.to_csv(tmp / "s.tsv", sep="\t", index=False)
    with pytest.raises(ValueError, match=r"lacks the column\(s\) \['pixel_x'\]"):
        squall.io.legacy_st(_write_counts(counts, tmp / "c.tsv.gz"), tmp / "s.tsv")


def test_bad_mpp(small_files):
    counts, spots, tmp = small_files
    with pytest.raises(ValueError, match="positive"):
        squall.io.legacy_st(_write_counts(counts, tmp / "c.tsv.gz"), spots, mpp=-1)


def test_given_mpp_is_used(small_files):
    counts, spots, tmp = small_files
    sdata = squall.io.legacy_st(_write_counts(counts, tmp / "c.tsv.gz"), spots, mpp=0.5)
    assert sdata.attrs["squall"]["mpp_source"] == "argument"
    assert np.allclose(sdata.shapes["spots"]["radius"], 100.0)  # 50 µm / 0.5 µm/px


def test_unselected_spots_are_dropped(small_files):
    counts, spots, tmp = small_files
    table = pd.read_csv(spots, sep="\t")
    ids = table["x"].astype(str) + "x" + table["y"].astype(str)
    table.loc[ids.isin(counts.index[:5]), "selected"] = 0
    table.to_csv(tmp / "s.tsv", sep="\t", index=False)
    sdata = squall.io.legacy_st(_write_counts(counts, tmp / "c.tsv.gz"), tmp / "s.tsv")
    assert list(sdata.tables["table"].obs_names) == list(counts.index[5:])
