from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from scipy import sparse

import squall_sd as squall


@pytest.fixture
def mob_adata(mob_raw):
    """Real MOB1 counts: var_names versioned Ensembl ids, var['gene_symbols'] MGI symbols."""
    _, _, counts, var = mob_raw
    X = sparse.csr_matrix(counts.to_numpy(np.float32))
    return ad.AnnData(X=X, var=var.copy())


def test_symbols_ids_and_case(mob_adata):
    var = mob_adata.var
    sym = list(var["gene_symbols"][:5])
    dense = mob_adata.X.toarray()
    # symbols via var['gene_symbols'], one missing gene, and the upper-case (human-style) spelling
    vocab = [sym[2], "NOT_A_GENE", sym[0].upper(), sym[4]]
    X, present = squall.pp.align_genes(mob_adata, vocab)
    assert sparse.issparse(X) and X.shape == (mob_adata.n_obs, 4) and X.dtype == np.float32
    np.testing.assert_array_equal(present, [True, False, True, True])
    np.testing.assert_array_equal(
        X.toarray(),
        np.column_stack([dense[:, 2], np.zeros(mob_adata.n_obs), dense[:, 0], dense[:, 4]]),
    )
    # Ensembl ids without version match the versioned var_names
    ids = [g.split(".")[0] for g in var.index[[3, 1]]]
    X2, present2 = squall.pp.align_genes(mob_adata, ids)
    assert present2.all()
    np.testing.assert_array_equal(X2.toarray(), dense[:, [3, 1]])
    # var_names as symbols and Ensembl ids in var['gene_ids'], dense input
    by_sym = ad.AnnData(
        X=dense,
        var=pd.DataFrame({"gene_ids": var.index.to_numpy()}, index=var["gene_symbols"].to_numpy()),
    )
    by_sym.var_names_make_unique()
    X3, present3 = squall.pp.align_genes(by_sym, [var.index[1], sym[3]])
    assert isinstance(X3, np.ndarray) and present3.all()
    np.testing.assert_array_equal(X3, dense[:, [1, 3]])


def test_vocabulary_table_and_layer(mob_adata):
    """A vocabulary with human and mouse columns: mouse data reach the ortholog's channel."""
    sym = list(mob_adata.var["gene_symbols"][:3])
    vocab = pd.DataFrame(
        {"HGNC_symbol": ["HUMAN_ONLY", "X1", "X2"], "MGI_symbol": ["", sym[1], sym[2]]}
    )
    mob_adata.layers["counts"] = mob_adata.X.copy() * 2
    X, present = squall.pp.align_genes(mob_adata, vocab, layer="counts")
    np.testing.assert_array_equal(present, [False, True, True])
    np.testing.assert_array_equal(X.toarray()[:, 1], mob_adata.X.toarray()[:, 1] * 2)
    with pytest.raises(KeyError, match="Layer 'nope' not found"):
        squall.pp.align_genes(mob_adata, vocab, layer="nope")


def test_no_overlap(mob_adata):
    with pytest.raises(
        ValueError, match="None of the 1000 genes of the data .* match the 2 model genes"
    ):
        squall.pp.align_genes(mob_adata, ["ERBB2_FAKE", "CD74_FAKE"])


def test_normalize_gene_name():
    # one function for pp and models: the published rule, case kept (pp upper-cased before)
    assert squall.pp.normalize_gene_name is squall.models.normalize_gene_name
    assert squall.pp.normalize_gene_name("GRCh38_ACTB") == "ACTB"
    assert squall.pp.normalize_gene_name("mm10__Actb") == "Actb"
    assert squall.pp.normalize_gene_name("ENSG00000075624.17") == "ENSG00000075624"


def test_gene_index_fallback_is_case_insensitive_and_keeps_non_ensembl_versions():
    adata = ad.AnnData(
        X=np.zeros((1, 4), np.float32),
        var=pd.DataFrame(index=["mm10__Actb", "ensg00000075624.17", "RP11-34P13.7", "RP11-34P13.8"]),
    )
    idx = squall.pp.gene_index(adata, ["ACTB", "ENSG00000075624", "rp11-34p13.8", "RP11-34P13"])
    np.testing.assert_array_equal(idx, [0, 1, 3, -1])


def test_normalize_expression(mob_adata):
    X = mob_adata.X[:50]
    b = squall.pp.normalize_expression(X, "binary")
    assert sparse.issparse(b)
    np.testing.assert_array_equal(b.toarray(), (X.toarray() > 0).astype(np.float32))
    np.testing.assert_array_equal(
        squall.pp.normalize_expression(X.toarray(), "binary"), b.toarray()
    )
    lg = squall.pp.normalize_expression(X, "log1p_cp10k")
    dense = X.toarray()
    ref = np.log1p(dense / dense.sum(1, keepdims=True) * 1e4)
    np.testing.assert_allclose(lg.toarray(), ref, rtol=1e-5)
    np.testing.assert_allclose(squall.pp.normalize_expression(dense, "log1p_cp10k"), ref, rtol=1e-5)
    np.testing.assert_array_equal(squall.pp.normalize_expression(dense, "raw"), dense)
    with pytest.raises(ValueError, match="`method` must be one of"):
        squall.pp.normalize_expression(dense, "zscore")


def test_gene_index_public(mob_adata):
    assert "gene_index" in squall.pp.__all__
    var = mob_adata.var
    sym = list(var["gene_symbols"][:5])
    idx = squall.pp.gene_index(mob_adata, [sym[2], "NOT_A_GENE", sym[0].upper(), var.index[4].split(".")[0]])
    assert idx.dtype == np.int64
    np.testing.assert_array_equal(idx, [2, -1, 0, 4])
    # a DataFrame of alternative identifiers per channel (e.g. a model vocabulary)
    frame = pd.DataFrame({"symbol": ["NOPE", sym[1]], "ensembl": [var.index[3], ""]})
    np.testing.assert_array_equal(squall.pp.gene_index(mob_adata, frame), [3, 1])
