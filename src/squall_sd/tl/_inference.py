"""What predict_expression and embed resolve alike: the model, the H&E and its µm/px, the regions, the new table."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from squall_sd._constants import ATTRS_KEY, PREDICTED_VAR
from squall_sd._sdata import Region, check_positive, image_mpp, resolve_image_key, resolve_table_key
from squall_sd.tl._engine import trim_heap

if TYPE_CHECKING:
    import geopandas as gpd
    from anndata import AnnData
    from spatialdata import SpatialData

    from squall_sd.models import Squall

__all__ = [
    "MAX_UPSAMPLE",
    "check_resolution",
    "new_table",
    "region_geometry",
    "resolve_image_mpp",
    "resolve_model",
    "resolve_where",
    "set_uns",
    "virtual_spots",
]

#: Largest allowed ratio image µm/px ÷ model µm/px (how much the image may be up-sampled).
MAX_UPSAMPLE = 4.0


def resolve_model(model: Squall | str) -> Squall:
    """Return a model: ``model`` itself, or :func:`squall_sd.models.load` of a name / path."""
    from squall_sd.models import Squall, load

    if isinstance(model, str):
        return load(model)
    if not isinstance(model, Squall):
        raise TypeError(
            f"`model` must be a squall model (`squall.models.load(...)`) or a model name, found "
            f"{type(model).__name__}."
        )
    return model


def check_resolution(image_mpp: float, mpp: float, *, model_name: str, image_key: str, max_upsample: float) -> None:
    """Raise when the tiles would be up-sampled from the image by more than ``max_upsample``."""
    if image_mpp / mpp > max_upsample * (1 + 1e-6):
        raise ValueError(
            f"Model {model_name!r} reads tiles at {mpp:g} µm/px, but image {image_key!r} has only "
            f"{image_mpp:.4g} µm/px at full resolution: the tiles would be up-sampled "
            f"{image_mpp / mpp:.1f}x (more than {max_upsample:g}x). Use a model trained at a coarser "
            f"resolution (≥ {image_mpp / max_upsample:.3g} µm/px, e.g. a Visium 'lowres' model at ~4 µm/px), "
            "a higher-resolution scan of the slide, or pass `mpp=` explicitly."
        )


def region_geometry(sdata: SpatialData, region: Region) -> gpd.GeoDataFrame:
    """Return the region element as shapes (labels are vectorised with :func:`spatialdata.to_polygons`)."""
    if region.kind == "shapes":
        return sdata.shapes[region.key]
    from spatialdata import to_polygons
    from spatialdata.transformations import get_transformation, set_transformation

    labels = sdata.labels[region.key]
    gdf = to_polygons(labels)
    if len(gdf) == 0:
        raise ValueError(f"Labels {region.key!r} hold no labelled cells.")
    set_transformation(gdf, get_transformation(labels, get_all=True), set_all=True)
    return gdf


def virtual_spots(
    sdata: SpatialData,
    *,
    image_key: str,
    spots: str,
    spot_size_um: float | None,
) -> tuple[gpd.GeoDataFrame, gpd.GeoDataFrame | None]:
    """Detect the tissue (unless ``f"{image_key}_tissue"`` exists) and lay virtual spots over it.

    Nothing is added to ``sdata``: the new elements are returned.
    """
    from squall_sd.pp import detect_tissue, make_spots

    tissue_key = f"{image_key}_tissue"
    tissue = None
    if tissue_key in sdata.shapes:
        gdf = make_spots(
            sdata, kind=spots, size_um=spot_size_um, image_key=image_key, tissue_key=tissue_key, inplace=False
        )
    else:
        tissue = detect_tissue(sdata, image_key=image_key, inplace=False)
        gdf = make_spots(sdata, kind=spots, size_um=spot_size_um, image_key=image_key, tissue=tissue, inplace=False)
    return gdf, tissue


def resolve_image_mpp(
    sdata: SpatialData, model: Squall, *, image_key: str | None, mpp: float | None, max_upsample: float
) -> tuple[str, float]:
    """Return the H&E key and the tiles' µm per pixel (default ``model.config.mpp``).

    Raises when the image has no µm per pixel or is much coarser than the tiles (``max_upsample``).

    Shared by :func:`predict_expression` and :func:`squall_sd.tl.embed`.
    """
    image_key = resolve_image_key(sdata, image_key)
    cfg = model.config
    mpp = check_positive(cfg.mpp if mpp is None else mpp, "mpp")
    check_positive(max_upsample, "max_upsample")
    check_resolution(
        image_mpp(sdata, image_key), mpp, model_name=cfg.name, image_key=image_key, max_upsample=max_upsample
    )
    return image_key, mpp


def resolve_where(
    sdata: SpatialData,
    region: Region | None,
    *,
    image_key: str,
    table_key: str | None,
    spots: str | None,
    spot_size_um: float | None,
    shapes_key_added: str,
) -> tuple[Region, gpd.GeoDataFrame, str | None, dict[str, Any]]:
    """Return ``(region, shapes, table_key, new_shapes)`` for a resolved ``region``.

    ``region=None`` lays virtual spots (``spots``, default ``"visium"``) over the tissue: they (and
    the tissue polygons, when detected) are returned in ``new_shapes`` and there is no table.
    Shared by :func:`predict_expression` and :func:`squall_sd.tl.embed`.
    """
    new_shapes: dict[str, Any] = {}
    if region is None:
        shapes, tissue = virtual_spots(
            sdata, image_key=image_key, spots=spots or "visium", spot_size_um=spot_size_um
        )
        trim_heap()  # tissue detection's working images are freed
        new_shapes[shapes_key_added] = shapes
        if tissue is not None:
            new_shapes[f"{image_key}_tissue"] = tissue
        return Region(shapes_key_added, "shapes"), shapes, None, new_shapes
    shapes = region_geometry(sdata, region)
    return region, shapes, resolve_table_key(sdata, region.key, table_key), new_shapes


def new_table(
    pred: np.ndarray, genes: Sequence[str], region: Region, shapes: gpd.GeoDataFrame, centers: np.ndarray
) -> AnnData:
    """Return a table annotating ``region`` with ``pred`` (regions × genes) as ``X``."""
    from anndata import AnnData
    from spatialdata.models import TableModel

    obs = pd.DataFrame(
        {
            "region": pd.Categorical([region.key] * len(shapes)),
            "instance_id": np.asarray(shapes.index),
        },
        index=pd.Index([str(i) for i in shapes.index]),
    )
    var = pd.DataFrame(index=pd.Index([str(g) for g in genes]))
    var[PREDICTED_VAR] = True
    adata = AnnData(X=pred, obs=obs, var=var)
    adata.obsm["spatial"] = np.asarray(centers, dtype=np.float64)
    return TableModel.parse(adata, region=region.key, region_key="region", instance_key="instance_id")


def set_uns(adata: AnnData, prov: dict[str, Any], name: str) -> None:
    """Store the provenance record ``prov`` of tool ``name`` in ``adata.uns["squall"][name]``."""
    meta = adata.uns.get(ATTRS_KEY)
    meta = dict(meta) if isinstance(meta, dict) else {}
    meta[name] = prov
    adata.uns[ATTRS_KEY] = meta
