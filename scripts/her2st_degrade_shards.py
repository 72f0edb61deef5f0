"""Copy prepared her2st shard folders with every tile degraded to a coarser µm/px.

An experiment of ``configs/README.md``: does the recipe lose anything when its sharp training tiles
(C's 0.69 µm/px scans read at 2 µm/px) look like patient A's ≈3.2 µm/px copies? Each tile of
``SRC/SECTION/shards/*.zarr`` is box-down-sampled to ``--to-mpp`` and bilinearly up-sampled back
(``benchmarks/_models.degrade``, the benchmark's rule), written to ``OUT/SECTION``; the expression
targets and everything else are copied unchanged, so the run differs from the recipe in the tiles'
sharpness alone.

    python scripts/her2st_degrade_shards.py data/her2st-spots112 data/her2st-spots112-deg32 \
        --sections C2 C3 C4 C5 C6 --to-mpp 3.202
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import zarr

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from _models import degrade  # noqa: E402


def main(argv=None) -> None:  # noqa: D103
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", type=Path)
    p.add_argument("out", type=Path)
    p.add_argument("--sections", nargs="+", required=True)
    p.add_argument("--to-mpp", type=float, required=True)
    args = p.parse_args(argv)
    if args.out.resolve() == args.src.resolve():
        raise SystemExit("OUT must differ from SRC: the source tiles are kept as they are.")
    args.out.mkdir(parents=True, exist_ok=True)
    for extra in ("panel.txt", "panel.json"):
        if (args.src / extra).is_file():
            shutil.copy2(args.src / extra, args.out / extra)
    for sec in args.sections:
        src, dst = args.src / sec, args.out / sec
        manifest = json.loads((src / "manifest.json").read_text())
        mpp = float(manifest["mpp"])
        if args.to_mpp <= mpp:
            raise SystemExit(f"--to-mpp {args.to_mpp} is not coarser than the tiles' {mpp} µm/px")
        if dst.exists():
            shutil.rmtree(dst)
        shutil.copytree(src, dst)
        n = 0
        for shard in manifest["shards"]:
            rgb = zarr.open_group(str(dst / shard["path"]), mode="r+")["rgb"]
            tiles = np.asarray(rgb[:]).transpose(0, 2, 3, 1)  # (n, 3, H, W) -> (n, H, W, 3)
            rgb[:] = degrade(np.ascontiguousarray(tiles), mpp, args.to_mpp).transpose(0, 3, 1, 2)
            n += len(tiles)
        manifest["degraded_to_mpp"] = args.to_mpp  # provenance; the reader ignores unknown keys
        (dst / "manifest.json").write_text(json.dumps(manifest, indent=1))
        print(f"{sec}: {n} tiles degraded to {args.to_mpp:g} µm/px -> {dst}")


if __name__ == "__main__":
    main()
