"""Streaming access to prepared shards: :class:`ShardDataset`, augmentation, collation, DataModule.

The sample order of an epoch is a pure function of ``(seed, epoch)``: shards are visited in a
shuffled order, tiles pass through a shuffle buffer, the stream is dealt round-robin to the DDP
ranks (each rank gets the same number of tiles) and then batch by batch to the DataLoader workers
(batch ``j`` of a rank is built by worker ``j % num_workers``, so the batches are identical for any
number of workers). Augmentations draw from a generator seeded by ``(seed, epoch, tile)``. A run
resumed mid-epoch therefore skips exactly the batches it had already seen and continues with the
same data it would have had without the interruption.
"""

from __future__ import annotations

import math
import os
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from squall_sd._logging import logger
from squall_sd.pp._resolution import degrade_patches, is_sharper
from squall_sd.train._augment import augment_tile
from squall_sd.train._shards import _Shard, read_manifest

__all__ = ["ShardDataset", "ShardDataModule", "collate_tiles", "augment_tile", "section_stats"]


def _rng(*keys: int) -> np.random.Generator:
    return np.random.default_rng([int(k) & 0xFFFFFFFF for k in keys])


class ShardDataset(IterableDataset):
    """Tiles of prepared datasets, streamed shard by shard (an iterable dataset).

    Parameters
    ----------
    sources
        One or several folders written by :func:`squall_sd.train.prepare`. They must share the tile
        size in pixels, the expression grid and the gene vocabulary; their µm/px may differ (e.g. the
        same slides prepared at 2 and at 4 µm/px), since each tile carries its own (``res``).
    batch_size
        Batch size of the DataLoader that will read it (the dataset deals whole batches to workers).
    shuffle
        Shuffle shards and tiles each epoch.
    shuffle_buffer
        Size of the shuffle buffer (tiles).
    seed
        Base seed of the order and the augmentations.
    augment
        ``{"flips": bool, "rot90": bool, "stain_jitter": float, "color_jitter": float, "blur": float}``
        (see :func:`augment_tile`), or ``None`` for no augmentation.
    drop_last
        Drop the last incomplete batch of each rank.
    max_tiles
        Use only the first ``max_tiles`` tiles (in storage order).
    rank, world_size
        DDP rank and number of ranks (default: from ``torch.distributed`` when initialised).
    tiles
        Optional explicit list of global tile indices to use (e.g. one slide), in this order.
    in_memory
        Read every shard fully into RAM on first use and keep it (instead of streaming tiles from
        disk with at most two shards open). Same samples, same order; for small datasets (e.g. a
        few sections) where decompressing tiles again every epoch dominates CPU training.
    effective_mpp
        Optional µm/px: tiles of slides scanned sharper than it (each slide's ``mpp_image`` in the
        manifest, :func:`~squall_sd.pp.is_sharper`) are degraded to it with
        :func:`~squall_sd.pp.degrade_patches` before augmentation, as
        :func:`~squall_sd.tl.predict_expression` does for a model with that
        :attr:`~squall_sd.models.SquallConfig.effective_mpp` (config key ``data.effective_mpp``).
    target_smoothing_um
        Optional Gaussian σ in µm: replace each spot's log1p(CP10k) by the weighted mean over the spots
        of its slide within 3σ (weight ``exp(-d² / 2σ²)``, the spot itself weight 1), from the spot
        centres stored in the shards (config key ``data.target_smoothing_um``; training targets only:
        the module validates against the measured values). Low-count spot profiles are noisy, and
        neighbouring spots share most of their tissue.

    Notes
    -----
    Each item is a dict of numpy arrays: ``rgb`` uint8 (3, P, P), ``res``, ``slide``, ``label``,
    ``index`` (global tile index), ``center_um`` (2,), ``cell_spot`` int (g, g) (tile-local spot
    index or -1), ``cell_weight`` float32 (g, g), and the tile's spots as a small CSR
    (``spot_indptr``, ``spot_indices``, ``spot_log1p``); ``expr`` (G, g, g) when the shards hold
    dense
    grids. Use :func:`collate_tiles` to batch them.

    """

    def __init__(
        self,
        sources: str | os.PathLike | Sequence[str | os.PathLike],
        *,
        batch_size: int = 8,
        shuffle: bool = True,
        shuffle_buffer: int = 512,
        seed: int = 0,
        augment: Mapping[str, Any] | None = None,
        drop_last: bool = True,
        max_tiles: int | None = None,
        rank: int | None = None,
        world_size: int | None = None,
        tiles: Sequence[int] | None = None,
        in_memory: bool = False,
        effective_mpp: float | None = None,
        target_smoothing_um: float | None = None,
    ) -> None:
        super().__init__()
        if isinstance(sources, (str, os.PathLike)):
            sources = [sources]
        self.manifests = [read_manifest(s) for s in sources]
        if not self.manifests:
            raise ValueError("No prepared dataset given.")
        ref = self.manifests[0]
        for m in self.manifests[1:]:
            # the µm/px may differ: every tile carries its own (``res``), which the model takes as input
            for key in ("img_size", "expr_size", "genes"):
                if m[key] != ref[key]:
                    raise ValueError(
                        f"Prepared datasets {ref['root']!r} and {m['root']!r} differ in {key!r}; "
                        "prepare them for the same model (the same `img_size`, `expr_size` and genes)."
                    )
        self.genes: list[str] = list(ref["genes"])
        self.img_size = int(ref["img_size"])
        self.expr_size = int(ref["expr_size"])
        #: µm/px of the tiles, one value per prepared dataset (they may differ: mixed scales)
        self.mpps: list[float] = [float(m["mpp"]) for m in self.manifests]
        self.mpp = self.mpps[0]
        self.shard_paths: list[Path] = []
        self.shard_slide_offset: list[int] = []
        self.slides: list[dict[str, Any]] = []
        counts = []
        for m in self.manifests:
            off = len(self.slides)
            self.slides.extend({**s, "source": m["root"]} for s in m["slides"])
            for sh in m["shards"]:
                self.shard_paths.append(Path(m["root"]) / sh["path"])
                self.shard_slide_offset.append(off)
                counts.append(int(sh["n_tiles"]))
        self.shard_start = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self.effective_mpp = None if effective_mpp is None else float(effective_mpp)
        #: per slide: degrade its tiles to ``effective_mpp`` (scanned sharper than it)
        self.slide_degrade = np.zeros(len(self.slides), dtype=bool)
        if self.effective_mpp is not None:
            for k, sl in enumerate(self.slides):
                if sl.get("mpp_image") is None:
                    raise ValueError(
                        f"Slide {sl.get('id')!r} of {sl['source']!r} does not record the µm/px of its image "
                        "(`mpp_image`), so data.effective_mpp cannot tell whether to degrade its tiles; "
                        "prepare it again with `squall prepare` (or set data.effective_mpp: null)."
                    )
                self.slide_degrade[k] = is_sharper(sl["mpp_image"], self.effective_mpp)
        self.target_smoothing_um = None if target_smoothing_um is None else float(target_smoothing_um)
        if self.target_smoothing_um is not None and not self.target_smoothing_um > 0:
            raise ValueError(
                f"target_smoothing_um must be a positive σ in µm (e.g. 100), found {target_smoothing_um!r}."
            )
        #: per shard: its spot table with smoothed values (``target_smoothing_um``), else read as stored
        self._spot_tables: list[tuple[np.ndarray, np.ndarray, np.ndarray]] | None = (
            None if self.target_smoothing_um is None else self._smoothed_spot_tables(self.target_smoothing_um)
        )
        n_all = int(self.shard_start[-1])
        self.tiles = None if tiles is None else np.asarray(tiles, dtype=np.int64)
        if self.tiles is not None and (
            self.tiles.min(initial=0) < 0 or self.tiles.max(initial=-1) >= n_all
        ):
            raise IndexError(f"Tile indices must lie in [0, {n_all}).")
        if max_tiles is not None:
            base = np.arange(n_all) if self.tiles is None else self.tiles
            self.tiles = base[: int(max_tiles)]
        self.n_tiles = n_all if self.tiles is None else len(self.tiles)
        self.label_categories = ref.get("labels", {}).get("categories")
        self.batch_size = int(batch_size)
        self.shuffle = bool(shuffle)
        self.shuffle_buffer = max(1, int(shuffle_buffer))
        self.seed = int(seed)
        self.augment = dict(augment) if augment else None
        self.drop_last = bool(drop_last)
        self._rank = rank
        self._world = world_size
        self.epoch = 0
        self.skip_batches = 0
        self.in_memory = bool(in_memory)
        self._open: OrderedDict[int, _Shard] = OrderedDict()

    # --------------------------------------------------------------------------- distribution
    @property
    def rank(self) -> int:
        """DDP rank of this process."""
        if self._rank is not None:
            return self._rank
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return torch.distributed.get_rank()
        return 0

    @property
    def world_size(self) -> int:
        """Number of DDP ranks."""
        if self._world is not None:
            return self._world
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return torch.distributed.get_world_size()
        return 1

    def set_distributed(self, rank: int, world_size: int) -> None:
        """Set the DDP rank and world size explicitly."""
        self._rank, self._world = int(rank), int(world_size)

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        """Select the epoch (order, augmentations) and how many batches to skip (resume)."""
        self.epoch = int(epoch)
        self.skip_batches = int(skip_batches)

    def _per_rank(self) -> int:
        return self.n_tiles // self.world_size if self.world_size > 1 else self.n_tiles

    def n_batches(self) -> int:
        """Batches per epoch on this rank."""
        n = self._per_rank()
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def __len__(self) -> int:
        n = self._per_rank()
        return self.n_batches() * self.batch_size if self.drop_last else n

    # --------------------------------------------------------------------------- order
    def epoch_order(self, epoch: int | None = None) -> np.ndarray:
        """Global tile indices of this rank's stream for ``epoch``, in order."""
        epoch = self.epoch if epoch is None else int(epoch)
        rng = _rng(self.seed, epoch, 0x5EED)
        if self.tiles is not None:
            stream = self.tiles.copy()
            if self.shuffle:
                stream = _buffer_shuffle(stream, self.shuffle_buffer, rng)
        else:
            n_sh = len(self.shard_paths)
            order = rng.permutation(n_sh) if self.shuffle else np.arange(n_sh)
            stream = np.concatenate(
                [np.arange(self.shard_start[s], self.shard_start[s + 1]) for s in order]
            ).astype(np.int64)
            if self.shuffle:
                stream = _buffer_shuffle(stream, self.shuffle_buffer, rng)
        world, rank = self.world_size, self.rank
        n = self._per_rank()
        return stream[rank : n * world : world] if world > 1 else stream

    def __iter__(self):
        order = self.epoch_order()
        info = get_worker_info()
        wid, nw = (0, 1) if info is None else (info.id, info.num_workers)
        bs = self.batch_size
        nb = self.n_batches()
        for j in range(self.skip_batches, nb):
            if j % nw != wid:
                continue
            for pos in range(j * bs, min((j + 1) * bs, len(order))):
                yield self.get(int(order[pos]), augment=True)

    def preload(self) -> ShardDataset:
        """Read every shard into RAM now (``in_memory`` datasets; DataLoader workers inherit them)."""
        if self.in_memory:
            for s in range(len(self.shard_paths)):
                self._shard(s)
        return self

    # --------------------------------------------------------------------------- access
    def _locate(self, index: int) -> tuple[int, int]:
        s = int(np.searchsorted(self.shard_start, index, side="right") - 1)
        return s, int(index - self.shard_start[s])

    def _shard(self, s: int) -> _Shard:
        if s in self._open:
            self._open.move_to_end(s)
            return self._open[s]
        sh = _Shard(self.shard_paths[s], in_memory=self.in_memory)
        self._open[s] = sh
        while not self.in_memory and len(self._open) > 2:
            self._open.popitem(last=False)
        return sh

    def get(self, index: int, *, augment: bool = False) -> dict[str, Any]:
        """Read global tile ``index`` (with this epoch's augmentation when ``augment``)."""
        s, i = self._locate(index)
        sh = self._shard(s)
        g = sh.group
        cell_spot = np.asarray(g["cell_spot"][i]).astype(np.int64)
        cell_weight = np.asarray(g["cell_weight"][i]).astype(np.float32)
        uniq = np.unique(cell_spot[cell_spot >= 0])
        local = np.full(cell_spot.shape, -1, dtype=np.int64)
        for k, u in enumerate(uniq):
            local[cell_spot == u] = k
        indptr, indices, vals = sh.spots() if self._spot_tables is None else self._spot_tables[s]
        rows_ptr = [0]
        rows_idx, rows_val = [], []
        for u in uniq:
            a, b = int(indptr[u]), int(indptr[u + 1])
            rows_idx.append(indices[a:b])
            rows_val.append(vals[a:b])
            rows_ptr.append(rows_ptr[-1] + (b - a))
        sample: dict[str, Any] = {
            "rgb": np.asarray(g["rgb"][i]),
            "res": np.float32(sh.meta("res")[i]),
            "slide": np.int64(sh.meta("slide")[i] + self.shard_slide_offset[s]),
            "label": np.int64(sh.meta("label")[i]),
            "center_um": sh.meta("center_um")[i].astype(np.float32),
            "index": np.int64(index),
            "cell_spot": local,
            "cell_weight": cell_weight,
            # cells outside every region filled with the nearest region's vector (older shards: none)
            "cell_fill": np.asarray(g["cell_fill"][i]).astype(bool)
            if "cell_fill" in g
            else np.zeros(cell_spot.shape, dtype=bool),
            "spot_indptr": np.asarray(rows_ptr, dtype=np.int64),
            "spot_indices": np.concatenate(rows_idx).astype(np.int64)
            if rows_idx
            else np.zeros(0, np.int64),
            "spot_log1p": np.concatenate(rows_val).astype(np.float32)
            if rows_val
            else np.zeros(0, np.float32),
        }
        if "expr_dense" in g:
            sample["expr"] = np.asarray(g["expr_dense"][i]).astype(np.float32)
        if self.slide_degrade[sample["slide"]] and self.effective_mpp > sample["res"]:
            sample["rgb"] = degrade_patches(sample["rgb"], float(sample["res"]), self.effective_mpp)
        if augment and self.augment:
            rng = _rng(self.seed, self.epoch, index, 0xA06)
            sample = augment_tile(
                sample,
                rng,
                flips=bool(self.augment.get("flips", True)),
                rot90=bool(self.augment.get("rot90", True)),
                stain=float(self.augment.get("stain_jitter", 0.0) or 0.0),
                color=float(self.augment.get("color_jitter", 0.0) or 0.0),
                blur=float(self.augment.get("blur", 0.0) or 0.0),
            )
        return sample

    def _smoothed_spot_tables(self, sigma_um: float) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """Every shard's spot table (CSR) with each spot's values smoothed over its slide's spots."""
        import scipy.sparse as sp
        import zarr

        groups = [zarr.open_group(p, mode="r") for p in self.shard_paths]
        keys, centers, rows = [], [], []
        for path, g, off in zip(self.shard_paths, groups, self.shard_slide_offset, strict=True):
            if "spot_obs" not in g or "spot_center_um" not in g:
                raise ValueError(
                    f"Shard {str(path)!r} does not store its spots' positions (older format), so "
                    "data.target_smoothing_um cannot find their neighbours; prepare it again with "
                    "`squall prepare` (or set data.target_smoothing_um: null)."
                )
            indptr = np.asarray(g["spot_indptr"][:])
            n_sp = len(indptr) - 1
            keys.append(np.stack([np.asarray(g["spot_slide"][:]).astype(np.int64) + off,
                                  np.asarray(g["spot_obs"][:]).astype(np.int64)], axis=1))
            centers.append(np.asarray(g["spot_center_um"][:], dtype=np.float64).reshape(n_sp, 2))
            rows.append(sp.csr_matrix(
                (np.asarray(g["spot_log1p"][:], dtype=np.float64), np.asarray(g["spot_indices"][:]), indptr),
                shape=(n_sp, len(self.genes)),
            ))
        if not keys:
            return []
        # one row per spot of a slide (shards may repeat a spot: each holds the spots its tiles touch);
        # np.unique sorts the (slide, obs) keys, so each slide's spots form one block of rows
        uniq, first, inverse = np.unique(np.concatenate(keys), axis=0, return_index=True, return_inverse=True)
        inverse = inverse.reshape(-1)
        x = sp.vstack(rows, format="csr")[first]
        xy = np.concatenate(centers)[first]
        blocks = [_gaussian_weights(xy[uniq[:, 0] == slide], sigma_um) for slide in np.unique(uniq[:, 0])]
        weights = sp.block_diag(blocks, format="csr")  # keys is not empty: at least one slide
        smoothed = (weights @ x).tocsr()
        out, start = [], 0
        for k in keys:
            m = smoothed[inverse[start : start + len(k)]].tocsr()
            m.sort_indices()
            out.append((m.indptr.astype(np.int64), m.indices.astype(np.int64), m.data.astype(np.float32)))
            start += len(k)
        logger.info("data: spot targets smoothed over neighbours (σ = %g µm, %d spots)", sigma_um, len(uniq))
        return out

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        # zarr handles are reopened in each worker; in-memory shards already loaded travel along
        state["_open"] = OrderedDict(self._open) if self.in_memory else OrderedDict()
        return state


