"""Image-only shards for phase 1 (masked-image pretraining) of squall-tiny-her2st: every H&E here.

One shard folder per image and scale (``OUT/{name}_{mpp}um``), tiled on a grid with
:func:`squall_sd.train.prepare` (no expression: the spots/tables are dropped), so that a model's
pretraining set is a list of folders that never includes its test patient's images:

    python scripts/train_her2st_pretrain_data.py --out data/her2st-pretrain

Images: her2st A1, A2, C2-C6 (A's blacked-out background set to white), the four mouse olfactory
bulb sections (../shared/data/mob), and the H&E of the Visium fixtures that
:func:`squall_sd.io.visium` reads (hires images, ~3.5 um/px, used at 4 um/px only). Scales: 2 and
4 um/px (the model's 2 um/px, and a coarser view: the model takes the scale as input). The Xenium lung
crop is left out: its files do not record its um/px.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from spatialdata import SpatialData
from train_her2st_prepare import tiny_config, white_background

import squall_sd as squall
from squall_sd import train

VISIUM = {  # name -> (outs folder, hires image) relative to ../shared/data/fixtures
    "visium_scanpy": "scanpy/tests/_data/visium_data/1.0.0",
    "visium_seurat": "seurat/tests/testdata/visium",
    "visium_sfe1": "sfe_8fa1e84/inst/extdata/sample01/outs",
    "visium_sfe2": "sfe_8fa1e84/inst/extdata/sample02/outs",
}


def images(shared: Path):
    """Yield (name, image-only SpatialData, scales) for every H&E used."""
    for sec in ["A1", "A2", "C2", "C3", "C4", "C5", "C6"]:
        sd = squall.datasets.her2st(sec, shared / "her2st")
        if sec.startswith("A"):
            white_background(sd)
        yield sec, SpatialData(images={"he": sd.images["he"]}, attrs=sd.attrs), (2.0, 4.0)
    for i in range(1, 5):
        sd = squall.datasets.mob(i, shared / "mob")
        yield f"MOB{i}", SpatialData(images={"he": sd.images["he"]}, attrs=sd.attrs), (2.0, 4.0)
    for name, rel in VISIUM.items():
        try:
            sd = squall.io.visium(shared / "fixtures" / rel)
        except Exception as e:  # noqa: BLE001 - a fixture the reader cannot open is reported and skipped
            print(f"{name}: skipped ({type(e).__name__}: {e})")
            continue
        if "he" not in sd.images:
            print(f"{name}: skipped (no H&E image)")
            continue
        yield name, SpatialData(images={"he": sd.images["he"]}, attrs=sd.attrs), (4.0,)


def main(argv=None) -> None:
    """Write one image-only shard folder per image and scale."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shared", type=Path, default=Path("../shared/data"))
    p.add_argument("--out", type=Path, default=Path("data/her2st-pretrain"))
    p.add_argument("--panel", type=Path, default=Path("data/her2st-spots112/panel.txt"))
    p.add_argument("--img-size", type=int, default=112)
    p.add_argument("--model-overrides", default="stem=conv,init=trunc_normal")
    p.add_argument("--overwrite", action="store_true", help="rewrite folders that exist")
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    panel = tuple(args.panel.read_text().split())
    for name, sd, scales in images(args.shared):
        for mpp in scales:
            t = time.time()
            cfg = tiny_config(panel, mpp, args.img_size, args.model_overrides)
            target = args.out / f"{name}_{mpp:g}um"
            if (target / "manifest.json").is_file() and not args.overwrite:
                print(f"{name} at {mpp:g} um/px: exists, kept")
                continue
            try:
                out = train.prepare(
                    sd, target, model_config_or_name=cfg, slide_ids=[name], min_tissue=0.5, overwrite=True
                )
            except ValueError as e:  # e.g. an image with no tile of enough tissue at this scale
                print(f"{name} at {mpp:g} um/px: skipped ({e})")
                continue
            n = train.read_manifest(out)["n_tiles"]
            print(f"{name} at {mpp:g} um/px: {n} tiles in {time.time() - t:.0f}s", flush=True)


if __name__ == "__main__":
    main()
