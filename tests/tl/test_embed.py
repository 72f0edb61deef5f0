"""tl.embed: spot embeddings into obsm and the whole-slide token map (squall-tiny, 64 px tiles)."""

from __future__ import annotations

import numpy as np
import pytest
import spatialdata as sd
import torch
from spatialdata.transformations import get_transformation, set_transformation

import squall_sd as squall


@pytest.fixture
def small():
    ex = squall.datasets.example()
    spots = ex.shapes["spots"].iloc[:8].copy()
    set_transformation(spots, get_transformation(ex.shapes["spots"], get_all=True), set_all=True)
    return sd.SpatialData(images={"he": ex.images["he"]}, shapes={"spots": spots},
                          tables={"table": ex.tables["table"][:8].copy()})


def tiny():
    torch.manual_seed(0)
    return squall.models.create("squall-tiny", img_size=64, expr_size=16, genes=["ERBB2", "CD74"], mpp=4.0)


def test_embed_region_tile_and_token_map(small):
    model = tiny()
    squall.tl.embed(small, model, progress=False, token_map=True, token_stride=2)
    adata = small.tables["table"]
    emb = adata.obsm["X_squall"]
    assert emb.shape == (8, model.config.embed_dim) and np.isfinite(emb).all()
    assert adata.uns["squall"]["embed"]["params"]["token_map"] is True
    tm = small.images["squall_token_map"]
    assert tm.shape[0] == model.config.embed_dim
    m = get_transformation(tm, to_coordinate_system="microns").to_affine_matrix(("x", "y"), ("x", "y"))
    assert np.isclose(m[0, 0], 64.0)  # one pixel per 16 px token at 4 µm/px
    assert np.isfinite(np.asarray(tm.data)).all()
    tile = squall.tl.embed(small, model, progress=False, pool="tile", inplace=False, key_added="X_tile")
    assert tile.obsm["X_tile"].shape == emb.shape and not np.allclose(tile.obsm["X_tile"], emb)
    with pytest.raises(ValueError, match="already exists"):
        squall.tl.embed(small, model, progress=False)


def test_embed_errors(small):
    with pytest.raises(KeyError, match="not found"):
        squall.tl.embed(small, tiny(), shapes_key="nope", progress=False)
    with pytest.raises(ValueError, match="token_stride"):
        squall.tl.embed(small, tiny(), token_map=True, token_stride=0, progress=False)
    with pytest.raises(ValueError, match=r"Expected `mpp` to be positive"):
        squall.tl.embed(small, tiny(), mpp=0, progress=False)
