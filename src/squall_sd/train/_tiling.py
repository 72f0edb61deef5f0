"""Tiles of one slide for :func:`squall_sd.train.prepare`: placing them, their targets and tissue test."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from squall_sd._constants import ATTRS_KEY
from squall_sd._logging import logger
from squall_sd.train._regions import (
    _label_slide,
    _NearestFill,
    _read_regions,
    _Regions,
    _resolve_fill,
    _tile_label,
)
from squall_sd.train._shards import _ShardWriter

#: Tiles whose windows are read together (one decode of lazily read JPEG/PNG images).
_READ_BATCH = 64


@dataclass(frozen=True)
class _SlideOptions:
    """What tiling one slide needs: the model geometry and :func:`prepare`'s options."""

    cfg: Any
    gene_index: Mapping[str, int]
    g: int
    cell_um: float
    tile_um: float
    stride: float
    min_tissue: float
    min_spot_cells: int
    label_key: str | None
    categories: list[str] | None
    image_key: str
    shapes_key: str | None
    table_key: str
    fill: str | None
    max_tiles: int | None
    progress: bool
    tile_centers: str
    jitter_um: float
    tiles_per_spot: int
    seed: int

    @classmethod
    def build(cls, cfg: Any, *, tile_stride_um: float | None, **options: Any) -> _SlideOptions:
        """Derive the geometry from ``cfg`` (the stride is rounded to whole expression cells)."""
        mpp = float(cfg.mpp)
        cell_um = float(cfg.cell_px) * mpp
        tile_um = float(cfg.img_size) * mpp
        stride = tile_um if tile_stride_um is None else float(tile_stride_um)
        stride = max(1, int(round(stride / cell_um))) * cell_um
        gene_index = {g: i for i, g in enumerate(cfg.genes)}
        return cls(
            cfg=cfg, gene_index=gene_index, g=int(cfg.expr_size), cell_um=cell_um, tile_um=tile_um,
            stride=stride, **options,
        )  # fmt: skip


def _tile_slides(
    sdatas: Sequence[Any], ids: Sequence[str], writer: _ShardWriter, opts: _SlideOptions
) -> tuple[list[dict[str, Any]], int]:
    """Tile every slide into ``writer``; return the manifest's slide entries and the number of tiles."""
    slides_meta = []
    n_total = 0
    for si, (sdata, sid) in enumerate(zip(sdatas, ids, strict=True)):
        info = _tile_slide(sdata, si, writer, opts, slide_name=sid)
        n_kept = info.pop("n_tiles")
        n_total += n_kept
        meta = sdata.attrs.get(ATTRS_KEY, {}) if sdata.attrs else {}
        slides_meta.append({"id": sid, "n_tiles": n_kept, "mpp_image": meta.get("mpp"), **info})
        logger.info("prepare: slide %s -> %d tiles", sid, n_kept)
    return slides_meta, n_total


def _extract(sdata: Any, centers: np.ndarray, *, image_key: str, patch_px: int, mpp: float) -> Any:
    from squall_sd.pp import extract_patches

    return extract_patches(sdata, centers, image_key=image_key, patch_px=patch_px, mpp=mpp)


