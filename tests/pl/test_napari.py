"""``squall.pl.napari`` under a virtual X display (pytest-xvfb, or any ``DISPLAY``).

The overlay test renders the bundled example with a real prediction layer
(:func:`squall_sd.tl.predict_expression` with a tiny, seeded, randomly initialised model), takes
canvas screenshots with the overlay hidden and shown, and checks that the pixels that change are
exactly those inside the spot discs projected to the screen with the viewer's camera. The layers
are added through napari-spatialdata (its widgets are docked, the layers carry its metadata and
are coloured by table columns with its View widget).
"""

from __future__ import annotations

import importlib.util
import os

import numpy as np
import pytest

import squall_sd as squall

needs_napari = pytest.mark.skipif(
    importlib.util.find_spec("napari") is None
    or importlib.util.find_spec("napari_spatialdata") is None,
    reason='napari or napari-spatialdata is not installed (pip install "squall-sd[napari]")',
)

#: A pixel "changed" when a channel differs by more than this (0-255).
PIXEL_TOL = 12
#: Pixels this close (screen px) to a disc edge are ignored (anti-aliasing).
EDGE_PX = 1.5


@pytest.fixture(scope="module")
def qt_display(request):
    """A Qt application on an X display (Xvfb from pytest-xvfb), or skip with the reason."""
    try:
        request.getfixturevalue("xvfb")  # pytest-xvfb starts Xvfb for the session when installed
    except pytest.FixtureLookupError:
        pass
    if not os.environ.get("DISPLAY"):
        pytest.skip(
            "no X display: install Xvfb (apt-get install xvfb libxcb-icccm4 libxcb-keysyms1 "
            "libxcb-xinerama0 libxkbcommon-x11-0 libxcb-cursor0 libgl1 libegl1) and pytest-xvfb"
        )
    if os.environ.get("QT_QPA_PLATFORM") == "offscreen":
        # offscreen has no OpenGL context for napari's canvas once a layer is added; use the display
        os.environ["QT_QPA_PLATFORM"] = "xcb"
    try:
        from napari._qt.qt_event_loop import get_qapp
    except ImportError as e:  # pragma: no cover - napari without a Qt backend
        pytest.skip(f"napari has no usable Qt backend: {e}")
    app = get_qapp()
    if app.platformName() != "xcb":
        pytest.skip(f"the Qt application runs on {app.platformName()!r}, not on the X display")
    return app


def _pump(app, n: int = 20) -> None:
    for _ in range(n):
        app.processEvents()


@pytest.fixture(scope="module")
def predicted():
    """The bundled example with a real prediction layer (tiny random model: arbitrary colours)."""
    import torch

    sdata = squall.datasets.example()
    torch.manual_seed(0)
    model = squall.models.create(
        "squall-tiny",
        genes=["ERBB2", "CD74", "EPCAM", "KRT19"],
        mpp=2.0,
        img_size=64,
        expr_size=16,
        depth=2,
        merge_layer_depth=1,
    )
    squall.tl.predict_expression(sdata, model, device="cpu", progress=False)
    return sdata


def _assert_napari_spatialdata(viewer, sdata, layer_names) -> None:
    """The viewer has napari-spatialdata's widgets and the layers its metadata, in microns."""
    from squall_sd.pl._napari import VIEW_WIDGET

    docks = viewer.window.dock_widgets
    assert "SpatialData" in docks and VIEW_WIDGET in docks
    assert docks["SpatialData"].coordinate_system_widget._system == "microns"
    for name in layer_names:
        meta = viewer.layers[name].metadata
        assert meta["sdata"] is sdata, name
        assert meta["_current_cs"] == "microns", name
        assert meta["name"] in sdata, name


def _disc_distance(viewer, shape_hw, spots) -> np.ndarray:
    """Signed distance (screen px) of each canvas pixel to the nearest projected disc."""
    h, w = shape_hw
    cy, cx = viewer.camera.center[-2:]
    zoom = viewer.camera.zoom  # screen px per world unit (µm)
    sx = (spots.centers_um[:, 0] - cx) * zoom + w / 2.0
    sy = (spots.centers_um[:, 1] - cy) * zoom + h / 2.0
    r = spots.radius_um * zoom
    yy, xx = np.mgrid[:h, :w].astype(float)
    dist = np.full((h, w), np.inf)
    for x, y, rad in zip(sx, sy, r, strict=True):
        dist = np.minimum(dist, np.hypot(xx - x, yy - y) - rad)
    return dist


