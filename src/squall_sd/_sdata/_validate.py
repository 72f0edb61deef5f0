"""Validation of user arguments and SpatialData keys, shared by every layer of squall.

Each check raises an error that says what was expected and lists what is available.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from spatialdata import SpatialData

__all__ = ["check_key", "check_path", "check_positive", "check_table_key", "validate_mpp"]

#: Element kind (``SpatialData`` attribute) -> noun used in messages.
_NOUN = {
    "images": "Image",
    "shapes": "Shapes",
    "tables": "Table",
    "labels": "Labels",
    "points": "Points",
}


def check_key(sdata: SpatialData, key: str, kind: str, *, hint: str | None = None) -> Any:
    """Return ``sdata.<kind>[key]`` or raise a :class:`KeyError` that lists the available keys.

    Parameters
    ----------
    sdata
        The SpatialData.
    key
        Element name.
    kind
        ``"images"``, ``"shapes"``, ``"labels"``, ``"points"`` or ``"tables"``.
    hint
        Text appended to the message. ``None``: for a missing ``*_tissue`` shapes element, how to
        detect the tissue; nothing otherwise.

    Returns
    -------
    The element.
    """
    container = getattr(sdata, kind)
    if key not in container:
        if hint is None:
            hint = ""
            if kind == "shapes" and str(key).endswith("_tissue"):
                img = str(key)[: -len("_tissue")]
                hint = f" Run `squall.pp.detect_tissue(sdata, image_key={img!r})` first."
        raise KeyError(
            f"{_NOUN.get(kind, kind)} {key!r} not found in `sdata.{kind}`. Available: {sorted(container)}.{hint}"
        )
    return container[key]


def check_table_key(sdata: SpatialData, table_key: str) -> None:
    """Raise a :class:`KeyError` listing the tables when ``table_key`` is not one of them."""
    check_key(sdata, table_key, "tables")


def check_positive(value: float, name: str) -> float:
    """Return ``value`` as float; raise a :class:`ValueError` when it is not a positive number."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"Expected `{name}` to be a number, found {value!r}.") from None
    if not np.isfinite(v) or v <= 0:
        raise ValueError(f"Expected `{name}` to be positive, found {value!r}.")
    return v


def validate_mpp(mpp: Any, *, source: str = "the image") -> float:
    """Check that ``mpp`` (µm per pixel) is a positive finite number and return it as float."""
    if mpp is None:
        raise ValueError(
            f"No µm per pixel known for {source}. Pass `mpp=` (micrometres per pixel of the full-resolution "
            "image; e.g. 0.25 for a 40x scan, 0.5 for 20x)."
        )
    try:
        value = float(mpp)
    except (TypeError, ValueError):
        raise TypeError(f"`mpp` must be a number (µm per pixel), got {mpp!r}.") from None
    if not np.isfinite(value) or value <= 0:
        raise ValueError(f"`mpp` must be a positive number of µm per pixel, got {mpp!r}.")
    return value


def check_path(path: str | os.PathLike, what: str, *, kind: str = "any") -> Path:
    """Return ``path`` as :class:`~pathlib.Path`, or raise a :class:`FileNotFoundError` that says what was expected.

    Parameters
    ----------
    path
        The path given by the user.
    what
        A description of what the path should be (used in the message), e.g. ``"Space Ranger outs folder"``.
    kind
        ``"file"``, ``"dir"`` or ``"any"``.
    """
    if path is None:
        raise TypeError(f"No path given for the {what}.")
    p = Path(path).expanduser()
    if not p.exists():
        parent = p.parent
        hint = ""
        if parent.is_dir():
            near = sorted(x.name for x in parent.iterdir())[:10]
            hint = f" The folder {str(parent)!r} holds: {near}."
        raise FileNotFoundError(f"The {what} {str(p)!r} does not exist.{hint} Check the path and try again.")
    if kind == "file" and not p.is_file():
        raise FileNotFoundError(f"The {what} {str(p)!r} is a folder; pass the file itself.")
    if kind == "dir" and not p.is_dir():
        raise NotADirectoryError(f"The {what} {str(p)!r} is a file; pass the folder that contains it.")
    return p
