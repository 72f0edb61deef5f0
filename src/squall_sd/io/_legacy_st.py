"""Legacy Spatial Transcriptomics (ST, 2016-2019 arrays; her2st / STUtility layout)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Literal

import anndata as ad
import numpy as np
import pandas as pd
from scipy import sparse
from spatialdata import SpatialData

from squall_sd._constants import MICRONS, SPOTS_KEY
from squall_sd._logging import logger
from squall_sd._sdata import affine_mpp, check_path, microns_scale, validate_mpp
from squall_sd.io._common import circles_element, make_sdata, set_attrs, table_element
from squall_sd.io._he import lazy_image_element, open_lazy

#: Columns a spot table must have (``new_x``/``new_y``/``selected`` are optional).
SPOT_COLUMNS = ("x", "y", "pixel_x", "pixel_y")
#: Centre-to-centre distance (µm) of neighbouring spots on a 1k ST array, whose spots sit on every integer
#: (x, y). 2k arrays put spots on a checkerboard (x + y even) of a grid half as coarse (100 µm per unit).
ST_1K_PITCH_UM = 200.0
ST_2K_UNIT_UM = 100.0


def _package_version() -> str:
    try:
        return version("squall-sd")
    except PackageNotFoundError:  # pragma: no cover
        return "0.0.0+unknown"


def _examples(values: Sequence, n: int = 5) -> str:
    values = list(values)
    shown = ", ".join(repr(str(v)) for v in values[:n])
    return f"[{shown}{', ...' if len(values) > n else ''}]"


def _looks_like_spot_ids(values: Sequence) -> float:
    """Fraction of ``values`` of the form ``"{x}x{y}"`` (numbers)."""
    s = pd.Index(values).astype(str)
    if len(s) == 0:
        return 0.0
    return float(s.str.fullmatch(r"-?\d+(\.\d+)?x-?\d+(\.\d+)?").mean())


def read_spot_table(path: str | os.PathLike) -> pd.DataFrame:
    """Read an ST spot-selection / alignment table and index it by the spot id ``"{x}x{y}"``.

    Parameters
    ----------
    path
        Tab- (or whitespace-) separated table with columns ``x y pixel_x pixel_y`` and optionally
        ``new_x new_y selected`` (the ST spot detector / STUtility layout).

    Returns
    -------
    The table indexed by ``f"{round(x)}x{round(y)}"``, with ``selected`` filled with 1 when absent.

    """
    p = check_path(path, "spot table", kind="file")
    df = pd.read_csv(p, sep="\t")
    if df.shape[1] == 1:
        df = pd.read_csv(p, sep=r"\s+")
    missing = [c for c in SPOT_COLUMNS if c not in df.columns]
    if missing:
        raise ValueError(
            f"The spot table {p.name} lacks the column(s) {missing}; found {list(df.columns)}. "
            "Pass the ST spot-detector / STUtility selection table (columns: x y new_x new_y pixel_x pixel_y selected)."
        )
    if "selected" not in df.columns:
        df["selected"] = 1
    xi = np.rint(df["x"].to_numpy(float)).astype(int)
    yi = np.rint(df["y"].to_numpy(float)).astype(int)
    df.index = pd.Index([f"{a}x{b}" for a, b in zip(xi, yi, strict=True)], name="spot_id")
    dup = df.index[df.index.duplicated()]
    if len(dup):
        raise ValueError(f"The spot table {p.name} has duplicate spot coordinates {_examples(dup)}.")
    return df


def read_st_counts(path: str | os.PathLike) -> pd.DataFrame:
    """Read an ST counts matrix (spots × genes; first column the spot id ``"{x}x{y}"``).

    A genes × spots file (spot ids as the header) is recognised and transposed.
    """
    p = check_path(path, "counts file", kind="file")
    df = pd.read_csv(p, sep="\t", index_col=0)
    if df.shape[1] == 0:
        df = pd.read_csv(p, sep=r"\s+", index_col=0)
    if _looks_like_spot_ids(df.index) < 0.5 and _looks_like_spot_ids(df.columns) >= 0.5:
        logger.info("%s holds genes x spots; transposing", p.name)
        df = df.T
    df.index = df.index.astype(str)
    df.columns = df.columns.astype(str)
    return df


def fit_mpp(array_xy: np.ndarray, pixel_xy: np.ndarray, pitch_um: float) -> tuple[float, float]:
    """Fit µm/px from spot pixel positions and array coordinates by least squares.

    Fits the affine map ``pixel = A @ (array * pitch_um) + b`` and returns ``1 / sqrt(|det A|)`` (µm per
    pixel, the geometric mean over x and y) and the RMS residual in µm.

    Parameters
    ----------
    array_xy
        (n, 2) array coordinates of the spots.
    pixel_xy
        (n, 2) pixel positions (x = column, y = row) of the same spots.
    pitch_um
        µm per unit of the array coordinates.

    """
    array_xy = np.asarray(array_xy, float)
    pixel_xy = np.asarray(pixel_xy, float)
    if len(array_xy) < 3:
        raise ValueError("At least 3 spots are needed to infer µm/px from the array; pass `mpp=`.")
    design = np.c_[array_xy * pitch_um, np.ones(len(array_xy))]
    coef, *_ = np.linalg.lstsq(design, pixel_xy, rcond=None)
    px_per_um = affine_mpp(coef[:2].T)  # the fitted map goes µm -> pixels
    if not np.isfinite(px_per_um) or px_per_um <= 0:
        raise ValueError("The spot positions are degenerate (collinear); cannot infer µm/px, pass `mpp=`.")
    mpp = 1.0 / px_per_um
    resid_px = pixel_xy - design @ coef
    rms_um = float(np.sqrt((resid_px**2).sum(1).mean()) * mpp)
    return float(mpp), rms_um


def guess_array_unit_um(x: np.ndarray, y: np.ndarray) -> float:
    """Guess µm per unit of the array coordinates: 100 for a 2k (checkerboard) array, else 200 (1k array)."""
    xi = np.rint(np.asarray(x, float)).astype(int)
    yi = np.rint(np.asarray(y, float)).astype(int)
    parity = (xi + yi) % 2
    if len(xi) > 10 and (parity == parity[0]).all():
        return ST_2K_UNIT_UM
    return ST_1K_PITCH_UM


def legacy_st(
    counts: str | os.PathLike,
    spots: str | os.PathLike,
    image: str | os.PathLike | None = None,
    *,
    mpp: float | None = None,
    spot_diameter_um: float = 100.0,
    image_scale: float | None = None,
    array_unit_um: float | None = None,
    on_unmatched: Literal["raise", "drop"] = "raise",
    section: str | None = None,
    spots_key: str = SPOTS_KEY,
) -> SpatialData:
    """Read a legacy Spatial Transcriptomics section (her2st / STUtility layout).

    Parameters
    ----------
    counts
        Counts table (``.tsv`` or ``.tsv.gz``), spots × genes, first column the spot id ``"{x}x{y}"``
        (array coordinates), raw UMI counts.
    spots
        Spot table with columns ``x y new_x new_y pixel_x pixel_y selected`` (ST spot detector /
        STUtility). ``pixel_x`` is the image column and ``pixel_y`` the row, in full-resolution pixels
        (or directly in ``image``'s pixels, as in STUtility's ``alignment_table_*.tsv``). Only spots with
        ``selected == 1`` (under tissue) are kept.
    image
        The H&E (JPEG, PNG or any format :func:`squall_sd.io.he` reads). Optional: without it the spots
        and table are placed in microns from the pixel positions alone.
    mpp
        µm per pixel of ``image`` (of the spot table's pixel frame when there is no image). When
        ``None`` it is fitted by least squares of the spot pixel positions on the array coordinates
        times the known array pitch (see ``array_unit_um``).
    spot_diameter_um
        True spot diameter in µm (100 µm on ST arrays).
    image_scale
        Factor from the spot table's pixel coordinates to ``image``'s pixels, for an image that is a
        resized copy of the full-resolution one (e.g. ``coord_scale_to_image`` of her2st's A1/A2 PNGs).
        Default 1.
    array_unit_um
        µm per unit of the array coordinates ``x``/``y``. ``None`` guesses from the layout: 200 µm for a
        1k array (spots on every integer position), 100 µm for a 2k array (spots on a checkerboard,
        141 µm apart diagonally).
    on_unmatched
        What to do with spot ids in ``counts`` that are absent from the spot table: ``"raise"`` a
        :class:`ValueError` (the default: usually a sign of mismatched files) or ``"drop"`` them with a
        warning (e.g. STUtility's example data, whose counts include a few spots missing from the table).
    section
        Section name recorded in ``obs["section"]`` and the metadata (default: the counts file stem).
    spots_key
        Name of the shapes element.

    Returns
    -------
    SpatialData with

    - image ``"he"`` (if ``image`` was given): lazily read multiscale RGB, pixels → ``microns`` =
      ``Scale(mpp)``;
    - shapes ``spots_key``: one circle of diameter ``spot_diameter_um`` per spot, in image pixels,
      with the same transformation;
    - table ``"table"`` annotating the spots: ``X`` raw integer counts (CSR), ``obs_names`` the spot
      ids ``"{x}x{y}"`` of the counts file, ``obs[["array_x", "array_y"]]``, ``obsm["spatial"]`` the
      spot centres in µm;
    - ``sdata.attrs["squall"]``: ``mpp``, how it was obtained, and provenance.

    Raises
    ------
    FileNotFoundError
        A path does not exist.
    ValueError
        Spot ids of ``counts`` not in the spot table (``on_unmatched="raise"``), no spot in common, no
        spot under tissue, spots outside the image (wrong ``image_scale``), or an invalid ``mpp``.

    """
    if on_unmatched not in ("raise", "drop"):
        raise ValueError(f"`on_unmatched` must be 'raise' or 'drop', got {on_unmatched!r}.")
    spot_diameter_um = validate_mpp(spot_diameter_um, source="the spot diameter")
    counts_path = check_path(counts, "counts file", kind="file")
    spots_path = check_path(spots, "spot table", kind="file")
    img = open_lazy(image) if image is not None else None
    section = section or counts_path.name.split(".")[0]

    table = read_spot_table(spots_path)
    scale = _image_scale(image_scale)
    if img is not None:  # fail fast (before reading the counts) when the spots do not fit the image
        _check_spots_fit_image(table, scale, img)
    cnt = _read_unique_counts(counts_path)
    cnt, spot_rows = _match_counts_to_spots(
        cnt, table, counts_path, spots_path, on_unmatched=on_unmatched, section=section
    )

    # --- geometry: pixel positions in the image frame and µm/px
    unit_um = float(array_unit_um) if array_unit_um is not None else _guess_unit(table)
    mpp, mpp_source = _resolve_mpp(mpp, table, scale, unit_um, section)
    centers = spot_rows[["pixel_x", "pixel_y"]].to_numpy(float) * scale
    if img is not None:
        _check_image_geometry(img, centers, mpp, mpp_source, section)
    transformations = {MICRONS: microns_scale(mpp)}
    radius_px = spot_diameter_um / 2.0 / mpp
    shapes = circles_element(centers, radius_px, transformations)

    # --- table
    adata = _build_table(
        cnt,
        spot_rows,
        centers,
        counts_path,
        section=section,
        mpp=mpp,
        spot_diameter_um=spot_diameter_um,
        unit_um=unit_um,
        spots_key=spots_key,
    )

    image_el = lazy_image_element(img, mpp) if img is not None else None
    sdata = make_sdata(image=image_el, shapes={spots_key: shapes}, table=adata)
    set_attrs(
        sdata,
        mpp=mpp if img is not None else None,
        technology="legacy_st",
        reader="squall_sd.io.legacy_st",
        squall_version=_package_version(),
        section=section,
        mpp_source=mpp_source,
        pixel_mpp=float(mpp),
        image_scale=scale,
        spot_diameter_um=float(spot_diameter_um),
        array_unit_um=unit_um,
        spots_key=spots_key,
        source_files={
            "counts": str(counts_path),
            "spots": str(spots_path),
            "image": None if img is None else str(img.path),
        },
    )
    logger.info("%s: %d spots x %d genes, %.4g µm/px", section, adata.n_obs, adata.n_vars, mpp)
    return sdata


def _image_scale(image_scale: float | None) -> float:
    """``image_scale`` as a positive float (1 when ``None``)."""
    scale = 1.0 if image_scale is None else float(image_scale)
    if not np.isfinite(scale) or scale <= 0:
        raise ValueError(f"`image_scale` must be a positive number, got {image_scale!r}.")
    return scale


def _read_unique_counts(counts_path: Path) -> pd.DataFrame:
    """Read the counts matrix and refuse duplicate spot ids."""
    cnt = read_st_counts(counts_path)
    if cnt.index.duplicated().any():
        raise ValueError(
            f"The counts file {counts_path.name} has duplicate spot ids {_examples(cnt.index[cnt.index.duplicated()])}."
        )
    return cnt


def _match_counts_to_spots(
    cnt: pd.DataFrame,
    table: pd.DataFrame,
    counts_path: Path,
    spots_path: Path,
    *,
    on_unmatched: Literal["raise", "drop"],
    section: str,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Keep the counts rows whose spot is in the spot table and selected; return them and their table rows."""
    known = cnt.index.isin(table.index)
    if not known.any():
        raise ValueError(
            f"No spot of {counts_path.name} is in {spots_path.name}: no overlap. Counts spot ids look like "
            f"{_examples(cnt.index)}, spot-table ids (from its x, y columns) like {_examples(table.index)}. "
            "Check that both files belong to the same section and that the counts' first column holds "
            "'{x}x{y}' array coordinates."
        )
    if not known.all():
        unmatched = cnt.index[~known]
        msg = (
            f"{len(unmatched)} of {len(cnt)} spot ids in {counts_path.name} are not in the spot table "
            f"{spots_path.name}, e.g. {_examples(unmatched)}."
        )
        if on_unmatched == "raise":
            raise ValueError(
                msg + " Check that the counts and spot files belong to the same section and that the counts' "
                "first column holds '{x}x{y}' array coordinates; pass `on_unmatched='drop'` to drop these spots."
            )
        logger.warning("%s Dropping them.", msg)
    selected = table["selected"].to_numpy() == 1
    keep = cnt.index[known & cnt.index.isin(table.index[selected])]
    if len(keep) == 0:
        raise ValueError(
            f"None of the {int(known.sum())} spots shared by {counts_path.name} and {spots_path.name} is selected "
            "(selected == 1, under tissue) in the spot table."
        )
    if len(keep) < known.sum():
        logger.info(
            "%s: dropping %d spots outside the tissue (selected != 1)",
            section,
            int(known.sum() - len(keep)),
        )
    return cnt.loc[keep], table.loc[keep]


def _resolve_mpp(
    mpp: float | None, table: pd.DataFrame, scale: float, unit_um: float, section: str
) -> tuple[float, str]:
    """Return (µm/px, how it was obtained): ``mpp`` when given, else fitted on the spot array."""
    if mpp is not None:
        return validate_mpp(mpp), "argument"
    # fit on all spots of the table (on and off tissue): more points, same array
    mpp_fit, rms_um = fit_mpp(
        table[["x", "y"]].to_numpy(float),
        table[["pixel_x", "pixel_y"]].to_numpy(float) * scale,
        unit_um,
    )
    if rms_um > 0.25 * unit_um:
        logger.warning(
            "%s: spot positions deviate %.0f µm (RMS) from a regular %.0f µm array; the fitted %.4g µm/px "
            "may be wrong. Pass `mpp=` if it is known.",
            section,
            rms_um,
            unit_um,
            mpp_fit,
        )
    mpp_source = f"least-squares fit of spot pixels on array coordinates x {unit_um:g} µm"
    logger.info("%s: %.4g µm/px (%s; RMS residual %.1f µm)", section, mpp_fit, mpp_source, rms_um)
    return mpp_fit, mpp_source


def _check_image_geometry(img, centers: np.ndarray, mpp: float, mpp_source: str, section: str) -> None:
    """Warn about spot centres outside the image and a fitted µm/px that disagrees with the image's."""
    height, width = img.shape_yx
    inside = (centers[:, 0] >= 0) & (centers[:, 0] < width) & (centers[:, 1] >= 0) & (centers[:, 1] < height)
    if not inside.all():
        logger.warning("%s: %d spot centres fall outside the image", section, int((~inside).sum()))
    if img.mpp is not None and mpp_source != "argument" and abs(img.mpp - mpp) / mpp > 0.05:
        logger.warning(
            "%s: the image metadata says %.4g µm/px but the spot array gives %.4g µm/px; using the array",
            section,
            img.mpp,
            mpp,
        )


def _counts_values(cnt: pd.DataFrame, counts_path: Path) -> np.ndarray:
    """Return the counts as int32/int64 (integral values) or float32 (with a warning)."""
    values = cnt.to_numpy()
    if not np.issubdtype(values.dtype, np.number):
        raise ValueError(f"The counts file {counts_path.name} holds non-numeric values; expected raw counts.")
    if np.issubdtype(values.dtype, np.integer) or np.array_equal(values, np.round(values)):
        dtype = np.int32 if values.max(initial=0) < np.iinfo(np.int32).max else np.int64
        return values.astype(dtype)
    logger.warning(
        "%s holds non-integer values; storing them as float32 (expected raw counts)",
        counts_path.name,
    )
    return values.astype(np.float32)


def _build_table(
    cnt: pd.DataFrame,
    spot_rows: pd.DataFrame,
    centers: np.ndarray,
    counts_path: Path,
    *,
    section: str,
    mpp: float,
    spot_diameter_um: float,
    unit_um: float,
    spots_key: str,
) -> ad.AnnData:
    """Build the table element: CSR counts, array coordinates and section in ``obs``, centres (µm) in ``obsm``."""
    values = _counts_values(cnt, counts_path)
    obs = pd.DataFrame(
        {
            "array_x": np.rint(spot_rows["x"].to_numpy(float)).astype(int),
            "array_y": np.rint(spot_rows["y"].to_numpy(float)).astype(int),
            "section": pd.Categorical([section] * len(spot_rows)),
        },
        index=pd.Index(cnt.index, name=None),
    )
    var = pd.DataFrame(index=pd.Index(cnt.columns, name=None))
    adata = ad.AnnData(X=sparse.csr_matrix(values), obs=obs, var=var)
    if not adata.var_names.is_unique:
        logger.info(
            "%s: making %d duplicate gene names unique",
            section,
            int(adata.var_names.duplicated().sum()),
        )
        adata.var_names_make_unique()
    adata.obsm["spatial"] = centers * mpp
    meta = {
        "technology": "legacy_st",
        "section": section,
        "spot_diameter_um": float(spot_diameter_um),
        "array_unit_um": unit_um,
        "mpp": float(mpp),
        "spatial_units": "microns",
    }
    adata.uns["squall"] = meta
    return table_element(adata, spots_key)


def _guess_unit(table: pd.DataFrame) -> float:
    unit = guess_array_unit_um(table["x"].to_numpy(), table["y"].to_numpy())
    layout = "2k (checkerboard)" if unit == ST_2K_UNIT_UM else "1k"
    logger.info("array layout: %s -> %g µm per array unit", layout, unit)
    return unit


def _check_spots_fit_image(table: pd.DataFrame, scale: float, img) -> None:
    sel = table[table["selected"].to_numpy() == 1]
    centers = sel[["pixel_x", "pixel_y"]].to_numpy(float) * scale
    height, width = img.shape_yx
    inside = (centers[:, 0] >= 0) & (centers[:, 0] < width) & (centers[:, 1] >= 0) & (centers[:, 1] < height)
    if len(centers) and inside.mean() < 0.5:
        raise ValueError(
            f"{int((~inside).sum())} of {len(centers)} spot centres fall outside the image {img.path.name} "
            f"({width} x {height} px; spot pixel_x up to {centers[:, 0].max():.0f}, pixel_y up to "
            f"{centers[:, 1].max():.0f}). If the image is a resized copy of the full-resolution H&E, pass "
            "`image_scale=` (image px per full-resolution px, e.g. coord_scale_to_image of her2st's sections.csv)."
        )
