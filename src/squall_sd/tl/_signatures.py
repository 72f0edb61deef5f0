"""Gene-signature scores (scanpy ``score_genes``) with a small set of cited built-in signatures."""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import pandas as pd
from anndata import AnnData

from squall_sd._docs import d
from squall_sd._logging import logger
from squall_sd._sdata import resolve_adata
from squall_sd.tl._utils import _looks_like_counts, provenance

if TYPE_CHECKING:
    from spatialdata import SpatialData

__all__ = ["SIGNATURES", "Signature", "score_signatures"]


@dataclass(frozen=True)
class Signature:
    """A named gene set with the source it comes from.

    Parameters
    ----------
    name
        Short identifier (used in the output column name).
    genes
        Human HGNC gene symbols.
    description
        What the score is meant to read out.
    source
        Citation of the gene list.

    """

    name: str
    genes: tuple[str, ...]
    description: str
    source: str


_DANAHER = (
    "Danaher P. et al. (2017) Gene expression markers of Tumor Infiltrating Leukocytes. "
    "J Immunother Cancer 5:18 (Table 1)"
)

#: Built-in signatures (human symbols; matched case-insensitively, so mouse symbols work too).
#: The lists are short on purpose: the published core sets, not extended versions.
SIGNATURES: dict[str, Signature] = {
    s.name: s
    for s in (
        Signature(
            "tls",
            (
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
            ),
            "12-chemokine signature of tertiary lymphoid structures",
            "Coppola D. et al. (2011) Am J Pathol 179(1):37-45; Messina J.L. et al. (2012) Sci Rep 2:765",
        ),
        Signature(
            "t_cell",
            ("CD3D", "CD3E", "CD3G", "CD6", "SH2D1A", "TRAT1"),
            "T cells",
            _DANAHER,
        ),
        Signature(
            "b_cell",
            ("BLK", "CD19", "FCRL2", "MS4A1", "FAM30A", "TNFRSF17", "TCL1A", "SPIB", "PNOC"),
            "B cells (FAM30A was KIAA0125 in the paper)",
            _DANAHER,
        ),
        Signature(
            "immune",
            ("PTPRC", "CD3D", "CD3E", "MS4A1", "CD19", "CD68", "CD163", "GZMA", "NKG7"),
            "pan-immune: CD45 plus two markers each of T cells, B cells, macrophages and "
            "cytotoxic cells, picked here from the lineage lists of the source",
            _DANAHER,
        ),
        Signature(
            "emt",
            ("VIM", "CDH2", "FN1", "SNAI1", "SNAI2", "TWIST1", "ZEB1", "ZEB2"),
            "core mesenchymal markers and EMT transcription factors (a marker list from a review, "
            "not a validated score; MSigDB HALLMARK_EPITHELIAL_MESENCHYMAL_TRANSITION is the "
            "200-gene alternative)",
            "Lamouille S., Xu J., Derynck R. (2014) Molecular mechanisms of epithelial-mesenchymal "
            "transition. Nat Rev Mol Cell Biol 15:178-196",
        ),
        Signature(
            "proliferation",
            (
                "BIRC5",
                "CCNB1",
                "CDC20",
                "NUF2",
                "CEP55",
                "NDC80",
                "MKI67",
                "PTTG1",
                "RRM2",
                "TYMS",
                "UBE2C",
            ),
            "PAM50 11-gene proliferation score (NUF2 = CDCA1, NDC80 = KNTC2 in the paper)",
            "Nielsen T.O. et al. (2010) Clin Cancer Res 16(21):5222-5232",
        ),
        Signature(
            "her2_amplicon",
            ("ERBB2", "GRB7", "STARD3", "PGAP3", "MIEN1", "TCAP", "PNMT", "PPP1R1B"),
            "genes of the 17q12 ERBB2 amplicon (co-amplified with HER2)",
            "Sahlberg K.K. et al. (2013) The HER2 amplicon includes several genes required for "
            "the growth and survival of HER2 positive breast cancer cells. Mol Oncol 7(3):392-401",
        ),
    )
}


def _resolve_signatures(
    signatures: str | Sequence[str] | Mapping[str, Sequence[str]] | None,
) -> dict[str, tuple[list[str], str]]:
    """Return ``{name: (genes, source)}``."""
    if signatures is None or (isinstance(signatures, str) and signatures == "builtin"):
        return {n: (list(s.genes), s.source) for n, s in SIGNATURES.items()}
    if isinstance(signatures, str):
        signatures = [signatures]
    if isinstance(signatures, Mapping):
        out = {}
        for name, genes in signatures.items():
            if isinstance(genes, str):
                raise TypeError(f"Signature {name!r} must be a list of gene symbols, found the string {genes!r}.")
            out[str(name)] = (list(genes), "user")
        return out
    out = {}
    for name in signatures:
        if name not in SIGNATURES:
            raise KeyError(
                f"Unknown built-in signature {name!r}; available: {sorted(SIGNATURES)}. "
                "Pass a dict `{name: [genes]}` for your own gene sets."
            )
        out[name] = (list(SIGNATURES[name].genes), SIGNATURES[name].source)
    return out


