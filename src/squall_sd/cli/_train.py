"""``squall prepare`` and ``squall train`` subcommands."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import yaml

from squall_sd._logging import logger


def _parse_sets(items: list[str] | None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items or []:
        if "=" not in item:
            raise ValueError(f"--set expects KEY=VALUE (dotted keys, YAML values), got {item!r}.")
        key, value = item.split("=", 1)
        out[key.strip()] = yaml.safe_load(value)
    return out


def _prepare(args: argparse.Namespace) -> int:
    from squall_sd.train import prepare

    genes = None
    if args.genes:
        genes = [g.strip() for g in Path(args.genes).read_text().splitlines() if g.strip()]
    overrides: dict[str, Any] = {"mpp": args.mpp} if args.mpp is not None else {}
    keys = {k: getattr(args, k) for k in ("image_key", "shapes_key", "table_key") if getattr(args, k)}
    fill = None if args.fill == "none" else args.fill
    out = prepare(
        list(args.inputs),
        args.out,
        model_config_or_name=args.model,
        shard_size=args.shard_size,
        tile_stride_um=args.tile_stride_um,
        min_tissue=args.min_tissue,
        genes=genes,
        label_key=args.label_key,
        expr_format=args.expr_format,
        fill=fill,
        min_spot_cells=args.min_spot_cells,
        overwrite=args.overwrite,
        progress=True,
        **keys,
        **overrides,
    )
    logger.info("prepared dataset: %s", out)
    return 0


def _train(args: argparse.Namespace) -> int:
    from squall_sd.train import run_phase

    resume: Any = "auto"
    if args.resume:
        resume = True if args.resume == "last" else args.resume
    if args.no_resume:
        resume = False
    result = run_phase(args.phase, args.config, resume=resume, overrides=_parse_sets(args.set))
    logger.info("finished; model: %s, checkpoint: %s", result.model_dir, result.last_checkpoint)
    return 0


def add_train_parsers(sub: argparse._SubParsersAction) -> None:
    """Register the ``prepare`` and ``train`` subcommands on ``sub``."""
    p = sub.add_parser("prepare", help="tile SpatialData stores into a sharded training dataset")
    p.add_argument(
        "inputs", nargs="+", help="SpatialData zarr stores (written by squall / spatialdata)"
    )
    p.add_argument("--out", required=True, help="output folder (manifest.json + shards/)")
    p.add_argument(
        "--model",
        default="squall-tiny",
        help="model name or save_pretrained folder (default: %(default)s)",
    )
    p.add_argument("--mpp", type=float, default=None, help="override the model's µm per pixel")
    p.add_argument(
        "--shard-size", type=int, default=256, help="tiles per shard (default: %(default)s)"
    )
    p.add_argument(
        "--tile-stride-um",
        type=float,
        default=None,
        help="step between tiles in µm (default: tile edge)",
    )
    p.add_argument(
        "--min-tissue",
        type=float,
        default=0.25,
        help="minimum tissue share of a tile (default: %(default)s)",
    )
    p.add_argument(
        "--genes", default=None, help="text file with the vocabulary (models without one)"
    )
    p.add_argument(
        "--label-key", default=None, help="obs column with spot classes (tile classification)"
    )
    p.add_argument(
        "--min-spot-cells",
        type=int,
        default=1,
        help="minimum expression cells of a tile covered by a region (default: %(default)s)",
    )
    p.add_argument("--image-key", default=None, help="H&E image element (default: he, as squall.io writes it)")
    p.add_argument(
        "--shapes-key", default=None, help="regions: spots, bins or cell boundaries (default: spots)"
    )
    p.add_argument("--table-key", default=None, help="table annotating the regions (default: table)")
    p.add_argument(
        "--fill",
        default="auto",
        choices=["auto", "nearest", "none"],
        help="in-tissue grid cells outside every region: 'nearest' region's vector, 'none' = 0, "
        "'auto' = nearest for capture spots, none for bins and cells (default: %(default)s)",
    )
    p.add_argument("--expr-format", default="factored", choices=["factored", "dense"])
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.set_defaults(func=_prepare)

    t = sub.add_parser("train", help="run a training phase from a YAML config (auto-resumes)")
    t.add_argument("phase", choices=["pretrain_image", "align", "finetune"], help="training phase")
    t.add_argument("config", help="YAML config (see configs/ and squall_sd.train)")
    t.add_argument(
        "--resume",
        nargs="?",
        const="last",
        default=None,
        help="resume from run_dir/checkpoints/last.ckpt (or the given checkpoint); default: auto",
    )
    t.add_argument("--no-resume", action="store_true", help="start over even if last.ckpt exists")
    t.add_argument(
        "--set", action="append", metavar="KEY=VALUE", help="override a config value (repeatable)"
    )
    t.set_defaults(func=_train)
