"""Private helpers shared by the 10x / NanoString readers: lazy image reading, counts, grids, polygons."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import anndata as ad
import dask.array as da
import numpy as np
import pandas as pd
from scipy import sparse

from squall_sd._logging import logger
from squall_sd._sdata import affine_mpp

#: File suffixes read with tifffile (chunked, lazily, level 0 of a pyramid).
TIFF_SUFFIXES = (".tif", ".tiff", ".btf", ".svs", ".ndpi", ".scn", ".qptiff")


def read_image_lazy(path: str | os.PathLike) -> da.Array:
    """Return the full-resolution level of an image file as a lazy dask array.

    TIFF-like files (incl. OME-TIFF / BigTIFF / SVS pyramids) are opened through tifffile's zarr store,
    so only the chunks that are used are ever read. Other formats (PNG, JPEG) cannot be read in parts;
    they are wrapped in a delayed read that happens only when the pixels are computed.
    """
    p = Path(path)
    name = p.name.lower()
    if name.endswith(TIFF_SUFFIXES):
        import tifffile
        import zarr

        store = tifffile.imread(p, aszarr=True, level=0)
        z = zarr.open(store, mode="r")
        if isinstance(z, zarr.Group):  # multiscale store: level 0 is "0"
            z = z["0"]
        arr = da.from_zarr(z)
        # drop leading singleton axes (e.g. (1, y, x, 3) or (1, 1, y, x))
        while arr.ndim > 3 and arr.shape[0] == 1:
            arr = arr[0]
        if arr.ndim == 3 and arr.shape[0] == 1:
            arr = arr[0]
        return arr

    import dask
    from PIL import Image

    Image.MAX_IMAGE_PIXELS = None  # whole-slide JPEGs are legitimately huge
    with Image.open(p) as im:
        width, height = im.size
        mode = im.mode
    n_channels = {
        "L": 1,
        "I;16": 1,
        "I": 1,
        "F": 1,
        "LA": 2,
        "RGB": 3,
        "RGBA": 4,
        "P": 3,
        "CMYK": 3,
    }.get(mode, 3)
    dtype = {"I;16": np.uint16, "I": np.int32, "F": np.float32}.get(mode, np.uint8)

    def _load(file: Path) -> np.ndarray:
        with Image.open(file) as im:
            if im.mode in ("P", "CMYK"):
                im = im.convert("RGB")
            out = np.asarray(im)
        return out

    shape = (height, width) if n_channels == 1 else (height, width, n_channels)
    return da.from_delayed(dask.delayed(_load)(p), shape=shape, dtype=dtype)


def first_existing(folder: Path, names: Iterable[str]) -> Path | None:
    """Return the first of ``folder / name`` that exists (a glob pattern is allowed), else ``None``."""
    for name in names:
        if any(ch in name for ch in "*?["):
            hits = sorted(folder.glob(name))
            if hits:
                return hits[0]
        elif (folder / name).exists():
            return folder / name
    return None


def read_10x_counts(counts: Path, *, gex_only: bool = True) -> ad.AnnData:
    """Read a 10x feature-barcode matrix: an ``.h5`` file or a MEX folder (``matrix.mtx(.gz)`` etc.)."""
    import scanpy as sc

    if counts.is_dir():
        try:
            adata = sc.read_10x_mtx(
                counts, var_names="gene_symbols", make_unique=True, gex_only=gex_only
            )
        except FileNotFoundError:  # e.g. uncompressed v3 files (features.tsv, matrix.mtx)
            adata = _read_mex_plain(counts, gex_only=gex_only)
    else:
        try:
            adata = sc.read_10x_h5(counts, gex_only=gex_only)
        except TypeError:  # e.g. a `shape` stored as floats by R writers
            adata = _read_10x_h5_plain(counts, gex_only=gex_only)
        adata.var_names_make_unique()
    adata.X = as_counts_matrix(adata.X)
    return adata


def as_counts_matrix(x) -> sparse.csr_matrix:
    """Return counts as a float32 CSR matrix (the type every squall reader stores in ``table.X``)."""
    return sparse.csr_matrix(x, dtype=np.float32)


def _read_mex_plain(folder: Path, *, gex_only: bool = True) -> ad.AnnData:
    """Read a MEX folder whose files may or may not be gzipped (``features.tsv`` or ``genes.tsv``)."""
    from scipy.io import mmread

    def _pick(*names: str) -> Path:
        for n in names:
            for cand in (folder / n, folder / f"{n}.gz"):
                if cand.exists():
                    return cand
        raise FileNotFoundError(
            f"No {' / '.join(names)} (optionally .gz) in the MEX folder {str(folder)!r}."
        )

    x = sparse.csr_matrix(mmread(_pick("matrix.mtx")).T)
    barcodes = pd.read_csv(_pick("barcodes.tsv"), header=None, sep="\t")[0].astype(str).to_numpy()
    feats = pd.read_csv(_pick("features.tsv", "genes.tsv"), header=None, sep="\t")
    var = pd.DataFrame(
        {"gene_ids": feats[0].astype(str).to_numpy()}, index=feats[1].astype(str).to_numpy()
    )
    if feats.shape[1] > 2:
        var["feature_types"] = feats[2].astype(str).to_numpy()
    adata = ad.AnnData(X=x, obs=pd.DataFrame(index=barcodes), var=var)
    adata.var_names_make_unique()
    if gex_only and "feature_types" in adata.var:
        adata = adata[:, adata.var["feature_types"] == "Gene Expression"].copy()
    return adata


def _read_10x_h5_plain(file: Path, *, gex_only: bool = True) -> ad.AnnData:
    """Read a 10x v3 ``.h5`` matrix with h5py (tolerates a float ``shape`` written by other tools)."""
    import h5py

    def _str(a: np.ndarray) -> np.ndarray:
        return np.array([x.decode() if isinstance(x, bytes) else str(x) for x in a])

    with h5py.File(file, "r") as f:
        g = f["matrix"]
        n_features, n_cells = (int(x) for x in g["shape"][()])
        x = sparse.csc_matrix(
            (g["data"][()], g["indices"][()].astype(np.int64), g["indptr"][()].astype(np.int64)),
            shape=(n_features, n_cells),
        )
        feats = g["features"]
        var = pd.DataFrame(
            {"gene_ids": _str(feats["id"][()]), "feature_types": _str(feats["feature_type"][()])},
            index=_str(feats["name"][()]),
        )
        obs = pd.DataFrame(index=_str(g["barcodes"][()]))
    adata = ad.AnnData(X=sparse.csr_matrix(x.T), obs=obs, var=var)
    if gex_only:
        adata = adata[:, adata.var["feature_types"] == "Gene Expression"].copy()
    return adata


def read_json(path: Path) -> dict[str, Any]:
    """Read a JSON file."""
    return json.loads(Path(path).read_text())


def fit_grid(array_xy: np.ndarray, pixel_xy: np.ndarray) -> np.ndarray | None:
    """Least-squares affine map from grid positions (µm) to pixel positions.

    Returns the 2×3 matrix ``M`` with ``pixel = M @ [x_um, y_um, 1]``, or ``None`` with fewer than 3
    non-collinear points.
    """
    ok = np.isfinite(pixel_xy).all(axis=1) & np.isfinite(array_xy).all(axis=1)
    a, p = array_xy[ok], pixel_xy[ok]
    if len(a) < 3:
        return None
    design = np.column_stack([a, np.ones(len(a))])
    if np.linalg.matrix_rank(design) < 3:
        return None
    coef, *_ = np.linalg.lstsq(design, p, rcond=None)
    return coef.T  # (2, 3)


def mpp_from_grid(matrix: np.ndarray) -> float:
    """µm per pixel implied by a grid fit of :func:`fit_grid` (geometric mean of the two axes)."""
    return 1.0 / affine_mpp(matrix)


def squares(centers: np.ndarray, half_axes: np.ndarray) -> np.ndarray:
    """Return shapely polygons: parallelograms ``centre ± u ± v`` with ``half_axes = [u, v]`` (2×2, rows)."""
    import shapely

    u, v = np.asarray(half_axes[0], dtype=float), np.asarray(half_axes[1], dtype=float)
    corners = np.stack([-u - v, u - v, u + v, -u + v, -u - v])  # (5, 2), closed ring
    rings = centers[:, None, :] + corners[None, :, :]
    return shapely.polygons(rings)


def polygons_from_vertices(df: pd.DataFrame, id_col: str, x_col: str, y_col: str) -> pd.Series:
    """Group a long vertex table (one row per vertex, rows of a polygon contiguous) into shapely polygons.

    Returns a Series of polygons indexed by the id (as str), in first-appearance order.
    """
    import shapely

    ids = df[id_col]
    if len(ids) and isinstance(ids.iloc[0], bytes):
        ids = ids.str.decode("utf-8")
    ids = ids.astype(str).to_numpy()
    xy = df[[x_col, y_col]].to_numpy(dtype=float)
    codes, uniques = pd.factorize(ids, sort=False)
    order = np.argsort(codes, kind="stable")
    codes_sorted = codes[order]
    xy = xy[order]
    polys = shapely.polygons(shapely.linearrings(xy, indices=codes_sorted))
    polys = shapely.make_valid(polys)
    # make_valid can return collections for self-touching rings: keep the largest polygon
    out = []
    for g in polys:
        if g.geom_type == "Polygon":
            out.append(g)
        else:
            parts = [p for p in getattr(g, "geoms", []) if p.geom_type == "Polygon"]
            if not parts:
                parts = [
                    q
                    for p in getattr(g, "geoms", [])
                    if p.geom_type == "MultiPolygon"
                    for q in p.geoms
                ]
            out.append(max(parts, key=lambda q: q.area) if parts else g.convex_hull)
    return pd.Series(out, index=pd.Index(uniques, name=id_col))


def check_overlap(
    counts_ids: Sequence[str], position_ids: Sequence[str], *, what: str, fix: str
) -> np.ndarray:
    """Return the boolean mask of ``counts_ids`` found in ``position_ids``; raise ``ValueError`` when none are."""
    mask = pd.Index(counts_ids).isin(pd.Index(position_ids))
    if not mask.any():
        raise ValueError(
            f"None of the {len(counts_ids)} barcodes/cell ids of the counts table were found among the "
            f"{len(position_ids)} {what}. e.g. counts: {list(counts_ids[:3])}, positions: {list(position_ids[:3])}. "
            f"{fix}"
        )
    n_missing = int((~mask).sum())
    if n_missing:
        logger.warning(
            "%d of %d counts rows have no position in the %s; they are dropped.",
            n_missing,
            len(mask),
            what,
        )
    return mask
