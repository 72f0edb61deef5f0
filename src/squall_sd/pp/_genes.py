"""Gene-panel alignment to a model vocabulary, and expression normalisation."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Literal

import numpy as np
import pandas as pd
from anndata import AnnData
from scipy import sparse

from squall_sd._logging import logger

#: ``var`` columns searched for alternative gene identifiers (in this order).
GENE_ID_COLUMNS = (
    "gene_ids",
    "gene_id",
    "gene_symbols",
    "gene_symbol",
    "gene_name",
    "gene_names",
    "symbol",
    "feature_name",
    "ensembl_id",
    "features",
)

_VERSION = re.compile(r"^(ENS[A-Z]*G\d+)\.\d+$", re.IGNORECASE)


def _match_key(name: str) -> str:
    """Case-insensitive key of the fallback round of :func:`gene_index`.

    :func:`~squall_sd.models.normalize_gene_name` upper-cased, except that only an Ensembl id's
    ``.version`` is dropped (``"RP11-34P13.7"`` stays as it is) and a name ending in ``"_"`` is
    kept whole, as this matching always did.
    """
    s = str(name).strip()
    while "__" in s:
        s = s.replace("__", "_")
    if "_" in s:
        s = s.rsplit("_", 1)[-1] or s
    m = _VERSION.match(s)
    if m:
        s = m.group(1)
    return s.upper()


def _vocab_names(
    genes: Sequence[str] | pd.Index | pd.DataFrame,
) -> tuple[list[list[str]], list[str]]:
    """Alternative identifiers per vocabulary channel, and a display name per channel."""
    if isinstance(genes, pd.DataFrame):
        if genes.shape[1] == 0:
            raise ValueError("The gene vocabulary DataFrame has no columns.")
        alts = []
        for row in genes.itertuples(index=False):
            alts.append([str(v) for v in row if isinstance(v, str) and v != ""])
        display = [a[0] if a else "" for a in alts]
        return alts, display
    if isinstance(genes, str):
        raise TypeError("`genes` must be a sequence of gene names, not a single string.")
    names = [str(g) for g in genes]
    return [[g] for g in names], names


def _data_names(adata: AnnData) -> list[list[str]]:
    """Candidate identifier lists of the data genes: var_names first, then known var columns."""
    lists = [list(map(str, adata.var_names))]
    for col in GENE_ID_COLUMNS:
        if col in adata.var.columns:
            lists.append([str(v) if pd.notna(v) else "" for v in adata.var[col]])
    return lists


def gene_index(adata: AnnData, genes: Sequence[str] | pd.Index | pd.DataFrame) -> np.ndarray:
    """Position of each vocabulary gene in ``adata.var`` (``-1`` when absent).

    Matching goes in two rounds: exact identifiers first (``var_names``, then the ``var`` columns
    listed in :data:`GENE_ID_COLUMNS`, e.g. ``gene_ids`` / ``gene_symbols``), then the same after
    normalisation (case-insensitive, without Ensembl versions or ``GRCh38_``-style prefixes).
    ``genes`` may be a DataFrame whose columns are alternative identifiers of each channel (e.g.
    human and mouse symbols and Ensembl ids), so mouse data reach the ortholog's channel.

    Parameters
    ----------
    adata
        Observations × genes whose ``var`` is searched.
    genes
        Vocabulary in channel order: gene names, or a DataFrame with one column per kind of
        identifier.

    Returns
    -------
    Integer array with one entry per vocabulary gene: its position in ``adata.var``, or ``-1``.
    """
    alts, _ = _vocab_names(genes)
    exact: dict[str, int] = {}
    fuzzy: dict[str, int] = {}
    for names in _data_names(adata):
        for j, n in enumerate(names):
            if not n:
                continue
            exact.setdefault(n, j)
    for names in _data_names(adata):
        for j, n in enumerate(names):
            if not n:
                continue
            fuzzy.setdefault(_match_key(n), j)
    idx = np.full(len(alts), -1, dtype=np.int64)
    for k, names in enumerate(alts):
        for n in names:
            j = exact.get(n)
            if j is not None:
                idx[k] = j
                break
        else:
            for n in names:
                j = fuzzy.get(_match_key(n))
                if j is not None:
                    idx[k] = j
                    break
    return idx


def align_genes(
    adata: AnnData,
    genes: Sequence[str] | pd.Index | pd.DataFrame,
    *,
    layer: str | None = None,
) -> tuple[np.ndarray | sparse.csr_matrix, np.ndarray]:
    """Reorder an expression matrix to a model's gene vocabulary.

    Parameters
    ----------
    adata
        Observations × genes. Genes are identified by ``var_names`` or by the ``var`` columns
        ``gene_ids`` / ``gene_symbols`` (and a few common aliases); symbols and Ensembl ids (with or
        without version) both work, with a case-insensitive fallback.
    genes
        The model vocabulary in channel order: gene names, or a DataFrame with one row per channel
        and alternative identifiers in its columns (e.g. ``HGNC_symbol``, ``ENSG_ID``,
        ``MGI_symbol``, ``ENSMUSG_ID``).
    layer
        Layer of ``adata`` to use instead of ``X``.

    Returns
    -------
    ``(X, present)``: ``X`` has shape ``(n_obs, len(genes))`` (float32; sparse CSR when the input is
    sparse), with all-zero columns for vocabulary genes the data lack; ``present`` is a boolean
    mask of length ``len(genes)`` that flags the genes found in the data.

    Raises
    ------
    ValueError
        When no vocabulary gene is found in the data.

    """
    if layer is not None and layer not in adata.layers:
        raise KeyError(
            f"Layer {layer!r} not found in `adata.layers`. Available: {list(adata.layers)}."
        )
    idx = gene_index(adata, genes)
    present = idx >= 0
    if not present.any():
        _, display = _vocab_names(genes)
        raise ValueError(
            f"None of the {adata.n_vars} genes of the data (e.g. {list(adata.var_names[:3])}) "
            "match the "
            f"{len(display)} model genes (e.g. {display[:3]}). Put gene symbols or Ensembl ids in "
            "`adata.var_names` or in a `var` column 'gene_ids' / 'gene_symbols', and check the "
            "species."
        )
    X = adata.layers[layer] if layer is not None else adata.X
    n_obs, n_genes = adata.n_obs, len(idx)
    cols = np.flatnonzero(present)
    src = idx[present]
    if sparse.issparse(X):
        sub = sparse.csc_matrix(X)[:, src].astype(np.float32)
        # scatter columns into vocabulary positions with a selection matrix (n_src × n_genes)
        sel = sparse.csr_matrix(
            (np.ones(len(src), dtype=np.float32), (np.arange(len(src)), cols)),
            shape=(len(src), n_genes),
        )
        out: np.ndarray | sparse.csr_matrix = sparse.csr_matrix(sub @ sel)
    else:
        dense = np.asarray(X)
        out = np.zeros((n_obs, n_genes), dtype=np.float32)
        out[:, cols] = dense[:, src]
    logger.info(
        "align_genes: %d of %d model genes found in the data (%d data genes)",
        int(present.sum()),
        n_genes,
        adata.n_vars,
    )
    return out, present


def normalize_expression(
    X: np.ndarray | sparse.spmatrix,
    method: Literal["binary", "log1p_cp10k", "raw"] = "binary",
    *,
    total_counts: np.ndarray | None = None,
) -> np.ndarray | sparse.csr_matrix:
    """Normalise spot/bin/cell expression for the model.

    Parameters
    ----------
    X
        Counts, observations × genes (dense or sparse).
    method
        ``"binary"``: 1 where the count is non-zero, else 0 (the SQUALL pretraining target);
        ``"log1p_cp10k"``: ``log1p`` of counts scaled to 10,000 per observation;
        ``"raw"``: the values as float32.
    total_counts
        Per-observation library sizes for ``"log1p_cp10k"`` (use the totals over *all* measured
        genes when ``X`` is already aligned to a vocabulary); default ``X.sum(axis=1)``.

    Returns
    -------
    A float32 matrix of the same shape (sparse CSR when the input is sparse).

    """
    is_sparse = sparse.issparse(X)
    if method == "raw":
        return (
            sparse.csr_matrix(X, dtype=np.float32) if is_sparse else np.asarray(X, dtype=np.float32)
        )
    if method == "binary":
        if is_sparse:
            out = sparse.csr_matrix(X, dtype=np.float32, copy=True)
            out.data = (out.data != 0).astype(np.float32)
            out.eliminate_zeros()
            return out
        return (np.asarray(X) != 0).astype(np.float32)
    if method == "log1p_cp10k":
        if total_counts is None:
            totals = np.asarray(X.sum(axis=1), dtype=np.float64).reshape(-1)
        else:
            totals = np.asarray(total_counts, dtype=np.float64).reshape(-1)
            if totals.shape[0] != X.shape[0]:
                raise ValueError(
                    f"`total_counts` has {totals.shape[0]} values for {X.shape[0]} observations."
                )
        scale = np.divide(1e4, totals, out=np.zeros_like(totals), where=totals > 0)
        if is_sparse:
            out = sparse.csr_matrix(X, dtype=np.float32, copy=True)
            out = sparse.csr_matrix(sparse.diags(scale.astype(np.float32)) @ out)
            out.data = np.log1p(out.data)
            return out
        return np.log1p(np.asarray(X, dtype=np.float64) * scale[:, None]).astype(np.float32)
    raise ValueError(f"`method` must be one of 'binary', 'log1p_cp10k', 'raw'; got {method!r}.")