class _TissueTest:
    """The tissue test of one slide's tiles: tissue as :mod:`squall_sd.pp` defines it.

    The slide's Otsu threshold of the HSV saturation is computed once on the coarse working image, as
    :func:`squall_sd.pp.detect_tissue` does (:func:`squall_sd.pp._tissue.tissue_threshold`), and applied
    to the tile's pixels (:func:`squall_sd.pp._tissue.apply_tissue_threshold`): a pixel is tissue when it
    is more saturated than the threshold (at least :data:`squall_sd.pp._tissue.MIN_SATURATION`) and not
    near-black. A slide without tissue contrast has no tissue.
    """

    def __init__(self, sdata: Any, image_key: str) -> None:
        from squall_sd.pp._tissue import tissue_threshold

        self.threshold = tissue_threshold(sdata, image_key)

    def mask(self, rgb: np.ndarray) -> np.ndarray:
        """Return the (h, w) tissue mask of a (3, h, w) uint8 tile."""
        from squall_sd.pp._tissue import apply_tissue_threshold

        return apply_tissue_threshold(rgb, self.threshold)

    def fraction(self, rgb: np.ndarray) -> float:
        """Return the share of a (3, h, w) uint8 tile that is tissue."""
        return float(self.mask(rgb).mean())

    def cells(self, rgb: np.ndarray, g: int) -> np.ndarray:
        """Return the (g, g) mask of the expression cells of a tile of which at least half is tissue."""
        mask = self.mask(rgb)
        p = mask.shape[-1] // g
        if p == 0:
            raise ValueError(f"A tile of {mask.shape[-1]} px cannot hold {g} expression cells per side.")
        return mask[: g * p, : g * p].reshape(g, p, g, p).mean(axis=(1, 3)) >= 0.5


@dataclass
class _TilePlan:
    """Candidate tiles of one slide on its lattice of expression cells."""

    x0: float  # lattice origin (µm)
    y0: float
    tile_cells: np.ndarray  # (n, 2) tile origins in lattice cells (column, row)
    origins: np.ndarray  # (n, 2) tile origins (x, y), µm
    nx: int  # lattice columns / rows the tiles span
    ny: int
    hi: np.ndarray  # upper corner (x, y) of the covered area, µm
    spot_mode: bool  # tiles centred on the regions


@dataclass
class _SlideTargets:
    """The expression side of one slide: its labelled lattice and what a tile's targets need."""

    regions: _Regions
    lattice: np.ndarray  # (h, w) region index of each lattice cell (-1: none)
    weight_of: np.ndarray  # (n_regions,) 1 / cells of each region
    filler: _NearestFill | None


def _tile_slide(sdata: Any, si: int, writer: _ShardWriter, opts: _SlideOptions, *, slide_name: str) -> dict[str, Any]:
    """Tile one slide into ``writer``; return its manifest entry (without ``id``)."""
    regions = _slide_regions(sdata, opts, slide_name)
    has_expr = regions is not None and regions.counts is not None
    plan = _plan_tiles(sdata, si, regions, opts, spot_mode=opts.tile_centers == "spots" and has_expr)
    meta: dict[str, Any] = {"regions": None, "fill": None}
    targets = None
    if has_expr:
        targets, cand, meta = _label_tiles(sdata, regions, plan, opts)
    else:
        cand = np.arange(len(plan.origins))
    kept = _write_tiles(sdata, si, writer, opts, plan, cand, targets, slide_name=slide_name)
    meta["n_tiles"] = kept
    if plan.spot_mode:
        meta["tiles"] = {"centers": "spots", "jitter_um": opts.jitter_um, "tiles_per_spot": opts.tiles_per_spot}
    return meta


def _slide_regions(sdata: Any, opts: _SlideOptions, slide_name: str) -> _Regions | None:
    """Check the slide's image and read its regions (``None``: an image-only slide)."""
    if opts.image_key not in sdata.images:
        raise KeyError(f"Slide {slide_name!r} has no image {opts.image_key!r}; available: {list(sdata.images)}.")
    regions = _read_regions(
        sdata,
        shapes_key=opts.shapes_key,
        table_key=opts.table_key,
        gene_index=opts.gene_index,
        n_genes=len(opts.gene_index),
        label_key=opts.label_key,
        categories=opts.categories,
        cfg=opts.cfg,
    )
    if regions is not None and not np.isclose(regions.grid.cell_um, opts.cell_um):
        raise ValueError(
            f"The model's expression cell ({opts.cell_um} µm) is not img_size * mpp / expr_size "
            f"({regions.grid.cell_um} µm)."
        )
    return regions


