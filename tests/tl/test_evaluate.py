"""Per-gene expression metrics: known answers against scipy on real her2st counts."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from anndata import AnnData
from scipy import sparse, stats

import squall_sd
from squall_sd.tl import evaluate_expression
from squall_sd.tl._evaluate import (
    bh_adjust,
    partial_pearson_per_gene,
    pearson_per_gene,
    spearman_per_gene,
)


def _cp10k_log1p(counts: np.ndarray) -> np.ndarray:
    tot = counts.sum(1, keepdims=True)
    return np.log1p(counts / np.maximum(tot, 1) * 1e4)


@pytest.fixture(scope="module")
def her2st_c2(shared_data):
    """Real her2st C2 counts: CP10k+log1p, raw totals, and a 'prediction' from C3's spots."""
    root = shared_data / "her2st" / "counts"
    c2 = pd.read_csv(root / "C2.tsv.gz", sep="\t", index_col=0)
    c3 = pd.read_csv(root / "C3.tsv.gz", sep="\t", index_col=0)
    genes = c2.columns.intersection(c3.columns)
    # 300 genes spanning expression levels, plus 5 that are all-zero in C2 (constant)
    mean = c2[genes].mean(0).sort_values(ascending=False)
    chosen = list(mean.index[:200]) + list(mean.index[1000:1095]) + list(mean[mean == 0].index[:5])
    n = min(len(c2), len(c3))
    tot = c2.to_numpy().sum(1)[:n]
    y_true = _cp10k_log1p(c2.to_numpy())[:n][:, c2.columns.get_indexer(chosen)]
    rng = np.random.default_rng(0)
    # a realistic prediction: C3 spots in the same order plus noise plus a depth term
    other = _cp10k_log1p(c3.to_numpy())[:n][:, c3.columns.get_indexer(chosen)]
    y_pred = (
        0.5 * other + 0.3 * y_true + rng.normal(0, 0.3, y_true.shape) + 0.1 * np.log1p(tot)[:, None]
    )
    y_pred[:, -5:] = rng.normal(size=(n, 5))  # measured is constant there
    return y_true, y_pred, tot, np.array(chosen)


def test_pearson_matches_scipy(her2st_c2):
    y_true, y_pred, _, _ = her2st_c2
    r, p = pearson_per_gene(y_true, y_pred, return_pvalue=True)
    assert r.shape == (y_true.shape[1],)
    for j in range(y_true.shape[1] - 5):
        ref = stats.pearsonr(y_true[:, j], y_pred[:, j])
        assert r[j] == pytest.approx(ref.statistic, abs=1e-10)
        assert p[j] == pytest.approx(ref.pvalue, rel=1e-6, abs=1e-300)
    assert np.all(np.isnan(r[-5:])) and np.all(np.isnan(p[-5:]))


def test_spearman_matches_scipy(her2st_c2):
    y_true, y_pred, _, _ = her2st_c2
    rho, p = spearman_per_gene(y_true, y_pred, return_pvalue=True)
    for j in range(0, y_true.shape[1] - 5, 7):
        ref = stats.spearmanr(y_true[:, j], y_pred[:, j])
        assert rho[j] == pytest.approx(ref.statistic, abs=1e-10)
        assert p[j] == pytest.approx(ref.pvalue, rel=1e-6, abs=1e-300)
    assert np.all(np.isnan(rho[-5:]))


def test_sparse_and_1d_inputs(her2st_c2):
    y_true, y_pred, _, _ = her2st_c2
    r_dense = pearson_per_gene(y_true, y_pred)
    r_sparse = pearson_per_gene(sparse.csr_matrix(y_true), y_pred)
    np.testing.assert_allclose(r_sparse, r_dense, equal_nan=True)
    r1 = pearson_per_gene(y_true[:, 0], y_pred[:, 0])
    assert r1.shape == (1,) and r1[0] == pytest.approx(r_dense[0])


def _partial_by_regression(x, y, z):
    design = np.column_stack([np.ones_like(z), z])
    rx = x - design @ np.linalg.lstsq(design, x, rcond=None)[0]
    ry = y - design @ np.linalg.lstsq(design, y, rcond=None)[0]
    return stats.pearsonr(rx, ry).statistic


