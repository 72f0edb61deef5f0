"""The shard format of prepared training datasets: its writer (:func:`squall_sd.train.prepare`) and reader.

On-disk layout of a prepared folder::

    manifest.json                 # geometry, genes, slides, shards, parameters, provenance
    shards/00000.zarr             # one zarr v3 group per shard of at most ``shard_size`` tiles
        rgb            uint8   (N, 3, P, P)  tile at the model's µm/px (chunk = 1 tile)
        res            float32 (N,)          µm per pixel of the tile (the model's ``res`` input)
        slide          int32   (N,)          index into manifest["slides"]
        center_um      float32 (N, 2)        tile centre (x, y) in the slide's ``microns`` frame
        label          int32   (N,)          tile class (-1: none), see manifest["labels"]
        cell_spot      int32   (N, g, g)     shard-local region ("spot") of each expression cell (-1: none)
        cell_weight    float16 (N, g, g)     value multiplier of each cell (1 / cells of the region, or 1)
        cell_fill      bool    (N, g, g)     the cell lies outside every region and was filled (weight 1)
        spot_indptr    int64   (M + 1,)      CSR over the shard's M regions × G model genes
        spot_indices   int32   (nnz,)        gene (vocabulary) index of each detected gene
        spot_log1p     float32 (nnz,)        log1p(CP10k) of that gene in that region
        spot_slide     int32   (M,)          slide of each region
        spot_obs       int64   (M,)          row of the region in its slide's table (-1: pooled region)
        spot_center_um float32 (M, 2)        region centre (x, y; centroid for polygons), microns
        expr_dense     float16 (N, G, g, g)  only with ``expr_format="dense"``

The expression grid of tile ``i`` is ``grid[:, y, x] = cell_weight[i, y, x] * b[cell_spot[i, y, x]]``
where ``b`` is the region's binary detection vector over the model vocabulary (1 where the gene has at
least one count). That is the published binary target (spec §4.10). The rules that assign regions to
cells are in :mod:`squall_sd.train._regions`.

The factored form stores each region's vector once per shard instead of once per cell, which is what
makes cohort-sized datasets fit on disk; the same CSR also holds log1p(CP10k) values for region-level
regression (use ``cell_fill`` to leave filled cells out of a region). Memory holds one slide's cell
lattice (int32, e.g. 200 MB for 20 × 10 mm at 2 µm cells) and one shard of tiles at a time.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import scipy.sparse as sp

from squall_sd._logging import logger

if TYPE_CHECKING:
    from squall_sd.train._regions import _Regions

__all__ = ["FORMAT_VERSION", "MANIFEST", "read_manifest", "write_manifest"]

#: Version of the shard format written by :func:`squall_sd.train.prepare`.
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
#: Value of ``manifest["format"]``.
FORMAT_NAME = "squall-sd-shards"


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
        self.spot_src: dict[int, _Regions] = {}

    def add(self, *, rgb, res, slide, center, label, idx, weight, fill, regions: _Regions | None) -> None:
        local = np.full(idx.shape, -1, dtype=np.int32)
        if regions is not None and regions.csr is not None:
            self.spot_src[slide] = regions
            has = idx >= 0
            uniq, inv = np.unique(idx[has], return_inverse=True)
            pos = np.empty(len(uniq), dtype=np.int32)
            for j, s in enumerate(uniq.tolist()):
                key = (slide, s)
                if key not in self.spot_pos:
                    self.spot_pos[key] = len(self.spot_rows)
                    self.spot_rows.append(key)
                pos[j] = self.spot_pos[key]
            local[has] = pos[inv.reshape(-1)]
        else:
            weight = np.zeros_like(weight)
            fill = np.zeros_like(fill)
        self.tiles.append(
            dict(
                rgb=rgb,
                res=res,
                slide=slide,
                center=center,
                label=label,
                cell_spot=local,
                cell_weight=weight,
                cell_fill=fill,
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
        grp.create_array("center_um", data=np.array([t["center"] for t in self.tiles], dtype=np.float32))
        grp.create_array("label", data=np.array([t["label"] for t in self.tiles], dtype=np.int32))
        cell_spot = np.stack([t["cell_spot"] for t in self.tiles]).astype(np.int32)
        cell_weight = np.stack([t["cell_weight"] for t in self.tiles]).astype(np.float16)
        grp.create_array("cell_spot", data=cell_spot, chunks=(1, g, g))
        grp.create_array("cell_weight", data=cell_weight, chunks=(1, g, g))
        cell_fill = np.stack([t["cell_fill"] for t in self.tiles]).astype(bool)
        grp.create_array("cell_fill", data=cell_fill, chunks=(1, g, g))
        keys = np.asarray(self.spot_rows, dtype=np.int64).reshape(-1, 2)
        slides, index = keys[:, 0], keys[:, 1]
        obs = np.zeros(len(keys), dtype=np.int64)
        centers = np.zeros((len(keys), 2), dtype=np.float32)
        blocks, order = [], []
        for slide in np.unique(slides).tolist():  # one row gather per slide
            at = np.flatnonzero(slides == slide)
            src = self.spot_src[slide]
            blocks.append(src.csr[index[at]])
            order.append(at)
            obs[at] = src.obs[index[at]]
            centers[at] = src.center[index[at]]
        if blocks:
            csr = sp.vstack(blocks, format="csr")[np.argsort(np.concatenate(order))]
            csr.sort_indices()
        else:
            csr = sp.csr_matrix((0, self.n_genes), dtype=np.float32)
        chunk = max(1, min(len(csr.data), 1 << 20))
        grp.create_array("spot_indptr", data=csr.indptr.astype(np.int64))
        grp.create_array("spot_indices", data=csr.indices.astype(np.int32), chunks=(chunk,))
        grp.create_array("spot_log1p", data=csr.data.astype(np.float32), chunks=(chunk,))
        grp.create_array("spot_slide", data=slides.astype(np.int32))
        grp.create_array("spot_obs", data=obs)
        grp.create_array("spot_center_um", data=centers)
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
        self.shards.append({"path": name, "n_tiles": n, "n_spots": len(self.spot_rows), "nnz": int(csr.nnz)})
        logger.info("prepare: wrote %s (%d tiles, %d spots)", name, n, len(self.spot_rows))
        self._reset()


def build_manifest(
    *,
    cfg: Any,
    version: str,
    cell_um: float,
    tile_um: float,
    stride: float,
    expr_format: str,
    n_tiles: int,
    shards: list[dict[str, Any]],
    slides: list[dict[str, Any]],
    labels: Mapping[str, Any],
    params: Mapping[str, Any],
) -> dict[str, Any]:
    """Return the manifest of a prepared folder (geometry, genes, slides, shards, parameters)."""
    return {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "squall_sd_version": version,
        "model": cfg.to_dict(include_genes=False),
        "genes": list(cfg.genes),
        "img_size": int(cfg.img_size),
        "expr_size": int(cfg.expr_size),
        "mpp": float(cfg.mpp),
        "cell_um": cell_um,
        "tile_um": tile_um,
        "tile_stride_um": stride,
        "normalization": "binary",
        "expr_format": expr_format,
        "n_tiles": n_tiles,
        "shards": shards,
        "slides": slides,
        "labels": dict(labels),
        "params": dict(params),
    }


def write_manifest(folder: Path, manifest: Mapping[str, Any]) -> None:
    """Write ``manifest`` as ``folder / manifest.json``."""
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=1))


# ------------------------------------------------------------------------------------ reader
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
    if man.get("format") != FORMAT_NAME:
        raise ValueError(f"{str(f)!r} is not a squall-sd shard manifest.")
    if int(man.get("format_version", 0)) > FORMAT_VERSION:
        raise ValueError(
            f"{str(f)!r} was written by a newer squall-sd (format {man['format_version']}); upgrade squall-sd."
        )
    man["root"] = str(f.parent.resolve())
    return man


class _Shard:
    """Handle on one shard (zarr group) with its spot table cached on first use.

    With ``in_memory``, every array of the shard is read (decompressed) once and kept as numpy
    arrays, so later tile reads are plain indexing.
    """

    def __init__(self, path: Path, *, in_memory: bool = False) -> None:
        import zarr

        self.path = path
        group = zarr.open_group(path, mode="r")
        if in_memory:
            self.group: Any = {k: np.asarray(group[k][:]) for k in group.array_keys()}
        else:
            self.group = group
        self._spots: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None
        self._meta: dict[str, np.ndarray] = {}

    def meta(self, key: str) -> np.ndarray:
        if key not in self._meta:
            self._meta[key] = np.asarray(self.group[key][:])
        return self._meta[key]

    def spots(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if self._spots is None:
            g = self.group
            self._spots = (
                np.asarray(g["spot_indptr"][:]),
                np.asarray(g["spot_indices"][:]),
                np.asarray(g["spot_log1p"][:]),
            )
        return self._spots