def _plan_tiles(sdata: Any, si: int, regions: _Regions | None, opts: _SlideOptions, *, spot_mode: bool) -> _TilePlan:
    """Place the slide's lattice and its candidate tiles (a grid, or centred on the regions)."""
    from squall_sd._sdata import affine_to_microns

    g, cell_um, tile_um, stride = opts.g, opts.cell_um, opts.tile_um, opts.stride
    if regions is not None:
        lo, hi = regions.bounds[:, :2].min(axis=0), regions.bounds[:, 2:].max(axis=0)
    else:
        el = sdata.images[opts.image_key]
        arr = el["scale0"]["image"] if hasattr(el, "children") and "scale0" in el.children else el
        m = affine_to_microns(arr)
        h, w = arr.shape[-2:]
        corners = np.array([[0, 0], [w, 0], [0, h], [w, h]], dtype=float) @ m[:2, :2].T + m[:2, 2]
        lo, hi = corners.min(axis=0), corners.max(axis=0)
    margin = tile_um / 2 + opts.jitter_um if spot_mode else 0.0
    # one cell lattice per slide, anchored at the lower corner of the covered area (widened by half a
    # tile plus the jitter for spot-centred tiles, so that every tile lies on the lattice)
    x0 = float(np.floor((lo[0] - margin) / cell_um) * cell_um)
    y0 = float(np.floor((lo[1] - margin) / cell_um) * cell_um)
    if spot_mode:
        tile_cells = _spot_tile_cells(
            regions.center, x0, y0, tile_um, cell_um, opts.jitter_um, opts.tiles_per_spot, opts.seed + si
        )
        origins = np.column_stack([x0 + tile_cells[:, 0] * cell_um, y0 + tile_cells[:, 1] * cell_um])
        nx = int(tile_cells[:, 0].max()) + g if len(tile_cells) else g
        ny = int(tile_cells[:, 1].max()) + g if len(tile_cells) else g
    else:
        nx = max(1, int(np.ceil((hi[0] - x0 - tile_um) / stride)) + 1)
        ny = max(1, int(np.ceil((hi[1] - y0 - tile_um) / stride)) + 1)
        step = int(round(stride / cell_um))  # tile stride in lattice cells
        tile_ij = np.array([(i, j) for j in range(ny) for i in range(nx)], dtype=np.int64).reshape(-1, 2)
        tile_cells = tile_ij * step  # tile origins in lattice cells (column, row)
        origins = np.column_stack([x0 + tile_ij[:, 0] * stride, y0 + tile_ij[:, 1] * stride])
        nx, ny = (nx - 1) * step + g, (ny - 1) * step + g
    return _TilePlan(x0, y0, tile_cells, origins, nx, ny, hi, spot_mode)


def _label_tiles(
    sdata: Any, regions: _Regions, plan: _TilePlan, opts: _SlideOptions
) -> tuple[_SlideTargets, np.ndarray, dict[str, Any]]:
    """Label the slide's lattice; return its targets, the tiles with enough covered cells and the entry."""
    g, cell_um = opts.g, opts.cell_um
    w = max(plan.nx, int(np.ceil((plan.hi[0] - plan.x0) / cell_um)) + 1)
    h = max(plan.ny, int(np.ceil((plan.hi[1] - plan.y0) / cell_um)) + 1)
    lattice, n_cells, regions, stats = _label_slide(regions, plan.x0, plan.y0, h, w)
    weight_of = (1.0 / np.maximum(n_cells, 1)).astype(np.float32)
    # drop tiles without enough covered cells before reading any pixels
    covered = np.array([(lattice[j : j + g, i : i + g] >= 0).sum() for i, j in plan.tile_cells])
    cand = np.flatnonzero(covered >= max(opts.min_spot_cells, 1))
    mode = _resolve_fill(opts.fill, regions, sdata)
    filler = _NearestFill(lattice, regions, n_cells, g, plan.x0, plan.y0) if mode == "nearest" else None
    meta = {"regions": {"kind": regions.kind, **stats}, "fill": mode}
    return _SlideTargets(regions, lattice, weight_of, filler), cand, meta