def test_partial_matches_residual_regression(her2st_c2):
    y_true, y_pred, tot, _ = her2st_c2
    depth = np.log1p(tot)
    pr, p = partial_pearson_per_gene(y_true, y_pred, depth, return_pvalue=True)
    for j in range(0, y_true.shape[1] - 5, 11):
        assert pr[j] == pytest.approx(
            _partial_by_regression(y_true[:, j], y_pred[:, j], depth), abs=1e-10
        )
    assert np.all(np.isnan(pr[-5:]))
    # the classic formula for one covariate
    j = 3
    rxy = stats.pearsonr(y_true[:, j], y_pred[:, j]).statistic
    rxz = stats.pearsonr(y_true[:, j], depth).statistic
    ryz = stats.pearsonr(y_pred[:, j], depth).statistic
    assert pr[j] == pytest.approx(
        (rxy - rxz * ryz) / np.sqrt((1 - rxz**2) * (1 - ryz**2)), abs=1e-10
    )
    # p-value: t test with n - 3 degrees of freedom
    n = y_true.shape[0]
    t = pr[j] * np.sqrt((n - 3) / (1 - pr[j] ** 2))
    assert p[j] == pytest.approx(2 * stats.t.sf(abs(t), n - 3), rel=1e-8)


def test_partial_of_a_depth_only_predictor_is_nan(her2st_c2):
    """A prediction that is a linear function of depth has nothing left once depth is controlled."""
    y_true, _, tot, _ = her2st_c2
    depth = np.log1p(tot)
    pred = np.tile(depth[:, None], (1, y_true.shape[1])) * 2.0 - 1.0
    r = pearson_per_gene(y_true, pred)
    assert np.nanmean(r) > 0.05  # depth alone correlates with CP10k+log1p expression on real data
    pr = partial_pearson_per_gene(y_true, pred, depth)
    assert np.all(np.isnan(pr))


def test_bh_hand_computed():
    p = np.array([0.01, 0.04, 0.03, 0.005, 0.5])
    # sorted: 0.005, 0.01, 0.03, 0.04, 0.5; p*m/i: 0.025, 0.025, 0.05, 0.05, 0.5; cummin from top
    expected = np.array([0.025, 0.05, 0.05, 0.025, 0.5])
    np.testing.assert_allclose(bh_adjust(p), expected)
    np.testing.assert_allclose(bh_adjust(p), stats.false_discovery_control(p, method="bh"))
    # ties and a value that would exceed 1
    np.testing.assert_allclose(bh_adjust([0.9, 0.9, 0.95]), [0.95, 0.95, 0.95])
    np.testing.assert_allclose(bh_adjust([1.0, 0.6]), [1.0, 1.0])


def test_bh_nan_and_validation(her2st_c2):
    y_true, y_pred, _, _ = her2st_c2
    _, p = pearson_per_gene(y_true, y_pred, return_pvalue=True)
    q = bh_adjust(p)
    ok = np.isfinite(p)
    np.testing.assert_allclose(q[ok], stats.false_discovery_control(p[ok]))
    assert np.all(np.isnan(q[~ok]))
    assert bh_adjust(np.array([np.nan, np.nan])).shape == (2,)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        bh_adjust([0.5, 1.5])


def test_mismatched_shapes_raise(her2st_c2):
    y_true, y_pred, tot, _ = her2st_c2
    with pytest.raises(ValueError, match="same shape"):
        pearson_per_gene(y_true, y_pred[:, :-1])
    with pytest.raises(ValueError, match="same shape"):
        spearman_per_gene(y_true[:-1], y_pred)
    with pytest.raises(ValueError, match="one row per observation"):
        partial_pearson_per_gene(y_true, y_pred, tot[:-1])


def test_constant_genes_give_nan_without_warnings():
    x = np.ones((10, 3))
    x[:, 1] = np.arange(10)
    with np.errstate(all="raise"):
        r = pearson_per_gene(x, x[:, [1, 1, 1]])
    assert np.isnan(r[0]) and r[1] == pytest.approx(1.0) and np.isnan(r[2])


