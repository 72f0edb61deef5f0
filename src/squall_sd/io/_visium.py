"""Reader for 10x Genomics Visium (Space Ranger 1.x–3.x ``outs``), built on :func:`spatialdata_io.visium`."""

from __future__ import annotations

import os
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
from spatialdata import SpatialData

from squall_sd._constants import IMAGE_KEY, MICRONS, SPOTS_KEY, TABLE_KEY
from squall_sd._logging import logger
from squall_sd._sdata import check_path, microns_scale, validate_mpp
from squall_sd.io._common import circles_element, image_element, make_sdata, set_attrs, table_element
from squall_sd.io._tenx import (
    as_counts_matrix,
    check_overlap,
    first_existing,
    fit_grid,
    mpp_from_grid,
    read_10x_counts,
    read_image_lazy,
    read_json,
)

__all__ = ["visium"]

#: Diameter of a Visium spot (µm) and centre-to-centre distance of neighbouring spots (µm).
SPOT_DIAMETER_UM = 55.0
SPOT_PITCH_UM = 100.0
#: ``spot_diameter_fullres`` of Space Ranger is the size in pixels of a theoretical 65 µm spot.
SCALEFACTOR_SPOT_UM = 65.0

_COUNTS_CANDIDATES = (
    "filtered_feature_bc_matrix.h5",
    "*_filtered_feature_bc_matrix.h5",
    "filtered_feature_bc_matrix",
    "raw_feature_bc_matrix.h5",
    "*_raw_feature_bc_matrix.h5",
    "raw_feature_bc_matrix",
)
_POSITIONS_CANDIDATES = (
    "tissue_positions.csv",
    "tissue_positions_list.csv",
    "tissue_positions.parquet",
)
_POSITION_COLUMNS = [
    "in_tissue",
    "array_row",
    "array_col",
    "pxl_row_in_fullres",
    "pxl_col_in_fullres",
]


def _resolve(outs: Path, file: str | os.PathLike) -> Path:
    p = Path(file).expanduser()
    return p if p.is_absolute() or p.exists() else outs / p


def read_positions(file: Path) -> pd.DataFrame:
    """Read a Space Ranger ``tissue_positions(_list).csv`` / ``.parquet`` into a frame indexed by barcode."""
    if file.suffix == ".parquet":
        df = pd.read_parquet(file)
    else:
        df = pd.read_csv(file, header=None)
        if str(df.iloc[0, 0]) == "barcode" or "in_tissue" in df.iloc[0].astype(str).tolist():
            df = pd.read_csv(file, header=0)
    if "barcode" in df.columns:
        df = df.set_index("barcode")
    elif df.shape[1] == 6:
        df = df.set_index(df.columns[0])
        df.columns = _POSITION_COLUMNS
    else:
        raise ValueError(
            f"{str(file)!r} does not look like a Space Ranger tissue positions file: expected the columns "
            f"barcode, {', '.join(_POSITION_COLUMNS)}; got {list(df.columns)}."
        )
    missing = [c for c in _POSITION_COLUMNS if c not in df.columns]
    if missing:
        raise ValueError(f"{str(file)!r} lacks the columns {missing}.")
    df.index = df.index.astype(str)
    df.index.name = None
    return df


def match_positions(
    adata: ad.AnnData, positions: pd.DataFrame, *, what: str, fix: str
) -> tuple[ad.AnnData, np.ndarray]:
    """Keep the barcodes of ``adata`` found in ``positions`` and copy their grid columns to ``obs``.

    Returns the filtered table (``obs`` gains ``in_tissue``, ``array_row``, ``array_col``) and the
    (n, 2) full-resolution pixel centres (x, y). ``what`` / ``fix`` go into the error raised by
    :func:`~squall_sd.io._tenx.check_overlap` when no barcode matches.
    """
    mask = check_overlap(adata.obs_names, positions.index, what=what, fix=fix)
    adata = adata[mask].copy()
    pos = positions.loc[adata.obs_names]
    for col in ("in_tissue", "array_row", "array_col"):
        adata.obs[col] = pos[col].to_numpy().astype(np.int64)
    return adata, pos[["pxl_col_in_fullres", "pxl_row_in_fullres"]].to_numpy(float)


