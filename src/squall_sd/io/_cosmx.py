"""Reader for NanoString CosMx SMI flat files."""

from __future__ import annotations

import os
import re
from pathlib import Path

import anndata as ad
import geopandas as gpd
import numpy as np
import pandas as pd
from scipy import sparse
from spatialdata import SpatialData
from spatialdata.models import PointsModel, ShapesModel

from squall_sd._constants import CELLS_KEY, MICRONS, TABLE_KEY
from squall_sd._logging import logger
from squall_sd._sdata import check_path, microns_scale, validate_mpp
from squall_sd.io._common import make_sdata, set_attrs, table_element
from squall_sd.io._tenx import as_counts_matrix, check_overlap, polygons_from_vertices

__all__ = ["cosmx"]

#: µm per pixel of CosMx global / local coordinates (SMI, 0.12028 µm/px).
COSMX_PIXEL_SIZE = 0.12028
_SUFFIXES = {
    "counts": "exprMat_file.csv",
    "metadata": "metadata_file.csv",
    "fov": "fov_positions_file.csv",
    "transcripts": "tx_file.csv",
    "polygons": "polygons.csv",
}


def _find(root: Path, key: str, dataset_id: str | None) -> Path | None:
    suffix = _SUFFIXES[key]
    hits = sorted(
        p
        for p in root.iterdir()
        if p.is_file() and re.search(rf"{re.escape(suffix)}(\.gz)?$", p.name)
    )
    if dataset_id is not None:
        hits = [p for p in hits if p.name.startswith(dataset_id)]
    if len(hits) > 1:
        raise ValueError(
            f"Several *{suffix} files in {str(root)!r}: {[p.name for p in hits]}. Pass `dataset_id=` (their common "
            "file-name prefix) to pick one."
        )
    return hits[0] if hits else None


def _cell_key(fov: pd.Series, cell: pd.Series) -> np.ndarray:
    return (cell.astype(int).astype(str) + "_" + fov.astype(int).astype(str)).to_numpy()


