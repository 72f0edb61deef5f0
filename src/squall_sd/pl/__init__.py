"""Plotting: static figures on the H&E (spatialdata-plot / matplotlib) and napari overlays.

- :func:`expression` -- predicted (and measured) expression of genes, spot by spot, on the H&E;
- :func:`niches` -- spatial niches from :func:`squall_sd.tl.niches`;
- :func:`signatures` -- signature scores from :func:`squall_sd.tl.score_signatures`;
- :func:`trajectory` -- pseudotime from :func:`squall_sd.tl.trajectory`;
- :func:`predicted_vs_measured` -- per-gene agreement of predictions with measurements;
- :func:`napari` -- an interactive napari viewer with the H&E and all overlays in microns.

Every static plot returns its :class:`~matplotlib.axes.Axes` and takes ``ax=`` and ``save=``.
"""

from __future__ import annotations

from squall_sd.pl._evaluate import predicted_vs_measured
from squall_sd.pl._napari import napari
from squall_sd.pl._spatial import expression, niches, signatures, trajectory

__all__ = ["expression", "napari", "niches", "predicted_vs_measured", "signatures", "trajectory"]
