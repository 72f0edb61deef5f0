"""tl.predict_expression: geometry, outputs, real data and bad input (squall-tiny, 64 px tiles, few spots)."""

from __future__ import annotations

import numpy as np
import pytest
import spatialdata as sd
import torch
from PIL import Image
from spatialdata.transformations import Affine, Identity, get_transformation

import squall_sd as squall
from squall_sd._sdata import microns_scale
from squall_sd.datasets._datasets import _bundle_dir
from squall_sd.io._common import image_element, make_sdata, set_attrs

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
    # a non-positive µm/px or up-sampling bound says which argument (mpp=0 was a ZeroDivisionError)
    for bad in (0, 0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match=r"Expected `mpp` to be positive"):
            squall.tl.predict_expression(small, model, mpp=bad, progress=False)
    with pytest.raises(ValueError, match=r"Expected `max_upsample` to be positive"):
        squall.tl.predict_expression(small, model, max_upsample=0, progress=False)
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
    white = np.full((3, 400, 400), 245, dtype=np.uint8)
    blank = make_sdata(image=image_element(white, {"microns": microns_scale(2.0)}))
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
    from squall_sd.tl._engine import _Prefetch

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


# ------------------------------------------------------------------------------------- tile order


def test_hilbert_index_is_a_curve():
    from squall_sd.tl._engine import hilbert_index

    for k in range(6):
        n = 1 << k
        cells = np.stack(np.meshgrid(np.arange(n), np.arange(n), indexing="ij"), -1).reshape(-1, 2)
        d = hilbert_index(cells)
        assert sorted(d.tolist()) == list(range(n * n))  # a permutation of the square
        walk = cells[np.argsort(d)]
        assert (np.abs(np.diff(walk, axis=0)).sum(axis=1) == 1).all()  # consecutive cells are adjacent
        np.testing.assert_array_equal(hilbert_index(cells - [7, -3]), d)  # only relative positions count
    rng = np.random.default_rng(0)
    cells = rng.integers(-40, 40, (500, 2))
    d = hilbert_index(cells)
    same = (cells[:, None] == cells[None]).all(axis=2)
    assert ((d[:, None] == d[None]) == same).all()  # distinct cells, distinct positions
    assert hilbert_index(np.zeros((0, 2))).shape == (0,)


def _permute_plan(plan, perm):
    """The same tiles (and owned regions) visited in the order ``perm``."""
    from squall_sd.tl._engine import TilePlan

    parts = [plan.owned[plan.owner_ptr[t] : plan.owner_ptr[t + 1]] for t in perm]
    ptr = np.concatenate([[0], np.cumsum([len(p) for p in parts])]).astype(np.int64)
    origin = plan.origin[perm] if len(plan.origin) else plan.origin
    return TilePlan(plan.centers[perm], ptr, np.concatenate(parts), plan.layout, plan.core_um, origin)


def test_plan_tiles_follows_the_hilbert_curve():
    from squall_sd.tl._engine import plan_tiles

    rng = np.random.default_rng(1)
    xy = rng.uniform(0, 1024, (3000, 2))
    plan = plan_tiles(xy, np.full(len(xy), 10.0), tile_um=128, token_um=32, layout="tiles")
    assert plan.layout == "tiles" and plan.core_um == 64 and len(plan) == 16 * 16
    # every region owned once, by the tile whose core holds its centre
    assert sorted(plan.owned.tolist()) == list(range(len(xy)))
    owner = np.repeat(np.arange(len(plan)), np.diff(plan.owner_ptr))
    np.testing.assert_array_equal(plan.origin[owner], np.floor(xy[plan.owned] / 64))
    np.testing.assert_allclose(plan.centers, (plan.origin + 0.5) * 64)
    # a full 16 x 16 square of cells: consecutive tiles are neighbours
    assert (np.abs(np.diff(plan.origin, axis=0)).sum(axis=1) == 1).all()
    # one tile per region: regions visited along the curve over tile-sized cells
    shapes = plan_tiles(xy[:50], np.full(50, 10.0), tile_um=128, token_um=32, layout="shapes")
    assert sorted(shapes.owned.tolist()) == list(range(50))
    np.testing.assert_array_equal(shapes.centers, xy[shapes.owned])
    np.testing.assert_array_equal(shapes.owner_ptr, np.arange(51))


