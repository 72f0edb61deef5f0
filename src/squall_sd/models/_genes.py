"""Gene vocabulary: channel ↔ gene mapping (human symbols / Ensembl ids, mouse orthologs)."""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Literal

import numpy as np

from squall_sd._gene_names import normalize_gene_name
from squall_sd._logging import logger

__all__ = ["GeneVocabulary", "normalize_gene_name", "read_gene_order"]

_HOMOLOG_COLUMNS = ("ENSG_ID", "HGNC_symbol", "ENSMUSG_ID", "MGI_symbol")
#: If the minority species of a sample still matches more than this many genes, the sample is
#: treated as mixed species (the published preprocessing sums both species into shared channels).
MIXED_SPECIES_MIN_MATCHES = 10_000


def _clean(values: Iterable[object] | None, n: int) -> list[str] | None:
    if values is None:
        return None
    out = ["" if v is None or (isinstance(v, float) and np.isnan(v)) else str(v) for v in values]
    if len(out) != n:
        raise ValueError(f"Expected {n} entries, found {len(out)}.")
    return out


class GeneVocabulary:
    """The gene channels of a model, in channel order.

    Channel ``c`` is one gene (an ortholog group in the published vocabulary: the human gene and its
    one-to-one mouse ortholog share the channel).

    Parameters
    ----------
    symbols
        Human gene symbols (HGNC) in channel order; the names used for outputs.
    ensembl_ids
        Human Ensembl gene ids (no version) in channel order, if known.
    mouse_symbols
        Mouse ortholog symbols (MGI), if known.
    mouse_ensembl_ids
        Mouse Ensembl gene ids, if known.
    source
        Where the vocabulary came from (file name), for provenance.

    """

    def __init__(
        self,
        symbols: Sequence[str],
        *,
        ensembl_ids: Sequence[str] | None = None,
        mouse_symbols: Sequence[str] | None = None,
        mouse_ensembl_ids: Sequence[str] | None = None,
        source: str | None = None,
    ) -> None:
        self.symbols: list[str] = [str(s) for s in symbols]
        n = len(self.symbols)
        if n == 0:
            raise ValueError("A gene vocabulary needs at least one gene.")
        self.ensembl_ids = _clean(ensembl_ids, n)
        self.mouse_symbols = _clean(mouse_symbols, n)
        self.mouse_ensembl_ids = _clean(mouse_ensembl_ids, n)
        self.source = source
        self._lookups: dict[str, dict[str, int]] = {}
        for kind, values in self._columns().items():
            table: dict[str, int] = {}
            for i, v in enumerate(values):
                if v and v not in table:
                    table[v] = i
            self._lookups[kind] = table

    def _columns(self) -> dict[str, list[str]]:
        cols = {"symbol": self.symbols}
        if self.ensembl_ids is not None:
            cols["id"] = self.ensembl_ids
        if self.mouse_symbols is not None:
            cols["mouse_symbol"] = self.mouse_symbols
        if self.mouse_ensembl_ids is not None:
            cols["mouse_id"] = self.mouse_ensembl_ids
        return cols

    def __len__(self) -> int:
        return len(self.symbols)

    def __repr__(self) -> str:
        head = ", ".join(self.symbols[:3])
        return f"GeneVocabulary(n={len(self)}, [{head}, ...], columns={list(self._lookups)})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, GeneVocabulary) and self._columns() == other._columns()

    @property
    def has_mouse(self) -> bool:
        """Whether mouse orthologs are known (mouse data can then be mapped onto the channels)."""
        return self.mouse_symbols is not None or self.mouse_ensembl_ids is not None

    def _find(self, name: str) -> int:
        for table in self._lookups.values():
            if name in table:
                return table[name]
        norm = normalize_gene_name(name)
        for table in self._lookups.values():
            if norm in table:
                return table[norm]
        upper = norm.upper()
        table = self._lookups["symbol"]
        if upper in table:
            return table[upper]
        return -1

    def index(self, genes: str | int | Sequence[str | int]) -> list[int]:
        """Channel indices of ``genes``.

        Parameters
        ----------
        genes
            Gene symbols (human or, if known, mouse), Ensembl ids (with or without version) or
            channel indices, or a single one of them.

        Returns
        -------
        One channel index per requested gene.

        Raises
        ------
        KeyError
            If a gene is not in the vocabulary (all missing genes are listed).

        """
        if isinstance(genes, (str, int, np.integer)):
            genes = [genes]
        out: list[int] = []
        missing: list[str] = []
        for g in genes:
            if isinstance(g, (int, np.integer)):
                if not -len(self) <= int(g) < len(self):
                    raise IndexError(f"Channel index {g} out of range for {len(self)} genes.")
                out.append(int(g) % len(self))
                continue
            i = self._find(str(g))
            if i < 0:
                missing.append(str(g))
            out.append(i)
        if missing:
            shown = missing[:20]
            more = f" (and {len(missing) - 20} more)" if len(missing) > 20 else ""
            raise KeyError(
                f"{len(missing)} gene(s) not in the model vocabulary of {len(self)} genes: "
                f"{shown}{more}. "
                "Use human or mouse symbols or Ensembl ids of protein-coding genes."
            )
        return out

    def match(
        self,
        names: Sequence[str],
        *,
        key: Literal["auto", "symbol", "id"] = "auto",
    ) -> tuple[np.ndarray, str]:
        """Map data gene names onto channels, choosing the species with more matches.

        Parameters
        ----------
        names
            Gene names of a dataset (e.g. ``adata.var_names``).
        key
            Match symbols (``"symbol"``), Ensembl ids (``"id"``) or decide from the names
            (``"auto"``: ids if most names start with ``"ENS"``).

        Returns
        -------
        ``(channels, species)``: channel index per name (``-1`` if not in the vocabulary) and the
        species used (``"human"`` or ``"mouse"``).

        """
        norm = [normalize_gene_name(n) for n in names]
        if key == "auto":
            key = "id" if sum(n.startswith("ENS") for n in norm) > len(norm) / 2 else "symbol"
        if key not in ("symbol", "id"):
            raise ValueError(f"`key` must be 'auto', 'symbol' or 'id', found {key!r}.")
        human = self._lookups.get("symbol" if key == "symbol" else "id", {})
        mouse = self._lookups.get("mouse_symbol" if key == "symbol" else "mouse_id", {})
        if not human and not mouse:
            raise ValueError(f"The vocabulary has no {key!r} column to match against.")
        h = np.array([human.get(n, -1) for n in norm], dtype=np.int64)
        m = np.array([mouse.get(n, -1) for n in norm], dtype=np.int64)
        nh, nm = int((h >= 0).sum()), int((m >= 0).sum())
        if min(nh, nm) > MIXED_SPECIES_MIN_MATCHES:
            logger.warning(
                "Both human (%d) and mouse (%d) genes match; the data look mixed-species. Returning the %s mapping.",
                nh,
                nm,
                "human" if nh >= nm else "mouse",
            )
        return (h, "human") if nh >= nm else (m, "mouse")

    # I/O ----------------------------------------------------------------------------------
    @classmethod
    def from_homolog_table(
        cls, path: str | os.PathLike[str], *, order: Literal["first_column", "row"] = "first_column"
    ) -> GeneVocabulary:
        """Read the official gene-order file (``gene_token_homologs.csv``).

        Parameters
        ----------
        path
            The CSV with columns ``ENSG_ID, HGNC_symbol, ENSMUSG_ID, MGI_symbol`` (and others) plus
            an unnamed integer first column.
        order
            ``"first_column"`` (default): channel ``c`` is the row whose first column equals ``c``
            (the order the authors' published analyses use); ``"row"``: channel = row order of the
            file (the order the tutorial input preprocessing uses). Which one the published weights
            follow is unresolved; check with :func:`squall_sd.models.gene_order_diagnostics`.

        Returns
        -------
        The vocabulary.

        """
        import pandas as pd

        path = Path(path)
        try:
            df = pd.read_csv(path)
        except Exception as err:  # noqa: BLE001
            raise ValueError(f"Could not read the gene-order file {path}: {err}") from err
        missing = [c for c in _HOMOLOG_COLUMNS if c not in df.columns]
        if missing:
            raise ValueError(
                f"{path} is not a SQUALL gene-order file: missing column(s) {missing}; found {list(df.columns)}."
            )
        if order == "first_column":
            first = df.iloc[:, 0]
            try:
                channels = first.to_numpy().astype(np.int64)
            except (TypeError, ValueError) as err:
                raise ValueError(f"The first column of {path} is not an integer channel index.") from err
            if not np.array_equal(np.sort(channels), np.arange(len(df))):
                raise ValueError(
                    f"The first column of {path} is not a permutation of 0..{len(df) - 1}; "
                    "use order='row' if the file rows are already in channel order."
                )
            df = df.iloc[np.argsort(channels, kind="stable")].reset_index(drop=True)
        elif order != "row":
            raise ValueError(f"`order` must be 'first_column' or 'row', found {order!r}.")
        ids = df["ENSG_ID"].astype("string").fillna("").tolist()
        symbols = df["HGNC_symbol"].astype("string").fillna("").tolist()
        symbols = [s if s else (ids[i] or f"channel_{i}") for i, s in enumerate(symbols)]
        symbols = _make_unique(symbols)
        return cls(
            symbols,
            ensembl_ids=ids,
            mouse_symbols=df["MGI_symbol"].astype("string").fillna("").tolist(),
            mouse_ensembl_ids=df["ENSMUSG_ID"].astype("string").fillna("").tolist(),
            source=path.name,
        )

    @classmethod
    def from_file(
        cls, path: str | os.PathLike[str], *, order: Literal["first_column", "row"] = "first_column"
    ) -> GeneVocabulary:
        """Read a vocabulary from the official CSV, a ``genes.tsv`` or a ``genes.txt``.

        Parameters
        ----------
        path
            The file.
        order
            Channel order of the official CSV (see :meth:`from_homolog_table`).

        Returns
        -------
        The vocabulary.

        """
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"Gene-order file {path} not found.")
        if path.suffix.lower() == ".csv":
            return cls.from_homolog_table(path, order=order)
        lines = [ln.rstrip("\n") for ln in path.read_text(encoding="utf-8").splitlines()]
        lines = [ln for ln in lines if ln.strip()]
        if lines and path.suffix.lower() == ".tsv" and lines[0].split("\t")[0] == "symbol":
            header = lines[0].split("\t")
            rows = [ln.split("\t") + [""] * (len(header) - len(ln.split("\t"))) for ln in lines[1:]]
            cols = {h: [r[i] for r in rows] for i, h in enumerate(header)}
            return cls(
                cols["symbol"],
                ensembl_ids=cols.get("ensembl_id"),
                mouse_symbols=cols.get("mouse_symbol"),
                mouse_ensembl_ids=cols.get("mouse_ensembl_id"),
                source=path.name,
            )
        return cls([ln.strip() for ln in lines], source=path.name)

    def write(self, path: str | os.PathLike[str]) -> None:
        """Write the vocabulary: ``*.txt`` → one symbol per line; ``*.tsv`` → all known columns.

        Parameters
        ----------
        path
            Output file.

        """
        path = Path(path)
        if path.suffix.lower() == ".tsv":
            cols = {"symbol": self.symbols}
            for name, values in (
                ("ensembl_id", self.ensembl_ids),
                ("mouse_symbol", self.mouse_symbols),
                ("mouse_ensembl_id", self.mouse_ensembl_ids),
            ):
                if values is not None:
                    cols[name] = values
            lines = ["\t".join(cols)] + ["\t".join(r) for r in zip(*cols.values(), strict=True)]
        else:
            lines = list(self.symbols)
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def _make_unique(names: list[str]) -> list[str]:
    seen: dict[str, int] = {}
    out = []
    dups = 0
    for n in names:
        if n in seen:
            seen[n] += 1
            out.append(f"{n}-{seen[n]}")
            dups += 1
        else:
            seen[n] = 0
            out.append(n)
    if dups:
        logger.warning(
            "%d duplicate gene symbol(s) in the vocabulary were made unique with a '-N' suffix.",
            dups,
        )
    return out


def read_gene_order(
    path: str | os.PathLike[str], *, order: Literal["first_column", "row"] = "first_column"
) -> GeneVocabulary:
    """Read a gene-order file (``gene_token_homologs.csv``, ``genes.tsv`` or ``genes.txt``).

    Parameters
    ----------
    path
        The file.
    order
        Channel order of the official CSV: ``"first_column"`` (default) or ``"row"``.

    Returns
    -------
    The vocabulary.

    """
    return GeneVocabulary.from_file(path, order=order)
