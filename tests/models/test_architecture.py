"""Published layout, registry, configs, output index maps (§4.8) and training behaviour."""

from __future__ import annotations

import pytest
import torch

import squall_sd.models as sm

from .conftest import GENES, micro_config, randomize_

N_PARAMS_555M = 555_415_949


def _meta(name: str, **kw) -> sm.Squall:
    with torch.device("meta"):
        return sm.create(name, **kw)


def test_555m_matches_manifest(manifest):
    model = _meta("squall-555m")
    got = [(k, tuple(v.shape)) for k, v in model.state_dict().items()]
    assert len(manifest) == 598
    assert got == manifest  # names, shapes and registration order
    assert sum(p.numel() for p in model.parameters()) == N_PARAMS_555M
    assert list(model.buffers()) == []


def test_manifest_copy_equals_shared(manifest, manifest_shared):
    assert manifest == manifest_shared


def test_555m_path_subtotals():
    model = _meta("squall-555m")
    enc = model.encoder
    n = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert n(enc) == 445_621_632
    # forward_rgb path: no expression-only parameters
    expr_only = n(enc.patch_embed_expr) + sum(
        n(b.mlp.mlp_expr) + n(b.mlp.norm_expr) for b in enc.blocks.blocks[:16]
    )
    assert n(enc) - expr_only == 303_059_840
    assert (
        n(enc) - expr_only + n(model.decoder.decoder_rgb) + n(model.decoder.increase_dim_rgb)
        == 361_687_373
    )


def test_registry_and_configs():
    names = sm.list_models()
    assert {"squall-555m", "squall-base", "squall-small", "squall-tiny"} <= set(names)
    tiny = sm.list_models("squall-t*")
    assert "squall-tiny" in tiny and all(n.startswith("squall-t") for n in tiny)
    cfg = sm.get_config("squall-555m")
    assert (cfg.grid, cfg.expr_patch, cfg.expr_embed_dim, cfg.n_genes) == (14, 4, 256, 15757)
    assert cfg.mpp == 0.5 and cfg.input_range == "0-1" and cfg.norm_eps == 1e-5 and not cfg.qkv_bias
    m = _meta("squall-tiny", genes=["A", "B", "C"])
    assert m.n_genes == 3 and m.genes == ["A", "B", "C"]
    assert m.decoder.increase_dim_rgb.fc2.weight.shape == (3, 32)
    with pytest.raises(KeyError, match="not found"):
        sm.create("squall-huge")
    with pytest.raises(TypeError, match="Unknown SquallConfig field"):
        sm.create("squall-tiny", widht=3)
    with pytest.raises(ValueError, match="duplicate"):
        sm.get_config("squall-tiny", genes=["A", "A"])
    with pytest.raises(ValueError, match="multiple"):
        sm.get_config("squall-tiny", img_size=220)
    d = sm.get_config("squall-tiny", genes=["A"]).to_dict(include_genes=True)
    assert sm.SquallConfig.from_dict(d) == sm.get_config("squall-tiny", genes=["A"])