def cosmx(
    path: str | os.PathLike,
    *,
    dataset_id: str | None = None,
    pixel_size: float = COSMX_PIXEL_SIZE,
    transcripts: bool = True,
) -> SpatialData:
    """Read NanoString CosMx SMI flat files into a SpatialData in microns.

    Reads ``<id>_exprMat_file.csv`` (counts), ``<id>_metadata_file.csv`` (cell centres and areas in
    global pixels), ``<id>-polygons.csv`` (cell outlines, when present), ``<id>_tx_file.csv``
    (transcripts) and ``<id>_fov_positions_file.csv``; ``.csv.gz`` works as well. Exports with only
    transcripts (no counts / metadata) are supported too: counts are then tallied per cell from the
    transcripts and each cell is a disc around its transcripts. :func:`spatialdata_io.cosmx` is not used
    because it requires the ``CellComposite/`` and ``CellLabels/`` image folders and returns no cell shapes.

    Parameters
    ----------
    path
        Folder of the flat files.
    dataset_id
        Common file-name prefix, needed only when the folder holds several datasets.
    pixel_size
        µm per CosMx pixel (default 0.12028).
    transcripts
        Also read the transcripts as the points element ``"transcripts"``.

    Returns
    -------
    SpatialData with the shapes ``"cells"`` (polygons when a polygons file is present, else circles of
    the cell area, in global pixels), the table ``"table"`` annotating them (obs names
    ``"{cell_ID}_{fov}"``; ``obsm["spatial"]`` centres in microns) and the points ``"transcripts"``, all
    mapped to ``"microns"``. There is no H&E: ``sdata.attrs["squall"]["mpp"]`` is ``None``.

    Raises
    ------
    FileNotFoundError
        When the folder, or both the counts and the transcripts, are missing.
    ValueError
        When the counts' cells match no row of the metadata.

    """
    root = check_path(path, "CosMx flat-file folder", kind="dir")
    pixel_size = validate_mpp(pixel_size, source="CosMx coordinates")
    files = {k: _find(root, k, dataset_id) for k in _SUFFIXES}
    for k, f in files.items():
        if f is None:
            logger.info("CosMx %s file (*%s) not found in %s.", k, _SUFFIXES[k], root)
    if files["counts"] is None and files["transcripts"] is None:
        raise FileNotFoundError(
            f"No *exprMat_file.csv nor *tx_file.csv in {str(root)!r}: is it a CosMx flat-file export? "
            f"It holds: {sorted(x.name for x in root.iterdir())[:12]}."
        )
    tx = pd.read_csv(files["transcripts"]) if files["transcripts"] is not None else None
    fov_pos = pd.read_csv(files["fov"]).set_index("fov") if files["fov"] is not None else None

    if files["counts"] is not None and files["metadata"] is not None:
        adata, centers, area = _from_counts(files["counts"], files["metadata"], fov_pos)
    else:
        if tx is None:
            raise FileNotFoundError(
                f"{str(root)!r} has counts but no *metadata_file.csv (cell positions) and no transcripts to place "
                "the cells with. Add the metadata file of the export."
            )
        logger.info(
            "No counts + metadata files in %s; counts and cell positions from the transcripts.",
            root,
        )
        adata, centers, area = _from_transcripts(tx)

    n = adata.n_obs
    radius = np.sqrt(np.clip(area, 1.0, None) / np.pi)
    to_microns = microns_scale(pixel_size)
    cell_shape = "circles"
    cells = None
    if files["polygons"] is not None:
        pol = pd.read_csv(files["polygons"])
        id_col = "cellID" if "cellID" in pol else "cell_ID"
        pol["_key"] = _cell_key(pol["fov"], pol[id_col])
        polys = polygons_from_vertices(pol, "_key", "x_global_px", "y_global_px")
        matched = pd.Index(adata.obs_names).isin(polys.index)
        if matched.mean() > 0.5:
            geoms = polys.reindex(adata.obs_names).to_numpy()
            miss = pd.isna(geoms)
            if miss.any():
                import shapely

                logger.info(
                    "%d cells have no polygon; drawn as circles of their area.", int(miss.sum())
                )
                geoms[miss] = shapely.buffer(shapely.points(centers[miss]), radius[miss])
            cells = ShapesModel.parse(
                gpd.GeoDataFrame(geometry=list(geoms), index=np.arange(n)),
                transformations={MICRONS: to_microns},
            )
            cell_shape = "polygons"
        else:
            logger.warning(
                "The polygons file matches few cells of the counts; cells drawn as circles."
            )
    if cells is None:
        cells = ShapesModel.parse(
            centers,
            geometry=0,
            radius=radius,
            index=np.arange(n),
            transformations={MICRONS: to_microns},
        )

    adata.obsm["spatial"] = centers * pixel_size
    adata.uns["spatial_unit"] = "microns"
    table = table_element(adata, CELLS_KEY)

    points = {}
    if transcripts and tx is not None:
        t = tx.copy()
        t["cell_id"] = _cell_key(t["fov"], t["cell_ID"])
        t.loc[t["cell_ID"].astype(int) == 0, "cell_id"] = "UNASSIGNED"
        t["target"] = t["target"].astype(str).astype("category")
        t = t.rename(columns={"z": "z_slice"})
        points["transcripts"] = PointsModel.parse(
            t,
            coordinates={"x": "x_global_px", "y": "y_global_px"},
            feature_key="target",
            instance_key="cell_id",
            transformations={MICRONS: to_microns},
        )
    elif transcripts:
        logger.info("No transcripts file in %s; no points element.", root)

    sdata = make_sdata(shapes={CELLS_KEY: cells}, table=table, points=points, table_key=TABLE_KEY)
    return set_attrs(
        sdata,
        mpp=None,
        technology="cosmx",
        cosmx_pixel_size_um=pixel_size,
        cell_shape=cell_shape,
        source_path=str(root),
    )


