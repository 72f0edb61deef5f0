"""The SDPA implementation against an independent float64 reference written from the spec (§4)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import squall_sd.models as sm
from squall_sd.models._layers import rpb_offsets

from .conftest import micro_config, randomize_

# ------------------------------------------------------------------------------------------------
# independent reference (float64, explicit softmax, explicit index maps, no nn modules)
# ------------------------------------------------------------------------------------------------


def ln(x, P, pre, eps=1e-5):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + eps) * P[pre + ".weight"] + P[pre + ".bias"]


def lin(x, P, pre):
    y = x @ P[pre + ".weight"].T
    return y + P[pre + ".bias"] if pre + ".bias" in P else y


def gelu(x):
    return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))


def ref_offsets(n):
    g = int(math.floor(math.sqrt(n)))
    pos = [(0, 0)] * (n - g * g) + [(k % g, k // g) for k in range(g * g)]  # (x=col, y=row)
    pos = np.array(pos)
    return torch.from_numpy((pos[:, None, :] - pos[None, :, :]).astype(np.float64))


def ref_attention(x, P, pre, heads):
    b, n, d = x.shape
    hd = d // heads
    qkv = lin(x, P, pre + ".qkv").reshape(b, n, 3, heads, hd)
    q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))
    logits = q @ k.transpose(-1, -2) / math.sqrt(hd)
    delta = ref_offsets(n)
    hid = torch.relu(lin(delta, P, pre + ".relative_position_bias.mlp.0"))
    bias = lin(hid, P, pre + ".relative_position_bias.mlp.2").permute(2, 0, 1)  # (H, N, N)
    logits = logits + bias[None]
    e = torch.exp(logits - logits.max(-1, keepdim=True).values)
    attn = e / e.sum(-1, keepdim=True)
    out = (attn @ v).transpose(1, 2).reshape(b, n, d)
    return lin(out, P, pre + ".proj")


def ref_mlp(x, P, pre):
    return lin(gelu(lin(x, P, pre + ".fc1")), P, pre + ".fc2")


def patchify(img, p):
    b, c, h, w = img.shape
    g = h // p
    return img.reshape(b, c, g, p, g, p).permute(0, 2, 4, 1, 3, 5).reshape(b, g * g, c * p * p)


def ref_embed_rgb(rgb, P):
    w = P["encoder.patch_embed_rgb.proj.weight"]
    return (
        patchify(rgb, w.shape[-1]) @ w.reshape(w.shape[0], -1).T
        + P["encoder.patch_embed_rgb.proj.bias"]
    )


def ref_embed_expr(expr, P):
    w0 = P["encoder.patch_embed_expr.0.weight"][:, :, 0, 0]
    cells = (
        torch.einsum("bgyx,eg->beyx", expr, w0)
        + P["encoder.patch_embed_expr.0.bias"][None, :, None, None]
    )
    w1 = P["encoder.patch_embed_expr.1.proj.weight"]
    return (
        patchify(cells, w1.shape[-1]) @ w1.reshape(w1.shape[0], -1).T
        + P["encoder.patch_embed_expr.1.proj.bias"]
    )


def ref_pos(res, P, g):
    rows, cols = np.divmod(np.arange(g * g), g)
    coords = torch.from_numpy(np.stack([rows, cols], -1).astype(np.float64))
    coords = coords[None] * torch.as_tensor(res, dtype=torch.float64).reshape(-1, 1, 1)
    return ln(lin(coords, P, "encoder.pos_embed.pos_embed.0"), P, "encoder.pos_embed.pos_embed.1")


def ref_encoder(x, P, cfg, routes):
    """``routes``: (B, N) array of "rgb"/"expr" per token (used in the multiway blocks)."""
    routes = np.asarray(routes)
    for i in range(cfg.depth):
        pre = f"encoder.blocks.blocks.{i}"
        x = x + ref_attention(ln(x, P, pre + ".norm"), P, pre + ".attn", cfg.num_heads)
        if i < cfg.merge_layer_depth:
            y_rgb = ref_mlp(ln(x, P, pre + ".mlp.norm_rgb"), P, pre + ".mlp.mlp_rgb")
            y_expr = ref_mlp(ln(x, P, pre + ".mlp.norm_expr"), P, pre + ".mlp.mlp_expr")
            sel = torch.from_numpy(routes == "rgb")[..., None]
            x = x + torch.where(sel, y_rgb, y_expr)
        else:
            x = x + ref_mlp(ln(x, P, pre + ".mlp.norm"), P, pre + ".mlp.mlp")
    return ln(x, P, "encoder.blocks.norm")


def ref_decoder(x, P, stack, cfg):
    for j in range(cfg.decoder_depth):
        pre = f"decoder.{stack}.blocks.{j}"
        x = x + ref_attention(ln(x, P, pre + ".norm1"), P, pre + ".attn", cfg.num_heads)
        x = x + ref_mlp(ln(x, P, pre + ".norm2"), P, pre + ".mlp")
    return ln(x, P, f"decoder.{stack}.norm")


def ref_expression_head(z, P, cfg):
    """Spec §4.8 index map, written as explicit gathers: cell k <- token k // f², slice k % f²."""
    b = z.shape[0]
    f2 = cfg.expr_patch**2
    inner = cfg.expr_embed_dim
    h = torch.relu(lin(z, P, "decoder.increase_dim_rgb.fc1")).reshape(b, cfg.num_tokens, f2, inner)
    k = np.arange(cfg.expr_size**2)
    cells = h[:, k // f2, k % f2]  # (B, S*S, inner)
    out = lin(cells, P, "decoder.increase_dim_rgb.fc2")
    y, x = np.divmod(k, cfg.expr_size)
    grid = torch.zeros(b, cfg.expr_size, cfg.expr_size, out.shape[-1], dtype=out.dtype)
    grid[:, y, x] = out
    return grid


def ref_rgb_head(z, P, cfg):
    b = z.shape[0]
    p2 = cfg.patch_size**2
    o = lin(z, P, "decoder.increase_dim_expr")  # (B, N, 3 p²)
    k = np.arange(cfg.img_size**2)
    img = torch.zeros(b, cfg.img_size, cfg.img_size, 3, dtype=o.dtype)
    y, x = np.divmod(k, cfg.img_size)
    for ch in range(3):
        img[:, y, x, ch] = o[:, k // p2, 3 * (k % p2) + ch]
    return img


def smooth_l1(a, b):
    d = (a - b).abs()
    return torch.where(d < 1, 0.5 * d**2, d - 0.5).mean()


# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def setup():
    cfg = micro_config()
    model = randomize_(sm.Squall(cfg), seed=3).eval()
    P = {k: v.detach().double() for k, v in model.state_dict().items()}
    g = torch.Generator().manual_seed(5)
    rgb = torch.rand(2, 3, 224, 224, generator=g, dtype=torch.float64)
    expr = (torch.rand(2, cfg.n_genes, 56, 56, generator=g) > 0.6).double()
    res = [0.5, 4.0]
    return cfg, model, P, rgb, expr, res


def _close(fast, ref, tol):
    fast = fast.double()
    err = (fast - ref).abs().max().item()
    scale = ref.abs().max().item()
    assert err <= tol * max(scale, 1.0), f"max abs err {err:.3e} (ref scale {scale:.3e})"


def test_rpb_offsets_match_spec():
    for n in (196, 197, 392, 393, 49):
        assert torch.equal(rpb_offsets(n), ref_offsets(n).float())
    o = rpb_offsets(392)
    # fictitious 19x19 layout: the first 31 tokens sit at (0, 0); RGB/expr token 0 differ
    assert torch.all(o[:31, :31] == 0)
    assert not torch.all(o[0, 196] == 0)
    # 197 (CLS): token 0 at (0,0), token 1 at (0,0) as well (first grid cell)
    o197 = rpb_offsets(197)
    assert torch.all(o197[0, 1] == 0) and torch.equal(o197[2, 1], torch.tensor([1.0, 0.0]))
    # column difference first: token 14 (row 1, col 0) vs token 0 -> (0, 1)
    assert torch.equal(rpb_offsets(196)[14, 0], torch.tensor([0.0, 1.0]))


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-10), (torch.float32, 2e-4)])
def test_forward_rgb_to_expr_matches_reference(setup, dtype, tol):
    cfg, model, P, rgb, _, res = setup
    m = model.to(dtype)
    z_ref = ref_encoder(
        ref_embed_rgb(rgb, P) + ref_pos(res, P, cfg.grid), P, cfg, [["rgb"] * 196] * 2
    )
    e_ref = ref_expression_head(ref_decoder(z_ref, P, "decoder_rgb", cfg), P, cfg)
    with torch.no_grad():
        z = m.forward_rgb(rgb.to(dtype), res)
        e = m.forward_rgb_to_expr(rgb.to(dtype), res)
    _close(z, z_ref, tol)
    _close(e, e_ref, tol)
    model.float()


