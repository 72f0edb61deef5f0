"""Fast inference: aggregation inside the forward, gene subsets, input handling."""

from __future__ import annotations

import pytest
import torch

import squall_sd.models as sm

from .conftest import micro_config, randomize_


@pytest.fixture(scope="module")
def model():
    return randomize_(sm.Squall(micro_config()), seed=7).eval()


@pytest.fixture(scope="module")
def rgb():
    return torch.rand(2, 3, 224, 224, generator=torch.Generator().manual_seed(3))


@pytest.fixture(scope="module")
def dense(model, rgb):
    with torch.no_grad():
        return model.forward_rgb_to_expr(rgb, [0.5, 1.0])


def test_predict_dense_equals_forward(model, rgb, dense):
    out = model.predict(rgb, [0.5, 1.0])
    assert out.dtype == torch.float32 and out.shape == dense.shape
    torch.testing.assert_close(out, dense, rtol=1e-5, atol=1e-5)


def test_tile_aggregation_equals_dense_then_sum(model, rgb, dense):
    torch.testing.assert_close(
        model.predict(rgb, [0.5, 1.0], aggregate="tile"), dense.sum((1, 2)), rtol=1e-4, atol=1e-3
    )
    torch.testing.assert_close(
        model.predict(rgb, [0.5, 1.0], aggregate="tile", reduce="mean"),
        dense.mean((1, 2)),
        rtol=1e-4,
        atol=1e-5,
    )


def test_region_weights_equal_dense_then_weighted_sum(model, rgb, dense):
    g = torch.Generator().manual_seed(0)
    w = torch.rand(2, 5, 56, 56, generator=g) * (torch.rand(2, 5, 56, 56, generator=g) > 0.5)
    expected = torch.einsum("brij,bijg->brg", w, dense)
    torch.testing.assert_close(
        model.predict(rgb, [0.5, 1.0], aggregate=w), expected, rtol=1e-4, atol=1e-3
    )
    mean = expected / w.sum((2, 3))[..., None]
    torch.testing.assert_close(
        model.predict(rgb, [0.5, 1.0], aggregate=w, reduce="mean"), mean, rtol=1e-4, atol=1e-4
    )
    # boolean masks shared by all tiles, e.g. spots rasterised on the grid
    masks = torch.zeros(3, 56, 56, dtype=torch.bool)
    masks[0, :10, :10] = True
    masks[1, 20:40, 5:50] = True
    masks[2] = True
    out = model.predict(rgb, [0.5, 1.0], aggregate=masks)
    expected = torch.einsum("rij,bijg->brg", masks.float(), dense)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-3)
    with pytest.raises(ValueError, match="Region weights"):
        model.predict(rgb, 0.5, aggregate=torch.ones(2, 3, 28, 28))


def test_gene_subset_equals_slicing(model, rgb, dense):
    genes = ["G5", "G0", "G17"]
    idx = [5, 0, 17]
    torch.testing.assert_close(
        model.predict(rgb, [0.5, 1.0], genes=genes), dense[..., idx], rtol=1e-5, atol=1e-5
    )
    torch.testing.assert_close(
        model.forward_rgb_to_expr(rgb, [0.5, 1.0], genes=genes).detach(),
        dense[..., idx],
        rtol=1e-5,
        atol=1e-5,
    )
    w = torch.rand(2, 4, 56, 56)
    full = model.predict(rgb, [0.5, 1.0], aggregate=w)
    sub = model.predict(rgb, [0.5, 1.0], aggregate=w, genes=idx)  # channel indices work too
    torch.testing.assert_close(sub, full[..., idx], rtol=1e-5, atol=1e-4)
    with pytest.raises(KeyError, match="not in the model vocabulary"):
        model.predict(rgb, 0.5, genes=["G5", "NOTAGENE"])


def test_input_conventions(model, rgb):
    rgb = rgb[:1]
    ref = model.predict(rgb, 0.5, aggregate="tile")
    u8 = (rgb * 255).round().to(torch.uint8)
    from_u8 = model.predict(u8.permute(0, 2, 3, 1), 0.5, aggregate="tile")  # uint8, channel last
    torch.testing.assert_close(from_u8, model.predict(u8.float() / 255, 0.5, aggregate="tile"))
    assert torch.allclose(from_u8, ref, rtol=0.05, atol=0.5)
    assert torch.equal(
        model.predict(rgb, None, aggregate="tile"), model.predict(rgb, 0.5, aggregate="tile")
    )
    assert not torch.allclose(model.predict(rgb, 4.0, aggregate="tile"), ref)  # res matters
    with pytest.raises(TypeError, match="uint8"):
        model.predict(rgb.to(torch.int32), 0.5)


def test_bf16_autocast_cpu_close(model, rgb):
    ref = model.predict(rgb, 0.5, aggregate="tile", reduce="mean")
    bf = model.predict(rgb, 0.5, aggregate="tile", reduce="mean", autocast=True)
    assert bf.dtype == torch.float32
    torch.testing.assert_close(bf, ref, rtol=0.05, atol=0.05)


def test_embed(model, rgb):
    e = model.embed(rgb, 0.5)
    assert e.shape == (2, 32)
    with torch.no_grad():
        torch.testing.assert_close(e, model.forward_rgb(rgb, 0.5).mean(1))
    assert model.embed(rgb, 0.5, pool=None).shape == (2, 196, 32)


def test_predict_runs_in_eval_mode(rgb):
    m = randomize_(sm.Squall(micro_config(drop_path_rate=0.5)), seed=1).train()
    a = m.predict(rgb[:1], 0.5, aggregate="tile")
    assert m.training  # restored
    m.eval()
    torch.testing.assert_close(a, m.predict(rgb[:1], 0.5, aggregate="tile"))