def _from_counts(counts_file: Path, meta_file: Path, fov_pos: pd.DataFrame | None):
    counts = pd.read_csv(counts_file)
    counts = counts[
        counts["cell_ID"].astype(int) != 0
    ]  # cell 0 holds each FOV's unassigned transcripts
    counts.index = _cell_key(counts.pop("fov"), counts.pop("cell_ID"))
    meta = pd.read_csv(meta_file)
    meta.index = _cell_key(meta["fov"], meta["cell_ID"])
    mask = check_overlap(
        counts.index,
        meta.index,
        what=f"cells (fov, cell_ID) of {meta_file.name}",
        fix="Check that the exprMat and metadata files come from the same CosMx export (same `dataset_id`).",
    )
    counts = counts[mask]
    meta = meta.loc[counts.index]
    if {"CenterX_global_px", "CenterY_global_px"} <= set(meta.columns):
        centers = meta[["CenterX_global_px", "CenterY_global_px"]].to_numpy(float)
    elif fov_pos is not None and {"CenterX_local_px", "CenterY_local_px"} <= set(meta.columns):
        logger.info("No global cell centres in %s; local centres + FOV positions.", meta_file.name)
        off = fov_pos.loc[meta["fov"].to_numpy(), ["x_global_px", "y_global_px"]].to_numpy(float)
        centers = meta[["CenterX_local_px", "CenterY_local_px"]].to_numpy(float) + off
    else:
        raise ValueError(
            f"{meta_file.name} has no CenterX_global_px / CenterY_global_px (nor local centres with a FOV positions "
            "file): cannot place the cells."
        )
    area = (
        meta["Area"].to_numpy(float)
        if "Area" in meta
        else np.full(len(meta), np.pi * (5 / COSMX_PIXEL_SIZE) ** 2)
    )
    obs = meta.drop(columns=[c for c in meta.columns if c.startswith("Center")])
    obs["fov"] = obs["fov"].astype(int)
    obs["cell_ID"] = obs["cell_ID"].astype(int)
    x = as_counts_matrix(counts.to_numpy(dtype=np.float32))
    adata = ad.AnnData(X=x, obs=obs, var=pd.DataFrame(index=counts.columns.astype(str)))
    adata.var_names_make_unique()
    return adata, centers, area


def _from_transcripts(tx: pd.DataFrame):
    t = tx[tx["cell_ID"].astype(int) != 0]
    key = _cell_key(t["fov"], t["cell_ID"])
    cells, ci = np.unique(key, return_inverse=True)
    genes, gi = np.unique(t["target"].astype(str).to_numpy(), return_inverse=True)
    x = sparse.csr_matrix(
        (np.ones(len(t), dtype=np.float32), (ci, gi)), shape=(len(cells), len(genes))
    )
    x.sum_duplicates()
    xy = t[["x_global_px", "y_global_px"]].to_numpy(float)
    cnt = np.bincount(ci, minlength=len(cells)).astype(float)
    centers = np.column_stack([np.bincount(ci, xy[:, 0]), np.bincount(ci, xy[:, 1])]) / cnt[:, None]
    # disc whose mean squared distance to the centre (R²/2) matches that of the cell's transcripts
    msd = np.bincount(ci, ((xy - centers[ci]) ** 2).sum(axis=1)) / cnt
    area = np.pi * 2 * msd
    first = pd.DataFrame(
        {
            "key": key,
            "fov": t["fov"].astype(int).to_numpy(),
            "cell_ID": t["cell_ID"].astype(int).to_numpy(),
        }
    )
    first = first.drop_duplicates("key").set_index("key").loc[cells]
    obs = pd.DataFrame(
        {
            "fov": first["fov"].to_numpy(),
            "cell_ID": first["cell_ID"].to_numpy(),
            "n_transcripts": cnt.astype(int),
        },
        index=cells,
    )
    return ad.AnnData(X=x, obs=obs, var=pd.DataFrame(index=genes)), centers, area
