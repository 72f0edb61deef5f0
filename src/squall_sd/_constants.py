"""Default element names, coordinate system and metadata keys shared by the whole package."""

from __future__ import annotations

#: Name of the physical coordinate system every reader registers (units: micrometres).
MICRONS = "microns"
#: Default image element name for the H&E.
IMAGE_KEY = "he"
#: Default shapes element names.
SPOTS_KEY = "spots"
CELLS_KEY = "cells"
#: Default table name.
TABLE_KEY = "table"
#: Key in ``sdata.attrs`` (and ``adata.uns``) holding squall metadata (µm/px, provenance).
ATTRS_KEY = "squall"

# ---- keys the tools add (defaults of their ``*_key_added`` arguments) ----------------------------
#: ``var`` column marking the genes :func:`squall_sd.tl.predict_expression` predicted in a table.
PREDICTED_VAR = "squall_predicted"
#: Layer of an existing table that receives predicted expression.
PREDICT_LAYER_KEY = "squall"
#: New table of predicted expression (no table annotated the region).
PREDICT_TABLE_KEY = "squall_expression"
#: Image of dense expression maps.
DENSE_KEY = "squall_dense"
#: Virtual spots laid over the tissue of an H&E-only slide.
VIRTUAL_SPOTS_KEY = "squall_spots"
#: ``obsm`` key of H&E embeddings.
EMBED_KEY = "X_squall"
#: New table of H&E embeddings (no table annotated the region).
EMBED_TABLE_KEY = "squall_embedding"
#: Image of the whole-slide token map.
TOKEN_MAP_KEY = "squall_token_map"


def bins_key(bin_size_um: int | float) -> str:
    """Return the default shapes name for Visium HD bins of ``bin_size_um`` micrometres."""
    return f"bins_{int(round(bin_size_um))}um"
