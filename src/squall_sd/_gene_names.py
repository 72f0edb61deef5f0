"""The one gene-name normalisation rule, shared by :mod:`squall_sd.models` and :mod:`squall_sd.pp`.

Pure Python (no torch, no AnnData), so both namespaces import it without importing each other.
"""

from __future__ import annotations

import re

__all__ = ["normalize_gene_name"]

_VERSION_RE = re.compile(r"\.\d+$")


def normalize_gene_name(name: str) -> str:
    """Normalise a gene name the way the published preprocessing does.

    ``"__"`` is collapsed to ``"_"``, the text after the last ``"_"`` is kept (``GRCh38_ACTB`` →
    ``ACTB``) and a numeric ``.version`` suffix is dropped (``ENSG00000075624.17`` →
    ``ENSG00000075624``). The case is kept (mouse symbols such as ``Actb`` differ from human ones
    only by case); apply :meth:`str.upper` to the result for a case-insensitive key.

    Parameters
    ----------
    name
        Gene symbol or Ensembl id as found in the data.

    Returns
    -------
    The normalised name.

    Examples
    --------
    >>> normalize_gene_name("mm10__Actb")
    'Actb'

    """
    name = str(name).strip()
    while "__" in name:
        name = name.replace("__", "_")
    name = name.rsplit("_", 1)[-1]
    return _VERSION_RE.sub("", name)
