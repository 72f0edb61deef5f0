"""Write sharded, streamable training datasets from SpatialData objects (:func:`prepare`).

On-disk layout of ``out_dir``::

    manifest.json                 # geometry, genes, slides, shards, parameters, provenance
    shards/00000.zarr             # one zarr v3 group per shard of at most ``shard_size`` tiles
        rgb          uint8   (N, 3, P, P)   tile at the model's µm/px (chunk = 1 tile)
        res          float32 (N,)           µm per pixel of the tile (the model's ``res`` input)
        slide        int32   (N,)           index into manifest["slides"]
        center_um    float32 (N, 2)         tile centre (x, y) in the slide's ``microns`` frame
        label        int32   (N,)           tile class (-1: none), see manifest["labels"]
        cell_spot    int32   (N, g, g)      shard-local spot index of each expression cell (-1:
        none)
        cell_weight  float16 (N, g, g)      value multiplier of each cell (1 / cells per spot,
        binary)
        spot_indptr  int64   (M + 1,)       CSR over the shard's M spots × G model genes
        spot_indices int32   (nnz,)         gene (vocabulary) index of each detected gene
        spot_log1p   float32 (nnz,)         log1p(CP10k) of that gene in that spot
        spot_slide   int32   (M,)           slide of each spot
        spot_obs     int64   (M,)           row of the spot in its slide's table
        spot_center_um float32 (M, 2)       spot centre (x, y), microns
        expr_dense   float16 (N, G, g, g)   only with ``expr_format="dense"``

The expression grid of tile ``i`` is ``grid[:, y, x] = cell_weight[i, y, x] * b[cell_spot[i, y,
x]]``
where ``b`` is the spot's binary detection vector over the model vocabulary (1 where the gene has at
least one count). That is the published binary target (spec §4.10): every grid cell whose centre
lies inside a spot's disc (its true size, from the shapes' radius) gets that spot's binary vector
divided by the number of grid cells the disc covers. The factored form stores each spot's vector
once per shard instead of once per cell, which is what makes cohort-sized datasets fit on disk; the
same CSR also holds log1p(CP10k) values for spot-level regression.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp

from squall_sd._constants import ATTRS_KEY, IMAGE_KEY, MICRONS, SPOTS_KEY, TABLE_KEY
from squall_sd._logging import logger

__all__ = ["prepare", "resolve_model_config", "FORMAT_VERSION"]

#: Version of the shard format written by :func:`prepare`.
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
#: Tiles whose windows are read together (one decode of lazily read JPEG/PNG images).
_READ_BATCH = 64


# ------------------------------------------------------------------------------------ model config
def resolve_model_config(model_config_or_name: Any, **overrides: Any) -> Any:
    """Return a :class:`~squall_sd.models.SquallConfig` from a config, name or model folder.

    Parameters
    ----------
    model_config_or_name
        A ``SquallConfig``, a mapping of its fields, a registered name (``"squall-tiny"``), a
        folder written by ``save_pretrained`` (its ``config.json`` and ``genes.txt``), or a model
        (anything with a ``config`` attribute).
    **overrides
        Fields to change (e.g. ``mpp=4.0``).

    Returns
    -------
    The configuration.

    """
    from squall_sd.models._config import SquallConfig, get_config

    obj = model_config_or_name
    if hasattr(obj, "config") and isinstance(obj.config, SquallConfig):
        cfg = obj.config
    elif isinstance(obj, SquallConfig):
        cfg = obj
    elif isinstance(obj, Mapping):
        cfg = SquallConfig.from_dict(dict(obj))
    elif isinstance(obj, (str, os.PathLike)) and Path(obj).expanduser().is_dir():
        folder = Path(obj).expanduser()
        cfg_file = folder / "config.json"
        if not cfg_file.is_file():
            raise FileNotFoundError(
                f"{str(folder)!r} is not a model folder: it has no config.json. Pass a registered "
                "model name (e.g. 'squall-tiny') or a folder written by `model.save_pretrained`."
            )
        data = json.loads(cfg_file.read_text())
        data = data.get("config", data) if isinstance(data, dict) else data
        genes_file = folder / "genes.txt"
        if data.get("genes") is None and genes_file.is_file():
            data["genes"] = [g for g in genes_file.read_text().splitlines() if g.strip()]
        cfg = SquallConfig.from_dict(data)
    elif isinstance(obj, str):
        cfg = get_config(obj)
    else:
        raise TypeError(
            f"Expected a SquallConfig, a model name or a model folder, got {type(obj).__name__}."
        )
    overrides = {k: v for k, v in overrides.items() if v is not None}
    return cfg.replace(**overrides) if overrides else cfg


# ------------------------------------------------------------------------------------ inputs
def _as_sdata(obj: Any) -> tuple[Any, str]:
    from spatialdata import SpatialData, read_zarr

    if isinstance(obj, SpatialData):
        meta = obj.attrs.get(ATTRS_KEY, {}) if obj.attrs else {}
        sid = (
            meta.get("sample")
            or meta.get("section")
            or meta.get("sample_id")
            or meta.get("dataset_id")
        )
        if sid is None and obj.path is not None:
            sid = Path(obj.path).stem
        return obj, (str(sid) if sid is not None else None)
    path = Path(obj).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"SpatialData store {str(path)!r} does not exist.")
    return read_zarr(path), path.stem


def _affine(element: Any) -> np.ndarray:
    from spatialdata.transformations import get_transformation

    try:
        t = get_transformation(element, to_coordinate_system=MICRONS)
    except (KeyError, ValueError):
        t = None
    if t is None:
        raise ValueError(
            f"An element has no transformation to the {MICRONS!r} coordinate system. Read the data "
            "with a `squall.io` reader so that every element is registered in microns."
        )
    return np.asarray(
        t.to_affine_matrix(input_axes=("x", "y"), output_axes=("x", "y")), dtype=float
    )


@dataclass
class _Spots:
    """Spots of one slide in microns with their expression over the model vocabulary."""

    center: np.ndarray  # (n, 2) x, y µm
    radius: np.ndarray  # (n,) µm
    obs: np.ndarray  # (n,) table row
    csr: sp.csr_matrix | None  # (n, G) log1p CP10k (float32), None for H&E only
    label: np.ndarray | None  # (n,) int codes, -1 unknown


def _table_for_shapes(sdata: Any, shapes_key: str, table_key: str) -> Any:
    if table_key not in sdata.tables:
        return None
    adata = sdata.tables[table_key]
    attrs = adata.uns.get("spatialdata_attrs", {})
    region = attrs.get("region")
    regions = [region] if isinstance(region, str) else list(region or [])
    if regions and shapes_key not in regions:
        raise ValueError(
            f"Table {table_key!r} annotates {regions}, not the shapes {shapes_key!r}; pass "
            "`shapes_key=` / `table_key=` that belong together."
        )
    return adata


def _read_spots(
    sdata: Any,
    *,
    shapes_key: str,
    table_key: str,
    gene_index: Mapping[str, int] | None,
    n_genes: int,
    label_key: str | None,
    categories: list[str] | None,
) -> _Spots | None:
    if shapes_key not in sdata.shapes:
        return None
    gdf = sdata.shapes[shapes_key]
    if "radius" not in gdf.columns:
        raise ValueError(
            f"Shapes {shapes_key!r} are not circles (no 'radius' column); prepare "
            "rasterises spots as "
            "discs. Polygons (cells, bins) are not supported yet."
        )
    m = _affine(gdf)
    xy = np.column_stack([gdf.geometry.x.to_numpy(), gdf.geometry.y.to_numpy()])
    center = xy @ m[:2, :2].T + m[:2, 2]
    radius = gdf["radius"].to_numpy(dtype=float) * float(np.sqrt(abs(np.linalg.det(m[:2, :2]))))
    adata = _table_for_shapes(sdata, shapes_key, table_key)
    if adata is None:
        return _Spots(center, radius, np.full(len(center), -1), None, None)
    attrs = adata.uns.get("spatialdata_attrs", {})
    inst_key = attrs.get("instance_key")
    pos = {k: i for i, k in enumerate(gdf.index)}
    if inst_key is not None and inst_key in adata.obs:
        shape_pos = np.array([pos.get(k, -1) for k in adata.obs[inst_key].tolist()])
    else:
        shape_pos = np.arange(adata.n_obs)
    keep = shape_pos >= 0
    if not keep.any():
        raise ValueError(f"No row of table {table_key!r} matches a shape of {shapes_key!r}.")
    rows = np.flatnonzero(keep)
    shape_pos = shape_pos[keep]
    X = adata.X
    X = sp.csr_matrix(X) if not sp.issparse(X) else X.tocsr()
    X = X[rows]
    if X.nnz and (X.data.min() < 0 or not np.allclose(X.data, np.round(X.data))):
        logger.warning(
            "Table %r does not look like raw counts (negative or non-integer values); "
            "prepare expects "
            "raw counts and computes the binary target and log1p(CP10k) itself.",
            table_key,
        )
    lib = np.asarray(X.sum(axis=1)).ravel()
    lib[lib == 0] = 1.0
    var = [str(v) for v in adata.var_names]
    cols = np.array([gene_index.get(v, -1) if gene_index is not None else -1 for v in var])
    sel = np.flatnonzero(cols >= 0)
    if len(sel) == 0:
        raise ValueError(
            f"No gene of table {table_key!r} is in the model vocabulary (e.g. table genes "
            f"{var[:5]}). "
            "Check that gene symbols are used, or build the vocabulary from the data (genes=None)."
        )
    Xs = X[:, sel].tocoo()
    vals = np.log1p(Xs.data / lib[Xs.row] * 1e4).astype(np.float32)
    keepnz = Xs.data > 0
    csr = sp.csr_matrix(
        (vals[keepnz], (Xs.row[keepnz], cols[sel][Xs.col[keepnz]])), shape=(len(rows), n_genes)
    )
    csr.sum_duplicates()
    csr.sort_indices()
    label = None
    if label_key is not None:
        if label_key not in adata.obs:
            raise KeyError(
                f"label_key {label_key!r} not found in the table's obs columns {list(adata.obs)}."
            )
        lab = adata.obs[label_key].astype(str).to_numpy()[rows]
        cat_index = {c: i for i, c in enumerate(categories or [])}
        label = np.array([cat_index.get(v, -1) for v in lab])
    return _Spots(center[shape_pos], radius[shape_pos], rows.astype(np.int64), csr, label)


def _vocab_from_data(sdatas: Sequence[Any], table_key: str, n_genes: int) -> list[str]:
    """Return the ``n_genes`` genes detected in the most spots over all inputs (ties by name)."""
    freq: dict[str, float] = {}
    for sdata in sdatas:
        if table_key not in sdata.tables:
            continue
        adata = sdata.tables[table_key]
        X = adata.X
        det = np.asarray((X > 0).sum(axis=0)).ravel() / max(adata.n_obs, 1)
        for g, d in zip(adata.var_names, det, strict=True):
            freq[str(g)] = freq.get(str(g), 0.0) + float(d)
    if not freq:
        raise ValueError(
            "No table with counts found; pass `genes=` or a model with a gene vocabulary."
        )
    ranked = sorted(freq, key=lambda g: (-freq[g], g))
    if len(ranked) < n_genes:
        raise ValueError(f"The data hold only {len(ranked)} genes; the model needs {n_genes}.")
    return ranked[:n_genes]


# ------------------------------------------------------------------------------------ geometry
def _tissue_fraction(rgb: np.ndarray) -> float:
    """Return the share of a (3, h, w) uint8 tile that looks like stained tissue."""
    x = rgb.astype(np.float32) / 255.0
    mx, mn = x.max(axis=0), x.min(axis=0)
    sat = (mx - mn) / np.maximum(mx, 1e-6)
    tissue = (sat > 0.08) & (mx > 0.1) & (mx - mn > 0.03)
    return float(tissue.mean())


def _cells_in_disc(cx: float, cy: float, r: float, x0: float, y0: float, cell: float) -> int:
    """Count the lattice cells (origin x0, y0; pitch ``cell``) whose centre lies in the disc."""
    i0 = int(np.floor((cx - r - x0) / cell)) - 1
    i1 = int(np.ceil((cx + r - x0) / cell)) + 1
    j0 = int(np.floor((cy - r - y0) / cell)) - 1
    j1 = int(np.ceil((cy + r - y0) / cell)) + 1
    xs = x0 + (np.arange(i0, i1) + 0.5) * cell
    ys = y0 + (np.arange(j0, j1) + 0.5) * cell
    d2 = (xs[None, :] - cx) ** 2 + (ys[:, None] - cy) ** 2
    return int((d2 <= r * r).sum())


def _rasterise(
    origin: tuple[float, float], g: int, cell: float, spots: _Spots, n_cells: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Return the slide-spot index and weight of the g×g cells of a tile at ``origin`` (µm)."""
    x0, y0 = origin
    xs = x0 + (np.arange(g) + 0.5) * cell
    ys = y0 + (np.arange(g) + 0.5) * cell
    span = g * cell
    c, r = spots.center, spots.radius
    near = np.flatnonzero(
        (c[:, 0] + r >= x0)
        & (c[:, 0] - r <= x0 + span)
        & (c[:, 1] + r >= y0)
        & (c[:, 1] - r <= y0 + span)
    )
    idx = np.full((g, g), -1, dtype=np.int64)
    best = np.full((g, g), np.inf)
    for s in near:
        d2 = (xs[None, :] - c[s, 0]) ** 2 + (ys[:, None] - c[s, 1]) ** 2
        hit = (d2 <= r[s] ** 2) & (d2 < best)
        idx[hit] = s
        best[hit] = d2[hit]
    weight = np.zeros((g, g), dtype=np.float32)
    has = idx >= 0
    weight[has] = 1.0 / np.maximum(n_cells[idx[has]], 1)
    return idx, weight