def spot_grid_mpp(
    positions: pd.DataFrame, *, row_pitch_um: float, col_pitch_um: float
) -> tuple[float | None, np.ndarray | None]:
    """Fit full-resolution pixel positions on array positions; return (µm/px, 2×3 µm→px matrix)."""
    grid_um = np.column_stack(
        [
            positions["array_col"].to_numpy(float) * col_pitch_um,
            positions["array_row"].to_numpy(float) * row_pitch_um,
        ]
    )
    px = positions[["pxl_col_in_fullres", "pxl_row_in_fullres"]].to_numpy(float)
    m = fit_grid(grid_um, px)
    if m is None:
        return None, None
    return mpp_from_grid(m), m


def visium(
    path: str | os.PathLike,
    *,
    fullres_image_file: str | os.PathLike | None = None,
    counts_file: str | os.PathLike | None = None,
    dataset_id: str | None = None,
    tissue_positions_file: str | os.PathLike | None = None,
    scalefactors_file: str | os.PathLike | None = None,
    mpp: float | None = None,
) -> SpatialData:
    """Read a 10x Genomics Visium Space Ranger ``outs`` folder (Space Ranger 1.x–3.x, incl. CytAssist).

    Counts in ``.h5`` are read with :func:`spatialdata_io.visium`; MEX counts (a
    ``filtered_feature_bc_matrix/`` folder, as CytAssist runs often ship) are read with
    :func:`scanpy.read_10x_mtx`. The spots are then registered in the physical ``"microns"``
    coordinate system.

    The µm per full-resolution pixel is fitted on the spot lattice (neighbouring spot centres are
    100 µm apart), which is exact for every Space Ranger version; ``spot_diameter_fullres`` of
    ``scalefactors_json.json`` (the pixel size of a theoretical 65 µm spot) is the fallback when fewer
    than three spots are present.

    Parameters
    ----------
    path
        The Space Ranger ``outs`` folder (it holds the counts and ``spatial/``).
    fullres_image_file
        The full-resolution H&E given to Space Ranger (absolute, or relative to ``path``). Without it the
        ``spatial/tissue_hires_image.png`` (or the lowres image) is used, scaled so that it still maps to
        microns. TIFF / OME-TIFF / SVS files are read lazily chunk by chunk.
    counts_file
        Counts file or MEX folder (absolute, or relative to ``path``). By default the first of
        ``filtered_feature_bc_matrix.h5``, ``filtered_feature_bc_matrix/``, ``raw_feature_bc_matrix.h5``,
        ``raw_feature_bc_matrix/`` found (with or without a ``<dataset_id>_`` prefix).
    dataset_id
        Name of the dataset, recorded in ``sdata.attrs["squall"]["dataset_id"]``. Inferred from a
        ``<dataset_id>_filtered_feature_bc_matrix.h5`` prefix or the folder name.
    tissue_positions_file
        Spot positions (default: ``spatial/tissue_positions.csv``, ``spatial/tissue_positions_list.csv``
        or ``spatial/tissue_positions.parquet``).
    scalefactors_file
        Scale factors JSON (default: ``spatial/scalefactors_json.json``).
    mpp
        µm per full-resolution pixel, overriding the value fitted on the spot lattice.

    Returns
    -------
    SpatialData with the image ``"he"`` (multiscale, lazy), the shapes ``"spots"`` (55 µm discs, in
    full-resolution pixels) and the table ``"table"`` (raw counts; ``obs`` holds ``in_tissue``,
    ``array_row``, ``array_col``; ``obsm["spatial"]`` the spot centres in microns). All elements map to
    the ``"microns"`` coordinate system; ``sdata.attrs["squall"]["mpp"]`` is the µm per pixel of
    ``"he"``.

    Raises
    ------
    FileNotFoundError
        When ``path``, the counts, the positions or the scale factors are missing.
    ValueError
        When no barcode of the counts table is found in the tissue positions.

    """
    outs = check_path(path, "Space Ranger outs folder", kind="dir")

    # --- locate files -------------------------------------------------------------------------
    counts = _locate_counts(outs, counts_file)
    positions_file = _locate_positions(outs, tissue_positions_file)
    sf_file = check_path(
        _resolve(outs, scalefactors_file)
        if scalefactors_file is not None
        else outs / "spatial" / "scalefactors_json.json",
        "scale factors file",
        kind="file",
    )
    scalefactors = read_json(sf_file)
    if dataset_id is None:
        dataset_id = _infer_dataset_id(outs, counts)
    positions = read_positions(positions_file)

    # --- counts (+ positions) -----------------------------------------------------------------
    adata = _read_counts_and_positions(outs, counts, positions_file, dataset_id)
    adata, centers_px = match_positions(
        adata,
        positions,
        what=f"spot barcodes of {positions_file.name}",
        fix="Check that the counts file and the spatial/ folder come from the same Space Ranger run "
        "(or pass the matching `counts_file=` / `tissue_positions_file=`).",
    )

    # --- µm per full-resolution pixel -----------------------------------------------------------
    fullres_mpp = _fullres_mpp(mpp, positions, scalefactors, sf_file)
    to_microns = microns_scale(fullres_mpp)

    # --- elements -----------------------------------------------------------------------------
    spots = circles_element(
        centers_px,
        SPOT_DIAMETER_UM / 2 / fullres_mpp,
        {MICRONS: to_microns},
        index=np.arange(adata.n_obs),
    )
    adata.obsm["spatial"] = centers_px * fullres_mpp
    adata.uns["spatial_unit"] = "microns"
    table = table_element(adata, SPOTS_KEY)

    image, image_mpp, image_source = _visium_image(outs, fullres_image_file, scalefactors, fullres_mpp, centers_px)

    sdata = make_sdata(
        image=image,
        shapes={SPOTS_KEY: spots},
        table=table,
        table_key=TABLE_KEY,
        image_key=IMAGE_KEY,
    )
    return set_attrs(
        sdata,
        mpp=image_mpp,
        technology="visium",
        dataset_id=dataset_id,
        fullres_mpp=fullres_mpp,
        image_source=image_source,
        spot_diameter_um=SPOT_DIAMETER_UM,
        source_path=str(outs),
    )


