"""Which model channels predict which genes of a table (symbols, Ensembl ids, mouse homologs)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

if TYPE_CHECKING:
    from anndata import AnnData

    from squall_sd.models import Squall

__all__ = ["match_table_genes", "restrict_to_genes", "vocabulary_frame"]


def vocabulary_frame(model: Squall) -> pd.DataFrame:
    """Return the model vocabulary as a DataFrame of alternative identifiers per channel (for gene matching)."""
    vocab = model.vocabulary
    if vocab is None:
        raise ValueError(
            f"Model {model.config.name!r} has no gene names, so its channels cannot be matched to a table's "
            "genes. Load it with `squall.models.load(..., genes_file='gene_token_homologs.csv')`."
        )
    cols: dict[str, list[str]] = {"symbol": list(vocab.symbols)}
    for name in ("ensembl_ids", "mouse_symbols", "mouse_ensembl_ids"):
        values = getattr(vocab, name, None)
        if values is not None:
            cols[name] = [str(v) if v else "" for v in values]
    return pd.DataFrame(cols)


def match_table_genes(model: Squall, table: AnnData, table_key: str) -> tuple[np.ndarray, np.ndarray]:
    """Model channels and table columns of the genes both have (each table column at most once).

    Returns
    -------
    ``(channels, columns)`` of equal length.
    """
    from squall_sd.pp import gene_index

    frame = vocabulary_frame(model)
    col = gene_index(table, frame)
    channels = np.flatnonzero(col >= 0)
    columns = col[channels]
    _, first = np.unique(columns, return_index=True)
    first = np.sort(first)
    channels, columns = channels[first], columns[first]
    if len(channels) == 0:
        raise ValueError(
            f"No gene of table {table_key!r} ({table.n_vars} genes, e.g. {list(table.var_names[:3])}) is "
            f"predicted by model {model.config.name!r} ({model.n_genes} genes, e.g. {frame['symbol'].tolist()[:3]}). "
            "Put gene symbols or Ensembl ids in `var_names` or in a `var` column 'gene_ids' / 'gene_symbols', "
            "check the species, or pass `table_key=None, shapes_key=...` to a new table with the model's genes."
        )
    return channels.astype(np.int64), columns.astype(np.int64)


def restrict_to_genes(
    model: Squall, channels: np.ndarray, columns: np.ndarray, genes: Sequence[str] | str, table_key: str
) -> tuple[np.ndarray, np.ndarray]:
    """Keep the (channel, column) pairs of ``genes``; every requested gene must be in the model and the table."""
    genes = [genes] if isinstance(genes, str) else list(genes)
    try:
        wanted = model.gene_index(genes)
    except KeyError as e:
        raise KeyError(
            f"{e.args[0] if e.args else e} `genes` must name genes the model predicts "
            f"(see `model.genes`, {model.n_genes} genes)."
        ) from None
    in_table = set(channels.tolist())
    keep = np.isin(channels, np.asarray(wanted, dtype=np.int64))
    missing = sorted({g for g, c in zip(genes, wanted, strict=True) if c not in in_table}, key=str)
    if missing:
        raise ValueError(
            f"`genes` {missing[:10]} are predicted by the model but not columns of table {table_key!r}; a table "
            "that already annotates the shapes gets predictions only for its own genes. Drop them from `genes`, "
            "or pass `table_key=None` to write a new table with any of the model's genes."
        )
    return channels[keep], columns[keep]
