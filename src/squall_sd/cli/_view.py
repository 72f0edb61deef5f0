"""``squall view STORE.zarr``: open a SpatialData store with its squall overlays in napari."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from squall_sd._logging import logger

__all__ = ["add_view_parser", "run_view"]

#: Window size (width, height) of ``--screenshot``, with napari-spatialdata's widgets docked.
SCREENSHOT_WINDOW = (1400, 900)


def add_view_parser(sub: Any) -> argparse.ArgumentParser:
    """Register the ``view`` subcommand on the ``squall`` sub-parsers ``sub``.

    Parameters
    ----------
    sub
        The object returned by :meth:`argparse.ArgumentParser.add_subparsers`.

    Returns
    -------
    The ``view`` parser.

    """
    view = sub.add_parser(
        "view",
        help="open a SpatialData store (e.g. from `squall predict`) in napari",
        description="Open the H&E with predicted / measured expression and niches in napari "
        "(all in microns).",
    )
    view.add_argument("store", help="SpatialData zarr store (e.g. result.zarr)")
    view.add_argument(
        "--genes",
        nargs="+",
        default=None,
        help="genes to overlay (default: 3 most variable predicted)",
    )
    view.add_argument(
        "--niches",
        default="squall_niche",
        help="obs column with niche labels (default: %(default)s)",
    )
    view.add_argument(
        "--table-key",
        default=None,
        help="table with the predictions (default: found automatically)",
    )
    view.add_argument(
        "--layer", default="squall", help="layer holding the predictions (default: %(default)s)"
    )
    view.add_argument("--no-measured", action="store_true", help="do not add measured expression")
    view.add_argument(
        "--screenshot",
        default=None,
        metavar="PNG",
        help="save a screenshot of the canvas to PNG and exit (no interactive window)",
    )
    view.set_defaults(func=run_view)
    return view


def run_view(args: argparse.Namespace) -> int:
    """Run ``squall view``.

    Parameters
    ----------
    args
        Parsed arguments of :func:`add_view_parser`.

    Returns
    -------
    The exit code.

    """
    from spatialdata import read_zarr

    from squall_sd._sdata import check_path
    from squall_sd.pl._napari import napari as open_napari
    from squall_sd.pl._napari import require_napari, require_napari_spatialdata

    store = check_path(args.store, "SpatialData zarr store", kind="dir")
    try:
        napari_module = require_napari()
        require_napari_spatialdata()
    except ImportError as e:
        sys.stderr.write(f"squall view: error: {e}\n")
        return 2
    sdata = read_zarr(store)
    title = f"squall: {store.name}"
    viewer = None
    if args.screenshot is not None:
        # napari-spatialdata docks its widgets beside the canvas: give the window a fixed size
        # before the layers are added, so that the view is fitted to a canvas of that size
        from qtpy.QtWidgets import QApplication

        viewer = napari_module.Viewer(title=title, show=True)
        viewer.window.resize(*SCREENSHOT_WINDOW)
        QApplication.processEvents()
    viewer = open_napari(
        sdata,
        genes=args.genes,
        niches=args.niches,
        table_key=args.table_key,
        layer=args.layer,
        measured=not args.no_measured,
        viewer=viewer,
        show=True,
        title=title,
    )
    if args.screenshot is not None:
        from qtpy.QtWidgets import QApplication

        for _ in range(10):
            QApplication.processEvents()
        out = Path(args.screenshot)
        viewer.screenshot(path=str(out), canvas_only=True)
        viewer.close()
        logger.info("wrote %s", out)
        return 0
    napari_module.run()
    return 0
