"""Resolution of the image / shapes / labels / table elements squall's tools work on.

A SpatialData as returned by a :mod:`squall_sd.io` reader (one image, one shapes element, one
table annotating it) needs no keys; with several candidates the helpers raise and list them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
from anndata import AnnData
from spatialdata.models import get_table_keys

from squall_sd._constants import ATTRS_KEY
from squall_sd._logging import logger
from squall_sd._sdata._validate import check_key

if TYPE_CHECKING:
    from spatialdata import SpatialData

__all__ = [
    "OUTPUT_PREFIX",
    "TISSUE_SUFFIX",
    "Region",
    "instance_positions",
    "resolve_adata",
    "resolve_image_key",
    "resolve_region",
    "resolve_table_key",
    "table_regions",
    "tables_annotating",
]

#: Prefix of the elements squall's tools write (``squall_dense``, ``squall_token_map``, ...).
OUTPUT_PREFIX = "squall_"
#: Suffix of the tissue polygons written by :func:`squall_sd.pp.detect_tissue` (never prediction targets).
TISSUE_SUFFIX = "_tissue"


@dataclass(frozen=True)
class Region:
    """The element whose observations get predictions.

    Attributes
    ----------
    key
        Element name.
    kind
        ``"shapes"`` or ``"labels"``.
    """

    key: str
    kind: str


def _available(sdata: SpatialData) -> str:
    return (
        f"images {sorted(sdata.images)}, shapes {sorted(sdata.shapes)}, labels {sorted(sdata.labels)}, "
        f"tables {sorted(sdata.tables)}"
    )


def resolve_image_key(sdata: SpatialData, image_key: str | None) -> str:
    """Return the H&E image to read.

    ``None`` picks the only image (images squall wrote, ``squall_*``, do not count), or the one a
    squall reader recorded in ``sdata.attrs["squall"]["image_key"]``; otherwise the choice is ambiguous and a
    :class:`KeyError` lists the images.

    Parameters
    ----------
    sdata
        The SpatialData.
    image_key
        Image key, or ``None``.

    Returns
    -------
    The image key.
    """
    images = sorted(sdata.images)
    if image_key is not None:
        check_key(sdata, image_key, "images", hint=" Pass one of them as `image_key=`.")
        return image_key
    if not images:
        raise ValueError(
            "The SpatialData holds no image. squall predicts from the H&E: read the data with a "
            "`squall.io` reader that loads the H&E, or add one with `squall.io.he(path, mpp=...)`."
        )
    # images squall wrote itself (dense maps, token maps) are never the H&E
    candidates = [k for k in images if not str(k).startswith(OUTPUT_PREFIX)] or images
    if len(candidates) == 1:
        return candidates[0]
    recorded = sdata.attrs.get(ATTRS_KEY, {}).get("image_key")
    if recorded in sdata.images:
        return str(recorded)
    raise KeyError(f"The SpatialData holds {len(images)} images {images}; pass `image_key=` to choose the H&E.")


def tables_annotating(sdata: SpatialData, region: str) -> list[str]:
    """Names of the tables that annotate the element ``region``.

    Parameters
    ----------
    sdata
        The SpatialData.
    region
        Element name.

    Returns
    -------
    Table names (sorted).
    """
    out = []
    for name, table in sdata.tables.items():
        try:
            regions = table_regions(table)
        except Exception:  # noqa: BLE001 - tables without spatialdata attrs annotate nothing
            continue
        if region in regions:
            out.append(name)
    return sorted(out)


def table_regions(table: AnnData) -> list:
    """Return the elements ``table`` annotates (its spatialdata ``region``) as a list.

    Raises what :func:`spatialdata.models.get_table_keys` raises for a table without spatialdata
    region / instance keys.
    """
    regions, _, _ = get_table_keys(table)
    return [regions] if isinstance(regions, str) else list(regions or [])


def _annotated_regions(sdata: SpatialData) -> list[Region]:
    found: dict[str, Region] = {}
    for table in sdata.tables.values():
        try:
            regions = table_regions(table)
        except Exception:  # noqa: BLE001
            continue
        for r in regions:
            if r in sdata.shapes and not str(r).endswith(TISSUE_SUFFIX):
                found[r] = Region(str(r), "shapes")
            elif r in sdata.labels:
                found[r] = Region(str(r), "labels")
    return [found[k] for k in sorted(found)]


def resolve_region(
    sdata: SpatialData, *, shapes_key: str | None = None, labels_key: str | None = None
) -> Region | None:
    """Return the element to predict at, or ``None`` when there is none (H&E-only slide).

    With no key: the only shapes / labels element annotated by a table; else the only shapes
    element that is not tissue polygons (``*_tissue``); else ``None``. Several candidates raise a
    :class:`KeyError` that lists them.

    Parameters
    ----------
    sdata
        The SpatialData.
    shapes_key
        Shapes element of spots / bins / cells.
    labels_key
        Labels element of cells (segmentation mask).

    Returns
    -------
    The region, or ``None``.
    """
    if shapes_key is not None and labels_key is not None:
        raise ValueError("Pass either `shapes_key=` or `labels_key=`, not both.")
    if shapes_key is not None:
        check_key(
            sdata,
            shapes_key,
            "shapes",
            hint=" Pass `shapes_key=None` to predict at the table's spots or at virtual spots over the tissue.",
        )
        return Region(shapes_key, "shapes")
    if labels_key is not None:
        check_key(sdata, labels_key, "labels", hint="")
        return Region(labels_key, "labels")
    annotated = _annotated_regions(sdata)
    if len(annotated) == 1:
        return annotated[0]
    if len(annotated) > 1:
        raise KeyError(
            f"Several elements are annotated by tables: {[r.key for r in annotated]}; pass `shapes_key=` "
            f"(or `labels_key=`) to choose where to predict. ({_available(sdata)})"
        )
    candidates = sorted(k for k in sdata.shapes if not str(k).endswith(TISSUE_SUFFIX))
    if len(candidates) == 1:
        return Region(candidates[0], "shapes")
    if len(candidates) > 1:
        raise KeyError(
            f"The SpatialData holds several shapes elements {candidates}; pass `shapes_key=` to choose "
            "where to predict, or `spots='visium'|'bins'|'tiles'` for virtual spots over the tissue."
        )
    return None


def resolve_table_key(sdata: SpatialData, region: str, table_key: str | None) -> str | None:
    """Return the table annotating ``region`` (``None`` when there is none).

    Parameters
    ----------
    sdata
        The SpatialData.
    region
        The annotated element.
    table_key
        Table name, or ``None`` to find it.

    Returns
    -------
    The table name or ``None``.
    """
    annotating = tables_annotating(sdata, region)
    if table_key is not None:
        if table_key not in sdata.tables:
            raise KeyError(
                f"Table {table_key!r} not found in `sdata.tables`. Available: {sorted(sdata.tables)}; "
                f"tables annotating {region!r}: {annotating}."
            )
        if table_key not in annotating:
            raise ValueError(
                f"Table {table_key!r} does not annotate {region!r} (tables annotating it: {annotating}). "
                "Pass the matching `shapes_key=` / `table_key=`."
            )
        return table_key
    if len(annotating) > 1:
        raise KeyError(f"Several tables annotate {region!r}: {annotating}; pass `table_key=` to choose one.")
    return annotating[0] if annotating else None


def instance_positions(table: AnnData, region: str, index: Any) -> tuple[np.ndarray, np.ndarray]:
    """Match the rows of ``table`` annotating ``region`` to the positions of ``index``.

    Parameters
    ----------
    table
        The table (spatialdata region / instance keys set).
    region
        The annotated element.
    index
        Instance ids of the element in the order predictions are made (shapes index or label ids).

    Returns
    -------
    ``(rows, pos)``: table row numbers and the matching positions in ``index`` (rows whose instance
    is absent from ``index`` are left out).
    """
    _, region_key, instance_key = get_table_keys(table)
    mask = (table.obs[region_key].astype(str) == region).to_numpy()
    rows = np.flatnonzero(mask)
    inst = table.obs[instance_key].to_numpy()[rows]
    pos = pd.Index(index).get_indexer(inst)
    if np.any(pos < 0) and pd.api.types.is_numeric_dtype(np.asarray(index)):
        # ids stored as strings in one of the two
        pos = pd.Index(np.asarray(index).astype(str)).get_indexer(inst.astype(str))
    ok = pos >= 0
    return rows[ok], pos[ok]


def resolve_adata(data: AnnData | SpatialData, table_key: str | None = None) -> AnnData:
    """Return the :class:`~anndata.AnnData` to work on.

    Parameters
    ----------
    data
        An AnnData, or a SpatialData whose table ``table_key`` is used.
    table_key
        Name of the table in ``data.tables``. When ``None`` and ``data`` is a SpatialData, the
        table ``"table"`` is used, or the only table if there is exactly one.

    Returns
    -------
    The AnnData (not a copy).

    """
    if isinstance(data, AnnData):
        if table_key is not None:
            logger.debug("`table_key=%r` ignored for AnnData input", table_key)
        return data
    tables = getattr(data, "tables", None)
    if tables is None:
        raise TypeError(f"Expected an `AnnData` or a `SpatialData`, found `{type(data).__name__}`.")
    available = list(tables.keys())
    if table_key is None:
        if "table" in tables:
            table_key = "table"
        elif len(available) == 1:
            table_key = available[0]
        else:
            raise KeyError(f"SpatialData has {len(available)} tables {available}; pass `table_key=` to choose one.")
    if table_key not in tables:
        raise KeyError(f"Table {table_key!r} not found in SpatialData. Available tables: {available}.")
    return tables[table_key]