# ------------------------------------------------------------------------------------ writer
class _ShardWriter:
    def __init__(self, root: Path, *, shard_size: int, g: int, n_genes: int, dense: bool) -> None:
        self.root = root
        self.shard_size = int(shard_size)
        self.g = g
        self.n_genes = n_genes
        self.dense = dense
        self.shards: list[dict[str, Any]] = []
        self._reset()

    def _reset(self) -> None:
        self.tiles: list[dict[str, Any]] = []
        self.spot_pos: dict[tuple[int, int], int] = {}
        self.spot_rows: list[tuple[int, int]] = []  # (slide, slide-spot index)
        self.spot_src: dict[int, _Spots] = {}

    def add(self, *, rgb, res, slide, center, label, idx, weight, spots: _Spots | None) -> None:
        local = np.full(idx.shape, -1, dtype=np.int32)
        if spots is not None and spots.csr is not None:
            self.spot_src[slide] = spots
            for s in np.unique(idx[idx >= 0]):
                key = (slide, int(s))
                if key not in self.spot_pos:
                    self.spot_pos[key] = len(self.spot_rows)
                    self.spot_rows.append(key)
                local[idx == s] = self.spot_pos[key]
        else:
            weight = np.zeros_like(weight)
        self.tiles.append(
            dict(
                rgb=rgb,
                res=res,
                slide=slide,
                center=center,
                label=label,
                cell_spot=local,
                cell_weight=weight,
            )
        )
        if len(self.tiles) >= self.shard_size:
            self.flush()

    def flush(self) -> None:
        import zarr

        if not self.tiles:
            return
        k = len(self.shards)
        name = f"shards/{k:05d}.zarr"
        grp = zarr.open_group(self.root / name, mode="w", zarr_format=3)
        n, g = len(self.tiles), self.g
        rgb = np.stack([t["rgb"] for t in self.tiles])
        p = rgb.shape[-1]
        grp.create_array("rgb", data=rgb, chunks=(1, 3, p, p))
        grp.create_array("res", data=np.array([t["res"] for t in self.tiles], dtype=np.float32))
        grp.create_array("slide", data=np.array([t["slide"] for t in self.tiles], dtype=np.int32))
        grp.create_array(
            "center_um", data=np.array([t["center"] for t in self.tiles], dtype=np.float32)
        )
        grp.create_array("label", data=np.array([t["label"] for t in self.tiles], dtype=np.int32))
        cell_spot = np.stack([t["cell_spot"] for t in self.tiles]).astype(np.int32)
        cell_weight = np.stack([t["cell_weight"] for t in self.tiles]).astype(np.float16)
        grp.create_array("cell_spot", data=cell_spot, chunks=(1, g, g))
        grp.create_array("cell_weight", data=cell_weight, chunks=(1, g, g))
        rows = []
        slides, obs, centers = [], [], []
        for slide, s in self.spot_rows:
            src = self.spot_src[slide]
            rows.append(src.csr[s])
            slides.append(slide)
            obs.append(src.obs[s])
            centers.append(src.center[s])
        if rows:
            csr = sp.vstack(rows, format="csr")
        else:
            csr = sp.csr_matrix((0, self.n_genes), dtype=np.float32)
        chunk = max(1, min(len(csr.data), 1 << 20))
        grp.create_array("spot_indptr", data=csr.indptr.astype(np.int64))
        grp.create_array("spot_indices", data=csr.indices.astype(np.int32), chunks=(chunk,))
        grp.create_array("spot_log1p", data=csr.data.astype(np.float32), chunks=(chunk,))
        grp.create_array("spot_slide", data=np.asarray(slides, dtype=np.int32).reshape(-1))
        grp.create_array("spot_obs", data=np.asarray(obs, dtype=np.int64).reshape(-1))
        grp.create_array(
            "spot_center_um", data=np.asarray(centers, dtype=np.float32).reshape(-1, 2)
        )
        if self.dense:
            dense = np.zeros((n, self.n_genes, g, g), dtype=np.float16)
            binary = csr.copy()
            binary.data[:] = 1.0
            for i in range(n):
                cs, w = cell_spot[i].reshape(-1), cell_weight[i].reshape(-1).astype(np.float32)
                has = np.flatnonzero(cs >= 0)
                if len(has):
                    vals = binary[cs[has]].toarray() * w[has, None]
                    flat = np.zeros((g * g, self.n_genes), dtype=np.float32)
                    flat[has] = vals
                    dense[i] = flat.T.reshape(self.n_genes, g, g)
            grp.create_array("expr_dense", data=dense, chunks=(1, self.n_genes, g, g))
        self.shards.append(
            {"path": name, "n_tiles": n, "n_spots": len(self.spot_rows), "nnz": int(csr.nnz)}
        )
        logger.info("prepare: wrote %s (%d tiles, %d spots)", name, n, len(self.spot_rows))
        self._reset()


