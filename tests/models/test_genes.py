"""Gene vocabulary: official CSV, name normalisation, human/mouse matching."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from squall_sd.models import GeneVocabulary, normalize_gene_name, read_gene_order


def write_homolog_csv(path: Path, n: int = 24, seed: int = 0) -> Path:
    """A synthetic file with the official columns; first column = channel, rows shuffled."""
    import pandas as pd

    rng = np.random.default_rng(seed)
    channels = rng.permutation(n)
    rows = []
    for c in range(n):
        rows.append(
            {
                "ENSG_ID": f"ENSG{c:011d}",
                "ENSG_start_bp": 100 * c,
                "ENSG_end_bp": 100 * c + 50,
                "ENSG_chromosome": "1",
                "ENSG_type": "protein_coding",
                "HGNC_symbol": f"HG{c}",
                "ENSMUSG_ID": f"ENSMUSG{c:011d}",
                "ENSMUSG_start_bp": 10 * c,
                "ENSMUSG_end_bp": 10 * c + 5,
                "ENSMUSG_chromosome": "2",
                "ENSMUSG_type": "protein_coding",
                "MGI_symbol": f"Mg{c}",
            }
        )
    df = pd.DataFrame(rows)  # index = channel
    df = df.iloc[channels]  # rows stored in another order, as in the official (MGI-sorted) file
    df.to_csv(path)  # the index becomes the unnamed first column
    return path


def test_homolog_table_orders(tmp_path):
    csv = write_homolog_csv(tmp_path / "g.csv")
    v = read_gene_order(csv)
    assert len(v) == 24 and v.symbols == [f"HG{c}" for c in range(24)]
    assert v.ensembl_ids[3] == "ENSG00000000003" and v.mouse_symbols[3] == "Mg3"
    row = read_gene_order(csv, order="row")
    import pandas as pd

    assert row.symbols == pd.read_csv(csv)["HGNC_symbol"].tolist()
    with pytest.raises(ValueError, match="order"):
        read_gene_order(csv, order="alphabetical")


def test_bad_gene_files(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match="missing column"):
        read_gene_order(bad)
    with pytest.raises(FileNotFoundError):
        read_gene_order(tmp_path / "nope.txt")
    csv = write_homolog_csv(tmp_path / "g.csv")
    text = csv.read_text().splitlines()
    text[1] = "99" + text[1][text[1].index(",") :]
    broken = tmp_path / "broken.csv"
    broken.write_text("\n".join(text) + "\n")
    with pytest.raises(ValueError, match="permutation"):
        read_gene_order(broken)


def test_normalize_gene_name():
    assert normalize_gene_name("GRCh38_ACTB") == "ACTB"
    assert normalize_gene_name("mm10__Actb") == "Actb"
    assert normalize_gene_name("ENSG00000075624.17") == "ENSG00000075624"
    assert normalize_gene_name("HLA-A") == "HLA-A"


def test_index_and_match(tmp_path):
    v = read_gene_order(write_homolog_csv(tmp_path / "g.csv"))
    assert v.index(["HG2", "Mg4", "ENSG00000000007.3", "ENSMUSG00000000001", "GRCh38_HG9", 11]) == [
        2,
        4,
        7,
        1,
        9,
        11,
    ]
    assert v.index("hg3") == [3]  # case-insensitive fallback on symbols
    with pytest.raises(KeyError, match="2 gene"):
        v.index(["HG1", "FOO", "BAR"])
    ch, species = v.match(["Mg1", "Mg2", "Xist", "HG3"])
    assert species == "mouse" and ch.tolist() == [1, 2, -1, -1]
    ch, species = v.match(["ENSG00000000005.1", "ENSG00000000006", "ENSGXXX"])
    assert species == "human" and ch.tolist() == [5, 6, -1]


def test_plain_vocabulary_and_tsv_round_trip(tmp_path):
    v = GeneVocabulary(["A", "B"], ensembl_ids=["E1", "E2"])
    v.write(tmp_path / "genes.tsv")
    v.write(tmp_path / "genes.txt")
    assert read_gene_order(tmp_path / "genes.tsv") == v
    assert read_gene_order(tmp_path / "genes.txt").symbols == ["A", "B"]
    assert not v.has_mouse


def test_gene_order_diagnostics_picks_the_order_the_weights_follow(tmp_path):
    import pandas as pd
    import torch

    import squall_sd.models as sm

    n = 24
    csv = write_homolog_csv(tmp_path / "g.csv", n=n)
    df = pd.read_csv(csv)
    names = ["RPL3", "RPS6", "RPL13A", "EEF1A1", "ACTB", "OR2A4", "OR5B2", "OR1A1"] + [
        f"X{i}" for i in range(n - 8)
    ]
    df["HGNC_symbol"] = names[: len(df)]
    df.to_csv(csv, index=False)
    truth = read_gene_order(csv, order="first_column")
    with torch.device("meta"):
        pass
    model = sm.create(
        "squall-tiny",
        embed_dim=32,
        depth=1,
        merge_layer_depth=1,
        num_heads=2,
        decoder_depth=1,
        genes=truth.symbols,
    )
    with torch.no_grad():
        bias = torch.zeros(n)
        for i, s in enumerate(truth.symbols):
            bias[i] = (
                3.0
                if s.startswith(("RP", "EEF", "ACTB"))
                else (-3.0 if s.startswith("OR") else 0.0)
            )
        model.decoder.increase_dim_rgb.fc2.bias.copy_(bias)
    res = sm.gene_order_diagnostics(model, csv)
    assert res["bias_gap"].idxmax() == "first_column"
    assert res.loc["first_column", "bias_gap"] == 6.0
    assert (
        res.loc["first_column", "n_ribosomal"] == 3 and res.loc["first_column", "n_olfactory"] == 3
    )