def _match_genes(genes: list[str], var_names: pd.Index) -> tuple[list[str], list[str]]:
    """Match symbols exactly, else case-insensitively; return (matched var names, missing)."""
    exact = set(var_names)
    upper: dict[str, str] = {}
    for v in var_names:
        upper.setdefault(str(v).upper(), v)
    found, missing = [], []
    for g in genes:
        if g in exact:
            found.append(g)
        elif g.upper() in upper:
            found.append(upper[g.upper()])
        else:
            missing.append(g)
    return list(dict.fromkeys(found)), missing


@d.dedent
def score_signatures(  # noqa: D417 - parameters from squall_sd._docs
    data: AnnData | SpatialData,
    signatures: str | Sequence[str] | Mapping[str, Sequence[str]] | None = None,
    *,
    table_key: str | None = None,
    layer: str | None = None,
    use_raw: bool | None = False,
    key_prefix: str = "sig_",
    ctrl_size: int = 50,
    random_state: int = 0,
    copy: bool = False,
) -> AnnData | None:
    """Score gene signatures per observation with :func:`scanpy.tl.score_genes`.

    Each score is the mean expression of the signature genes minus the mean of randomly drawn
    control genes of similar expression. Works on measured expression and on predicted
    expression (pass its ``layer``).

    Built-in signatures (``signatures=None`` or ``"builtin"``; see :data:`SIGNATURES`):

    - ``tls``: 12-chemokine tertiary-lymphoid-structure signature (CCL2, CCL3, CCL4, CCL5, CCL8,
      CCL18, CCL19, CCL21, CXCL9, CXCL10, CXCL11, CXCL13; Coppola et al. 2011, Messina et al. 2012),
    - ``t_cell``, ``b_cell``: Danaher et al. 2017 lineage markers; ``immune``: CD45 + a few
      markers of T, B, macrophage and cytotoxic cells from the same source,
    - ``emt``: core mesenchymal markers / EMT transcription factors (Lamouille et al. 2014),
    - ``proliferation``: PAM50 11-gene proliferation score (Nielsen et al. 2010),
    - ``her2_amplicon``: 17q12 ERBB2 amplicon genes (Sahlberg et al. 2013).

    Parameters
    ----------
    %(data_table)s
    signatures
        ``None`` / ``"builtin"`` (all built-in signatures), names of built-in signatures, or a
        mapping ``{name: [gene symbols]}`` of your own. Symbols are matched exactly, else
        case-insensitively.
    %(table_key_data)s
    layer
        Layer with the expression to score (``None``: ``adata.X``). Normalised, log-transformed
        values are expected.
    use_raw
        Score ``adata.raw`` instead (passed to :func:`scanpy.tl.score_genes`).
    key_prefix
        Prefix of the output columns.
    ctrl_size
        Number of control genes per expression bin.
    random_state
        Seed of the control-gene draw.
    %(copy)s

    Returns
    -------
    ``None``, or the modified copy with ``copy=True``. Writes

    - :attr:`anndata.AnnData.obs` ``[f"{key_prefix}{name}"]`` - one score per signature,
    - :attr:`anndata.AnnData.uns` ``[f"{key_prefix}signatures"]`` - genes used and missing, sources.

    Raises
    ------
    ValueError
        If none of a signature's genes is present.

    Warns
    -----
    UserWarning
        If some genes of a signature are missing.

    """
    import scanpy as sc

    adata = resolve_adata(data, table_key)
    if copy:
        adata = adata.copy()
    if layer is not None and layer not in adata.layers:
        raise KeyError(
            f"Layer {layer!r} not found; available layers: {list(adata.layers.keys())}. "
            "For predicted expression run `squall.tl.predict_expression(sdata, model)` first."
        )
    if use_raw and adata.raw is None:
        raise ValueError("`use_raw=True` but `adata.raw` is empty.")
    X = adata.raw.X if use_raw else (adata.X if layer is None else adata.layers[layer])
    if X is not None and _looks_like_counts(X):
        logger.warning(
            "The expression looks like raw counts; signature scores are usually computed on "
            "log-normalised data (`sc.pp.normalize_total(adata); sc.pp.log1p(adata)`)."
        )
    var_names = adata.raw.var_names if use_raw else adata.var_names
    sigs = _resolve_signatures(signatures)
    record: dict[str, dict[str, object]] = {}
    for name, (genes, source) in sigs.items():
        found, missing = _match_genes(genes, var_names)
        if not found:
            raise ValueError(
                f"None of the {len(genes)} genes of signature {name!r} "
                f"({', '.join(genes[:6])}, ...) is in "
                "`adata.var_names`. Check that var_names are gene symbols (e.g. "
                "`adata.var_names = adata.var['gene_symbols']`) or pass `signatures=` your "
                "own genes."
            )
        if missing:
            warnings.warn(
                f"Signature {name!r}: {len(missing)} of {len(genes)} genes not found and skipped: "
                f"{', '.join(missing)}.",
                UserWarning,
                stacklevel=2,
            )
        sc.tl.score_genes(
            adata,
            found,
            score_name=f"{key_prefix}{name}",
            ctrl_size=ctrl_size,
            random_state=random_state,
            layer=layer,
            use_raw=use_raw,
        )
        record[name] = {"genes_used": found, "genes_missing": missing, "source": source}
        logger.info("Adding `adata.obs['%s%s']` (%d genes)", key_prefix, name, len(found))
    adata.uns[f"{key_prefix}signatures"] = provenance(
        signatures=record,
        layer=layer,
        use_raw=use_raw,
        ctrl_size=int(ctrl_size),
        random_state=int(random_state),
    )
    return adata if copy else None