def test_tile_order_does_not_change_predictions(small, genes, monkeypatch):
    """Tiles in column order (the old plan) give the same values per spot (up to float rounding)."""
    import squall_sd.tl._predict as mod

    model = tiny(genes, mpp=4.0, img_size=128)
    kw = {"progress": False, "inplace": False, "layout": "tiles", "batch_size": 3}
    ref = squall.tl.predict_expression(small, model, **kw)
    plan_tiles = mod.plan_tiles

    def by_columns(*args, **kwargs):
        plan = plan_tiles(*args, **kwargs)
        return _permute_plan(plan, np.lexsort((plan.origin[:, 1], plan.origin[:, 0])))

    monkeypatch.setattr(mod, "plan_tiles", by_columns)
    got = squall.tl.predict_expression(small, model, **kw)
    pred = ref.var["squall_predicted"].to_numpy()
    assert np.isfinite(ref.layers["squall"][:, pred]).all()
    np.testing.assert_allclose(got.layers["squall"][:, pred], ref.layers["squall"][:, pred], rtol=1e-5, atol=1e-5)


def test_small_chunk_cache_decodes_each_chunk_about_once(genes, monkeypatch):
    """Predicting a tiled slide through a cache of 8 chunks decodes each chunk at most ~2 times."""
    import dask.array as da

    import squall_sd.pp as spp
    from squall_sd.io._common import circles_element

    with Image.open(_bundle_dir() / "he.jpg") as im:
        arr = np.moveaxis(np.asarray(im.convert("RGB"))[1000:1768, 1000:1768], -1, 0)
    ch = 96  # 8 x 8 chunks of 96 px (192 µm): three 64 µm tile cores per chunk
    image = image_element(da.from_array(np.ascontiguousarray(arr), chunks=(3, ch, ch)),
                          {"microns": microns_scale(2.0)}, chunks=ch)
    g = np.arange(20.0, 768 * 2, 64.0)
    xy = np.stack(np.meshgrid(g, g), -1).reshape(-1, 2)
    sdata = make_sdata(image=image, shapes={"spots": circles_element(xy, 10.0, {"microns": microns_scale(1.0)})})
    model = tiny(genes, mpp=2.0)

    def no_forward(rgb, mpp, *, genes=None, aggregate=None, **kwargs):  # only reading is tested here
        return torch.zeros(aggregate.shape[0], aggregate.shape[1], len(genes) if genes else model.n_genes)

    monkeypatch.setattr(model, "predict", no_forward)
    made = []
    extract = spp.extract_patches
    cache_mb = 8 * 3 * ch * ch / 1e6

    def small_cache(*args, **kwargs):
        made.append(extract(*args, **{**kwargs, "cache_mb": cache_mb}))
        return made[-1]

    monkeypatch.setattr(spp, "extract_patches", small_cache)
    out = squall.tl.predict_expression(sdata, model, shapes_key="spots", table_key=None, layout="tiles",
                                       batch_size=8, progress=False, inplace=False)
    assert out.uns["squall"]["predict_expression"]["params"]["n_tiles"] == 24 * 24
    (ds,) = made
    assert ds.level.name == "scale0" and not ds.cached  # the cache is emptied after the loop
    touched = {k for c in ds.centers_um for k in ds._chunks.keys(*ds._window_bounds(*c))}
    assert len(touched) == 64
    assert ds.decodes <= 2 * len(touched)
    # the same tiles column by column through the same cache decode each chunk ~4 times
    col = np.lexsort((ds.centers_um[:, 1], ds.centers_um[:, 0]))
    ref = extract(sdata, ds.centers_um[col], patch_px=64, mpp=2.0, cache_mb=cache_mb)
    for i in range(len(ref)):
        ref[i]
    assert ref.decodes > 3 * len(touched)


def test_num_workers_auto(monkeypatch):
    from squall_sd.tl._engine import resolve_workers

    assert resolve_workers("auto", torch.device("cpu")) == 0
    monkeypatch.setattr("os.cpu_count", lambda: 16)
    assert resolve_workers("auto", torch.device("cuda")) == 8
    monkeypatch.setattr("os.cpu_count", lambda: 6)
    assert resolve_workers("auto", torch.device("cuda")) == 3
    assert resolve_workers(2, torch.device("cpu")) == 2
    with pytest.raises(ValueError, match="'auto'"):
        resolve_workers("many", torch.device("cpu"))
    with pytest.raises(ValueError, match=">= 0"):
        resolve_workers(-1, torch.device("cpu"))
    assert resolve_workers("auto", torch.device("mps")) == 0  # not measured: the reading thread