@pytest.mark.parametrize("name", ["squall-base", "squall-small"])
def test_larger_configs_shapes(name):
    m = _meta(name)
    c = m.config
    assert m.encoder.patch_embed_rgb.proj.weight.shape == (c.embed_dim, 3, 16, 16)
    assert m.decoder.increase_dim_rgb.fc2.weight.shape == (15757, c.embed_dim // 4)
    assert m.decoder.increase_dim_rgb.fc1.weight.shape == (4 * c.embed_dim, c.embed_dim)
    assert (
        len(m.encoder.blocks.blocks) == c.depth
        and len(m.decoder.decoder_rgb.blocks) == c.decoder_depth
    )
    assert hasattr(m.encoder.blocks.blocks[c.merge_layer_depth - 1].mlp, "mlp_rgb")
    assert hasattr(m.encoder.blocks.blocks[c.merge_layer_depth].mlp, "mlp")


def test_tiny_forward_shapes_and_no_nan(tiles):
    torch.manual_seed(0)
    m = sm.create("squall-tiny", init="trunc_normal").eval()
    with torch.no_grad():
        e = m.forward_rgb_to_expr(tiles, 0.5)
        z = m.forward_rgb(tiles.permute(0, 2, 3, 1), [0.5, 4.0])  # channel last accepted
    assert e.shape == (2, 56, 56, 256) and z.shape == (2, 196, 128)
    assert torch.isfinite(e).all() and torch.isfinite(z).all()
    with pytest.raises(ValueError, match="224"):
        m.forward_rgb(torch.rand(1, 3, 112, 112))
    with pytest.raises(ValueError, match="res"):
        m.forward_rgb(tiles, [0.5, 0.5, 0.5])


def test_expression_head_index_map_one_hot():
    """A token-t probe lands in cells k with k // 16 == t, carrying fc1 slice k % 16 (§4.8)."""
    cfg = micro_config()
    head = sm.Squall(cfg).decoder.increase_dim_rgb
    inner, f2 = cfg.expr_embed_dim, cfg.expr_patch**2
    with torch.no_grad():
        head.fc1.weight.zero_()
        head.fc1.bias.zero_()
        head.fc1.weight[:, 0] = (
            torch.arange(inner * f2, dtype=torch.float32) + 1
        )  # marker = feature index + 1
        head.fc2.weight.zero_()
        head.fc2.bias.zero_()
        head.fc2.weight[0, 0] = 1.0  # channel 0 reads element 0 of the cell's slice
        for t in (0, 3, 13, 14, 100, 195):
            x = torch.zeros(1, 196, cfg.embed_dim)
            x[0, t, 0] = 1.0
            out = head(x)[0, :, :, 0]
            k = torch.arange(56 * 56).reshape(56, 56)
            expected = torch.where(k // f2 == t, (inner * (k % f2) + 1).float(), torch.zeros(()))
            assert torch.equal(out, expected), t
        # spec examples: token 0 fills (0, 0..15); token 3 fills (0, 48..55) and (1, 0..7)
        x = torch.zeros(1, 196, cfg.embed_dim)
        x[0, 3, 0] = 1.0
        nz = head(x)[0, :, :, 0].nonzero().tolist()
        assert nz == [[0, c] for c in range(48, 56)] + [[1, c] for c in range(8)]


def test_rgb_head_index_map_one_hot():
    """Pixel (y, x, ch), k = 224 y + x, comes from token k // 256, output 3 (k % 256) + ch."""
    cfg = micro_config()
    dec = sm.Squall(cfg).decoder
    with torch.no_grad():
        dec.increase_dim_expr.weight.zero_()
        dec.increase_dim_expr.bias.zero_()
        dec.increase_dim_expr.weight[:, 0] = torch.arange(768, dtype=torch.float32) + 1
        k = torch.arange(224 * 224).reshape(224, 224)
        for t in (0, 1, 15, 195):
            x = torch.zeros(1, 196, cfg.embed_dim)
            x[0, t, 0] = 1.0
            img = dec.rgb_head(x)[0]
            for ch in range(3):
                expected = torch.where(
                    k // 256 == t, (3 * (k % 256) + ch + 1).float(), torch.zeros(())
                )
                assert torch.equal(img[..., ch], expected), (t, ch)
        # token row r covers pixel rows 16r..16r+15
        x = torch.zeros(1, 196, cfg.embed_dim)
        x[0, 14 * 2 + 5, 0] = 1.0
        rows = dec.rgb_head(x)[0].abs().sum(dim=(1, 2)).nonzero().flatten()
        assert rows.min() >= 32 and rows.max() <= 47


def test_multiway_routing_uses_the_right_mlps(tiles, expr_grid):
    m = randomize_(sm.Squall(micro_config())).eval()
    with torch.no_grad():
        z_rgb = m.forward_rgb(tiles)
        # perturbing the expression MLPs must not change forward_rgb, but must change forward_expr
        z_expr = m.forward_expr(expr_grid)
        for blk in m.encoder.blocks.blocks[: m.config.merge_layer_depth]:
            blk.mlp.mlp_expr.fc2.bias.add_(1.0)
        assert torch.equal(m.forward_rgb(tiles), z_rgb)
        assert not torch.allclose(m.forward_expr(expr_grid), z_expr)


def test_pretraining_backward_and_drop_path(tiles, expr_grid):
    torch.manual_seed(0)
    m = sm.Squall(micro_config(drop_path_rate=0.2, init="trunc_normal")).train()
    assert m.encoder.blocks.blocks[-1].drop_path.p == pytest.approx(0.2)
    assert m.encoder.blocks.blocks[0].drop_path.__class__.__name__ == "Identity"
    out = m(tiles, expr_grid, 0.5, generator=torch.Generator().manual_seed(0))
    rgb_loss, expr_loss = out
    (rgb_loss + expr_loss).backward()
    missing = [n for n, p in m.named_parameters() if p.grad is None]
    assert missing == []
    rpb = m.encoder.blocks.blocks[0].attn.relative_position_bias.mlp[0].weight.grad
    assert rpb.abs().sum() > 0
    # a mask with only RGB tokens gives a zero (but differentiable) RGB loss
    out = m(tiles, expr_grid, 0.5, mask=torch.ones(2, 196, dtype=torch.bool))
    assert out.rgb_loss.item() == 0.0 and out.rgb_loss.requires_grad


def test_inference_then_training_reuses_cached_offsets(tiles, expr_grid):
    m = sm.Squall(micro_config())
    m.predict(tiles, aggregate="tile")  # populates the offset cache under inference_mode
    loss = sum(m(tiles, expr_grid, 0.5))
    loss.backward()


def test_genes_default_from_config():
    m = sm.Squall(micro_config())
    assert m.genes == GENES
    assert m.gene_index(["G3", "G0"]) == [3, 0]
    with pytest.raises(KeyError, match="not in the model vocabulary"):
        m.gene_index(["NOPE"])