def _tile_targets(
    targets: _SlideTargets, rgb: np.ndarray, tissue: _TissueTest, iy0: int, ix0: int, g: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """Region index, weight and fill flag of each expression cell of one tile, and the tile's class."""
    weight = np.zeros((g, g), dtype=np.float32)
    filled = np.zeros((g, g), dtype=bool)
    idx = targets.lattice[iy0 : iy0 + g, ix0 : ix0 + g].astype(np.int64)
    label = _tile_label(targets.regions, idx)
    if targets.filler is not None:
        need = (idx < 0) & tissue.cells(rgb, g)
        if need.any():
            near = targets.filler(iy0, ix0, need)
            filled = need & (near >= 0)
            idx[filled] = near[filled]
    has = idx >= 0
    weight[has] = targets.weight_of[idx[has]]
    weight[filled] = 1.0
    return idx, weight, filled, label


def _write_tiles(
    sdata: Any,
    si: int,
    writer: _ShardWriter,
    opts: _SlideOptions,
    plan: _TilePlan,
    cand: np.ndarray,
    targets: _SlideTargets | None,
    *,
    slide_name: str,
) -> int:
    """Read the candidate tiles, keep those with enough tissue and write them; return how many were kept."""
    from tqdm.auto import tqdm

    g, max_tiles = opts.g, opts.max_tiles
    centers = plan.origins[cand] + opts.tile_um / 2
    ds = _extract(sdata, centers, image_key=opts.image_key, patch_px=int(opts.cfg.img_size), mpp=float(opts.cfg.mpp))
    tissue = _TissueTest(sdata, opts.image_key)
    kept = 0
    bar = tqdm(total=len(cand), disable=not opts.progress, desc=f"tiles {slide_name}")
    for b0 in range(0, len(cand), _READ_BATCH):
        if max_tiles is not None and kept >= max_tiles:
            break
        batch = ds.get_batch(np.arange(b0, min(b0 + _READ_BATCH, len(cand))))  # windows read together
        bar.update(len(batch))
        for j, rgb in enumerate(batch):
            k = b0 + j
            if max_tiles is not None and kept >= max_tiles:
                break
            if tissue.fraction(rgb) < opts.min_tissue:
                continue
            if targets is not None:
                ix0, iy0 = (int(v) for v in plan.tile_cells[cand[k]])
                idx, weight, filled, label = _tile_targets(targets, rgb, tissue, iy0, ix0, g)
            else:
                idx = np.full((g, g), -1, dtype=np.int64)
                weight = np.zeros((g, g), dtype=np.float32)
                filled = np.zeros((g, g), dtype=bool)
                label = -1
            writer.add(
                rgb=np.ascontiguousarray(rgb, dtype=np.uint8),
                res=float(opts.cfg.mpp),
                slide=si,
                center=centers[k],
                label=label,
                idx=idx,
                weight=weight.astype(np.float16),
                fill=filled,
                regions=targets.regions if targets is not None else None,
            )
            kept += 1
    bar.close()
    return kept


def _spot_tile_cells(
    centers: np.ndarray,
    x0: float,
    y0: float,
    tile_um: float,
    cell_um: float,
    jitter_um: float,
    copies: int,
    seed: int,
) -> np.ndarray:
    """Origins (lattice column, row) of tiles centred on each region, ``copies`` per region.

    The first copy of a region is centred on it (to the nearest lattice cell); further copies are
    shifted by a uniform random offset in [-``jitter_um``, ``jitter_um``] on each axis, drawn from
    ``seed`` so that a dataset is reproducible.
    """
    rng = np.random.default_rng(seed)
    centers = np.asarray(centers, dtype=np.float64).reshape(-1, 2)
    out = []
    for c in range(int(copies)):
        off = np.zeros_like(centers) if c == 0 else rng.uniform(-jitter_um, jitter_um, size=centers.shape)
        org = centers + off - tile_um / 2 - np.array([x0, y0])
        out.append(np.round(org / cell_um).astype(np.int64))
    return np.clip(np.concatenate(out), 0, None) if out else np.zeros((0, 2), np.int64)