def test_trim_heap_is_safe_to_call():
    import platform

    from squall_sd.tl._engine import _malloc_trim, trim_heap

    if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
        assert _malloc_trim() is not None
    blocks = [np.ones(2_000_000) for _ in range(8)]  # ~128 MB, then freed
    del blocks
    assert trim_heap() is None


def test_genes_with_an_existing_table_restrict_or_raise(small, genes):
    """`genes=` is never ignored: it restricts the layer to those genes, or says why it cannot."""
    model = tiny(genes)
    full = squall.tl.predict_expression(small, model, progress=False, inplace=False)
    out = squall.tl.predict_expression(small, model, genes=genes[2:5], progress=False, inplace=False)
    pred = out.var["squall_predicted"].to_numpy()
    assert list(out.var_names[pred]) == genes[2:5]
    # the same values as predicting every gene (up to float32 summation order)
    np.testing.assert_allclose(out.layers["squall"][:, pred], full.layers["squall"][:, pred], rtol=1e-5, atol=1e-5)
    assert np.isnan(out.layers["squall"][:, ~pred]).all()
    with pytest.raises(KeyError, match="not in the model vocabulary"):
        squall.tl.predict_expression(small, model, genes=["NOSUCHGENE"], progress=False, inplace=False)
    # in the model's vocabulary but not a column of the table: a clear error, not a silent skip
    with pytest.raises(ValueError, match=r"NOTINDATA0.*table_key=None"):
        squall.tl.predict_expression(small, model, genes=[genes[0], "NOTINDATA0"], progress=False, inplace=False)
    assert "squall" not in small.tables["table"].layers  # nothing written by the failed calls


def test_worker_processes_give_the_same_values(small, genes):
    """The engine loop with DataLoader workers (no prefetch thread) gives the values of the threaded loop."""
    model = tiny(genes, mpp=4.0, img_size=128)
    kw = {"progress": False, "inplace": False, "layout": "tiles", "batch_size": 3}
    ref = squall.tl.predict_expression(small, model, num_workers=0, **kw)
    got = squall.tl.predict_expression(small, model, num_workers=1, **kw)
    np.testing.assert_array_equal(got.layers["squall"], ref.layers["squall"])
    emb0 = squall.tl.embed(small, model, num_workers=0, **kw)
    emb1 = squall.tl.embed(small, model, num_workers=1, **kw)
    np.testing.assert_array_equal(emb1.obsm["X_squall"], emb0.obsm["X_squall"])


def test_frozen_gc_freezes_only_for_the_call(small, genes, monkeypatch):
    """predict_expression / embed run with the session's objects frozen out of the collector, then unfreeze them."""
    import gc

    from squall_sd.tl import _predict_run
    from squall_sd.tl._engine import frozen_gc

    seen = []
    run = _predict_run.run_batches

    def spy(*a, **k):
        seen.append(gc.get_freeze_count())
        return run(*a, **k)

    monkeypatch.setattr(_predict_run, "run_batches", spy)
    assert gc.get_freeze_count() == 0
    squall.tl.predict_expression(small, tiny(genes), progress=False, inplace=False)
    assert seen and seen[0] > 0  # frozen while the tiles ran
    assert gc.get_freeze_count() == 0  # and unfrozen after

    @frozen_gc
    def fail():
        assert gc.get_freeze_count() > 0
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        fail()
    assert gc.get_freeze_count() == 0  # unfrozen on failure too
    # a caller that froze objects itself keeps them frozen
    gc.freeze()
    try:
        n = gc.get_freeze_count()
        frozen_gc(lambda: None)()
        assert gc.get_freeze_count() == n
    finally:
        gc.unfreeze()


def test_tta_reaches_the_model_and_the_provenance(small, genes, monkeypatch):
    model = tiny(genes)
    ref = squall.tl.predict_expression(small, model, progress=False, inplace=False)
    seen = []
    predict = model.predict

    def spy(*args, **kwargs):
        seen.append(kwargs.get("tta"))
        return predict(*args, **kwargs)

    monkeypatch.setattr(model, "predict", spy)
    got = squall.tl.predict_expression(small, model, progress=False, inplace=False, tta=True)
    assert seen and all(t is True for t in seen)
    pred = ref.var["squall_predicted"].to_numpy()
    a, b = ref.layers["squall"][:, pred], got.layers["squall"][:, pred]
    assert np.isfinite(b).all() and not np.allclose(a, b, atol=1e-4)
    assert got.uns["squall"]["predict_expression"]["params"]["tta"] is True
    assert ref.uns["squall"]["predict_expression"]["params"]["tta"] is False
