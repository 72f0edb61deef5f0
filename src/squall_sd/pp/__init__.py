"""Preprocessing: tissue detection, virtual spots, patches, genes, expression grids and stains.

All sizes are stated in their parameter names or docs: ``*_um`` / ``*_um2`` are microns,
``*_px`` are pixels, ``mpp`` is µm per pixel. Coordinates are in the ``microns`` coordinate
system that every :mod:`squall_sd.io` reader registers.
"""

from __future__ import annotations

from squall_sd._gene_names import normalize_gene_name
from squall_sd.pp._genes import align_genes, gene_index, normalize_expression
from squall_sd.pp._patches import PatchDataset, extract_patches
from squall_sd.pp._rasterize import (
    ExpressionRasterizer,
    RegionGrid,
    TileRegions,
    rasterize_expression,
    region_weights,
)
from squall_sd.pp._register import register_spots
from squall_sd.pp._resolution import degrade_patches, is_sharper
from squall_sd.pp._spots import make_spots
from squall_sd.pp._stain import estimate_white_point, he_stain_jitter, normalize_stain
from squall_sd.pp._tissue import detect_tissue
from squall_sd.pp._utils import pyramid_levels

__all__ = [
    "ExpressionRasterizer",
    "PatchDataset",
    "RegionGrid",
    "TileRegions",
    "align_genes",
    "degrade_patches",
    "detect_tissue",
    "estimate_white_point",
    "extract_patches",
    "gene_index",
    "he_stain_jitter",
    "is_sharper",
    "make_spots",
    "normalize_expression",
    "normalize_gene_name",
    "normalize_stain",
    "pyramid_levels",
    "register_spots",
    "rasterize_expression",
    "region_weights",
]
