"""tl.predict_expression: geometry, outputs, real data and bad input (squall-tiny, 64 px tiles, few spots)."""

from __future__ import annotations

import numpy as np
import pytest
import spatialdata as sd
import torch
from PIL import Image
from spatialdata.transformations import Affine, Identity, get_transformation

import squall_sd as squall
from squall_sd.datasets._datasets import _bundle_dir
from squall_sd.io._common import image_element, make_sdata, microns_scale, set_attrs

N_SPOTS = 12


def tiny(genes, *, mpp=2.0, img_size=64, seed=0):
    """squall-tiny with 64 px tiles (4 x 4 tokens, 16 x 16 grid), fixed weights."""
    torch.manual_seed(seed)
    expr = img_size // 4
    return squall.models.create("squall-tiny", img_size=img_size, expr_size=expr, genes=list(genes), mpp=mpp)


@pytest.fixture(scope="module")
def example_full():
    return squall.datasets.example()


@pytest.fixture
def small(example_full):
    """The bundled example reduced to its first spots (shapes and table), image kept."""
    s = example_full
    table = s.tables["table"][:N_SPOTS].copy()
    spots = s.shapes["spots"].iloc[:N_SPOTS].copy()
    from spatialdata.transformations import set_transformation

    set_transformation(spots, get_transformation(s.shapes["spots"], get_all=True), set_all=True)
    out = sd.SpatialData(images={"he": s.images["he"]}, shapes={"spots": spots}, tables={"table": table})
    out.attrs.update(s.attrs)
    return out


@pytest.fixture(scope="module")
def genes(example_full):
    return list(example_full.tables["table"].var_names[:20]) + [f"NOTINDATA{i}" for i in range(4)]


def _full_res(sdata):
    return np.asarray(sdata.images["he"]["scale0"]["image"].data.compute())


def _with_image(sdata, cyx, transformation):
    img = image_element(cyx, {"microns": transformation})
    return sd.SpatialData(
        images={"he": img},
        shapes={"spots": sdata.shapes["spots"]},
        tables={"table": sdata.tables["table"].copy()},
    )


def test_no_keys_needed_and_outputs(small, genes):
    model = tiny(genes)
    squall.tl.predict_expression(small, model, progress=False)
    adata = small.tables["table"]
    layer = adata.layers["squall"]
    assert layer.shape == adata.shape and layer.dtype == np.float32
    pred = adata.var["squall_predicted"].to_numpy()
    assert pred.sum() == 20 and list(adata.var_names[pred]) == genes[:20]
    assert np.isfinite(layer[:, pred]).all() and np.isnan(layer[:, ~pred]).all()
    prov = adata.uns["squall"]["predict_expression"]
    assert prov["model"] == "squall-tiny" and prov["squall_sd_version"] == squall.__version__
    assert "weights_sha256" in prov and prov["params"]["mpp"] == 2.0
    # nothing is overwritten without overwrite=True
    with pytest.raises(ValueError, match="already exists.*overwrite=True"):
        squall.tl.predict_expression(small, model, progress=False)
    # inplace=False returns the table and leaves sdata alone
    before = layer.copy()
    out = squall.tl.predict_expression(small, model, progress=False, inplace=False, key_added="other")
    assert "other" in out.layers and "other" not in adata.layers
    np.testing.assert_array_equal(out.layers["other"], before)


def test_geometry_mark_changes_only_that_spot(small, genes):
    """A black square painted at one spot changes that spot's prediction only (others bit-identical)."""
    model = tiny(genes, mpp=2.0)  # 128 µm tiles, spots 200 µm apart: one tile per spot
    ref = squall.tl.predict_expression(small, model, progress=False, inplace=False, layout="shapes")
    arr = _full_res(small).copy()
    mpp = squall.io.get_mpp(small)
    k = 5
    cx, cy = squall.pp._utils.centers_from(small, "spots")[k] / mpp
    arr[:, int(cy) - 8 : int(cy) + 8, int(cx) - 8 : int(cx) + 8] = 0
    marked = _with_image(small, arr, microns_scale(mpp))
    got = squall.tl.predict_expression(marked, model, progress=False, inplace=False, layout="shapes")
    a, b = ref.layers["squall"], got.layers["squall"]
    pred = ref.var["squall_predicted"].to_numpy()
    changed = np.flatnonzero(np.any(a[:, pred] != b[:, pred], axis=1))
    assert changed.tolist() == [k]


