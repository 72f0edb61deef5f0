"""Xenium reader on real Xenium outputs (../shared/data/fixtures) and an H&E registered by alignment CSV."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest
import shapely
import spatialdata as sd
from PIL import Image
from spatialdata.transformations import get_transformation

import squall_sd as squall

SFE = "fixtures/sfe_8fa1e84/inst/extdata/xenium"
SPE = "fixtures/spatialexperiment_3f497ac/inst/extdata/10xXenium"
MOLEXP = "fixtures/moleculeexperiment/inst/extdata/xenium_V1_FF_Mouse_Brain/sample1"
HE = "xenium_lung_ncbi858/image/NCBI858.jpg"


def _check_contract(sdata, n_obs):
    table = sdata.tables["table"]
    assert table.n_obs == n_obs
    assert table.uns["spatialdata_attrs"]["region"] == "cells"
    assert np.array_equal(
        table.obs["instance_id"].to_numpy(), sdata.shapes["cells"].index.to_numpy()
    )
    for el in [sdata.shapes["cells"], *sdata.points.values()]:
        assert "microns" in get_transformation(el, get_all=True)


def test_xenium_sfe_polygons_and_transcripts(shared_data):
    sdata = squall.io.xenium(shared_data / SFE)
    _check_contract(sdata, 526)
    assert sdata.attrs["squall"]["cell_shape"] == "polygons"
    assert sdata.attrs["squall"]["mpp"] is None  # no H&E
    cells = sd.transform(sdata.shapes["cells"], to_coordinate_system="microns")
    table = sdata.tables["table"]
    # polygon areas match the cell areas of cells.parquet (µm²)
    rel = np.abs(cells.area.to_numpy() / table.obs["cell_area"].to_numpy() - 1)
    assert np.median(rel) < 0.05 and rel.max() < 0.2
    # transcripts assigned to a cell lie inside (or at the edge of) that cell's polygon
    tx = sdata.points["transcripts"].compute()
    assert len(tx) == 5260
    poly_of = dict(zip(table.obs["cell_id"], cells.geometry, strict=True))
    tx = tx[tx["cell_id"].isin(poly_of)].sample(500, random_state=0)
    inside = [
        poly_of[c].buffer(1.0).contains(shapely.Point(x, y))
        for c, x, y in zip(tx["cell_id"], tx["x"], tx["y"], strict=True)
    ]
    assert np.mean(inside) > 0.9


def test_xenium_spe_cells_as_circles(shared_data):
    sdata = squall.io.xenium(
        shared_data / SPE, transcripts=True
    )  # no transcripts file: logged, no points
    _check_contract(sdata, 36602)
    assert sdata.attrs["squall"]["cell_shape"] == "circles"
    assert list(sdata.points) == []
    table = sdata.tables["table"]
    assert table.n_vars == 248  # gene expression only (541 features incl. controls)
    cells = sd.transform(sdata.shapes["cells"], to_coordinate_system="microns")
    np.testing.assert_allclose(np.pi * cells["radius"] ** 2, table.obs["cell_area"], rtol=1e-6)
    meta = pd.read_csv(shared_data / SPE / "cells.csv.gz")
    np.testing.assert_allclose(table.obsm["spatial"], meta[["x_centroid", "y_centroid"]].to_numpy())


def test_xenium_counts_from_transcripts(shared_data):
    """No cell_feature_matrix: counts are tallied from transcripts (qv ≥ 20, genes only).

    Pixel size from experiment.xenium.
    """
    sdata = squall.io.xenium(shared_data / MOLEXP)
    assert sdata.attrs["squall"]["morphology_pixel_size_um"] == 0.2125
    table = sdata.tables["table"]
    tx = pd.read_csv(shared_data / MOLEXP / "transcripts.csv")
    tx["cell_id"] = tx["cell_id"].astype(str)
    keep = tx[
        tx["cell_id"].isin(table.obs_names)
        & (tx["qv"] >= 20)
        & ~tx["feature_name"].str.startswith(("NegControl", "BLANK"))
    ]
    assert table.X.sum() == len(keep)
    assert sdata.attrs["squall"]["cell_shape"] == "polygons"


def test_xenium_he_alignment(shared_data, tmp_path):
    """An H&E registered with a known Xenium Explorer matrix lands where the matrix says, in microns."""
    theta, scale, shift = np.deg2rad(20), 1.7, (3000.0, 5000.0)
    a = np.array(
        [
            [scale * np.cos(theta), -scale * np.sin(theta), shift[0]],
            [scale * np.sin(theta), scale * np.cos(theta), shift[1]],
            [0, 0, 1],
        ]
    )
    csv = tmp_path / "he_imagealignment.csv"
    np.savetxt(csv, a, delimiter=",")
    sdata = squall.io.xenium(
        shared_data / SFE, he_image=shared_data / HE, he_alignment=csv, transcripts=False
    )
    ps = 0.2125
    assert squall.io.get_mpp(sdata) == pytest.approx(ps * scale)
    assert sdata.attrs["squall"]["mpp"] == pytest.approx(ps * scale)

    img = np.asarray(Image.open(shared_data / HE)).astype(float)
    h, w = img.shape[:2]
    # the image extent in microns is the bounding box of the mapped corners
    corners = np.array([[0, 0, 1], [w, 0, 1], [0, h, 1], [w, h, 1]], dtype=float)
    mapped = ps * (corners @ a.T)[:, :2]
    ext = sd.get_extent(sdata["he"], coordinate_system="microns")
    np.testing.assert_allclose([ext["x"][0], ext["y"][0]], mapped.min(axis=0), atol=1e-6)
    np.testing.assert_allclose([ext["x"][1], ext["y"][1]], mapped.max(axis=0), atol=1e-6)

    # image content: a window rasterised in microns equals the H&E pixels the matrix maps there
    p = np.array([700.0, 600.0])
    q = ps * (a @ np.r_[p, 1])[:2]
    half, step = 30.0, ps * scale
    r = sd.rasterize(
        sdata["he"],
        axes=("x", "y"),
        min_coordinate=q - half,
        max_coordinate=q + half,
        target_coordinate_system="microns",
        target_unit_to_pixels=1 / step,
    )
    r = np.asarray(r.values).astype(float)

    def expected(m):
        ys, xs = np.mgrid[0 : r.shape[1], 0 : r.shape[2]]
        qx, qy = q[0] - half + (xs + 0.5) * step, q[1] - half + (ys + 0.5) * step
        src = np.einsum(
            "ij,jkl->ikl", np.linalg.inv(m), np.stack([qx / ps, qy / ps, np.ones_like(qx)])
        )
        sx = np.clip(np.round(src[0] - 0.5).astype(int), 0, w - 1)
        sy = np.clip(np.round(src[1] - 0.5).astype(int), 0, h - 1)
        return img[sy, sx].transpose(2, 0, 1)

    good = np.corrcoef(r.ravel(), expected(a).ravel())[0, 1]
    wrong = a.copy()
    wrong[:2, :2] = a[:2, :2].T  # rotation the other way round
    bad = np.corrcoef(r.ravel(), expected(wrong).ravel())[0, 1]
    assert good > 0.9 and good > bad + 0.2, (good, bad)


def test_xenium_zarr_round_trip(shared_data, tmp_path):
    sdata = squall.io.xenium(shared_data / SFE)
    back = sd.read_zarr(squall.io.write(sdata, tmp_path / "x.zarr"))
    t0, t1 = sdata.tables["table"], back.tables["table"]
    assert (t0.X != t1.X).nnz == 0
    pd.testing.assert_frame_equal(t0.obs, t1.obs)
    assert (
        sdata.shapes["cells"].geometry.geom_equals_exact(back.shapes["cells"].geometry, 1e-9).all()
    )
    p0 = sdata.points["transcripts"].compute().reset_index(drop=True)
    p1 = back.points["transcripts"].compute().reset_index(drop=True)
    np.testing.assert_allclose(p0[["x", "y"]].to_numpy(), p1[["x", "y"]].to_numpy())
    assert list(p0["feature_name"].astype(str)) == list(p1["feature_name"].astype(str))


def test_xenium_bad_inputs(shared_data, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        squall.io.xenium(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="neither cell_feature_matrix"):
        squall.io.xenium(tmp_path)
    bad = tmp_path / "bad.csv"
    bad.write_text("1,0\n0,1\n")
    with pytest.raises(ValueError, match="3×3 alignment matrix"):
        squall.io.xenium(shared_data / SPE, he_image=shared_data / HE, he_alignment=bad)
    with pytest.raises(ValueError, match="without `he_image`"):
        squall.io.xenium(shared_data / SPE, he_alignment=bad)
    # cells file whose ids do not match the counts
    root = tmp_path / "xenium"
    root.mkdir()
    shutil.copy(shared_data / SFE / "cell_feature_matrix.h5", root)
    meta = pd.read_parquet(shared_data / SFE / "cells.parquet")
    meta["cell_id"] = "c" + meta["cell_id"].astype(str)
    meta.to_csv(root / "cells.csv.gz", index=False)
    (root / "experiment.xenium").write_text(json.dumps({"pixel_size": 0.2125}))
    with pytest.raises(ValueError, match="same Xenium output folder"):
        squall.io.xenium(root)
