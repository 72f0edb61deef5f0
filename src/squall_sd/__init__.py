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

import importlib
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any

from squall_sd._logging import logger

_SUBMODULES = ("datasets", "io", "models", "pl", "pp", "tl", "train")

if TYPE_CHECKING:  # pragma: no cover
    from squall_sd import datasets, io, models, pl, pp, tl, train

try:
    __version__ = version("squall-sd")
except PackageNotFoundError:  # pragma: no cover - running from a source tree without install
    __version__ = "0.0.0+unknown"

__all__ = ["datasets", "io", "logger", "models", "pl", "pp", "tl", "train", "__version__"]


def __getattr__(name: str) -> Any:
    # The namespaces import heavy libraries (torch, spatialdata, squidpy); load each on first use
    # so that `import squall_sd` and the `squall` command start quickly.
    if name in _SUBMODULES:
        module = importlib.import_module(f"squall_sd.{name}")
        globals()[name] = module
        return module
    raise AttributeError(f"module 'squall_sd' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_SUBMODULES))