def test_channel_indices_without_vocabulary(rgb):
    import numpy as np

    m = randomize_(sm.Squall(micro_config(genes=None, n_genes=24)), seed=2).eval()
    assert m.genes is None
    out = m.predict(rgb[:1], 0.5, aggregate="tile", genes=np.array([3, 1]))
    full = m.predict(rgb[:1], 0.5, aggregate="tile")
    torch.testing.assert_close(out, full[:, [3, 1]])
    with pytest.raises(KeyError, match="no gene vocabulary"):
        m.predict(rgb[:1], 0.5, genes=["ERBB2"])


def test_predict_dense_genes_from_one_forward(model, rgb, dense):
    g = torch.Generator().manual_seed(5)
    w = torch.rand(2, 4, 56, 56, generator=g)
    agg, dmap = model.predict(rgb, [0.5, 1.0], aggregate=w, dense_genes=[3, 0])
    torch.testing.assert_close(agg, model.predict(rgb, [0.5, 1.0], aggregate=w))
    assert dmap.dtype == torch.float32 and dmap.shape == (2, 56, 56, 2)
    torch.testing.assert_close(dmap, dense[..., [3, 0]], rtol=1e-5, atol=1e-5)
    # with a gene subset for the aggregate, with "tile", and with the dense grid itself
    sub, dmap2 = model.predict(rgb, [0.5, 1.0], aggregate=w, genes=[1], dense_genes=[3, 0], reduce="mean")
    torch.testing.assert_close(sub, model.predict(rgb, [0.5, 1.0], aggregate=w, genes=[1], reduce="mean"))
    torch.testing.assert_close(dmap2, dmap)
    tile, _ = model.predict(rgb, [0.5, 1.0], aggregate="tile", dense_genes=[0])
    torch.testing.assert_close(tile, model.predict(rgb, [0.5, 1.0], aggregate="tile"))
    full, dmap3 = model.predict(rgb, [0.5, 1.0], dense_genes=[2])
    torch.testing.assert_close(full, dense, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dmap3, dense[..., [2]], rtol=1e-5, atol=1e-5)


def test_attention_bias_cache_follows_weights(rgb):
    m = randomize_(sm.Squall(micro_config()), seed=11).eval()
    a = m.predict(rgb[:1], 0.5, aggregate="tile")
    assert torch.equal(a, m.predict(rgb[:1], 0.5, aggregate="tile"))  # cached bias: same result
    with torch.no_grad():  # an in-place update (as an optimiser step) invalidates the cache
        m.encoder.blocks.blocks[0].attn.relative_position_bias.mlp[2].weight.mul_(3.0)
    b = m.predict(rgb[:1], 0.5, aggregate="tile")
    assert not torch.allclose(a, b)
    fresh = randomize_(sm.Squall(micro_config()), seed=11).eval()
    with torch.no_grad():
        fresh.encoder.blocks.blocks[0].attn.relative_position_bias.mlp[2].weight.mul_(3.0)
    torch.testing.assert_close(b, fresh.predict(rgb[:1], 0.5, aggregate="tile"))
    # training (with gradients) never uses the cache: the bias gets gradients
    m.train()
    z = m.forward_rgb(rgb[:1], 0.5)
    z.sum().backward()
    assert m.encoder.blocks.blocks[0].attn.relative_position_bias.mlp[0].weight.grad is not None


def test_sparse_region_weights_equal_dense(model, rgb):
    g = torch.Generator().manual_seed(9)
    w = torch.rand(2, 6, 56, 56, generator=g) * (torch.rand(2, 6, 56, 56, generator=g) > 0.9)
    for reduce in ("sum", "mean"):
        dense = model.predict(rgb, [0.5, 1.0], aggregate=w, reduce=reduce, genes=[4, 1])
        sparse = model.predict(rgb, [0.5, 1.0], aggregate=w.to_sparse(), reduce=reduce, genes=[4, 1])
        torch.testing.assert_close(sparse, dense, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="Region weights must have shape"):
        model.predict(rgb, 0.5, aggregate=torch.ones(2, 3, 28, 28).to_sparse())


def test_tta_averages_the_eight_views_turned_back(model, rgb):
    """``tta=True`` = the mean of the dense predictions of the 8 rotated / mirrored tiles, each turned back
    cell by cell; so it is exactly equivariant, and aggregation, gene subsets and dense maps follow it."""
    res = [0.5, 1.0]
    views = []
    for flip in (False, True):
        for k in range(4):
            x = torch.rot90(rgb, k, (2, 3))
            x = torch.flip(x, (3,)) if flip else x
            d = model.predict(x, res)
            d = torch.flip(d, (2,)) if flip else d
            views.append(torch.rot90(d, -k, (1, 2)))
    expect = torch.stack(views).mean(0)
    got = model.predict(rgb, res, tta=True)
    torch.testing.assert_close(got, expect, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got, views[0], atol=1e-3)  # the views do differ
    # a rotated tile gives the rotated prediction
    turned = model.predict(torch.rot90(rgb, 1, (2, 3)), res, tta=True)
    torch.testing.assert_close(turned, torch.rot90(got, 1, (1, 2)), rtol=1e-5, atol=1e-5)
    # region aggregation, gene subsets and dense maps from the same averaged features
    s = got.shape[1]
    w = torch.zeros(2, 2, s, s)
    w[:, 0, : s // 2] = 1.0
    w[:, 1, :, : s // 3] = 0.5
    agg, dense = model.predict(rgb, res, aggregate=w, genes=[1, 3], dense_genes=[2], tta=True)
    torch.testing.assert_close(agg, torch.einsum("brij,bijg->brg", w, got[..., [1, 3]]), rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(dense, got[..., [2]], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="square tiles"):
        model.predict(rgb[..., :200], res, tta=True)
