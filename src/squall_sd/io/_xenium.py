"""Reader for 10x Genomics Xenium outputs, with an optional H&E registered by a Xenium Explorer alignment."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import anndata as ad
import dask.dataframe as dd
import geopandas as gpd
import numpy as np
import pandas as pd
import shapely
from scipy import sparse
from spatialdata import SpatialData
from spatialdata.models import PointsModel, ShapesModel
from spatialdata.transformations import Affine, Identity, Scale, Sequence

from squall_sd._constants import CELLS_KEY, IMAGE_KEY, MICRONS, TABLE_KEY
from squall_sd._logging import logger
from squall_sd._sdata import affine_mpp, check_path, validate_mpp
from squall_sd.io._common import image_element, make_sdata, set_attrs, table_element
from squall_sd.io._tenx import (
    as_counts_matrix,
    check_overlap,
    first_existing,
    polygons_from_vertices,
    read_10x_counts,
    read_image_lazy,
    read_json,
)

__all__ = ["xenium", "read_alignment"]

#: µm per pixel of the Xenium morphology image when ``experiment.xenium`` is missing.
DEFAULT_PIXEL_SIZE = 0.2125
#: Transcript ``cell_id`` values that mean "not assigned to a cell".
_UNASSIGNED = {"UNASSIGNED", "-1", "0", ""}
#: Feature-name prefixes of control probes / codewords (dropped from the counts with ``gex_only``).
_CONTROL_PREFIXES = (
    "NegControl",
    "BLANK",
    "Unassigned",
    "Deprecated",
    "antisense",
    "Intergenic",
    "UnassignedCodeword",
)
#: Transcripts at or above this Phred quality are kept (as Xenium Onboard Analysis does for counts).
MIN_QV = 20.0


def read_alignment(file: str | os.PathLike) -> np.ndarray:
    """Read a Xenium Explorer image-alignment CSV: a 3×3 affine matrix, H&E pixel → morphology pixel.

    Parameters
    ----------
    file
        The ``*_imagealignment.csv`` exported by Xenium Explorer (three comma-separated rows, no header).

    Returns
    -------
    The 3×3 matrix ``A`` with ``[x_m, y_m, 1] = A @ [x_he, y_he, 1]`` (x = column, y = row).

    Raises
    ------
    ValueError
        When the file does not hold an invertible 3×3 affine matrix.

    """
    p = check_path(file, "H&E alignment CSV", kind="file")
    try:
        m = pd.read_csv(p, header=None, sep=None, engine="python").to_numpy(dtype=float)
    except ValueError as err:
        raise ValueError(
            f"{str(p)!r} is not a Xenium Explorer alignment matrix (3 rows of 3 numbers): {err}. Export it from "
            "Xenium Explorer (Image Alignment → Download alignment file) or pass `he_alignment=None`."
        ) from None
    if m.shape != (3, 3):
        raise ValueError(
            f"{str(p)!r} holds a {m.shape[0]}×{m.shape[1]} table; expected the 3×3 alignment matrix that maps H&E "
            "pixels to morphology pixels (keypoint CSVs are not supported)."
        )
    if not np.allclose(m[2], [0, 0, 1], atol=1e-6):
        if np.allclose(m[2, :2], 0, atol=1e-6) and m[2, 2] != 0:
            m = m / m[2, 2]
        else:
            raise ValueError(
                f"The alignment in {str(p)!r} is projective (last row {m[2].tolist()}); expected an affine."
            )
    if abs(np.linalg.det(m[:2, :2])) < 1e-12:
        raise ValueError(f"The alignment matrix in {str(p)!r} is singular.")
    return m


def xenium(
    path: str | os.PathLike,
    *,
    he_image: str | os.PathLike | None = None,
    he_alignment: str | os.PathLike | None = None,
    transcripts: bool = True,
    pixel_size: float | None = None,
    gex_only: bool = True,
) -> SpatialData:
    """Read a 10x Genomics Xenium output folder, and optionally a post-Xenium H&E registered to it.

    Xenium coordinates are microns already, so cells and transcripts map to ``"microns"`` by identity.
    With ``cells.zarr.zip`` and ``experiment.xenium`` present the data are read with
    :func:`spatialdata_io.xenium`; otherwise (trimmed or older outputs) the plain files are read
    directly, logging which files were missing: counts from ``cell_feature_matrix.h5`` (or its MEX folder;
    without either, counted from the transcripts), cells from ``cells.parquet`` / ``cells.csv.gz``,
    polygons from ``cell_boundaries.parquet`` / ``.csv.gz``, transcripts from ``transcripts.parquet`` /
    ``.csv.gz``.

    Parameters
    ----------
    path
        The Xenium output folder.
    he_image
        An H&E image of the same section (TIFF / OME-TIFF read lazily; PNG / JPEG).
    he_alignment
        The Xenium Explorer alignment CSV of ``he_image``: a 3×3 affine mapping H&E pixels to morphology
        pixels (see :func:`read_alignment`). It is composed with the morphology pixel size to map the H&E
        to microns. Without it the H&E is assumed to be registered to the morphology image already.
    transcripts
        Also read the transcripts as the points element ``"transcripts"``.
    pixel_size
        µm per morphology pixel; by default ``pixel_size`` of ``experiment.xenium``, else 0.2125.
    gex_only
        Keep only gene-expression features (drop control probes / codewords).

    Returns
    -------
    SpatialData with the shapes ``"cells"`` (boundary polygons when present, else circles of the cell
    area), the table ``"table"`` annotating them (``obsm["spatial"]``: centroids in microns), the points
    ``"transcripts"`` and, with ``he_image``, the image ``"he"``; all in the ``"microns"`` system.

    Raises
    ------
    FileNotFoundError
        When the folder or all of counts / transcripts are missing.
    ValueError
        When the counts' cell ids match no cell position, or the alignment file is malformed.

    """
    root = check_path(path, "Xenium output folder", kind="dir")
    specs_file = root / "experiment.xenium"
    specs = read_json(specs_file) if specs_file.exists() else {}
    if pixel_size is not None:
        pixel_size = validate_mpp(pixel_size, source="the morphology image")
    elif "pixel_size" in specs:
        pixel_size = float(specs["pixel_size"])
    else:
        pixel_size = DEFAULT_PIXEL_SIZE
        logger.info(
            "experiment.xenium missing in %s; assuming %.4f µm per morphology pixel.",
            root,
            pixel_size,
        )

    if he_alignment is not None and he_image is None:
        raise ValueError(
            "`he_alignment` was given without `he_image`; pass the H&E image the alignment belongs to."
        )
    if he_image is not None:  # check the H&E inputs before the (slow) read of the Xenium data
        check_path(he_image, "H&E image", kind="file")
        if he_alignment is not None:
            read_alignment(he_alignment)

    parts = _read_stock(root, transcripts, gex_only)
    if parts is None:
        parts = _read_files(root, transcripts, gex_only)
    adata, centroids, boundaries, points_df = parts

    # --- cells: polygons where available, else circles of the cell area -----------------------
    n = adata.n_obs
    if "cell_area" in adata.obs:
        radius = np.sqrt(np.clip(adata.obs["cell_area"].to_numpy(float), 1e-6, None) / np.pi)
    else:
        radius = np.full(n, 5.0)
        logger.info("No cell areas in %s; cells drawn as 5 µm-radius circles.", root)
    cell_ids = adata.obs["cell_id"].astype(str).to_numpy()
    if boundaries is not None and pd.Index(cell_ids).isin(boundaries.index).mean() > 0.5:
        polys = boundaries.reindex(cell_ids).to_numpy()
        missing = pd.isna(polys)
        if missing.any():
            logger.info(
                "%d cells have no boundary polygon; drawn as circles of their area.",
                int(missing.sum()),
            )
            polys[missing] = shapely.buffer(shapely.points(centroids[missing]), radius[missing])
        cells = ShapesModel.parse(
            gpd.GeoDataFrame(geometry=list(polys), index=np.arange(n)),
            transformations={MICRONS: Identity()},
        )
        cell_shape = "polygons"
    else:
        if boundaries is not None:
            logger.warning(
                "Cell boundaries do not match the cell ids of the counts; cells drawn as circles."
            )
        cells = ShapesModel.parse(
            centroids,
            geometry=0,
            radius=radius,
            index=np.arange(n),
            transformations={MICRONS: Identity()},
        )
        cell_shape = "circles"
    adata.obsm["spatial"] = centroids
    adata.uns["spatial_unit"] = "microns"
    table = table_element(adata, CELLS_KEY)

    points = {}
    if transcripts and points_df is not None:
        points["transcripts"] = points_df

    image, he_mpp = None, None
    if he_image is not None:
        image, he_mpp = _he_element(he_image, he_alignment, pixel_size)

    sdata = make_sdata(
        image=image,
        shapes={CELLS_KEY: cells},
        table=table,
        points=points,
        table_key=TABLE_KEY,
        image_key=IMAGE_KEY,
    )
    return set_attrs(
        sdata,
        mpp=he_mpp,
        technology="xenium",
        morphology_pixel_size_um=pixel_size,
        cell_shape=cell_shape,
        source_path=str(root),
    )


def _he_element(he_image, he_alignment, pixel_size: float):
    file = check_path(he_image, "H&E image", kind="file")
    to_morph_px = Scale([pixel_size, pixel_size], axes=("x", "y"))
    if he_alignment is not None:
        a = read_alignment(he_alignment)
        t = Sequence([Affine(a, input_axes=("x", "y"), output_axes=("x", "y")), to_morph_px])
        mpp = pixel_size * affine_mpp(a)
    else:
        logger.info(
            "No `he_alignment`: assuming %s is registered to the morphology image (%.4f µm/px).",
            file,
            pixel_size,
        )
        t, mpp = to_morph_px, pixel_size
    return image_element(read_image_lazy(file), {MICRONS: t}), mpp


def _read_stock(root: Path, transcripts: bool, gex_only: bool):
    """Read with spatialdata-io when its required files exist; ``None`` otherwise (logged)."""
    need = [
        "experiment.xenium",
        "cells.zarr.zip",
        "cell_feature_matrix.h5",
        "cells.parquet",
        "cell_boundaries.parquet",
    ]
    if transcripts:
        need.append("transcripts.parquet")
    missing = [f for f in need if not (root / f).exists()]
    if missing:
        logger.info(
            "spatialdata_io.xenium needs %s, missing in %s; reading the plain files.", missing, root
        )
        return None
    try:
        import spatialdata_io

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            sd0 = spatialdata_io.xenium(
                root,
                cells_boundaries=True,
                nucleus_boundaries=False,
                cells_as_circles=False,
                cells_labels=False,
                nucleus_labels=False,
                transcripts=transcripts,
                morphology_mip=False,
                morphology_focus=False,
                aligned_images=False,
                gex_only=gex_only,
            )
        tab = sd0.tables["table"]
        obs = tab.obs.drop(columns=[c for c in ("region",) if c in tab.obs]).copy()
        obs["cell_id"] = obs["cell_id"].astype(str)
        adata = ad.AnnData(
            X=as_counts_matrix(tab.X),
            obs=obs.set_index(obs["cell_id"].to_numpy()),
            var=tab.var.copy(),
        )
        adata.obs.index.name = None
        centroids = np.asarray(tab.obsm["spatial"], dtype=float)
        bounds = sd0.shapes["cell_boundaries"]
        boundaries = pd.Series(bounds.geometry.to_numpy(), index=bounds.index.astype(str))
        pts = None
        if transcripts:
            pts = sd0.points["transcripts"]
            from spatialdata.transformations import set_transformation

            set_transformation(pts, {MICRONS: Identity()}, set_all=True)
        return adata, centroids, boundaries, pts
    except Exception as err:  # noqa: BLE001 - fall back to the plain files
        logger.warning(
            "spatialdata_io.xenium failed on %s (%s); reading the plain files.", root, err
        )
        return None


def _read_table_file(file: Path) -> pd.DataFrame:
    df = pd.read_parquet(file) if file.suffix == ".parquet" else pd.read_csv(file)
    df = df.drop(columns=[c for c in df.columns if str(c).startswith("Unnamed")])
    for col in ("cell_id", "feature_name"):
        if col in df and len(df) and isinstance(df[col].iloc[0], bytes):
            df[col] = df[col].str.decode("utf-8")
    if "cell_id" in df:
        df["cell_id"] = df["cell_id"].astype(str)
    return df


def _read_files(root: Path, transcripts: bool, gex_only: bool):
    counts = first_existing(root, ("cell_feature_matrix.h5", "cell_feature_matrix"))
    cells_file = first_existing(root, ("cells.parquet", "cells.csv.gz", "cells.csv"))
    bounds_file = first_existing(
        root, ("cell_boundaries.parquet", "cell_boundaries.csv.gz", "cell_boundaries.csv")
    )
    tx_file = first_existing(root, ("transcripts.parquet", "transcripts.csv.gz", "transcripts.csv"))
    for what, f in (
        ("counts", counts),
        ("cells", cells_file),
        ("cell boundaries", bounds_file),
        ("transcripts", tx_file),
    ):
        if f is None:
            logger.info("Xenium %s file not found in %s.", what, root)
    if counts is None and tx_file is None:
        raise FileNotFoundError(
            f"{str(root)!r} has neither cell_feature_matrix.h5 (or cell_feature_matrix/) nor transcripts: is it a "
            f"Xenium output folder? It holds: {sorted(x.name for x in root.iterdir())[:12]}."
        )

    tx = _read_table_file(tx_file) if tx_file is not None else None
    boundaries = None
    if bounds_file is not None:
        bdf = _read_table_file(bounds_file)
        boundaries = polygons_from_vertices(bdf, "cell_id", "vertex_x", "vertex_y")

    if counts is not None:
        adata = read_10x_counts(counts, gex_only=gex_only)
    else:
        logger.info(
            "No cell_feature_matrix in %s; counting transcripts per cell (qv >= %s).", root, MIN_QV
        )
        adata = _counts_from_transcripts(tx, gex_only)
    adata = ad.AnnData(
        X=adata.X, obs=pd.DataFrame(index=adata.obs_names.astype(str)), var=adata.var.copy()
    )

    # cell positions: cells table, else boundary centroids, else transcript means
    if cells_file is not None:
        meta = _read_table_file(cells_file).set_index("cell_id", drop=False)
        meta.index = meta.index.astype(str)
        pos_ids = meta.index
    elif boundaries is not None:
        logger.info(
            "No cells.parquet / cells.csv.gz in %s; cell centroids and areas from the boundaries.",
            root,
        )
        meta = pd.DataFrame(
            {
                "cell_id": boundaries.index,
                "x_centroid": shapely.get_x(shapely.centroid(boundaries.to_numpy())),
                "y_centroid": shapely.get_y(shapely.centroid(boundaries.to_numpy())),
                "cell_area": shapely.area(boundaries.to_numpy()),
            },
            index=boundaries.index,
        )
        pos_ids = meta.index
    else:
        logger.info(
            "No cells or boundaries in %s; cell centroids from the mean transcript position.", root
        )
        g = (
            tx[~tx["cell_id"].isin(_UNASSIGNED)]
            .groupby("cell_id")[["x_location", "y_location"]]
            .mean()
        )
        meta = g.rename(columns={"x_location": "x_centroid", "y_location": "y_centroid"})
        meta["cell_id"] = meta.index.astype(str)
        meta.index = meta.index.astype(str)
        pos_ids = meta.index
    mask = check_overlap(
        adata.obs_names,
        pos_ids,
        what="cell ids of the cells / boundaries files",
        fix="Check that the counts and the cell files come from the same Xenium output folder.",
    )
    adata = adata[mask].copy()
    meta = meta.loc[adata.obs_names]
    centroids = meta[["x_centroid", "y_centroid"]].to_numpy(float)
    keep = [c for c in meta.columns if c not in ("x_centroid", "y_centroid")]
    for c in keep:
        adata.obs[c] = meta[c].to_numpy()
    adata.obs["cell_id"] = adata.obs_names.to_numpy()

    pts = None
    if transcripts and tx_file is not None:
        pts = _points(tx_file, tx)
    elif transcripts:
        logger.info("No transcripts file in %s; no points element.", root)
    return adata, centroids, boundaries, pts


def _counts_from_transcripts(tx: pd.DataFrame, gex_only: bool) -> ad.AnnData:
    t = tx[~tx["cell_id"].isin(_UNASSIGNED)]
    if "qv" in t:
        t = t[t["qv"] >= MIN_QV]
    if gex_only:
        t = t[~t["feature_name"].astype(str).str.startswith(_CONTROL_PREFIXES)]
    cells, ci = np.unique(t["cell_id"].to_numpy(), return_inverse=True)
    genes, gi = np.unique(t["feature_name"].astype(str).to_numpy(), return_inverse=True)
    x = sparse.csr_matrix(
        (np.ones(len(t), dtype=np.float32), (ci, gi)), shape=(len(cells), len(genes))
    )
    x.sum_duplicates()
    return ad.AnnData(X=x, obs=pd.DataFrame(index=cells.astype(str)), var=pd.DataFrame(index=genes))


def _points(tx_file: Path, tx: pd.DataFrame | None):
    if tx_file.suffix == ".parquet":
        ddf = dd.read_parquet(tx_file)  # lazy: transcripts of a whole run do not fit in memory
        sample = ddf.head(1)
        for col in ("feature_name", "cell_id"):
            if col in sample and len(sample) and isinstance(sample[col].iloc[0], bytes):
                ddf[col] = ddf[col].map_partitions(
                    lambda s: s.str.decode("utf-8"), meta=(col, "object")
                )
        cats = ddf["feature_name"].drop_duplicates().compute()
        ddf["feature_name"] = ddf["feature_name"].astype(
            pd.CategoricalDtype(categories=sorted(cats.astype(str)))
        )
        data = ddf
    else:
        data = tx.copy()
        data["feature_name"] = data["feature_name"].astype(str).astype("category")
    data = data[
        [c for c in data.columns if c != "z_location"]
        + (["z_location"] if "z_location" in data.columns else [])
    ]
    return PointsModel.parse(
        data,
        coordinates={"x": "x_location", "y": "y_location"},
        feature_key="feature_name",
        instance_key="cell_id",
        transformations={MICRONS: Identity()},
    )
