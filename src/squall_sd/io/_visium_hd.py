"""Reader for 10x Genomics Visium HD binned outputs (``binned_outputs/square_XXXum``)."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import anndata as ad
import geopandas as gpd
import numpy as np
import pandas as pd
from spatialdata import SpatialData
from spatialdata.models import ShapesModel

from squall_sd._constants import IMAGE_KEY, MICRONS, TABLE_KEY, bins_key
from squall_sd._logging import logger
from squall_sd._sdata import check_path, microns_scale, validate_mpp
from squall_sd.io._common import image_element, make_sdata, set_attrs, table_element
from squall_sd.io._tenx import (
    as_counts_matrix,
    first_existing,
    fit_grid,
    mpp_from_grid,
    read_10x_counts,
    read_image_lazy,
    read_json,
    squares,
)
from squall_sd.io._visium import match_positions, read_positions

__all__ = ["visium_hd"]

_COUNTS_CANDIDATES = (
    "filtered_feature_bc_matrix.h5",
    "filtered_feature_bc_matrix",
    "raw_feature_bc_matrix.h5",
    "raw_feature_bc_matrix",
)


def _find_bin_dir(root: Path, bin_size: int) -> Path:
    name = f"square_{int(bin_size):03d}um"
    for cand in (root, root / name, root / "binned_outputs" / name):
        if cand.name == name and cand.is_dir():
            return cand
    hits = sorted(p for p in root.rglob(name) if p.is_dir())
    if hits:
        return hits[0]
    available = sorted({p.name for p in root.rglob("square_*um") if p.is_dir()})
    raise FileNotFoundError(
        f"No {name}/ folder under {str(root)!r}. Available bin sizes: {available or 'none'}. Pass the Visium HD "
        "outs folder (holding binned_outputs/) and a `bin_size` that Space Ranger wrote (2, 8 or 16)."
    )


def visium_hd(
    path: str | os.PathLike,
    *,
    bin_size: int = 8,
    fullres_image_file: str | os.PathLike | None = None,
    mpp: float | None = None,
) -> SpatialData:
    """Read one bin size of a 10x Genomics Visium HD Space Ranger output.

    When the output has ``feature_slice.h5`` the counts are read with :func:`spatialdata_io.visium_hd`;
    otherwise (many shared / trimmed outputs lack it, and the stock reader then fails) the
    ``binned_outputs/square_XXXum`` folder is read directly: the counts (``filtered_feature_bc_matrix.h5``
    or its MEX folder), ``spatial/tissue_positions.parquet`` and ``spatial/scalefactors_json.json``
    (``microns_per_pixel``, ``bin_size_um``).

    Parameters
    ----------
    path
        The Space Ranger ``outs`` folder, its ``binned_outputs/`` folder, or one ``square_XXXum/`` folder.
    bin_size
        Bin edge in µm (2, 8 or 16); selects ``square_{bin_size:03d}um``.
    fullres_image_file
        The full-resolution H&E given to Space Ranger (absolute, or relative to ``path``). Without it the
        hires (else lowres) tissue image of ``spatial/`` is used, scaled so that it maps to microns.
    mpp
        µm per full-resolution pixel, overriding ``microns_per_pixel`` of the scale factors.

    Returns
    -------
    SpatialData with the image ``"he"`` (if any), the shapes ``"bins_{n}um"`` (squares of ``bin_size``
    µm, oriented along the bin grid, in full-resolution pixels) and the table ``"table"`` (raw counts;
    ``obs`` holds ``in_tissue``, ``array_row``, ``array_col``; ``obsm["spatial"]`` the bin centres in
    microns), all mapped to the ``"microns"`` coordinate system.

    Raises
    ------
    FileNotFoundError
        When the bin folder, counts, positions or scale factors are missing.
    ValueError
        When no barcode of the counts table is found in the tissue positions.

    """
    root = check_path(path, "Visium HD outs folder", kind="dir")
    bin_dir = _find_bin_dir(root, bin_size)
    outs = bin_dir.parent.parent if bin_dir.parent.name == "binned_outputs" else bin_dir.parent

    counts = first_existing(bin_dir, _COUNTS_CANDIDATES)
    if counts is None:
        raise FileNotFoundError(
            f"No counts in {str(bin_dir)!r}: expected filtered_feature_bc_matrix.h5 or a filtered_feature_bc_matrix/ "
            "MEX folder."
        )
    spatial = check_path(bin_dir / "spatial", f"spatial/ folder of {bin_dir.name}", kind="dir")
    positions_file = first_existing(spatial, ("tissue_positions.parquet", "tissue_positions.csv"))
    if positions_file is None:
        raise FileNotFoundError(f"No tissue_positions.parquet (or .csv) in {str(spatial)!r}.")
    sf_file = first_existing(spatial, ("scalefactors_json.json",)) or first_existing(
        outs / "spatial", ("scalefactors_json.json",)
    )
    if sf_file is None:
        raise FileNotFoundError(
            f"No scalefactors_json.json in {str(spatial)!r} or {str(outs / 'spatial')!r}."
        )
    scalefactors = read_json(sf_file)
    if "bin_size_um" in scalefactors and not np.isclose(
        float(scalefactors["bin_size_um"]), bin_size
    ):
        logger.warning(
            "%s says bin_size_um=%s, not %s.", sf_file, scalefactors["bin_size_um"], bin_size
        )

    if mpp is not None:
        fullres_mpp = validate_mpp(mpp, source="the full-resolution image")
    elif scalefactors.get("microns_per_pixel"):
        fullres_mpp = float(scalefactors["microns_per_pixel"])
    elif scalefactors.get("spot_diameter_fullres"):
        fullres_mpp = float(bin_size) / float(scalefactors["spot_diameter_fullres"])
        logger.info("No microns_per_pixel in %s; using bin_size / spot_diameter_fullres.", sf_file)
    else:
        raise ValueError(f"Cannot determine µm per pixel from {sf_file}; pass `mpp=`.")

    adata = _read_hd_counts(outs, bin_size, counts)
    positions = read_positions(positions_file)
    adata, centers_px = match_positions(
        adata,
        positions,
        what=f"bin barcodes of {positions_file.name}",
        fix="Check that the counts and spatial/ folder come from the same square_XXXum folder of one run.",
    )

    # bin squares oriented along the bin grid (fitted on all bins), edge exactly bin_size µm
    half_px = bin_size / 2 / fullres_mpp
    grid = fit_grid(
        positions[["array_col", "array_row"]].to_numpy(float) * bin_size,
        positions[["pxl_col_in_fullres", "pxl_row_in_fullres"]].to_numpy(float),
    )
    if grid is not None and np.linalg.norm(grid[:, 0]) > 0:
        u = grid[:, 0] / np.linalg.norm(grid[:, 0])
        v = grid[:, 1] - (grid[:, 1] @ u) * u
        v = v / np.linalg.norm(v) if np.linalg.norm(v) > 0 else np.array([-u[1], u[0]])
        fitted_mpp = mpp_from_grid(grid)
        if abs(fitted_mpp / fullres_mpp - 1) > 0.05:
            logger.warning(
                "Bin grid implies %.4f µm/px but the scale factors say %.4f.",
                fitted_mpp,
                fullres_mpp,
            )
    else:
        u, v = np.array([1.0, 0.0]), np.array([0.0, 1.0])
    polys = squares(centers_px, np.stack([u * half_px, v * half_px]))
    to_microns = microns_scale(fullres_mpp)
    shapes_key = bins_key(bin_size)
    bins = ShapesModel.parse(
        gpd.GeoDataFrame(geometry=polys, index=np.arange(adata.n_obs)),
        transformations={MICRONS: to_microns},
    )
    adata.obsm["spatial"] = centers_px * fullres_mpp
    adata.uns["spatial_unit"] = "microns"
    table = table_element(adata, shapes_key)

    image, image_mpp, image_source = _hd_image(
        root, outs, bin_dir, fullres_image_file, scalefactors, fullres_mpp
    )
    sdata = make_sdata(
        image=image,
        shapes={shapes_key: bins},
        table=table,
        table_key=TABLE_KEY,
        image_key=IMAGE_KEY,
    )
    return set_attrs(
        sdata,
        mpp=image_mpp,
        technology="visium_hd",
        bin_size_um=float(bin_size),
        fullres_mpp=fullres_mpp,
        image_source=image_source,
        shapes_key=shapes_key,
        source_path=str(root),
    )


def _read_hd_counts(outs: Path, bin_size: int, counts: Path) -> ad.AnnData:
    """Read the counts of one bin size (spatialdata-io with ``feature_slice.h5``, else scanpy)."""
    has_slice = first_existing(outs, ("feature_slice.h5", "*_feature_slice.h5")) is not None
    if has_slice:
        try:
            import spatialdata_io

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                sd0 = spatialdata_io.visium_hd(
                    outs,
                    bin_size=int(bin_size),
                    load_segmentations_only=False,
                    load_all_images=False,
                )
            key = f"square_{int(bin_size):03d}um"
            tab = sd0.tables[key]
            return ad.AnnData(
                X=as_counts_matrix(tab.X),
                obs=pd.DataFrame(index=tab.obs_names.astype(str)),
                var=tab.var.copy(),
            )
        except Exception as err:  # noqa: BLE001 - fall back to reading the binned folder directly
            logger.warning(
                "spatialdata_io.visium_hd could not read %s (%s); reading the binned files.",
                outs,
                err,
            )
    else:
        logger.info(
            "No feature_slice.h5 in %s (spatialdata_io.visium_hd needs it); reading %s directly.",
            outs,
            counts,
        )
    adata = read_10x_counts(counts)
    return ad.AnnData(
        X=adata.X, obs=pd.DataFrame(index=adata.obs_names.astype(str)), var=adata.var.copy()
    )


def _hd_image(root, outs, bin_dir, fullres_image_file, scalefactors, fullres_mpp):
    if fullres_image_file is not None:
        p = Path(fullres_image_file).expanduser()
        if not p.is_absolute() and not p.exists():
            p = root / p
        file = check_path(p, "full-resolution H&E image", kind="file")
        return (
            image_element(read_image_lazy(file), {MICRONS: microns_scale(fullres_mpp)}),
            fullres_mpp,
            "fullres",
        )
    for name, key in (
        ("tissue_hires_image.png", "tissue_hires_scalef"),
        ("tissue_lowres_image.png", "tissue_lowres_scalef"),
    ):
        file = first_existing(outs / "spatial", (name,)) or first_existing(
            bin_dir / "spatial", (name,)
        )
        if file is not None and scalefactors.get(key):
            image_mpp = fullres_mpp / float(scalefactors[key])
            logger.info("No full-resolution image given; using %s (%.3f µm/px).", file, image_mpp)
            return (
                image_element(read_image_lazy(file), {MICRONS: microns_scale(image_mpp)}),
                image_mpp,
                name,
            )
    logger.warning(
        "No H&E image found for %s and no `fullres_image_file` given; reading without image.", root
    )
    return None, None, None
