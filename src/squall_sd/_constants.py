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


def bins_key(bin_size_um: int | float) -> str:
    """Return the default shapes name for Visium HD bins of ``bin_size_um`` micrometres."""
    return f"bins_{int(round(bin_size_um))}um"