def test_geometry_tiling_layout(small, genes):
    """With a tiling, a mark changes only the spots of the tiles that see it; spots keep their values."""
    model = tiny(genes, mpp=4.0, img_size=128)  # 512 µm tiles, 1-token (64 µm) margins
    arr = _full_res(small).copy()
    mpp = squall.io.get_mpp(small)
    # same pyramid for both runs (the model reads the 4 µm/px level)
    ref = squall.tl.predict_expression(_with_image(small, arr, microns_scale(mpp)), model, progress=False,
                                       inplace=False, layout="tiles")
    assert ref.uns["squall"]["predict_expression"]["params"]["layout"] == "tiles"
    assert ref.uns["squall"]["predict_expression"]["params"]["n_tiles"] < N_SPOTS
    centers = squall.pp._utils.centers_from(small, "spots")
    k = 5
    cx, cy = centers[k] / mpp
    arr[:, int(cy) - 8 : int(cy) + 8, int(cx) - 8 : int(cx) + 8] = 0
    got = squall.tl.predict_expression(_with_image(small, arr, microns_scale(mpp)), model, progress=False,
                                       inplace=False, layout="tiles")
    pred = ref.var["squall_predicted"].to_numpy()
    a, b = ref.layers["squall"][:, pred], got.layers["squall"][:, pred]
    changed = set(np.flatnonzero(np.any(a != b, axis=1)))
    assert k in changed
    # spots whose tile (core 384 µm, margin 64 µm) does not contain the mark are bit-identical
    core = 512 - 2 * 64
    owner = np.floor(centers / core)
    tile_lo = owner * core - 64
    sees = np.all((centers[k] >= tile_lo - 20) & (centers[k] <= tile_lo + 512 + 20), axis=1)
    assert changed <= set(np.flatnonzero(sees))


@pytest.mark.parametrize("how", ["rot90", "flip"])
def test_rotated_slide_keeps_predictions_on_tissue(small, genes, how):
    model = tiny(genes, mpp=2.0)
    ref = squall.tl.predict_expression(small, model, progress=False, inplace=False, layout="shapes")
    arr = _full_res(small)
    mpp = squall.io.get_mpp(small)
    w = arr.shape[2]
    if how == "rot90":
        new = np.ascontiguousarray(np.rot90(arr, k=1, axes=(1, 2)))  # new[i, j] = old[j, W-1-i]
        m = [[0, -mpp, mpp * w], [mpp, 0, 0], [0, 0, 1]]
    else:
        new = np.ascontiguousarray(arr[:, :, ::-1])
        m = [[-mpp, 0, mpp * w], [0, mpp, 0], [0, 0, 1]]
    t = Affine(np.array(m, dtype=float), input_axes=("x", "y"), output_axes=("x", "y"))
    got = squall.tl.predict_expression(_with_image(small, new, t), model, progress=False, inplace=False,
                                       layout="shapes")
    pred = ref.var["squall_predicted"].to_numpy()
    np.testing.assert_allclose(got.layers["squall"][:, pred], ref.layers["squall"][:, pred], rtol=2e-3, atol=2e-3)


def test_dense_maps_and_backed_store(small, genes, tmp_path):
    model = tiny(genes, mpp=4.0)
    path = tmp_path / "s.zarr"
    small.write(path)
    backed = sd.read_zarr(path)
    squall.tl.predict_expression(backed, model, progress=False, dense_genes=genes[:2])
    dense = backed.images["squall_dense"]
    assert dense.shape[0] == 2 and list(dense.coords["c"].values) == genes[:2]
    t = get_transformation(dense, to_coordinate_system="microns")
    m = t.to_affine_matrix(input_axes=("x", "y"), output_axes=("x", "y"))
    assert np.isclose(m[0, 0], 16.0)  # 4 px cells at 4 µm/px
    assert np.isfinite(np.asarray(dense.data)).any()
    back = sd.read_zarr(path)
    assert "squall_dense" in back.images and "squall" in back.tables["table"].layers