def _gaussian_weights(xy: np.ndarray, sigma_um: float):
    """Row-normalised sparse Gaussian weights between points ``xy`` (µm) within 3σ."""
    import scipy.sparse as sp
    from scipy.spatial import cKDTree

    pairs = cKDTree(xy).query_pairs(3.0 * sigma_um, output_type="ndarray") if len(xy) else np.zeros((0, 2), int)
    d2 = np.sum((xy[pairs[:, 0]] - xy[pairs[:, 1]]) ** 2, axis=1)
    w = np.exp(-d2 / (2.0 * sigma_um**2))
    n = len(xy)
    i = np.concatenate([pairs[:, 0], pairs[:, 1], np.arange(n)])
    j = np.concatenate([pairs[:, 1], pairs[:, 0], np.arange(n)])
    mat = sp.csr_matrix((np.concatenate([w, w, np.ones(n)]), (i, j)), shape=(n, n))
    return sp.diags(1.0 / np.asarray(mat.sum(axis=1)).reshape(-1)) @ mat


def _buffer_shuffle(stream: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """Shuffle ``stream`` through a buffer of ``size`` items (only nearby items get mixed)."""
    if size >= len(stream):
        return stream[rng.permutation(len(stream))]
    out = np.empty_like(stream)
    buf = list(stream[:size])
    picks = rng.integers(0, size, size=len(stream))
    k = 0
    for x in stream[size:]:
        j = picks[k]
        out[k] = buf[j]
        buf[j] = x
        k += 1
    rest = np.asarray(buf)[rng.permutation(size)]
    out[k:] = rest
    return out


def section_stats(
    sources: str | os.PathLike | Sequence[str | os.PathLike],
    gene_idx: Sequence[int] | np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Per-section mean and standard deviation of each gene's spot log1p(CP10k).

    Sections are indexed as the ``slide`` field of :class:`ShardDataset` items over the same
    ``sources`` (slides of the manifests, in order). Every spot of a shard's spot table counts
    once, zeros included.

    Parameters
    ----------
    sources
        Prepared dataset folder(s), as given to :class:`ShardDataset`.
    gene_idx
        Vocabulary indices of the genes to summarise (default: all).

    Returns
    -------
    ``mean`` and ``std`` (n_slides, n_genes) float32; sections without spots get mean 0, std 0.

    """
    import zarr

    ds = ShardDataset(sources, batch_size=1, shuffle=False)
    n_vocab = len(ds.genes)
    idx = np.arange(n_vocab) if gene_idx is None else np.asarray(gene_idx, dtype=np.int64)
    n_sl = len(ds.slides)
    s1 = np.zeros((n_sl, len(idx)), np.float64)
    s2 = np.zeros((n_sl, len(idx)), np.float64)
    cnt = np.zeros(n_sl, np.float64)
    for path, off in zip(ds.shard_paths, ds.shard_slide_offset, strict=True):
        g = zarr.open_group(path, mode="r")
        indptr = np.asarray(g["spot_indptr"][:])
        n_sp = len(indptr) - 1
        if n_sp == 0:
            continue
        dense = np.zeros((n_sp, n_vocab), np.float32)
        rows = np.repeat(np.arange(n_sp), np.diff(indptr))
        dense[rows, np.asarray(g["spot_indices"][:])] = np.asarray(g["spot_log1p"][:])
        dense = dense[:, idx].astype(np.float64)
        slide = np.asarray(g["spot_slide"][:]).astype(np.int64) + off
        np.add.at(s1, slide, dense)
        np.add.at(s2, slide, dense**2)
        np.add.at(cnt, slide, 1.0)
    n = np.maximum(cnt, 1.0)[:, None]
    mean = s1 / n
    std = np.sqrt(np.maximum(s2 / n - mean**2, 0.0))
    return mean.astype(np.float32), std.astype(np.float32)


def collate_tiles(samples: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
    """Batch samples of :class:`ShardDataset`.

    Parameters
    ----------
    samples
        Items of the dataset.

    Returns
    -------
    ``rgb`` uint8 (B, 3, P, P); ``res``, ``slide``, ``label``, ``index`` (B,); ``center_um`` (B, 2);
    ``cell_spot`` (B, g, g) indexing the batch's spots (-1: none); ``cell_weight`` (B, g, g);
    ``cell_fill`` bool (B, g, g): cells outside every spot filled with the nearest spot's vector;
    ``spot_tile`` (S,) the tile of each spot; ``spot_crow``, ``spot_col``, ``spot_log1p``: a CSR of
    the S spots × G genes with log1p(CP10k) values (binary = nonzero); ``expr`` (B, G, g, g) when
    the shards are dense.

    """
    out: dict[str, torch.Tensor] = {
        "rgb": torch.from_numpy(np.stack([s["rgb"] for s in samples])),
        "res": torch.tensor([float(s["res"]) for s in samples], dtype=torch.float32),
        "slide": torch.tensor([int(s["slide"]) for s in samples], dtype=torch.long),
        "label": torch.tensor([int(s["label"]) for s in samples], dtype=torch.long),
        "index": torch.tensor([int(s["index"]) for s in samples], dtype=torch.long),
        "center_um": torch.from_numpy(np.stack([s["center_um"] for s in samples])),
        "cell_weight": torch.from_numpy(np.stack([s["cell_weight"] for s in samples])),
        "cell_fill": torch.from_numpy(np.stack([s["cell_fill"] for s in samples])),
    }
    cell_spot, crow, cols, vals, spot_tile = [], [0], [], [], []
    offset = 0
    for b, s in enumerate(samples):
        cs = s["cell_spot"].copy()
        n_sp = len(s["spot_indptr"]) - 1
        cs[cs >= 0] += offset
        cell_spot.append(cs)
        crow.extend((s["spot_indptr"][1:] + crow[-1]).tolist())
        cols.append(s["spot_indices"])
        vals.append(s["spot_log1p"])
        spot_tile.extend([b] * n_sp)
        offset += n_sp
    out["cell_spot"] = torch.from_numpy(np.stack(cell_spot))
    out["spot_tile"] = torch.tensor(spot_tile, dtype=torch.long)
    out["spot_crow"] = torch.tensor(crow, dtype=torch.long)
    out["spot_col"] = (
        torch.from_numpy(np.concatenate(cols)) if cols else torch.zeros(0, dtype=torch.long)
    )
    out["spot_log1p"] = torch.from_numpy(np.concatenate(vals)) if vals else torch.zeros(0)
    if all("expr" in s for s in samples):
        out["expr"] = torch.from_numpy(np.stack([s["expr"] for s in samples]))
    return out


def spot_matrix(batch: Mapping[str, torch.Tensor], n_genes: int, *, binary: bool) -> torch.Tensor:
    """Dense (S, G) spot matrix of a batch: binary detection or log1p(CP10k)."""
    crow, col, val = batch["spot_crow"], batch["spot_col"], batch["spot_log1p"]
    n_sp = crow.numel() - 1
    dense = torch.zeros(n_sp, n_genes, device=val.device, dtype=torch.float32)
    if n_sp and col.numel():
        rows = torch.repeat_interleave(torch.arange(n_sp, device=val.device), crow[1:] - crow[:-1])
        dense[rows, col] = torch.ones_like(val) if binary else val.float()
    return dense


def expression_grid(batch: Mapping[str, torch.Tensor], n_genes: int) -> torch.Tensor:
    """Return the binary expression target (B, G, g, g) of a batch (spec §4.10)."""
    if "expr" in batch:
        return batch["expr"].float()
    spots = spot_matrix(batch, n_genes, binary=True)
    cs = batch["cell_spot"]
    w = batch["cell_weight"].float() * (cs >= 0)
    if spots.shape[0] == 0:
        b, g = cs.shape[0], cs.shape[-1]
        return torch.zeros(b, n_genes, g, g, device=w.device)
    grid = spots[cs.clamp(min=0)] * w[..., None]  # (B, g, g, G)
    return grid.permute(0, 3, 1, 2).contiguous()


class ShardDataModule(pl.LightningDataModule):
    """LightningDataModule over prepared shards (the ``data`` section of a training config).

    Parameters
    ----------
    cfg
        Resolved configuration (see :func:`squall_sd.train.load_config`); uses ``seed`` and
        ``data.{train, val, batch_size, num_workers, shuffle_buffer, augment, drop_last,
        max_tiles, in_memory, effective_mpp, target_smoothing_um}`` (the last for the training data only).

    """

    def __init__(self, cfg: Mapping[str, Any]) -> None:
        super().__init__()
        self.cfg = cfg
        d = cfg["data"]
        if d["train"] is None:
            raise ValueError("data.train is not set: give the folder written by `squall prepare`.")
        self.train_ds: ShardDataset | None = None
        self.val_ds: ShardDataset | None = None

    def _make(self, src: Any, *, train: bool) -> ShardDataset:
        d = self.cfg["data"]
        return ShardDataset(
            src,
            batch_size=int(d["batch_size"]),
            shuffle=train,
            shuffle_buffer=int(d["shuffle_buffer"]),
            seed=int(self.cfg["seed"]),
            augment=d["augment"] if train else None,
            drop_last=bool(d["drop_last"]) if train else False,
            max_tiles=d["max_tiles"],
            in_memory=bool(d.get("in_memory", False)),
            effective_mpp=d.get("effective_mpp"),
            target_smoothing_um=d.get("target_smoothing_um") if train else None,
        )

    def setup(self, stage: str | None = None) -> None:
        d = self.cfg["data"]
        if self.train_ds is None:
            self.train_ds = self._make(d["train"], train=True).preload()
        if d["val"] is not None and self.val_ds is None:
            self.val_ds = self._make(d["val"], train=False).preload()
        if self.trainer is not None:
            for ds in (self.train_ds, self.val_ds):
                if ds is not None:
                    ds.set_distributed(self.trainer.global_rank, self.trainer.world_size)
        logger.info("data: %d training tiles", self.train_ds.n_tiles)

    def _loader(self, ds: ShardDataset) -> DataLoader:
        d = self.cfg["data"]
        nw = int(d["num_workers"])
        return DataLoader(
            ds,
            batch_size=ds.batch_size,
            num_workers=nw,
            collate_fn=collate_tiles,
            drop_last=ds.drop_last,
            pin_memory=torch.cuda.is_available(),
            persistent_workers=False,
            prefetch_factor=4 if nw > 0 else None,
        )

    def sync_position(self, batches_seen: int) -> None:
        """Point the training stream at batch ``batches_seen`` (epoch, skip = divmod)."""
        if self.train_ds is None:
            return
        nb = max(1, self.train_ds.n_batches())
        self.train_ds.set_epoch(batches_seen // nb, batches_seen % nb)

    def train_dataloader(self) -> DataLoader:
        if self.trainer is not None and self.trainer.lightning_module is not None:
            self.sync_position(int(getattr(self.trainer.lightning_module, "batches_seen", 0)))
        return self._loader(self.train_ds)

    def val_dataloader(self) -> DataLoader | list:
        return self._loader(self.val_ds) if self.val_ds is not None else []