def _locate_counts(outs: Path, counts_file: str | os.PathLike | None) -> Path:
    """Return ``counts_file`` (checked) or the first standard counts file / MEX folder in ``outs``."""
    if counts_file is not None:
        return check_path(_resolve(outs, counts_file), "counts file")
    counts = first_existing(outs, _COUNTS_CANDIDATES)
    if counts is None:
        raise FileNotFoundError(
            f"No counts found in {str(outs)!r}: expected filtered_feature_bc_matrix.h5 or a "
            "filtered_feature_bc_matrix/ MEX folder (or the raw_ ones). Pass `counts_file=` if it is named "
            f"differently. The folder holds: {sorted(x.name for x in outs.iterdir())[:12]}."
        )
    return counts


def _locate_positions(outs: Path, tissue_positions_file: str | os.PathLike | None) -> Path:
    """Return ``tissue_positions_file`` (checked) or the first standard positions file in ``outs/spatial``."""
    if tissue_positions_file is not None:
        return check_path(_resolve(outs, tissue_positions_file), "tissue positions file", kind="file")
    spatial = outs / "spatial"
    check_path(spatial, "spatial/ folder of the Space Ranger outs", kind="dir")
    positions_file = first_existing(spatial, _POSITIONS_CANDIDATES)
    if positions_file is None:
        raise FileNotFoundError(
            f"No tissue positions file in {str(spatial)!r}: expected one of {list(_POSITIONS_CANDIDATES)}. "
            "Pass `tissue_positions_file=`."
        )
    return positions_file


def _infer_dataset_id(outs: Path, counts: Path) -> str:
    """Return the ``<dataset_id>_`` prefix of the counts file, else the name of the run folder."""
    if counts.name.endswith("_filtered_feature_bc_matrix.h5") or counts.name.endswith("_raw_feature_bc_matrix.h5"):
        return counts.name.rsplit("_", 3)[0]
    return outs.parent.name if outs.name == "outs" else outs.name


