"""Saving/loading: squall-sd folders, official checkpoint layouts (§3), errors, Hub, bundled."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import pytest
import torch

import squall_sd.models as sm
from squall_sd.models import _registry

from .conftest import GENES, micro_config, randomize_


@pytest.fixture(scope="module")
def model():
    return randomize_(sm.Squall(micro_config()), seed=4).eval()


@pytest.fixture(scope="module")
def official_state(model):
    """A random state dict in the official layout (what the published .pth holds)."""
    return {k: v.clone() for k, v in model.state_dict().items()}


def _assert_same(a: sm.Squall, b: sm.Squall) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k


def test_save_load_round_trip_bit_exact(model, tmp_path):
    out = model.save_pretrained(tmp_path / "m")
    files = sorted(p.name for p in out.iterdir())
    assert files == ["config.json", "genes.txt", "model.safetensors", "model.safetensors.sha256"]
    meta = json.loads((out / "config.json").read_text())
    assert meta["format"] == "squall-sd" and len(meta["weights_sha256"]) == 64
    assert (out / "genes.txt").read_text().split() == GENES
    loaded = sm.load(out)
    _assert_same(model, loaded)
    assert loaded.genes == GENES and loaded.config == model.config
    assert loaded.weights_sha256 == meta["weights_sha256"] == model.weights_sha256
    assert not loaded.training
    x = torch.rand(1, 3, 224, 224)
    assert torch.equal(model.predict(x, 0.5, aggregate="tile"), loaded.predict(x, 0.5, aggregate="tile"))
    # loading the safetensors file itself works too; saving again needs overwrite=True
    _assert_same(model, sm.load(out / "model.safetensors"))
    with pytest.raises(FileExistsError, match="overwrite"):
        model.save_pretrained(out)
    model.save_pretrained(out, overwrite=True)


def test_read_config_of_a_folder(model, tmp_path):
    out = model.save_pretrained(tmp_path / "m")
    cfg = sm.read_config(out)
    assert cfg == model.config and cfg.genes == tuple(GENES)
    assert sm.read_config(out) == sm.load(out).config
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "config.json").write_text(json.dumps(model.config.to_dict(include_genes=False)))
    assert sm.read_config(bare) == model.config.replace(genes=None)
    with pytest.raises(FileNotFoundError, match="is not a model folder: it has no config.json"):
        sm.read_config(tmp_path)


def test_corrupt_directory(model, tmp_path):
    out = model.save_pretrained(tmp_path / "m")
    w = out / "model.safetensors"
    data = w.read_bytes()
    w.write_bytes(data[: len(data) // 2])
    with pytest.raises(sm.CheckpointError, match="corrupt"):
        sm.load(out)
    with pytest.raises(sm.CheckpointError, match="truncated"):
        sm.load(out, verify=False)
    (out / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="not a squall-sd model directory"):
        sm.load(out)


@pytest.mark.parametrize("layout", ["bare", "base_model", "state_dict", "model", "module_prefix", "fp16"])
def test_official_layouts_load_strictly(model, official_state, tmp_path, layout):
    state = dict(official_state)
    if layout == "module_prefix":
        obj = {"base_model": {"module." + k: v for k, v in state.items()}, "epoch": 3}
    elif layout == "fp16":
        obj = {k: v.half() for k, v in state.items()}
    elif layout == "bare":
        obj = state
    elif layout == "base_model":  # training format, with optimizer state etc.
        obj = {
            "base_model": state,
            "optimizer": {"state": {}, "param_groups": []},
            "epoch": 7,
            "metrics": 0.1,
        }
    else:
        obj = {layout: state}
    path = tmp_path / "SQUALL_test.pth"
    torch.save(obj, path)
    genes_txt = tmp_path / "genes.txt"
    genes_txt.write_text("\n".join(GENES) + "\n")
    loaded = sm.load(path, genes_file=genes_txt)
    cfg = loaded.config
    ref = model.config
    for f in (
        "embed_dim",
        "depth",
        "merge_layer_depth",
        "num_heads",
        "decoder_depth",
        "rpb_hidden",
        "n_genes",
        "mlp_ratio",
        "expr_size",
        "patch_size",
        "qkv_bias",
    ):
        assert getattr(cfg, f) == getattr(ref, f), f
    if layout == "fp16":
        for k, v in loaded.state_dict().items():
            assert v.dtype == torch.float32 and torch.equal(v, official_state[k].half().float())
    else:
        _assert_same(model, loaded)
    assert loaded.genes == GENES
    assert loaded.weights_source == str(path) and len(loaded.weights_sha256) == 64


def test_official_555m_layout_inferred(manifest):
    state = {k: torch.empty(s, device="meta") for k, s in manifest}
    cfg = sm.config_from_state_dict(state)
    assert cfg.name == "squall-555m"
    assert cfg == sm.get_config("squall-555m").replace(name=cfg.name, description=cfg.description, licence=cfg.licence)


def test_mismatched_checkpoints_fail_clearly(official_state, tmp_path):
    def _save(obj, name="bad.pth"):
        p = tmp_path / name
        torch.save(obj, p)
        return p

    missing = dict(official_state)
    del missing["decoder.increase_dim_expr.bias"]
    with pytest.raises(sm.CheckpointError, match=r"1 missing key\(s\):\n    decoder.increase_dim_expr.bias"):
        sm.load(_save(missing))

    extra = dict(official_state)
    extra["encoder.blocks.blocks.0.attn.qkv.bias"] = torch.zeros(96)
    extra["decoder.something_else"] = torch.zeros(3)
    with pytest.raises(sm.CheckpointError, match=r"unexpected key\(s\)"):
        sm.load(_save(extra))

    wrong = dict(official_state)
    wrong["decoder.increase_dim_expr.weight"] = torch.zeros(767, 32)
    with pytest.raises(
        sm.CheckpointError,
        match=r"(?s)shape mismatch.*increase_dim_expr.weight: checkpoint \(767, 32\)",
    ):
        sm.load(_save(wrong))

    backbone = {k[len("encoder.") :]: v for k, v in official_state.items() if k.startswith("encoder.")}
    with pytest.raises(sm.CheckpointError, match="backbone-only"):
        sm.load(_save(backbone))

    with pytest.raises(sm.CheckpointError, match="wrong model"):
        sm.load(
            _save(
                {
                    **official_state,
                    "encoder.blocks.blocks.0.attn.lookup_table_weight": torch.zeros(3),
                }
            )
        )

    with pytest.raises(sm.CheckpointError, match="not a state dict"):
        sm.load(_save([1, 2, 3]))

    with pytest.raises(ValueError, match="lists 3 genes, but the weights have 24"):
        g = tmp_path / "g.txt"
        g.write_text("A\nB\nC\n")
        sm.load(_save(official_state, "ok.pth"), genes_file=g)


def test_truncated_official_file(official_state, tmp_path):
    p = tmp_path / "SQUALL_full.pth"
    torch.save(official_state, p)
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 3])
    with pytest.raises(sm.CheckpointError, match="truncated, corrupt, or not a PyTorch file"):
        sm.load(p)
    p.write_bytes(b"")
    with pytest.raises(sm.CheckpointError, match="empty"):
        sm.load(p)


class TrainingMetrics:
    """An arbitrary Python object, as some training-format checkpoints hold."""


def test_untrusted_pickle_needs_opt_in(official_state, tmp_path):
    p = tmp_path / "train.pth"
    torch.save({"base_model": official_state, "metrics": TrainingMetrics()}, p)
    with pytest.raises(sm.CheckpointError, match="trust_checkpoint=True"):
        sm.load(p)
    assert sm.load(p, trust_checkpoint=True).n_genes == 24


def test_registered_name_without_weights_and_unknown_name():
    with pytest.raises(FileNotFoundError, match="no bundled weights.*huggingface.co/zongxu/SQUALL"):
        sm.load("squall-555m")
    with pytest.raises(FileNotFoundError, match="no bundled weights"):
        sm.load("squall-tiny")
    with pytest.raises(FileNotFoundError, match="neither a file"):
        sm.load("no-such-model")


def test_bundled_lookup_is_generic(model, tmp_path, monkeypatch):
    monkeypatch.setattr(_registry, "WEIGHTS_DIR", tmp_path)
    assert sm.list_models(pretrained=True) == []
    model.save_pretrained(tmp_path / "squall-micro-demo")
    assert sm.list_models(pretrained=True) == ["squall-micro-demo"]
    assert "squall-micro-demo" in sm.list_models()
    loaded = sm.load("squall-micro-demo")
    _assert_same(model, loaded)
    assert loaded.weights_source == "squall-micro-demo"
    assert sm.create("squall-micro-demo").n_genes == model.n_genes  # same architecture, fresh weights


def test_huggingface_paths(model, official_state, tmp_path, monkeypatch):
    local = tmp_path / "hub"
    model.save_pretrained(local / "dir")
    torch.save({"base_model": official_state}, local / "SQUALL_full.pth")
    calls = []

    def hf_hub_download(repo_id, filename, **kw):
        calls.append(("file", repo_id, filename, kw))
        return str(local / filename)

    def snapshot_download(repo_id, allow_patterns=None, **kw):
        calls.append(("snapshot", repo_id, tuple(allow_patterns), kw))
        return str(local / "dir")

    fake = types.ModuleType("huggingface_hub")
    fake.hf_hub_download = hf_hub_download
    fake.snapshot_download = snapshot_download
    monkeypatch.setitem(sys.modules, "huggingface_hub", fake)
    a = sm.load("hf://zongxu/SQUALL/SQUALL_full.pth", hub_kwargs={"revision": "main"})
    _assert_same(model, a)
    b = sm.load("hf://someone/squall-tiny-demo")
    _assert_same(model, b)
    assert calls[0] == ("file", "zongxu/SQUALL", "SQUALL_full.pth", {"revision": "main"})
    assert calls[1][0] == "snapshot" and "model.safetensors" in calls[1][2]
    with pytest.raises(ValueError, match="hf://owner/repo"):
        sm.load("hf://justone")
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)
    with pytest.raises(ImportError, match=r"squall-sd\[hub\]"):
        sm.load("hf://zongxu/SQUALL/SQUALL_full.pth")


def test_official_with_homolog_table(model, official_state, tmp_path):
    """The official gene-order CSV names the channels (first column = channel, by default)."""
    from .test_genes import write_homolog_csv

    csv = write_homolog_csv(tmp_path / "gene_token_homologs.csv", n=24)
    p = tmp_path / "SQUALL_full.pth"
    torch.save(official_state, p)
    m = sm.load(p, genes_file=csv)
    assert m.genes[0] == "HG0" and m.vocabulary.mouse_symbols[0] == "Mg0"
    m_row = sm.load(p, genes_file=csv, gene_order="row")
    assert m_row.genes != m.genes and sorted(m_row.genes) == sorted(m.genes)
    # save -> load keeps ids and mouse orthologs (genes.tsv)
    out = m.save_pretrained(tmp_path / "converted")
    assert (out / "genes.tsv").is_file()
    again = sm.load(out)
    assert again.vocabulary == m.vocabulary
    assert again.gene_index(["ENSG00000000003", "Mg5"]) == m.gene_index(["HG3", "HG5"])
    assert Path(out / "genes.txt").read_text().split() == m.genes
