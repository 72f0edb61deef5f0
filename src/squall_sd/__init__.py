"""squall-sd: a SQUALL-style H&E + spatial transcriptomics foundation model for the scverse.

Use it as ``import squall_sd as squall``; the namespaces are

- :mod:`squall_sd.io` -- readers that return :class:`spatialdata.SpatialData`,
- :mod:`squall_sd.pp` -- preprocessing (tissue detection, patches, normalisation),
- :mod:`squall_sd.models` -- the SQUALL model family, registry and weight I/O,
- :mod:`squall_sd.train` -- the training phases,
- :mod:`squall_sd.tl` -- tools (expression prediction, niches, ...),
- :mod:`squall_sd.pl` -- plotting,
- :mod:`squall_sd.datasets` -- the bundled example and loaders for public data.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

from squall_sd._logging import logger
from squall_sd import datasets, io, models, pl, pp, tl  # noqa: E402

try:
    __version__ = version("squall-sd")
except PackageNotFoundError:  # pragma: no cover - running from a source tree without install
    __version__ = "0.0.0+unknown"

__all__ = ["datasets", "io", "logger", "models", "pl", "pp", "tl", "__version__"]