def _fullres_mpp(mpp: float | None, positions: pd.DataFrame, scalefactors: dict, sf_file: Path) -> float:
    """Return µm per full-resolution pixel: ``mpp``, else the spot-lattice fit, else ``spot_diameter_fullres``."""
    sf_mpp = None
    if scalefactors.get("spot_diameter_fullres"):
        sf_mpp = SCALEFACTOR_SPOT_UM / float(scalefactors["spot_diameter_fullres"])
    grid_mpp, _ = spot_grid_mpp(positions, row_pitch_um=SPOT_PITCH_UM * np.sqrt(3) / 2, col_pitch_um=SPOT_PITCH_UM / 2)
    if mpp is not None:
        return validate_mpp(mpp, source="the full-resolution image")
    if grid_mpp is not None:
        if sf_mpp is not None and abs(sf_mpp / grid_mpp - 1) > 0.1:
            logger.info(
                "µm/px from the spot lattice (%.4f) differs from spot_diameter_fullres (%.4f); using the lattice.",
                grid_mpp,
                sf_mpp,
            )
        return grid_mpp
    if sf_mpp is not None:
        logger.info("Too few spots to fit the lattice; µm/px from spot_diameter_fullres (65 µm spot).")
        return sf_mpp
    raise ValueError(
        f"Cannot determine µm per pixel: {sf_file.name} has no spot_diameter_fullres and the positions are "
        "too few to fit the spot lattice. Pass `mpp=` (µm per full-resolution pixel)."
    )


def _read_counts_and_positions(outs: Path, counts: Path, positions_file: Path, dataset_id: str) -> ad.AnnData:
    """Read the counts as AnnData (barcodes as obs_names), via spatialdata-io where it can."""
    if counts.is_file() and counts.suffix == ".h5" and counts.parent == outs and positions_file.suffix == ".csv":
        try:
            import spatialdata_io

            sd0 = spatialdata_io.visium(
                outs,
                dataset_id=dataset_id,
                counts_file=counts.name,
                tissue_positions_file=positions_file.relative_to(outs) if positions_file.is_relative_to(outs) else None,
            )
            adata = sd0.tables["table"]
            adata = ad.AnnData(
                X=as_counts_matrix(adata.X),
                obs=pd.DataFrame(index=adata.obs_names),
                var=adata.var.copy(),
            )
            return adata
        except Exception as err:  # noqa: BLE001 - any failure of the stock reader falls back to ours
            logger.warning(
                "spatialdata_io.visium could not read %s (%s); reading the files directly.",
                outs,
                err,
            )
    else:
        logger.info(
            "spatialdata_io.visium does not read %s (%s); reading it with scanpy.",
            counts.name,
            "MEX folder" if counts.is_dir() else "non-standard layout",
        )
    adata = read_10x_counts(counts)
    return ad.AnnData(X=adata.X, obs=pd.DataFrame(index=adata.obs_names.astype(str)), var=adata.var.copy())


def _visium_image(
    outs: Path,
    fullres_image_file: str | os.PathLike | None,
    scalefactors: dict,
    fullres_mpp: float,
    centers_px: np.ndarray,
):
    """Return (image element or None, µm/px of that image or None, source name)."""
    if fullres_image_file is not None:
        file = check_path(_resolve(outs, fullres_image_file), "full-resolution H&E image", kind="file")
        arr = read_image_lazy(file)
        yx = arr.shape[:2] if arr.shape[-1] in (3, 4) and arr.ndim == 3 else arr.shape[-2:]
        hi = np.nanmax(centers_px, axis=0) if len(centers_px) else np.zeros(2)
        if hi[0] > yx[1] * 1.02 or hi[1] > yx[0] * 1.02:
            logger.warning(
                "Spot centres reach (%.0f, %.0f) px but %s is only %d x %d px: is it the image Space Ranger used?",
                hi[0],
                hi[1],
                file.name,
                yx[1],
                yx[0],
            )
        return image_element(arr, {MICRONS: microns_scale(fullres_mpp)}), fullres_mpp, "fullres"
    for name, key in (
        ("tissue_hires_image.png", "tissue_hires_scalef"),
        ("tissue_lowres_image.png", "tissue_lowres_scalef"),
    ):
        file = outs / "spatial" / name
        if file.exists() and scalefactors.get(key):
            image_mpp = fullres_mpp / float(scalefactors[key])
            logger.info("No full-resolution image given; using %s (%.3f µm/px).", name, image_mpp)
            return (
                image_element(read_image_lazy(file), {MICRONS: microns_scale(image_mpp)}),
                image_mpp,
                name,
            )
    logger.warning(
        "No H&E image found in %s/spatial and no `fullres_image_file` given; reading without image.",
        outs,
    )
    return None, None, None