def test_forward_expr_and_all_match_reference(setup):
    cfg, model, P, rgb, expr, res = setup
    m = model.double()
    pos = ref_pos(res, P, cfg.grid)
    x_rgb = ref_embed_rgb(rgb, P) + pos
    x_expr = ref_embed_expr(expr, P) + pos
    z_expr_ref = ref_encoder(x_expr, P, cfg, [["expr"] * 196] * 2)
    z_all_ref = ref_encoder(
        torch.cat([x_rgb, x_expr], 1), P, cfg, [["rgb"] * 196 + ["expr"] * 196] * 2
    )
    e_all_ref = ref_expression_head(ref_decoder(z_all_ref[:, :196], P, "decoder_rgb", cfg), P, cfg)
    with torch.no_grad():
        _close(m.forward_expr(expr, res), z_expr_ref, 1e-10)
        _close(m.forward_all(rgb, expr, res), z_all_ref, 1e-10)
        _close(m.forward_all_to_expr(rgb, expr, res), e_all_ref, 1e-10)
    model.float()


def test_pretraining_losses_match_reference(setup):
    cfg, model, P, rgb, expr, res = setup
    m = model.double()
    g = torch.Generator().manual_seed(11)
    mask = torch.rand(2, 196, generator=g) < 0.5
    pos = ref_pos(res, P, cfg.grid)
    x = torch.where(mask[..., None], ref_embed_rgb(rgb, P), ref_embed_expr(expr, P)) + pos
    routes = np.where(mask.numpy(), "rgb", "expr")
    z = ref_encoder(x, P, cfg, routes)
    pred_expr = ref_expression_head(ref_decoder(z, P, "decoder_rgb", cfg), P, cfg)
    pred_rgb = ref_rgb_head(ref_decoder(z, P, "decoder_expr", cfg), P, cfg)
    tok = mask.reshape(2, 14, 14)
    cell_sel = tok.repeat_interleave(4, 1).repeat_interleave(4, 2)
    px_sel = ~tok.repeat_interleave(16, 1).repeat_interleave(16, 2)
    expr_loss = smooth_l1(pred_expr[cell_sel], expr.permute(0, 2, 3, 1)[cell_sel])
    rgb_loss = smooth_l1(pred_rgb[px_sel], rgb.permute(0, 2, 3, 1)[px_sel])
    with torch.no_grad():
        out = m(rgb, expr, res, mask=mask)
    assert out.rgb_loss.item() == pytest.approx(rgb_loss.item(), rel=1e-6)
    assert out.expr_loss.item() == pytest.approx(expr_loss.item(), rel=1e-6)
    # the sparse (B, S*S, G) input gives the same losses
    sparse = expr.permute(0, 2, 3, 1).reshape(2, 56 * 56, -1).to_sparse()
    with torch.no_grad():
        out2 = m(rgb, sparse, res, mask=mask)
    assert out2.expr_loss.item() == pytest.approx(expr_loss.item(), rel=1e-9)
    model.float()