def test_evaluate_expression_on_anndata(her2st_c2):
    y_true, y_pred, tot, genes = her2st_c2
    var_names = list(genes)
    adata = AnnData(X=sparse.csr_matrix(y_true), var=pd.DataFrame(index=var_names))
    adata.layers["squall"] = y_pred
    adata.obs["log_umi"] = np.log1p(tot)
    summary = evaluate_expression(adata, depth_key="log_umi", key_added="ev")
    r_ref = pearson_per_gene(y_true, y_pred)
    np.testing.assert_allclose(adata.var["ev_pearson"].to_numpy(), r_ref, equal_nan=True)
    assert summary is adata.uns["ev"]
    assert summary["n_genes"] == len(var_names) - 5
    assert summary["mean_pearson"] == pytest.approx(np.nanmean(r_ref))
    assert summary["median_pearson"] == pytest.approx(np.nanmedian(r_ref))
    q = adata.var["ev_pearson_padj"].to_numpy()
    assert summary["n_significant"] == int(np.sum((r_ref > 0) & (q < 0.05)))
    assert 0 < summary["n_significant"] <= summary["n_genes"]
    pr = partial_pearson_per_gene(y_true, y_pred, np.log1p(tot))
    np.testing.assert_allclose(adata.var["ev_partial_pearson"].to_numpy(), pr, equal_nan=True)
    assert summary["mean_partial_pearson"] == pytest.approx(np.nanmean(pr))
    for col in ["ev_spearman", "ev_spearman_padj", "ev_pearson_pval", "ev_partial_pearson_padj"]:
        assert col in adata.var

    # gene subset: other genes NaN; predicted as an array; measured from a layer
    adata.layers["meas"] = y_true
    s2 = evaluate_expression(
        adata, measured="meas", predicted=y_pred, genes=var_names[:10], key_added="sub"
    )
    assert s2["n_genes_requested"] == 10
    assert np.all(np.isnan(adata.var["sub_pearson"].to_numpy()[10:]))
    np.testing.assert_allclose(adata.var["sub_pearson"].to_numpy()[:10], r_ref[:10])
    assert "mean_partial_pearson" not in s2


def test_evaluate_expression_copy_writes_nothing(her2st_c2):
    y_true, y_pred, tot, genes = her2st_c2
    adata = AnnData(X=y_true, var=pd.DataFrame(index=list(genes)))
    adata.layers["squall"] = y_pred
    summary = evaluate_expression(adata, key_added="ev", copy=True)
    assert list(adata.var.columns) == [] and "ev" not in adata.uns
    assert summary == evaluate_expression(adata, key_added="ev")
    assert "ev_pearson" in adata.var and adata.uns["ev"] == summary


def test_evaluate_expression_errors(her2st_c2):
    y_true, y_pred, _, genes = her2st_c2
    adata = AnnData(X=y_true, var=pd.DataFrame(index=list(genes)))
    with pytest.raises(KeyError, match="layers"):
        evaluate_expression(adata, predicted="nope")
    with pytest.raises(ValueError, match="shape"):
        evaluate_expression(adata, predicted=y_pred[:, :-1])
    adata.layers["squall"] = y_pred
    with pytest.raises(KeyError, match="var_names"):
        evaluate_expression(adata, genes=["NOT_A_GENE"])
    with pytest.raises(KeyError, match="depth_key"):
        evaluate_expression(adata, depth_key="missing")


def test_evaluate_expression_on_bundled_example():
    example = getattr(squall_sd.datasets, "example", None)
    if example is None:
        pytest.skip("squall_sd.datasets.example() is not available yet")
    data = example()
    adata = data.tables["table"] if hasattr(data, "tables") else data
    import scanpy as sc

    adata = adata[np.asarray(adata.X.sum(1)).ravel() > 0].copy()  # drop empty spots/cells
    sc.pp.calculate_qc_metrics(adata, inplace=True, log1p=True, percent_top=None)
    sc.pp.normalize_total(adata, target_sum=1e4)
    sc.pp.log1p(adata)
    x = adata.X.toarray() if sparse.issparse(adata.X) else np.asarray(adata.X)
    # the depth-only predictor: every gene predicted by log total UMI
    adata.layers["squall"] = np.tile(
        adata.obs["log1p_total_counts"].to_numpy()[:, None], (1, adata.n_vars)
    )
    summary = evaluate_expression(adata, depth_key="log1p_total_counts")
    r = pearson_per_gene(x, adata.layers["squall"])
    assert summary["mean_pearson"] == pytest.approx(np.nanmean(r))
    assert np.isnan(summary["mean_partial_pearson"])  # nothing beyond depth
