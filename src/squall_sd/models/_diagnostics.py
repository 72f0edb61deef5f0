"""Checks of an official checkpoint against a gene-order hypothesis (spec §9)."""

from __future__ import annotations

import os
import re
from typing import TYPE_CHECKING

import numpy as np

from squall_sd._logging import logger
from squall_sd.models._genes import GeneVocabulary

if TYPE_CHECKING:
    import pandas as pd

    from squall_sd.models._squall import Squall

__all__ = ["gene_order_diagnostics"]

_RIBO = re.compile(r"^RP[LS]\d+[AXYL]?\d*$")
_OLFACTORY = re.compile(r"^OR\d+[A-Z]+\d+")
_HOUSEKEEPING = ("EEF1A1", "TPT1", "ACTB", "GAPDH", "FTL", "FTH1")


def gene_order_diagnostics(model: Squall, genes_file: str | os.PathLike[str]) -> pd.DataFrame:
    """Compare the two candidate channel orders of the official gene-order file on a loaded model.

    Under the correct order the learned output bias of ubiquitous genes (ribosomal RPL/RPS,
    EEF1A1, ACTB, ...) is high and that of rarely detected genes (olfactory receptors OR*) is low
    (specification §9). Both orders of ``genes_file`` are scored; the row with the larger
    ``bias_gap`` is the likely channel order.

    Parameters
    ----------
    model
        A model with trained weights (e.g. loaded from ``SQUALL_full.pth``).
    genes_file
        The official ``gene_token_homologs.csv``.

    Returns
    -------
    One row per order (``first_column``, ``row``) with the mean ``fc2`` bias of ribosomal and
    olfactory-receptor genes, their difference ``bias_gap``, the mean bias percentile of the
    housekeeping genes and the number of genes in each group.

    """
    import pandas as pd

    bias = model.decoder.increase_dim_rgb.fc2.bias.detach().float().cpu().numpy()
    pct = bias.argsort().argsort() / max(len(bias) - 1, 1)
    rows = []
    for order in ("first_column", "row"):
        vocab = GeneVocabulary.from_file(genes_file, order=order)  # type: ignore[arg-type]
        if len(vocab) != len(bias):
            raise ValueError(f"{genes_file} lists {len(vocab)} genes, the model has {len(bias)} channels.")
        sym = np.array(vocab.symbols)
        ribo = np.array([bool(_RIBO.match(s)) for s in sym])
        olf = np.array([bool(_OLFACTORY.match(s)) for s in sym])
        hk = np.isin(sym, _HOUSEKEEPING)
        rows.append(
            {
                "order": order,
                "ribosomal_mean_bias": float(bias[ribo].mean()) if ribo.any() else np.nan,
                "olfactory_mean_bias": float(bias[olf].mean()) if olf.any() else np.nan,
                "bias_gap": float(bias[ribo].mean() - bias[olf].mean()) if ribo.any() and olf.any() else np.nan,
                "housekeeping_bias_percentile": float(pct[hk].mean()) if hk.any() else np.nan,
                "n_ribosomal": int(ribo.sum()),
                "n_olfactory": int(olf.sum()),
                "n_housekeeping": int(hk.sum()),
            }
        )
    df = pd.DataFrame(rows).set_index("order")
    if df["bias_gap"].notna().all():
        logger.info("Gene-order check: the likely channel order is %r", df["bias_gap"].idxmax())
    return df
