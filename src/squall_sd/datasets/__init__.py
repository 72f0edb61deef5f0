"""Small bundled real example data and loaders for public datasets kept on disk.

- :func:`example` -- her2st section C2 (HER2+ breast cancer, legacy ST), shipped with the package;
- :func:`her2st`, :func:`mob`, :func:`xenium_lung` -- read local copies of public datasets by path.
"""

from __future__ import annotations

from squall_sd.datasets._datasets import (
    attach_pathologist_labels,
    example,
    her2st,
    mob,
    xenium_lung,
)

__all__ = ["attach_pathologist_labels", "example", "her2st", "mob", "xenium_lung"]
