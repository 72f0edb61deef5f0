"""The preprocessing chain on the bundled example (her2st C2 read by squall_sd.io.legacy_st)."""

from __future__ import annotations

import numpy as np
import pytest
import shapely
from spatialdata.transformations import get_transformation

import squall_sd as squall


@pytest.fixture(scope="module")
def example():
    return squall.datasets.example()


def test_example_chain(example):
    sdata = example
    squall.pp.detect_tissue(sdata)
    tissue = sdata.shapes["he_tissue"].union_all()
    spots = sdata.shapes["spots"]
    m = get_transformation(spots, "microns").to_affine_matrix(("x", "y"), ("x", "y"))
    xy = np.column_stack([spots.geometry.x, spots.geometry.y]) @ m[:2, :2].T + m[:2, 2]
    assert shapely.contains_xy(tissue, xy[:, 0], xy[:, 1]).mean() > 0.9
    # H&E-only style virtual Visium spots over the same tissue
    squall.pp.make_spots(sdata)
    assert len(sdata.shapes["virtual_spots"]) > 300
    # 224 px patches at 4 µm/px around the real spots, and their expression grids
    ds = squall.pp.extract_patches(sdata, "spots", patch_px=224, mpp=4.0)
    batch = ds.get_batch(np.arange(4))
    assert batch.shape == (4, 3, 224, 224) and batch.dtype == np.uint8
    np.testing.assert_array_equal(batch[2], ds[2])
    genes = list(sdata.tables["table"].var_names[:50]) + ["NOT_IN_PANEL"]
    expr = squall.pp.rasterize_expression(sdata, xy[:4], shapes_key="spots", genes=genes, mpp=4.0)
    regions = squall.pp.region_weights(sdata, xy[:4], shapes_key="spots", mpp=4.0)
    assert expr.shape == (4, 51, 56, 56) and not expr[:, -1].any()
    # the centre spot of tile 0 is whole inside it: its cells sum to its binary vector
    r = int(np.flatnonzero(regions.index[0] == 0)[0])
    assert regions.weights[0, r].sum() == regions.n_cells[0, r]
    x0 = sdata.tables["table"][:, genes[:50]].X
    x0 = np.asarray(x0.todense() if hasattr(x0, "todense") else x0)
    inst = list(sdata.tables["table"].obs["instance_id"])
    row = inst.index(spots.index[0])
    np.testing.assert_allclose(
        (expr[0, :50] * regions.weights[0, r]).sum(axis=(1, 2)), (x0[row] > 0), atol=1e-5
    )
