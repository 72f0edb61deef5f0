"""tl.trajectory on real her2st A1 (cancer in situ -> invasive) and two sections at once."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pytest
import scanpy as sc
from scipy import sparse

import squall_sd as squall


def _prep(adata: ad.AnnData) -> ad.AnnData:
    sc.pp.normalize_total(adata)
    sc.pp.log1p(adata)
    sc.pp.pca(adata, n_comps=30, random_state=0)
    return adata


@pytest.fixture(scope="module")
def a1(shared_data):
    return _prep(squall.datasets.her2st("A1", shared_data / "her2st").tables["table"])


def test_root_group_in_situ(a1):
    adata = a1.copy()
    squall.tl.trajectory(adata, root=("pathologist_label", "cancer in situ"))
    pt = adata.obs["squall_pseudotime"]
    params = adata.uns["squall_pseudotime"]
    root = params["root_index"]
    assert adata.obs["pathologist_label"].iloc[root] == "cancer in situ"
    assert pt.iloc[root] == 0 and np.nanmax(pt) <= 1 and np.isfinite(pt).mean() > 0.95
    means = adata.obs.groupby("pathologist_label", observed=True)["squall_pseudotime"].mean()
    assert means["cancer in situ"] < means["invasive cancer"]
    assert params["niche_aware"] and "squall_pseudotime_connectivities" in adata.obsp
    assert adata.obsm["X_squall_pseudotime_diffmap"].shape[0] == adata.n_obs


def test_root_forms_and_niche_aware(a1):
    adata = a1.copy()
    name = adata.obs_names[5]
    squall.tl.trajectory(adata, root=name, key_added="by_name")
    squall.tl.trajectory(adata, root=5, key_added="by_pos")
    np.testing.assert_allclose(adata.obs["by_name"], adata.obs["by_pos"])
    mask = (adata.obs["pathologist_label"] == "cancer in situ").to_numpy()
    squall.tl.trajectory(adata, root=mask, key_added="by_mask")
    squall.tl.trajectory(adata, root=("pathologist_label", "cancer in situ"), key_added="by_group")
    np.testing.assert_allclose(adata.obs["by_mask"], adata.obs["by_group"])
    squall.tl.trajectory(adata, root=mask, niche_aware=False, key_added="plain")
    assert not np.allclose(adata.obs["plain"], adata.obs["by_mask"])
    assert "plain_connectivities" not in adata.obsp


def test_two_sections(shared_data, a1):
    c1 = _prep(squall.datasets.her2st("C1", shared_data / "her2st").tables["table"])
    adata = ad.concat({"A1": a1, "C1": c1}, join="inner", index_unique="_", label="sec")
    sc.pp.pca(adata, n_comps=30, random_state=0)
    squall.tl.trajectory(adata, root=("pathologist_label", "cancer in situ"), library_key="sec")
    adj = sparse.coo_matrix(adata.obsp["squall_pseudotime_connectivities"])
    sec = adata.obs["sec"].to_numpy()
    assert (sec[adj.row] == sec[adj.col]).all()
    assert np.isfinite(adata.obs["squall_pseudotime"]).mean() > 0.9


def test_errors(a1):
    adata = a1.copy()
    with pytest.raises(KeyError, match="not found in `adata.obs`"):
        squall.tl.trajectory(adata, root=("region_label", "x"))
    with pytest.raises(ValueError, match="No observation"):
        squall.tl.trajectory(adata, root=("pathologist_label", "DCIS"))
    with pytest.raises(TypeError, match="boolean mask"):
        squall.tl.trajectory(adata, root=[0.5, 1.5])
    with pytest.raises(KeyError, match="squall.tl.embed"):
        squall.tl.trajectory(adata, root=0, use_rep="X_squall")
    with pytest.raises(KeyError, match="spatial_neighbors"):
        squall.tl.trajectory(adata, root=0, connectivity_key="spatial")