# ------------------------------------------------------------------------------------ main
def prepare(
    sdatas_or_paths: Any | Iterable[Any],
    out_dir: str | os.PathLike,
    *,
    model_config_or_name: Any = "squall-tiny",
    shard_size: int = 256,
    tile_stride_um: float | None = None,
    min_tissue: float = 0.25,
    min_spot_cells: int = 1,
    genes: Sequence[str] | None = None,
    label_key: str | None = None,
    slide_ids: Sequence[str] | None = None,
    image_key: str = IMAGE_KEY,
    shapes_key: str = SPOTS_KEY,
    table_key: str = TABLE_KEY,
    expr_format: str = "factored",
    max_tiles_per_slide: int | None = None,
    overwrite: bool = False,
    show_progress: bool = False,
    **model_overrides: Any,
) -> Path:
    """Tile SpatialData slides and write a sharded training dataset (zarr v3) plus a manifest.

    Every slide is covered by a grid of tiles of ``img_size`` pixels at the model's µm/px
    (``config.mpp``), stepping ``tile_stride_um``; a tile is kept when at least ``min_tissue`` of
    it is tissue and (for slides with expression) at least ``min_spot_cells`` of its expression
    cells fall inside a spot. The RGB tile is read lazily from the multiscale image with
    :func:`squall_sd.pp.extract_patches`; spots are rasterised onto the tile's ``expr_size`` ×
    ``expr_size`` grid as discs of their true radius, with the published binary target (spec
    §4.10; see the module docstring for the stored form). Genes are aligned to the model
    vocabulary by symbol. Tiles are written in shards of ``shard_size`` as they are produced, so
    memory holds one shard at a time. The folder is built under a temporary name and moved into
    place only when complete.

    Parameters
    ----------
    sdatas_or_paths
        One or several :class:`~spatialdata.SpatialData` objects or paths of SpatialData zarr
        stores.
        Each needs the H&E image ``image_key`` registered in ``microns``; ``shapes_key`` circles and
        the ``table_key`` raw-count table are optional (H&E-only slides give image-only tiles).
    out_dir
        Folder to create.
    model_config_or_name
        The model the data are for: a registered name, a :class:`~squall_sd.models.SquallConfig`,
        or a ``save_pretrained`` folder. It fixes the tile size, µm/px, grid and gene vocabulary.
    shard_size
        Tiles per shard.
    tile_stride_um
        Step between tile centres in microns (default: the tile edge, i.e. no overlap). It is
        rounded to a whole number of expression cells so that all tiles share one cell lattice.
    min_tissue
        Minimum tissue share of a tile (0–1).
    min_spot_cells
        Minimum number of expression cells covered by spots for a tile of a slide with expression.
    genes
        Vocabulary to use when the model has none (``squall-tiny``): a list of symbols. By default
        the ``n_genes`` genes detected in the most spots over all inputs.
    label_key
        Optional column of the table's ``obs`` holding a spot class; each tile gets the class
        covering most of its spot cells (for tile classification).
    slide_ids
        Names of the slides (default: ``sdata.attrs["squall"]["sample"]``, the store name, or
        ``slide{i}``).
    image_key, shapes_key, table_key
        Element names.
    expr_format
        ``"factored"`` (default; per-cell spot index and weight plus a spot CSR) or ``"dense"``
        (additionally a dense float16 ``(N, G, g, g)`` grid; only for small vocabularies).
    max_tiles_per_slide
        Keep at most this many tiles per slide (the first in raster order; for quick tests).
    overwrite
        Replace an existing ``out_dir``.
    show_progress
        Show a progress bar over the tiles.
    **model_overrides
        :class:`~squall_sd.models.SquallConfig` fields to override (e.g. ``mpp=4.0``).

    Returns
    -------
    The path of the written folder (``manifest.json`` inside).

    """
    from squall_sd import __version__

    if expr_format not in ("factored", "dense"):
        raise ValueError(f"expr_format must be 'factored' or 'dense', found {expr_format!r}.")
    if not 0 <= float(min_tissue) <= 1:
        raise ValueError(f"min_tissue must lie in [0, 1], found {min_tissue!r}.")
    target = Path(out_dir).expanduser().resolve()
    if target.exists() and not overwrite:
        raise FileExistsError(
            f"{str(target)!r} already exists; pass overwrite=True or choose another folder."
        )
    if not target.parent.is_dir():
        raise FileNotFoundError(f"The folder {str(target.parent)!r} to write into does not exist.")

    items = [sdatas_or_paths] if _is_single(sdatas_or_paths) else list(sdatas_or_paths)
    if not items:
        raise ValueError("No SpatialData given.")
    loaded = [_as_sdata(x) for x in items]
    sdatas = [s for s, _ in loaded]
    ids = (
        list(slide_ids)
        if slide_ids is not None
        else [sid or f"slide{i}" for i, (_, sid) in enumerate(loaded)]
    )
    if len(ids) != len(sdatas):
        raise ValueError(f"Got {len(ids)} slide_ids for {len(sdatas)} slides.")
    if len(set(ids)) != len(ids):
        ids = [f"{s}_{i}" for i, s in enumerate(ids)]

    cfg = resolve_model_config(model_config_or_name, **model_overrides)
    if cfg.genes is None:
        vocab = (
            list(genes) if genes is not None else _vocab_from_data(sdatas, table_key, cfg.n_genes)
        )
        cfg = cfg.replace(genes=tuple(vocab))
    elif genes is not None and list(genes) != list(cfg.genes):
        raise ValueError(
            "`genes` was given but the model already has a vocabulary; leave `genes` unset."
        )
    vocab = list(cfg.genes)
    gene_index = {g: i for i, g in enumerate(vocab)}
    n_genes = len(vocab)
    g = int(cfg.expr_size)
    mpp = float(cfg.mpp)
    cell_um = float(cfg.cell_px) * mpp
    tile_um = float(cfg.img_size) * mpp
    stride = tile_um if tile_stride_um is None else float(tile_stride_um)
    stride = max(1, int(round(stride / cell_um))) * cell_um

    categories: list[str] | None = None
    if label_key is not None:
        cats: set[str] = set()
        for s in sdatas:
            if table_key in s.tables and label_key in s.tables[table_key].obs:
                cats.update(s.tables[table_key].obs[label_key].astype(str).unique().tolist())
        if not cats:
            raise KeyError(f"label_key {label_key!r} is not an obs column of any input table.")
        categories = sorted(cats)

    from squall_sd.io._common import move_into_place, temp_sibling

    tmp = temp_sibling(target)
    tmp.mkdir()
    try:
        writer = _ShardWriter(
            tmp, shard_size=shard_size, g=g, n_genes=n_genes, dense=expr_format == "dense"
        )
        slides_meta = []
        n_total = 0
        for si, (sdata, sid) in enumerate(zip(sdatas, ids, strict=True)):
            n_kept = _tile_slide(
                sdata,
                si,
                writer,
                cfg=cfg,
                gene_index=gene_index,
                n_genes=n_genes,
                stride=stride,
                cell_um=cell_um,
                tile_um=tile_um,
                min_tissue=float(min_tissue),
                min_spot_cells=int(min_spot_cells),
                label_key=label_key,
                categories=categories,
                image_key=image_key,
                shapes_key=shapes_key,
                table_key=table_key,
                max_tiles=max_tiles_per_slide,
                show_progress=show_progress,
                slide_name=sid,
            )
            n_total += n_kept
            meta = sdata.attrs.get(ATTRS_KEY, {}) if sdata.attrs else {}
            slides_meta.append({"id": sid, "n_tiles": n_kept, "mpp_image": meta.get("mpp")})
            logger.info("prepare: slide %s -> %d tiles", sid, n_kept)
        writer.flush()
        if n_total == 0:
            raise ValueError(
                "No tile passed the filters (min_tissue, min_spot_cells); lower them or check "
                "that the "
                "image and spots overlap in the 'microns' coordinate system."
            )
        manifest = {
            "format": "squall-sd-shards",
            "format_version": FORMAT_VERSION,
            "squall_sd_version": __version__,
            "model": cfg.to_dict(include_genes=False),
            "genes": vocab,
            "img_size": int(cfg.img_size),
            "expr_size": g,
            "mpp": mpp,
            "cell_um": cell_um,
            "tile_um": tile_um,
            "tile_stride_um": stride,
            "normalization": "binary",
            "expr_format": expr_format,
            "n_tiles": n_total,
            "shards": writer.shards,
            "slides": slides_meta,
            "labels": {"key": label_key, "categories": categories},
            "params": {
                "min_tissue": float(min_tissue),
                "min_spot_cells": int(min_spot_cells),
                "shard_size": int(shard_size),
                "image_key": image_key,
                "shapes_key": shapes_key,
                "table_key": table_key,
            },
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    move_into_place(tmp, target)
    logger.info("prepare: wrote %d tiles from %d slides to %s", n_total, len(sdatas), target)
    return target


def _is_single(x: Any) -> bool:
    from spatialdata import SpatialData

    return isinstance(x, (SpatialData, str, os.PathLike))


def _extract(sdata: Any, centers: np.ndarray, *, image_key: str, patch_px: int, mpp: float) -> Any:
    try:
        from squall_sd.pp import extract_patches
    except ImportError:  # pp still being assembled
        from squall_sd.pp._patches import extract_patches
    return extract_patches(sdata, centers, image_key=image_key, patch_px=patch_px, mpp=mpp)


def _tile_slide(
    sdata: Any,
    si: int,
    writer: _ShardWriter,
    *,
    cfg: Any,
    gene_index: Mapping[str, int],
    n_genes: int,
    stride: float,
    cell_um: float,
    tile_um: float,
    min_tissue: float,
    min_spot_cells: int,
    label_key: str | None,
    categories: list[str] | None,
    image_key: str,
    shapes_key: str,
    table_key: str,
    max_tiles: int | None,
    show_progress: bool,
    slide_name: str,
) -> int:
    from tqdm.auto import tqdm

    if image_key not in sdata.images:
        raise KeyError(
            f"Slide {slide_name!r} has no image {image_key!r}; available: {list(sdata.images)}."
        )
    spots = _read_spots(
        sdata,
        shapes_key=shapes_key,
        table_key=table_key,
        gene_index=gene_index,
        n_genes=n_genes,
        label_key=label_key,
        categories=categories,
    )
    has_expr = spots is not None and spots.csr is not None
    g = int(cfg.expr_size)
    if spots is not None and len(spots.center):
        lo = (spots.center - spots.radius[:, None]).min(axis=0)
        hi = (spots.center + spots.radius[:, None]).max(axis=0)
    else:
        el = sdata.images[image_key]
        arr = el["scale0"]["image"] if hasattr(el, "children") and "scale0" in el.children else el
        m = _affine(arr)
        h, w = arr.shape[-2:]
        corners = np.array([[0, 0], [w, 0], [0, h], [w, h]], dtype=float) @ m[:2, :2].T + m[:2, 2]
        lo, hi = corners.min(axis=0), corners.max(axis=0)
    # one cell lattice per slide, anchored at the lower corner of the covered area
    x0 = np.floor(lo[0] / cell_um) * cell_um
    y0 = np.floor(lo[1] / cell_um) * cell_um
    nx = max(1, int(np.ceil((hi[0] - x0 - tile_um) / stride)) + 1)
    ny = max(1, int(np.ceil((hi[1] - y0 - tile_um) / stride)) + 1)
    origins = np.array([(x0 + i * stride, y0 + j * stride) for j in range(ny) for i in range(nx)])
    n_cells = None
    if has_expr:
        n_cells = np.array(
            [
                _cells_in_disc(c[0], c[1], r, x0, y0, cell_um)
                for c, r in zip(spots.center, spots.radius, strict=True)
            ]
        )
        # cheap pre-filter: tiles whose square touches at least one spot's bounding box
        c, r = spots.center, spots.radius
        touch = np.array(
            [
                bool(
                    np.any(
                        (c[:, 0] + r >= ox)
                        & (c[:, 0] - r <= ox + tile_um)
                        & (c[:, 1] + r >= oy)
                        & (c[:, 1] - r <= oy + tile_um)
                    )
                )
                for ox, oy in origins
            ]
        )
        cand = np.flatnonzero(touch)
    else:
        cand = np.arange(len(origins))
    if has_expr:  # drop candidates without enough spot cells before reading any pixels
        rast = {}
        for k in cand:
            idx, weight = _rasterise(tuple(origins[k]), g, cell_um, spots, n_cells)
            if int((idx >= 0).sum()) >= max(min_spot_cells, 1):
                rast[int(k)] = (idx.astype(np.int32), weight.astype(np.float16))
        cand = np.array(sorted(rast), dtype=int)
    centers = origins[cand] + tile_um / 2
    ds = _extract(
        sdata, centers, image_key=image_key, patch_px=int(cfg.img_size), mpp=float(cfg.mpp)
    )
    kept = 0
    empty = (np.full((g, g), -1, dtype=np.int64), np.zeros((g, g), dtype=np.float32))
    bar = tqdm(total=len(cand), disable=not show_progress, desc=f"tiles {slide_name}")
    for b0 in range(0, len(cand), _READ_BATCH):
        if max_tiles is not None and kept >= max_tiles:
            break
        batch = ds.get_batch(
            np.arange(b0, min(b0 + _READ_BATCH, len(cand)))
        )  # windows read together
        bar.update(len(batch))
        for j, rgb in enumerate(batch):
            k = b0 + j
            if max_tiles is not None and kept >= max_tiles:
                break
            if _tissue_fraction(rgb) < min_tissue:
                continue
            idx, weight = rast[int(cand[k])] if has_expr else empty
            _add_tile(writer, rgb, k, idx, weight, spots, has_expr, cfg, si, centers)
            kept += 1
    bar.close()
    return kept


def _add_tile(writer, rgb, k, idx, weight, spots, has_expr, cfg, si, centers) -> None:
    label = -1
    if spots is not None and spots.label is not None and (idx >= 0).any():
        codes = spots.label[idx[idx >= 0]]
        codes = codes[codes >= 0]
        if len(codes):
            label = int(np.bincount(codes).argmax())
    writer.add(
        rgb=np.ascontiguousarray(rgb, dtype=np.uint8),
        res=float(cfg.mpp),
        slide=si,
        center=centers[k],
        label=label,
        idx=idx,
        weight=weight,
        spots=spots if has_expr else None,
    )


def read_manifest(path: str | os.PathLike) -> dict[str, Any]:
    """Read the ``manifest.json`` of a folder written by :func:`prepare`.

    Parameters
    ----------
    path
        The folder (or the manifest file itself).

    Returns
    -------
    The manifest, with ``"root"`` set to the folder.

    """
    p = Path(path).expanduser()
    f = p / MANIFEST if p.is_dir() else p
    if not f.is_file():
        raise FileNotFoundError(
            f"{str(p)!r} is not a prepared dataset (no {MANIFEST}); create one with "
            "`squall_sd.train.prepare(...)` or `squall prepare`."
        )
    man = json.loads(f.read_text())
    if man.get("format") != "squall-sd-shards":
        raise ValueError(f"{str(f)!r} is not a squall-sd shard manifest.")
    if int(man.get("format_version", 0)) > FORMAT_VERSION:
        raise ValueError(
            f"{str(f)!r} was written by a newer squall-sd (format {man['format_version']}); "
            "upgrade squall-sd."
        )
    man["root"] = str(f.parent.resolve())
    return man