@needs_napari
def test_napari_overlay_lines_up_with_spots(qt_display, predicted):
    import napari

    from squall_sd.pl._utils import resolve_spots

    viewer = napari.Viewer(show=True)
    try:
        viewer.window.resize(900, 800)
        _pump(qt_display)
        out = squall.pl.napari(predicted, genes=["ERBB2"], viewer=viewer)
        assert out is viewer
        names = [layer.name for layer in viewer.layers]
        assert names == ["he", "ERBB2 predicted", "ERBB2 measured"]
        assert viewer.layers["he"].multiscale
        overlay = viewer.layers["ERBB2 predicted"]
        assert overlay.visible and not viewer.layers["ERBB2 measured"].visible
        _assert_napari_spatialdata(viewer, predicted, names)
        assert overlay.metadata["name"] == "spots"
        assert overlay.metadata["table_names"] == ["table"]
        table = predicted.tables["table"]
        np.testing.assert_allclose(
            overlay.features["ERBB2"].to_numpy(),
            table[:, "ERBB2"].layers["squall"].ravel(),
            rtol=1e-6,
        )
        _pump(qt_display)

        overlay.visible = False
        _pump(qt_display)
        bare = viewer.screenshot(canvas_only=True, flash=False)
        overlay.visible = True
        _pump(qt_display)
        shown = viewer.screenshot(canvas_only=True, flash=False)
        assert bare.shape == shown.shape

        changed = np.abs(shown[..., :3].astype(int) - bare[..., :3].astype(int)).max(-1) > PIXEL_TOL
        dist = _disc_distance(viewer, changed.shape, resolve_spots(predicted))
        inside, outside = dist < -EDGE_PX, dist > EDGE_PX
        assert inside.sum() > 2000, "the spot discs should cover a visible part of the canvas"
        assert changed[inside].mean() > 0.97, (
            "the overlay should change the pixels inside the spots"
        )
        assert changed[outside].mean() < 0.001, (
            "the overlay should not change pixels outside the spots"
        )
    finally:
        viewer.close()


@needs_napari
def test_napari_layers_and_niches(qt_display, sdata, monkeypatch):
    """Default genes, measured + niche layers, all in microns (stand-in outputs, see conftest)."""
    from matplotlib.colors import to_rgba
    from napari_spatialdata._widgets import AListWidget

    from squall_sd.pl._panels import _palette

    colored = []  # (layer, table attribute, column, adata layer) that napari-spatialdata coloured
    real_action = AListWidget._onAction

    def spy(self, items):
        colored.append((self.model.layer.name, self._attr, tuple(items), self.model.adata_layer))
        return real_action(self, items)

    monkeypatch.setattr(AListWidget, "_onAction", spy)
    viewer = squall.pl.napari(sdata, show=False)
    try:
        names = [layer.name for layer in viewer.layers]
        assert names[0] == "he"
        assert names[-1] == "squall_niche"
        assert sum(n.endswith(" predicted") for n in names) == 3
        assert sum(n.endswith(" measured") for n in names) == 3
        assert [layer.visible for layer in viewer.layers][:2] == [True, True]
        assert not any(layer.visible for layer in list(viewer.layers)[2:])
        # the H&E's level 0 is scaled from pixels to microns (2 µm/px in the example)
        np.testing.assert_allclose(
            np.diag(viewer.layers["he"].affine.affine_matrix)[:2], 1.99998, rtol=1e-4
        )
        niche = viewer.layers["squall_niche"]
        obs = sdata.tables["table"].obs
        assert list(niche.features["squall_niche"].cat.categories) == list(
            obs["squall_niche"].cat.categories
        )
        _assert_napari_spatialdata(viewer, sdata, names)

        # every overlay was coloured by its table column through napari-spatialdata's View widget
        genes = [n.removesuffix(" predicted") for n in names if n.endswith(" predicted")]
        for gene in genes:
            assert (f"{gene} predicted", "var", (gene,), "squall") in colored
            assert (f"{gene} measured", "var", (gene,), None) in colored
        assert ("squall_niche", "obs", ("squall_niche",), None) in colored

        # a predicted gene: coloured by its values in `layers["squall"]` (same value, same colour;
        # higher value, brighter viridis), unpredicted (NaN) spots grey
        gene = genes[0]
        pred = viewer.layers[f"{gene} predicted"]
        values = sdata.tables["table"][:, gene].layers["squall"].ravel()
        np.testing.assert_allclose(pred.features[gene].to_numpy(), values, rtol=1e-6)
        face = np.asarray(pred.face_color)
        lum = face[:, :3] @ np.array([0.2126, 0.7152, 0.0722])
        finite = np.isfinite(values)
        order = np.argsort(values[finite])
        assert np.all(np.diff(lum[finite][order]) >= -1e-6)
        assert np.ptp(lum) > 0.3

        # the niches: coloured by `obs["squall_niche"]` with the palette of `squall.pl.niches`
        palette = _palette(sdata.tables["table"], "squall_niche", None)
        labels = obs["squall_niche"].to_numpy()
        grey = (0.6, 0.6, 0.6, 0.5)
        expected = np.array([to_rgba(palette[v]) if isinstance(v, str) else grey for v in labels])
        np.testing.assert_allclose(np.asarray(niche.face_color), expected, atol=1e-6)
    finally:
        viewer.close()


@needs_napari
def test_view_cli_screenshot(qt_display, predicted, tmp_path):
    from squall_sd.cli import main
    from squall_sd.io._common import write

    store = write(predicted, tmp_path / "result.zarr")
    png = tmp_path / "view.png"
    assert main(["view", str(store), "--genes", "ERBB2", "--screenshot", str(png)]) == 0
    assert png.stat().st_size > 1000


@pytest.mark.parametrize(
    ("module", "require", "match"),
    [
        ("napari", "require_napari", r'pip install "squall-sd\[napari\]"'),
        ("napari_spatialdata", "require_napari_spatialdata", r'napari-spatialdata: pip install "squall-sd\[napari\]"'),
    ],
)
def test_require_napari_message(monkeypatch, module, require, match):
    import builtins

    import squall_sd.pl._napari as pl_napari

    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name == module:
            raise ImportError(f"No module named {module!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    with pytest.raises(ImportError, match=match):
        getattr(pl_napari, require)()
