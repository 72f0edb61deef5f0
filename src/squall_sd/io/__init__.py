"""Readers that turn spatial-omics outputs and H&E slides into :class:`spatialdata.SpatialData`.

Every reader returns a SpatialData whose H&E (if any) is a lazily read multiscale image ``"he"``,
whose spots / bins / cells are shapes of their true size, whose counts are a table ``"table"``
annotating those shapes, and whose elements are all registered in the physical ``"microns"``
coordinate system. The µm per pixel of the H&E is recorded in ``sdata.attrs["squall"]["mpp"]``.
"""

from squall_sd._sdata import get_mpp
from squall_sd.io._common import write
from squall_sd.io._cosmx import cosmx
from squall_sd.io._he import he
from squall_sd.io._legacy_st import legacy_st
from squall_sd.io._visium import visium
from squall_sd.io._visium_hd import visium_hd
from squall_sd.io._xenium import xenium

__all__ = ["cosmx", "get_mpp", "he", "legacy_st", "visium", "visium_hd", "write", "xenium"]
