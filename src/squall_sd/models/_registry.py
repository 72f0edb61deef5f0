"""The model registry front end: registered configurations plus the bundled weights folders."""

from __future__ import annotations

import fnmatch
from pathlib import Path

from squall_sd.models._config import list_configs
from squall_sd.models._weights import CONFIG_NAME

__all__ = ["WEIGHTS_DIR", "bundled", "list_models"]

#: Folder with bundled weights, one sub-folder per model name (config.json + model.safetensors).
WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"


def bundled() -> dict[str, Path]:
    """Bundled model name → its weights folder (the sub-folders of :data:`WEIGHTS_DIR`)."""
    if not WEIGHTS_DIR.is_dir():
        return {}
    return {p.name: p for p in sorted(WEIGHTS_DIR.iterdir()) if (p / CONFIG_NAME).is_file()}


def list_models(pattern: str = "*", *, pretrained: bool = False) -> list[str]:
    """Names of the registered models.

    Parameters
    ----------
    pattern
        Glob pattern on the name, e.g. ``"squall-t*"``.
    pretrained
        List only names with bundled weights (loadable with :func:`load`).

    Returns
    -------
    Sorted model names.

    """
    names = set(bundled())
    if not pretrained:
        names |= set(list_configs())
    return sorted(n for n in names if fnmatch.fnmatch(n, pattern))
