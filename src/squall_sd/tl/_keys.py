"""Old import path of the element / key resolution, now in :mod:`squall_sd._sdata`.

r13-merge: re-export, remove after merge. ``tl/_predict.py`` and ``tl/_embed.py`` import these names
from here; they should import them from :mod:`squall_sd._sdata` (``check_microns`` is
:func:`squall_sd._sdata.image_mpp`).
"""

from squall_sd._sdata import (  # noqa: F401 - r13-merge: re-export, remove after merge
    OUTPUT_PREFIX,
    TISSUE_SUFFIX,
    Region,
    check_table_key,
    instance_positions,
    resolve_image_key,
    resolve_region,
    resolve_table_key,
    table_regions,
    tables_annotating,
)
from squall_sd._sdata import image_mpp as check_microns  # noqa: F401 - r13-merge: re-export, remove after merge
