"""Write sharded, streamable training datasets from SpatialData objects (:func:`prepare`).

:func:`prepare` orchestrates: it checks the options, resolves the model geometry, then for each slide
reads its regions (:mod:`squall_sd.train._regions`: rasterising spots, bins and cells onto the slide's
lattice of expression cells), plans the tiles, reads their pixels and writes them with their targets
into shards (:mod:`squall_sd.train._shards`: the on-disk format, its writer and reader).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from squall_sd._constants import ATTRS_KEY, IMAGE_KEY, TABLE_KEY
from squall_sd._logging import logger
from squall_sd._sdata import staged
from squall_sd.train._shards import (
    FORMAT_VERSION,
    MANIFEST,
    _ShardWriter,
    build_manifest,
    read_manifest,
    write_manifest,
)
from squall_sd.train._tiling import _SlideOptions, _tile_slides

__all__ = ["prepare", "resolve_model_config", "read_manifest", "FORMAT_VERSION", "MANIFEST"]


# ------------------------------------------------------------------------------------ model config
def resolve_model_config(model_config_or_name: Any, **overrides: Any) -> Any:
    """Return a :class:`~squall_sd.models.SquallConfig` from a config, name or model folder.

    Parameters
    ----------
    model_config_or_name
        A ``SquallConfig``, a mapping of its fields, a registered name (``"squall-tiny"``), a
        folder written by ``save_pretrained`` (read with :func:`squall_sd.models.read_config`), or a model
        (anything with a ``config`` attribute).
    **overrides
        Fields to change (e.g. ``mpp=4.0``).

    Returns
    -------
    The configuration.

    """
    from squall_sd.models import SquallConfig, get_config, read_config

    obj = model_config_or_name
    if hasattr(obj, "config") and isinstance(obj.config, SquallConfig):
        cfg = obj.config
    elif isinstance(obj, SquallConfig):
        cfg = obj
    elif isinstance(obj, Mapping):
        cfg = SquallConfig.from_dict(dict(obj))
    elif isinstance(obj, (str, os.PathLike)) and Path(obj).expanduser().is_dir():
        # a model folder is read by squall_sd.models (the one reader of its layout), without its weights
        cfg = read_config(obj)
    elif isinstance(obj, str):
        cfg = get_config(obj)
    else:
        raise TypeError(f"Expected a SquallConfig, a model name or a model folder, got {type(obj).__name__}.")
    overrides = {k: v for k, v in overrides.items() if v is not None}
    return cfg.replace(**overrides) if overrides else cfg


# ------------------------------------------------------------------------------------ inputs
def _as_sdata(obj: Any) -> tuple[Any, str]:
    from spatialdata import SpatialData, read_zarr

    if isinstance(obj, SpatialData):
        meta = obj.attrs.get(ATTRS_KEY, {}) if obj.attrs else {}
        sid = meta.get("sample") or meta.get("section") or meta.get("sample_id") or meta.get("dataset_id")
        if sid is None and obj.path is not None:
            sid = Path(obj.path).stem
        return obj, (str(sid) if sid is not None else None)
    path = Path(obj).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"SpatialData store {str(path)!r} does not exist.")
    return read_zarr(path), path.stem


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
        raise ValueError("No table with counts found; pass `genes=` or a model with a gene vocabulary.")
    ranked = sorted(freq, key=lambda g: (-freq[g], g))
    if len(ranked) < n_genes:
        raise ValueError(f"The data hold only {len(ranked)} genes; the model needs {n_genes}.")
    return ranked[:n_genes]


# ------------------------------------------------------------------------------------ main
def prepare(
    sdatas_or_paths: Any | Iterable[Any],
    out_dir: str | os.PathLike,
    *,
    model_config_or_name: Any = "squall-tiny",
    shard_size: int = 256,
    tile_stride_um: float | None = None,
    tile_centers: str = "grid",
    jitter_um: float = 0.0,
    tiles_per_spot: int = 1,
    seed: int = 0,
    min_tissue: float = 0.25,
    min_spot_cells: int = 1,
    genes: Sequence[str] | None = None,
    label_key: str | None = None,
    slide_ids: Sequence[str] | None = None,
    image_key: str = IMAGE_KEY,
    shapes_key: str | None = None,
    table_key: str = TABLE_KEY,
    expr_format: str = "factored",
    fill: str | None = "auto",
    max_tiles_per_slide: int | None = None,
    overwrite: bool = False,
    progress: bool = False,
    show_progress: bool | None = None,
    **model_overrides: Any,
) -> Path:
    """Tile SpatialData slides and write a sharded training dataset (zarr v3) plus a manifest.

    Every slide is covered by a grid of tiles of ``img_size`` pixels at the model's µm/px
    (``config.mpp``), stepping ``tile_stride_um``; a tile is kept when at least ``min_tissue`` of
    it is tissue and (for slides with expression) at least ``min_spot_cells`` of its expression
    cells are covered by a region. The RGB tile is read lazily from the multiscale image with
    :func:`squall_sd.pp.extract_patches`. The regions of ``shapes_key`` (spots as circles, Visium HD
    bins as squares, cell boundaries as polygons) are rasterised by their true geometry onto the
    tile's ``expr_size`` × ``expr_size`` grid with the published binary target (spec §4.10): a grid
    cell whose centre lies in a region holds the region's binary vector divided by the number of cells
    the region covers; a region smaller than a cell goes to the cell under its centre, several such
    regions in one cell being pooled (counts summed); optionally in-tissue cells outside every region
    get the nearest region's vector undivided (``fill``). The module docstring states the rules and the
    stored form. Genes are aligned to the model vocabulary by symbol. Tiles are written in shards of
    ``shard_size`` as they are produced, so memory holds one slide's cell lattice and one shard at a
    time. The folder is built under a temporary name and moved into place only when complete.

    Parameters
    ----------
    sdatas_or_paths
        One or several :class:`~spatialdata.SpatialData` objects or paths of SpatialData zarr
        stores. Each needs the H&E image ``image_key`` registered in ``microns``; the ``shapes_key``
        regions (circles or polygons) and the ``table_key`` raw-count table annotating them are
        optional (H&E-only slides give image-only tiles).
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
    tile_centers
        ``"grid"`` (default): tiles on a regular grid stepping ``tile_stride_um``. ``"spots"``: one
        tile centred on each region of the table (spot, bin or cell) plus ``tiles_per_spot - 1``
        copies shifted at random by up to ``jitter_um`` on each axis; the whole tile is still
        rasterised (neighbouring regions included). Slides without expression are always tiled on
        the grid. Spot-centred tiles put every spot at a tile's centre, which suits spot-level
        regression with a small field of view.
    jitter_um
        Largest random shift (microns, each axis) of the extra spot-centred tiles.
    tiles_per_spot
        Tiles per region with ``tile_centers="spots"`` (the first one unshifted).
    seed
        Seed of the random shifts.
    min_tissue
        Minimum tissue share of a tile (0–1). A pixel is tissue as :mod:`squall_sd.pp` defines it:
        more saturated than the slide's Otsu threshold computed as in :func:`squall_sd.pp.detect_tissue`
        (at least 0.09) and not near-black.
    min_spot_cells
        Minimum number of expression cells covered by regions (filled cells do not count) for a
        tile of a slide with expression.
    genes
        Vocabulary to use when the model has none (``squall-tiny``): a list of symbols. By default
        the ``n_genes`` genes detected in the most spots over all inputs.
    label_key
        Optional column of the table's ``obs`` holding a region class; each tile gets the class
        covering most of its covered cells (for tile classification; a pooled region has the
        majority class of its members).
    slide_ids
        Names of the slides (default: ``sdata.attrs["squall"]["sample"]``, the store name, or
        ``slide{i}``).
    image_key, shapes_key, table_key
        Element names: e.g. ``shapes_key="bins_8um"`` for :func:`squall_sd.io.visium_hd` output
        (8 or 16 µm bins), ``"cells"`` for :func:`squall_sd.io.xenium` / :func:`squall_sd.io.cosmx`.
        ``shapes_key=None`` (default) uses ``"spots"`` where a slide has it and treats a slide
        without it as image-only (H&E pretraining); a ``shapes_key`` that is given must exist.
    expr_format
        ``"factored"`` (default; per-cell spot index and weight plus a spot CSR) or ``"dense"``
        (additionally a dense float16 ``(N, G, g, g)`` grid; only for small vocabularies).
    fill
        In-tissue cells outside every region: ``"nearest"`` gives them the nearest region's binary
        vector, undivided (spec §4.10, marked in ``cell_fill``); ``None`` leaves them 0; ``"auto"``
        (default) is ``"nearest"`` for capture spots (circles, unless
        ``sdata.attrs["squall"]["technology"]`` is a single-cell platform such as ``"xenium"`` or
        ``"cosmx"``) and ``None`` for bins and cells. The choice per slide is recorded in
        ``manifest["slides"][i]["fill"]``.
    max_tiles_per_slide
        Keep at most this many tiles per slide (the first in raster order; for quick tests).
    overwrite
        Replace an existing ``out_dir``.
    progress
        Show a progress bar over the tiles.
    show_progress
        Deprecated alias of ``progress`` (a :class:`FutureWarning`; removed in the next release).
    **model_overrides
        :class:`~squall_sd.models.SquallConfig` fields to override (e.g. ``mpp=4.0``).

    Returns
    -------
    The path of the written folder (``manifest.json`` inside).

    """
    from squall_sd import __version__

    if show_progress is not None:
        warnings.warn(
            "`show_progress` is deprecated; use `progress` (as every squall_sd function does).",
            FutureWarning,
            stacklevel=2,
        )
        progress = bool(show_progress)
    _check_options(fill, expr_format, tile_centers, tiles_per_spot, jitter_um, min_tissue)
    target = _target_folder(out_dir, overwrite)
    sdatas, ids = _load_inputs(sdatas_or_paths, slide_ids)
    cfg = resolve_model_config(model_config_or_name, **model_overrides)
    if cfg.genes is None:
        vocab = list(genes) if genes is not None else _vocab_from_data(sdatas, table_key, cfg.n_genes)
        cfg = cfg.replace(genes=tuple(vocab))
    elif genes is not None and list(genes) != list(cfg.genes):
        raise ValueError("`genes` was given but the model already has a vocabulary; leave `genes` unset.")
    opts = _SlideOptions.build(
        cfg,
        tile_stride_um=tile_stride_um,
        min_tissue=float(min_tissue),
        min_spot_cells=int(min_spot_cells),
        label_key=label_key,
        categories=_label_categories(sdatas, table_key, label_key),
        image_key=image_key,
        shapes_key=shapes_key,
        table_key=table_key,
        fill=fill,
        max_tiles=max_tiles_per_slide,
        progress=progress,
        tile_centers=tile_centers,
        jitter_um=float(jitter_um),
        tiles_per_spot=int(tiles_per_spot),
        seed=int(seed),
    )

    with staged(target) as tmp:
        writer = _ShardWriter(
            tmp, shard_size=shard_size, g=opts.g, n_genes=len(opts.gene_index), dense=expr_format == "dense"
        )
        slides_meta, n_total = _tile_slides(sdatas, ids, writer, opts)
        writer.flush()
        if n_total == 0:
            raise ValueError(
                "No tile passed the filters (min_tissue, min_spot_cells); lower them or check "
                "that the "
                "image and spots overlap in the 'microns' coordinate system."
            )
        manifest = build_manifest(
            cfg=cfg,
            version=__version__,
            cell_um=opts.cell_um,
            tile_um=opts.tile_um,
            stride=opts.stride,
            expr_format=expr_format,
            n_tiles=n_total,
            shards=writer.shards,
            slides=slides_meta,
            labels={"key": label_key, "categories": opts.categories},
            params={
                "tile_centers": tile_centers,
                "jitter_um": float(jitter_um),
                "tiles_per_spot": int(tiles_per_spot),
                "seed": int(seed),
                "min_tissue": float(min_tissue),
                "min_spot_cells": int(min_spot_cells),
                "shard_size": int(shard_size),
                "image_key": image_key,
                "shapes_key": shapes_key,
                "table_key": table_key,
                "fill": fill,
            },
        )
        write_manifest(tmp, manifest)
    logger.info("prepare: wrote %d tiles from %d slides to %s", n_total, len(sdatas), target)
    return target


# ------------------------------------------------------------------------------------ steps of prepare
def _check_options(
    fill: str | None,
    expr_format: str,
    tile_centers: str,
    tiles_per_spot: int,
    jitter_um: float,
    min_tissue: float,
) -> None:
    """Raise on an invalid option of :func:`prepare`."""
    if fill not in ("auto", "nearest", None):
        raise ValueError(f"fill must be 'auto', 'nearest' or None, found {fill!r}.")
    if expr_format not in ("factored", "dense"):
        raise ValueError(f"expr_format must be 'factored' or 'dense', found {expr_format!r}.")
    if tile_centers not in ("grid", "spots"):
        raise ValueError(f"tile_centers must be 'grid' or 'spots', found {tile_centers!r}.")
    if int(tiles_per_spot) < 1 or float(jitter_um) < 0:
        raise ValueError(f"tiles_per_spot must be >= 1 and jitter_um >= 0, found {tiles_per_spot!r} and {jitter_um!r}.")
    if not 0 <= float(min_tissue) <= 1:
        raise ValueError(f"min_tissue must lie in [0, 1], found {min_tissue!r}.")


def _target_folder(out_dir: str | os.PathLike, overwrite: bool) -> Path:
    """Return the resolved output folder; raise when it exists (without ``overwrite``) or has no parent."""
    target = Path(out_dir).expanduser().resolve()
    if target.exists() and not overwrite:
        raise FileExistsError(f"{str(target)!r} already exists; pass overwrite=True or choose another folder.")
    if not target.parent.is_dir():
        raise FileNotFoundError(f"The folder {str(target.parent)!r} to write into does not exist.")
    return target


def _load_inputs(sdatas_or_paths: Any, slide_ids: Sequence[str] | None) -> tuple[list[Any], list[str]]:
    """Return the SpatialData objects and their unique slide names."""
    items = [sdatas_or_paths] if _is_single(sdatas_or_paths) else list(sdatas_or_paths)
    if not items:
        raise ValueError("No SpatialData given.")
    loaded = [_as_sdata(x) for x in items]
    sdatas = [s for s, _ in loaded]
    ids = list(slide_ids) if slide_ids is not None else [sid or f"slide{i}" for i, (_, sid) in enumerate(loaded)]
    if len(ids) != len(sdatas):
        raise ValueError(f"Got {len(ids)} slide_ids for {len(sdatas)} slides.")
    if len(set(ids)) != len(ids):
        ids = [f"{s}_{i}" for i, s in enumerate(ids)]
    return sdatas, ids


def _label_categories(sdatas: Sequence[Any], table_key: str, label_key: str | None) -> list[str] | None:
    """Return the sorted classes of ``label_key`` over all input tables (``None`` without a key)."""
    if label_key is None:
        return None
    cats: set[str] = set()
    for s in sdatas:
        if table_key in s.tables and label_key in s.tables[table_key].obs:
            cats.update(s.tables[table_key].obs[label_key].astype(str).unique().tolist())
    if not cats:
        raise KeyError(f"label_key {label_key!r} is not an obs column of any input table.")
    return sorted(cats)


def _is_single(x: Any) -> bool:
    from spatialdata import SpatialData

    return isinstance(x, (SpatialData, str, os.PathLike))
