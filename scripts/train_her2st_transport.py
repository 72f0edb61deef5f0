"""Move prepared shard folders to a training node without spatialdata, small (JPEG tiles).

The GPU machine used for the bundled model could only receive ~64 MiB, so the shards' ``rgb``
arrays travel as JPEG (quality 90) and are rebuilt there as the zarr arrays ``prepare`` writes
(same shape, dtype and chunks); everything else is copied byte for byte.

    python scripts/train_her2st_transport.py pack data/her2st-shards data/carry
    python scripts/train_her2st_transport.py unpack data/carry data/her2st-shards   # on the node
"""

from __future__ import annotations

import io
import shutil
import sys
from pathlib import Path

import numpy as np
from PIL import Image


def pack(src: Path, dst: Path, quality: int = 90) -> None:
    """Copy the shard folders ``src`` to ``dst``, storing each shard's ``rgb`` array as JPEG blobs in an npz."""
    import zarr

    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst, ignore=lambda d, names: ["rgb"] if Path(d).suffix == ".zarr" else [])
    for grp_path in sorted(src.glob("*/shards/*.zarr")):
        rgb = np.asarray(zarr.open_group(grp_path, mode="r")["rgb"][:])
        blobs = []
        for t in rgb:
            buf = io.BytesIO()
            Image.fromarray(np.moveaxis(t, 0, -1)).save(buf, format="JPEG", quality=quality)
            blobs.append(np.frombuffer(buf.getvalue(), dtype=np.uint8))
        out = dst / grp_path.relative_to(src)
        np.savez(out / "rgb_jpeg.npz", blob=np.concatenate(blobs), lens=[len(b) for b in blobs],
                 shape=rgb.shape)


def unpack(src: Path, dst: Path) -> None:
    """Copy packed shards ``src`` to ``dst``, decoding the JPEG blobs back into each shard's zarr ``rgb`` array."""
    import zarr

    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst)
    for npz in sorted(dst.glob("*/shards/*.zarr/rgb_jpeg.npz")):
        z = np.load(npz)
        offs = np.concatenate([[0], np.cumsum(z["lens"])])
        rgb = np.stack([
            np.moveaxis(
                np.asarray(Image.open(io.BytesIO(z["blob"][offs[i]:offs[i + 1]].tobytes())).convert("RGB")), -1, 0
            )
            for i in range(len(z["lens"]))
        ]).astype(np.uint8)
        assert rgb.shape == tuple(z["shape"]), (rgb.shape, z["shape"])
        grp = zarr.open_group(npz.parent, mode="a", zarr_format=3)
        grp.create_array("rgb", data=rgb, chunks=(1, 3, rgb.shape[-1], rgb.shape[-1]))
        npz.unlink()


if __name__ == "__main__":
    {"pack": pack, "unpack": unpack}[sys.argv[1]](Path(sys.argv[2]), Path(sys.argv[3]))
