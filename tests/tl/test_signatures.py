"""tl.score_signatures on real her2st D1 (pathologist labels) and the bundled example."""

from __future__ import annotations

import numpy as np
import pytest
import scanpy as sc

import squall_sd as squall
from squall_sd.tl._signatures import SIGNATURES


@pytest.fixture(scope="module")
def d1(shared_data):
    adata = squall.datasets.her2st("D1", shared_data / "her2st").tables["table"]
    adata.layers["counts"] = adata.X.copy()
    sc.pp.normalize_total(adata)
    sc.pp.log1p(adata)
    return adata


def test_builtin_signatures_are_cited():
    assert {"tls", "t_cell", "b_cell", "immune", "emt", "proliferation", "her2_amplicon"} <= set(
        SIGNATURES
    )
    assert SIGNATURES["tls"].genes == (
        "CCL2",
        "CCL3",
        "CCL4",
        "CCL5",
        "CCL8",
        "CCL18",
        "CCL19",
        "CCL21",
        "CXCL9",
        "CXCL10",
        "CXCL11",
        "CXCL13",
    )
    for sig in SIGNATURES.values():
        assert sig.source and sig.description and 1 <= len(sig.genes) <= 15


def test_builtin_scores_follow_pathology(d1):
    adata = d1.copy()
    squall.tl.score_signatures(adata)
    cols = [f"sig_{n}" for n in SIGNATURES]
    assert all(c in adata.obs for c in cols)
    means = adata.obs.groupby("pathologist_label", observed=True)[cols].mean()
    # immune / TLS chemokine scores are highest in the pathologist's immune infiltrate ...
    for c in ("sig_tls", "sig_immune", "sig_t_cell"):
        assert means[c].idxmax() == "immune infiltrate", c
    # ... and the HER2 amplicon score is highest in invasive cancer (a HER2+ tumour)
    assert means["sig_her2_amplicon"].idxmax() == "invasive cancer"
    rec = adata.uns["sig_signatures"]["signatures"]["tls"]
    assert "Coppola" in rec["source"] and len(rec["genes_used"]) >= 8


def test_user_sets_layers_and_case(d1):
    adata = d1.copy()
    adata.layers["lognorm"] = adata.X.copy()
    with pytest.warns(UserWarning, match="NOT_A_GENE"):
        squall.tl.score_signatures(
            adata, {"my_set": ["Erbb2", "grb7", "NOT_A_GENE"]}, layer="lognorm", key_prefix="s_"
        )  # symbols matched case-insensitively (mouse-style names work)
    assert adata.uns["s_signatures"]["signatures"]["my_set"]["genes_used"] == ["ERBB2", "GRB7"]
    assert np.isfinite(adata.obs["s_my_set"]).all()
    squall.tl.score_signatures(adata, ["tls"], key_prefix="only_")
    assert "only_tls" in adata.obs and "only_emt" not in adata.obs


def test_errors(d1):
    adata = d1.copy()
    with pytest.raises(ValueError, match="None of the"):
        squall.tl.score_signatures(adata, {"bad": ["FOO1", "BAR2"]})
    with pytest.raises(KeyError, match="Unknown built-in signature"):
        squall.tl.score_signatures(adata, ["tcells"])
    with pytest.raises(KeyError, match="predict_expression"):
        squall.tl.score_signatures(adata, layer="squall_predicted")
    with pytest.raises(TypeError, match="list of gene symbols"):
        squall.tl.score_signatures(adata, {"s": "ERBB2"})


def test_bundled_example_spatialdata():
    sdata = squall.datasets.example()
    table = sdata.tables["table"]
    sc.pp.normalize_total(table)
    sc.pp.log1p(table)
    out = squall.tl.score_signatures(sdata, ["her2_amplicon", "tls"], copy=True)
    assert "sig_her2_amplicon" in out.obs and "sig_her2_amplicon" not in table.obs
