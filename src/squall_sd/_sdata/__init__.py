"""The SpatialData layer of squall: key resolution, µm per pixel, transformations, validation, writing.

The lowest layer of the package: :mod:`squall_sd.io`, :mod:`squall_sd.pp`, :mod:`squall_sd.tl`,
:mod:`squall_sd.pl`, :mod:`squall_sd.train` and the CLI build on it; it imports none of them.
"""

from squall_sd._sdata._keys import (
    OUTPUT_PREFIX,
    TISSUE_SUFFIX,
    Region,
    instance_positions,
    resolve_adata,
    resolve_image_key,
    resolve_region,
    resolve_table_key,
    table_regions,
    tables_annotating,
)
from squall_sd._sdata._mpp import Level, affine_mpp, get_mpp, image_levels, image_mpp, pick_level
from squall_sd._sdata._transform import (
    affine_to_microns,
    apply_affine,
    identity,
    is_axis_aligned,
    microns_scale,
    microns_transformations,
)
from squall_sd._sdata._validate import check_key, check_path, check_positive, check_table_key, validate_mpp
from squall_sd._sdata._write import (
    add_elements,
    move_into_place,
    snapshot_table,
    staged,
    table_write_settings,
    temp_sibling,
    write_elements,
    write_sdata,
)

__all__ = [
    "OUTPUT_PREFIX",
    "TISSUE_SUFFIX",
    "Level",
    "Region",
    "add_elements",
    "affine_mpp",
    "affine_to_microns",
    "apply_affine",
    "check_key",
    "check_path",
    "check_positive",
    "check_table_key",
    "get_mpp",
    "identity",
    "image_levels",
    "image_mpp",
    "instance_positions",
    "is_axis_aligned",
    "microns_scale",
    "microns_transformations",
    "move_into_place",
    "pick_level",
    "resolve_adata",
    "resolve_image_key",
    "resolve_region",
    "resolve_table_key",
    "snapshot_table",
    "staged",
    "table_regions",
    "table_write_settings",
    "tables_annotating",
    "temp_sibling",
    "validate_mpp",
    "write_elements",
    "write_sdata",
]
