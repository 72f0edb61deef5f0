"""``squall.pl.napari`` under a virtual X display (pytest-xvfb, or any ``DISPLAY``).

The overlay test renders the bundled example with a real prediction layer
(:func:`squall_sd.tl.predict_expression` with a tiny, seeded, randomly initialised model), takes
canvas screenshots with the overlay hidden and shown, and checks that the pixels that change are
exactly those inside the spot discs projected to the screen with the viewer's camera.
"""

from __future__ import annotations

import importlib.util
import os

import numpy as np
import pytest

import squall_sd as squall

needs_napari = pytest.mark.skipif(
    importlib.util.find_spec("napari") is None,
    reason='napari is not installed (pip install "squall-sd[napari]")',
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
def test_napari_layers_and_niches(qt_display, sdata):
    """Default genes, measured + niche layers, all in microns (stand-in outputs, see conftest)."""
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
        assert list(niche.features["squall_niche"].cat.categories) == list(
            sdata.tables["table"].obs["squall_niche"].cat.categories
        )
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


def test_require_napari_message(monkeypatch):
    import builtins

    from squall_sd.pl._napari import require_napari

    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name == "napari":
            raise ImportError("No module named 'napari'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    with pytest.raises(ImportError, match=r'pip install "squall-sd\[napari\]"'):
        require_napari()
