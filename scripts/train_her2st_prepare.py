"""Data for the bundled model ``squall-tiny-her2st``: gene panel + one shard folder per section.

Step 0 of the recipe in ``src/squall_sd/models/weights/squall-tiny-her2st/README.md``:

    python scripts/train_her2st_prepare.py --root ../shared/data/her2st --out data/her2st-shards

1. Gene panel (the model's vocabulary and its fine-tuning targets): the 785 genes of ``hvg785.npy``
   followed by the 50 most expressed genes (highest mean log1p CP10k over the spots) of each
   training set used (patient C, patient A, and A+C), restricted to genes measured in all seven
   imaged sections -- so that every model of the recipe covers the benchmark's genes
   (``benchmarks/her2st_expression.py`` takes the top 50 of the training patient).
2. ``squall_sd.train.prepare`` per section (A1, A2, C2..C6), all with the same model config
   (squall-tiny, vocabulary = panel, ``mpp`` µm/px), so that a training set is just a list of
   section folders: C only, A only, or A+C.
   The A1/A2 PNGs have their background blacked out; pixels whose max channel is < 16 are set to
   white (the glass of the C scans) before tiling, as the benchmark does with its tiles.
"""

from __future__ import annotations

import argparse
import json
import time
from functools import reduce
from pathlib import Path

import numpy as np
import pandas as pd

SECTIONS = {"A": ["A1", "A2"], "C": ["C2", "C3", "C4", "C5", "C6"]}


def log1p_cp10k(counts: pd.DataFrame) -> pd.DataFrame:
    """Normalise a spots x genes count table to log1p of counts per 10,000 (CP10k)."""
    x = counts.to_numpy(dtype=np.float64)
    tot = np.maximum(x.sum(1, keepdims=True), 1.0)
    return pd.DataFrame(np.log1p(x / tot * 1e4), index=counts.index, columns=counts.columns)


def gene_panel(root: Path) -> tuple[list[str], dict]:
    """Build the gene panel (hvg785 + top-50 genes of C, A and A+C, common to all sections) and its summary."""
    counts = {
        s: pd.read_csv(root / "counts" / f"{s}.tsv.gz", sep="\t", index_col=0)
        for p in SECTIONS.values()
        for s in p
    }
    common = reduce(lambda a, b: a.intersection(b), [c.columns for c in counts.values()])
    hvg = [str(g) for g in np.load(root / "hvg785.npy", allow_pickle=True)]
    hvg = [g for g in hvg if g in common]
    norm = {s: log1p_cp10k(c)[list(common)] for s, c in counts.items()}
    tops = {}
    for name, secs in {"C": SECTIONS["C"], "A": SECTIONS["A"], "A+C": SECTIONS["A"] + SECTIONS["C"]}.items():
        m = pd.concat([norm[s] for s in secs]).to_numpy().mean(0)
        tops[name] = [str(common[i]) for i in np.argsort(-m, kind="stable")[:50]]
    panel = list(dict.fromkeys(hvg + tops["C"] + tops["A"] + tops["A+C"]))
    info = {"n_hvg785": len(hvg), "top50": tops, "n_panel": len(panel)}
    return panel, info


def tiny_config(panel, mpp: float, img_size: int, overrides: str = ""):
    """Return squall-tiny for ``panel`` with ``img_size``-px tiles at ``mpp`` µm/px.

    The tiny model's 4 px per expression cell is kept; ``overrides`` ("key=value,...") sets further
    fields.
    """
    import squall_sd as squall

    over = dict(kv.split("=", 1) for kv in overrides.split(",") if kv)
    return squall.models.get_config("squall-tiny").replace(
        genes=tuple(panel), mpp=mpp, img_size=img_size, expr_size=img_size // 4, **over
    )


def white_background(sdata, thresh: int = 16) -> None:
    """Set near-black pixels (max channel < thresh) of every scale of the H&E to white, lazily."""
    im = sdata.images["he"]
    for key in list(im.children) if hasattr(im, "children") else []:
        arr = im[key]["image"]

        def fix(b):
            b = b.copy()
            b[:, b.max(axis=0) < thresh] = 255
            return b

        arr.data = arr.data.rechunk({0: -1}).map_blocks(fix, dtype=np.uint8)


def main(argv=None) -> None:
    """Write the gene panel and run ``squall_sd.train.prepare`` for each requested section."""
    import squall_sd as squall
    from squall_sd import train

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", type=Path, default=Path("../shared/data/her2st"))
    p.add_argument("--out", type=Path, default=Path("data/her2st-shards"))
    p.add_argument("--mpp", type=float, default=2.0, help="µm/px of the tiles")
    p.add_argument("--img-size", type=int, default=224, help="tile edge in px (field = img-size × mpp µm)")
    p.add_argument("--stride-um", type=float, default=None, help="tile step (default: tile edge)")
    p.add_argument(
        "--spot-tiles", type=int, default=0,
        help="N > 0: N tiles centred on each spot (the first exact, the rest shifted by up to --jitter-um) "
        "instead of the stride grid",
    )
    p.add_argument("--jitter-um", type=float, default=0.0, help="largest shift of the extra spot tiles")
    p.add_argument(
        "--model-overrides", default="",
        help="further SquallConfig fields as key=value,... (e.g. stem=conv,init=trunc_normal)",
    )
    p.add_argument("--sections", default="A1,A2,C2,C3,C4,C5,C6")
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    panel, info = gene_panel(args.root)
    (args.out / "panel.txt").write_text("\n".join(panel) + "\n")
    (args.out / "panel.json").write_text(json.dumps(info, indent=1))
    print(f"panel: {len(panel)} genes ({info['n_hvg785']} hvg785 + top-50 extras)")
    cfg = tiny_config(panel, args.mpp, args.img_size, args.model_overrides)
    spot = {"tile_centers": "spots", "tiles_per_spot": args.spot_tiles, "jitter_um": args.jitter_um}
    for sec in args.sections.split(","):
        t = time.time()
        sdata = squall.datasets.her2st(sec, args.root)
        if sec.startswith("A"):
            white_background(sdata)
        train.prepare(
            sdata, args.out / sec, model_config_or_name=cfg, tile_stride_um=args.stride_um,
            slide_ids=[sec], overwrite=True, **(spot if args.spot_tiles else {}),
        )
        print(f"{sec}: prepared in {time.time() - t:.0f}s")


if __name__ == "__main__":
    main()