def test_failure_mid_run_leaves_sdata_and_store(small, genes, tmp_path, monkeypatch):
    model = tiny(genes, mpp=2.0)
    path = tmp_path / "s.zarr"
    small.write(path)
    backed = sd.read_zarr(path)
    calls = {"n": 0}
    orig = model.predict

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("boom")
        return orig(*args, **kwargs)

    monkeypatch.setattr(model, "predict", flaky)
    on_disk = sorted(backed.elements_paths_on_disk())
    with pytest.raises(RuntimeError, match="boom"):
        squall.tl.predict_expression(backed, model, progress=False, batch_size=4, spots=None)
    assert calls["n"] == 2
    assert "squall" not in backed.tables["table"].layers
    assert "squall_predicted" not in backed.tables["table"].var
    assert sorted(sd.read_zarr(path).elements_paths_on_disk()) == on_disk
    assert "squall" not in sd.read_zarr(path).tables["table"].layers


def test_he_only_virtual_spots_and_new_table(genes):
    with Image.open(_bundle_dir() / "he.jpg") as im:
        crop = np.asarray(im.convert("RGB"))[1200:1700, 1200:1700]
    sdata = make_sdata(image=image_element(crop, {"microns": microns_scale(2.0)}))
    set_attrs(sdata, mpp=2.0, technology="he")
    model = tiny(genes, mpp=4.0)
    squall.tl.predict_expression(sdata, model, progress=False, spot_size_um=100)
    assert {"squall_spots", "he_tissue"} <= set(sdata.shapes)
    adata = sdata.tables["squall_expression"]
    assert adata.n_obs == len(sdata.shapes["squall_spots"]) > 0
    assert list(adata.var_names) == genes and np.isfinite(adata.X).all()
    assert adata.uns["spatialdata_attrs"]["region"] == "squall_spots"
    sd.SpatialData.validate_table_in_spatialdata(sdata, adata)


# ------------------------------------------------------------------------------------- bad input
def test_errors(small, genes):
    model = tiny(genes)
    with pytest.raises(KeyError, match=r"Shapes 'nope' not found.*\['spots'\]"):
        squall.tl.predict_expression(small, model, shapes_key="nope", progress=False)
    with pytest.raises(KeyError, match=r"Image 'nope' not found.*\['he'\]"):
        squall.tl.predict_expression(small, model, image_key="nope", progress=False)
    with pytest.raises(KeyError, match="Table 'nope' not found"):
        squall.tl.predict_expression(small, model, table_key="nope", progress=False)
    # no gene overlap
    with pytest.raises(ValueError, match="No gene of table 'table'.*is predicted by model"):
        squall.tl.predict_expression(small, tiny(["FOO1", "FOO2"]), progress=False)
    # model much finer than the image (0.25 µm/px vs 2 µm/px: 8x)
    with pytest.raises(ValueError, match=r"reads tiles at 0.25 µm/px.*image 'he'.*2 µm/px.*coarser"):
        squall.tl.predict_expression(small, tiny(genes, mpp=0.25), progress=False)
    # several shapes / images: asks which
    two = sd.SpatialData(images={"he": small.images["he"], "he2": small.images["he"]},
                         shapes={"a": small.shapes["spots"], "b": small.shapes["spots"]})
    with pytest.raises(KeyError, match=r"2 images \['he', 'he2'\]"):
        squall.tl.predict_expression(two, model, progress=False)
    with pytest.raises(KeyError, match=r"several shapes elements \['a', 'b'\]"):
        squall.tl.predict_expression(two, model, image_key="he", progress=False)
    assert "squall" not in small.tables["table"].layers


