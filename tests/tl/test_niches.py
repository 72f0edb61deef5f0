"""tl.niches / tl.niche_enrichment on real her2st sections (C1, D1: pathologist labels) and the bundled example."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scanpy as sc
from scipy import sparse
from sklearn.metrics import adjusted_rand_score

import squall_sd as squall
from squall_sd.tl._niche_clustering import _pick_k
from squall_sd.tl._niches import _align_batches
from squall_sd.tl._utils import aggregate_neighbors


def _lognorm(adata: ad.AnnData) -> ad.AnnData:
    adata.layers["counts"] = adata.X.copy()
    sc.pp.normalize_total(adata)
    sc.pp.log1p(adata)
    sc.pp.pca(adata, n_comps=20, random_state=0)
    return adata


@pytest.fixture(scope="module")
def her2st_c1_d1(shared_data):
    """Two real her2st sections (patients C and D) in one AnnData, log-normalised, joint PCA."""
    tables = []
    for sec in ("C1", "D1"):
        t = squall.datasets.her2st(sec, shared_data / "her2st").tables["table"]
        t.obs_names = [f"{sec}_{n}" for n in t.obs_names]
        tables.append(t)
    adata = ad.concat(tables, join="inner")
    adata.obs["section"] = adata.obs["section"].astype("category")
    return _lognorm(adata)


@pytest.fixture
def d1(her2st_c1_d1):
    return her2st_c1_d1[her2st_c1_d1.obs["section"] == "D1"].copy()


def test_aggregate_neighbors_exact_hops():
    # path graph 0-1-2-3-4: hop rings of node 2 are {1, 3} and {0, 4}
    n = 5
    adj = sparse.diags([np.ones(n - 1), np.ones(n - 1)], [-1, 1], format="csr")
    rep = np.arange(n, dtype=np.float32)[:, None] ** 2
    agg = aggregate_neighbors(rep, adj, n_hops=2)
    assert agg.shape == (n, 3)
    np.testing.assert_allclose(agg[2], [4.0, (1 + 9) / 2, (0 + 16) / 2])
    np.testing.assert_allclose(agg[0], [0.0, 1.0, 4.0])  # rings {1} and {2}


def test_niches_gmm_stability_real(d1):
    squall.tl.niches(d1, n_niches=range(3, 7), n_runs=3)
    lab = d1.obs["squall_niche"]
    assert isinstance(lab.dtype, pd.CategoricalDtype)
    params = d1.uns["squall_niche"]
    k = params["n_niches"]
    assert k in range(3, 7) and lab.nunique() <= k
    curve = params["stability"]
    assert list(curve["n_niches"]) == [3, 4, 5, 6]
    assert k == _pick_k(pd.DataFrame(curve))  # chosen by stability, not labels
    assert d1.obsm["X_squall_niche"].shape == (d1.n_obs, 10 * 4)  # self + 3 hops of 10 PCs
    assert "squall_niche_connectivities" in d1.obsp
    # niches carry tissue structure: clearly better than chance against the pathologist's regions
    m = d1.obs["pathologist_label"].notna() & (d1.obs["pathologist_label"] != "undetermined")
    assert adjusted_rand_score(d1.obs["pathologist_label"][m], lab[m]) > 0.05
    # deterministic
    again = squall.tl.niches(d1, n_niches=range(3, 7), n_runs=3, copy=True)
    assert (again.obs["squall_niche"] == lab).all()


def test_niches_two_sections_consistent(her2st_c1_d1):
    adata = her2st_c1_d1.copy()
    squall.tl.niches(adata, library_key="section", graph="knn", n_niches=4, n_runs=2)
    adj = sparse.coo_matrix(adata.obsp["squall_niche_connectivities"])
    sec = adata.obs["section"].to_numpy()
    assert adj.nnz > 0 and (sec[adj.row] == sec[adj.col]).all()  # no edge between sections
    # one model for both sections: one set of categories, one fitted k
    assert list(adata.obs["squall_niche"].cat.categories) == ["0", "1", "2", "3"]
    assert adata.uns["squall_niche"]["library_key"] == "section"
    # a graph that does connect the sections (both start near the origin in microns) is refused
    squall.tl.niches(adata, graph="knn", n_niches=2, n_runs=1, key_added="joined")
    with pytest.raises(ValueError, match="between different libraries"):
        squall.tl.niches(adata, connectivity_key="joined_connectivities", library_key="section", n_niches=2)


@pytest.mark.parametrize("use_rep", ["X", "counts_pca", "X_squall_like"])
def test_niches_leiden_inputs(d1, use_rep):
    # "X": measured expression (PCA on the fly); a layer (stand-in for predicted expression); an obsm embedding
    adata = d1.copy()
    if use_rep == "counts_pca":
        adata.layers["counts_pca"] = adata.X.copy()
    if use_rep == "X_squall_like":
        adata.obsm["X_squall_like"] = adata.obsm["X_pca"][:, :8]
    squall.tl.niches(adata, use_rep=use_rep, method="leiden", resolution=0.5)
    assert adata.obs["squall_niche"].nunique() >= 2
    assert adata.uns["squall_niche"]["method"] == "leiden"


def test_niches_errors(d1):
    adata = d1.copy()
    del adata.obsm["X_pca"]
    with pytest.raises(KeyError, match=r"sc\.pp\.pca"):
        squall.tl.niches(adata)
    with pytest.raises(KeyError, match=r"squall\.tl\.embed"):
        squall.tl.niches(adata, use_rep="X_squall")
    with pytest.raises(KeyError, match="spatial_neighbors"):
        squall.tl.niches(adata, use_rep="X", connectivity_key="spatial_connectivities")
    with pytest.raises(KeyError, match="library_key"):
        squall.tl.niches(adata, use_rep="X", library_key="patient")
    with pytest.raises(ValueError, match="method"):
        squall.tl.niches(adata, use_rep="X", method="kmeans")


def test_niche_enrichment_real(d1):
    squall.tl.niches(d1, n_niches=4, n_runs=2)
    squall.tl.niche_enrichment(d1, cluster_key="pathologist_label", n_perms=50)
    comp = d1.uns["squall_niche_composition"]
    assert comp.shape[0] == d1.obs["squall_niche"].nunique()
    np.testing.assert_allclose(comp.sum(1), 1.0)
    z = d1.uns["squall_niche_nhood_enrichment"]["zscore"]
    assert z.shape == (comp.shape[0],) * 2
    # niches are spatially coherent: each niche borders itself more than expected
    assert np.nanmean(np.diag(z)) > 0
    out = squall.tl.niche_enrichment(d1, cluster_key="pathologist_label", normalize="cluster", n_perms=20, copy=True)
    np.testing.assert_allclose(out["composition"].sum(0), 1.0)
    with pytest.raises(KeyError, match="Run `squall.tl.niches"):
        squall.tl.niche_enrichment(d1, niche_key="nope")
    with pytest.raises(KeyError, match="not found"):
        squall.tl.niche_enrichment(d1, connectivity_key="missing_graph")


def test_niches_bundled_example_spatialdata():
    """Core path without ../shared: the bundled her2st C2 example as SpatialData."""
    sdata = squall.datasets.example()
    table = sdata.tables["table"]
    sc.pp.normalize_total(table)
    sc.pp.log1p(table)
    squall.tl.niches(sdata, use_rep="X", table_key="table", n_niches=range(2, 5), n_runs=2)
    assert sdata.tables["table"].obs["squall_niche"].nunique() >= 2
    squall.tl.niche_enrichment(sdata, cluster_key="her2st_cluster", n_perms=20)
    assert "squall_niche_composition" in sdata.tables["table"].uns
    with pytest.raises(KeyError, match="Available tables"):
        squall.tl.niches(sdata, table_key="cells")


def test_niches_predicted_layer_ignores_unpredicted_genes():
    """A `predict_expression` layer is NaN for the genes the model does not predict: those are left out."""
    adata = squall.datasets.example().tables["table"]
    sc.pp.normalize_total(adata)
    sc.pp.log1p(adata)
    pred = np.asarray(adata.X.todense() if sparse.issparse(adata.X) else adata.X, dtype=np.float32).copy()
    pred[:, ::3] = np.nan
    adata.layers["squall"] = pred
    squall.tl.niches(adata, use_rep="squall", n_niches=3, n_runs=2)
    assert adata.obs["squall_niche"].nunique() == 3
    pred[0, 1] = np.nan  # a missing value in a predicted gene is an error, not silently dropped
    adata.layers["squall"] = pred
    with pytest.raises(ValueError, match="missing values"):
        squall.tl.niches(adata, use_rep="squall", n_niches=3, n_runs=2)


def test_pick_k_prefers_interior_peak():
    curve = pd.DataFrame({"n_niches": [2, 3, 4, 5, 6], "stability": [0.5, 0.7, 0.6, 0.65, 0.9]})
    assert _pick_k(curve) == 3  # the range end (6) is higher but is no peak
    curve["stability"] = [0.5, 0.7, 0.6, 0.75, 0.7]
    assert _pick_k(curve) == 5  # the highest of two interior peaks
    curve["stability"] = [0.1, 0.2, 0.3, 0.4, 0.5]  # monotone: the end, with a warning
    assert _pick_k(curve) == 6


def test_align_batches():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(200, 3)).astype(np.float32)
    b = (rng.normal(size=(100, 3)) * 3 + 10).astype(np.float32)
    out = _align_batches(np.vstack([a, b]), np.r_[np.zeros(200), np.ones(100)])
    for block in (out[:200], out[200:]):
        np.testing.assert_allclose(block.mean(0), 0, atol=1e-4)
    # both batches get the same (pooled within-batch) scale
    np.testing.assert_allclose(out[:200].std(0), out[200:].std(0), rtol=1e-4)
    with pytest.raises(ValueError, match="missing"):
        _align_batches(a, np.array([None] * 200))


def test_niches_joint_batch_key(her2st_c1_d1):
    """Two patients in one fit: without correction each patient is its own niche, with batch_key not."""
    adata = her2st_c1_d1.copy()
    squall.tl.niches(adata, library_key="section", n_niches=4, n_runs=2)
    squall.tl.niches(adata, library_key="section", batch_key="section", n_niches=4, n_runs=2, key_added="bk")
    sec = adata.obs["section"]
    per_section = pd.crosstab(adata.obs["bk"], sec)
    assert (per_section > 0).all(1).sum() >= 2  # at least two niches shared by both patients
    params = adata.uns["bk"]
    assert params["batch_key"] == "section" and "aligned per 'section'" in params["representation"]
    with pytest.raises(KeyError, match="batch_key"):
        squall.tl.niches(adata, batch_key="patient", n_niches=2)


def test_niches_selection_subsample(d1):
    adata = d1.copy()
    squall.tl.niches(adata, n_niches=range(2, 5), n_runs=2, selection_subsample=150)
    params = adata.uns["squall_niche"]
    assert params["selection_subsample"] == 150 and params["subsample"] is None
    assert 2 <= params["n_niches"] <= 4 and adata.obs["squall_niche"].notna().all()


def test_pick_k_one_standard_error_rule():
    """A smaller peak within one standard error of the highest peak wins; a clearly lower one does not."""
    curve = pd.DataFrame(
        {
            "n_niches": [2, 3, 4, 5, 6, 7],
            "stability": [0.50, 0.70, 0.60, 0.72, 0.65, 0.60],
            "stability_se": [0.02, 0.02, 0.02, 0.03, 0.02, 0.02],
        }
    )
    assert _pick_k(curve) == 3  # 0.70 >= 0.72 - 0.03: the difference is within the noise
    curve["stability_se"] = 0.01
    assert _pick_k(curve) == 5  # 0.70 < 0.72 - 0.01: the higher peak wins
    assert _pick_k(curve.drop(columns="stability_se")) == 5  # no standard errors: the highest peak


def test_niches_seed_robust_real(d1):
    """Two random states on a real section: the same number of niches and (nearly) the same labels."""
    a = squall.tl.niches(d1, n_niches=range(2, 9), random_state=0, copy=True)
    b = squall.tl.niches(d1, n_niches=range(2, 9), random_state=1, copy=True)
    assert a.uns["squall_niche"]["n_niches"] == b.uns["squall_niche"]["n_niches"]
    assert adjusted_rand_score(a.obs["squall_niche"], b.obs["squall_niche"]) > 0.6
    curve = pd.DataFrame(a.uns["squall_niche"]["stability"])
    assert (curve["stability_se"] >= 0).all() and a.uns["squall_niche"]["n_runs"] == 10