def test_missing_mpp_and_no_tissue(genes):
    img = image_element(np.full((3, 400, 400), 120, dtype=np.uint8), {"global": Identity()})
    with pytest.raises(ValueError, match="has no µm per pixel.*microns"):
        squall.tl.predict_expression(make_sdata(image=img), tiny(genes), progress=False)
    blank = make_sdata(image=image_element(np.full((3, 400, 400), 245, dtype=np.uint8), {"microns": microns_scale(2.0)}))
    with pytest.raises(ValueError, match="no tissue detected"):
        squall.tl.predict_expression(blank, tiny(genes, mpp=4.0), progress=False)
    assert not blank.shapes and not blank.tables


# ------------------------------------------------------------------------------------- real data
def test_bundled_example_end_to_end(example_full):
    """The whole bundled section with the bundled trained model when present, else random squall-tiny."""
    sdata = squall.datasets.example()
    if "squall-tiny-her2st" in squall.models.list_models(pretrained=True):
        model = squall.models.load("squall-tiny-her2st")
    else:
        model = tiny(list(sdata.tables["table"].var_names[:16]), mpp=4.0, img_size=128)
    squall.tl.predict_expression(sdata, model, progress=False)
    layer = sdata.tables["table"].layers["squall"]
    assert np.isfinite(layer[:, sdata.tables["table"].var["squall_predicted"].to_numpy()]).all()


def test_visium_cytassist(shared_data):
    sdata = squall.io.visium(shared_data / "fixtures/coexpressdeconvolve_visium_cytassist")
    var = sdata.tables["table"].var_names
    genes = [g.upper() for g in var[:12]] + ["NOTAGENE"]  # mouse symbols matched case-insensitively
    model = tiny(genes, mpp=24.0)  # the fixture has a 23.3 µm/px image only
    squall.tl.predict_expression(sdata, model, progress=False)
    adata = sdata.tables["table"]
    assert adata.var["squall_predicted"].sum() == 12
    assert adata.uns["squall"]["predict_expression"]["params"]["layout"] == "tiles"
    assert np.isfinite(adata.layers["squall"][:, :12]).all()


def test_her2st_section(shared_data):
    sdata = squall.datasets.her2st("A1", shared_data / "her2st", labels=False)
    genes = list(sdata.tables["table"].var_names[:10])
    model = tiny(genes, mpp=8.0, img_size=128)
    squall.tl.predict_expression(sdata, model, progress=False, num_workers=0)
    adata = sdata.tables["table"]
    assert np.isfinite(adata.layers["squall"][:, adata.var["squall_predicted"].to_numpy()]).all()


def test_he_only_jpg(shared_data, tmp_path):
    src = shared_data / "her2st" / "images" / "C2.jpg"
    Image.MAX_IMAGE_PIXELS = None
    with Image.open(src) as im:
        w, h = im.size
        im.convert("RGB").crop((w // 2 - 450, h // 2 - 450, w // 2 + 450, h // 2 + 450)).save(tmp_path / "crop.jpg")
    sdata = squall.io.he(tmp_path / "crop.jpg", mpp=1.0)
    model = tiny(["ERBB2", "CD74"], mpp=4.0)
    squall.tl.predict_expression(sdata, model, progress=False, spots="bins", spot_size_um=64)
    adata = sdata.tables["squall_expression"]
    assert adata.n_obs > 0 and adata.shape[1] == 2 and np.isfinite(adata.X).all()


def test_prefetch_order_errors_and_close():
    from squall_sd.tl._predict import _Prefetch

    assert list(_Prefetch(iter(range(50)), depth=2)) == list(range(50))

    def boom():
        yield 1
        raise RuntimeError("read failed")

    it = iter(_Prefetch(boom()))
    assert next(it) == 1
    with pytest.raises(RuntimeError, match="read failed"):
        next(it)
    p = _Prefetch(iter(range(10**6)), depth=2)  # closing early stops the thread
    next(iter(p))
    p.close()
    assert not p._thread.is_alive()
