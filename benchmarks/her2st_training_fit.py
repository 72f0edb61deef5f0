"""How well does a trained her2st model fit the sections it saw (and its validation sections)?

The held-out numbers live in ``her2st_expression.py``; this script answers the other question a
learning curve raises: did training fit the training data at all? For a model exported by
``scripts/train_her2st_export.py`` (its run's ``config.yaml`` says which sections were training and
validation), it predicts every her2st section with an image from spot-centred tiles at the model's
geometry and reports, per section, the mean per-gene Pearson r over the 785 published genes and over
the 50 most expressed genes of the model's training sections, with the depth-controlled partial r.

``--degrade-mpp 3.2`` adds rows for the same sections with every tile degraded to 3.2 µm/px (box
down-sampling of the tile, then bilinear up-sampling back to its size): patient A's images are
≈3.2 µm/px copies, so the degraded C6 rows measure robustness to that resolution gap on a validation
section of patient C, without looking at patient A.

``--shift-um 150 50`` adds, per model and section, the top-50 r with every spot centre moved by
(dx, dy) on a grid of ±150 µm in 50 µm steps: a check that a section's fit is not held back by where
its spots sit on the image (a well-registered section scores best at or near (0, 0)).

    python benchmarks/her2st_training_fit.py src/squall_sd/models/weights/squall-tiny-her2st \
        runs/her2st-ms/C/bundle runs/her2st-ms/A/bundle --out benchmarks/results/her2st_training_fit.md
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from functools import reduce
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import _her2st_data as data  # noqa: E402
import _squall_adapter as SA  # noqa: E402
from _models import degrade  # noqa: E402

from squall_sd.tl._evaluate import partial_pearson_per_gene, pearson_per_gene  # noqa: E402

SECTIONS = ["A1", "A2", "C2", "C3", "C4", "C5", "C6"]


def shifted_tiles(sec: data.Section, dx_um: float, dy_um: float, mpp: float, size: int) -> np.ndarray:
    """Spot tiles of ``sec`` with every spot centre moved by (dx, dy) µm, cut as the unshifted tiles are."""
    moved = dataclasses.replace(sec, centres_px=sec.centres_px + np.array([dx_um, dy_um]) / sec.image_mpp, patches=None)
    tiles = data._extract_tiles_package(moved, mpp, size, black_to_white=True)
    return tiles if tiles is not None else data.extract_tiles(moved, mpp, size, black_to_white=True)


def section_scores(
    sec: data.Section, pred: np.ndarray, known: list[str], hvg: list[str], top50: list[str]
) -> list[float]:
    """Mean r and partial r (log total UMI) over the ``hvg`` genes, then over the ``top50``, of a
    section's spot predictions (columns ``known``) with its measured log1p(CP10k)."""
    col = {g: i for i, g in enumerate(known)}
    depth = np.log1p(sec.total_umi)
    row = []
    for genes in (hvg, top50):
        sel = [g for g in genes if g in col]
        y, p_ = data.normalised(sec, sel), pred[:, [col[g] for g in sel]]
        row += [np.nanmean(pearson_per_gene(y, p_)), np.nanmean(partial_pearson_per_gene(y, p_, depth))]
    return row


def roles(model_dir: Path) -> dict[str, str]:
    """Section -> "train" / "validation" / "held out", from the run's config.yaml beside the model."""
    sections = data.run_sections(model_dir)
    if sections is None:
        raise SystemExit(f"{model_dir} has no config.yaml of its training run: its training sections are unknown.")
    return {
        s: "train" if s in sections["train"] else "validation" if s in sections["val"] else "held out"
        for s in SECTIONS
    }


def shift_grids(model, secs: dict, sections: list[str], top50: list[str], shift_um: list[float]) -> list[str]:
    """Markdown tables: top-50 r of each section with its spot centres moved by (dx, dy) µm."""
    c = model.config
    top, step = shift_um
    steps = np.arange(-top, top + step / 2, step)
    lines = []
    for s in sections:
        grid = np.empty((len(steps), len(steps)))
        for i, dy in enumerate(steps):
            for j, dx in enumerate(steps):
                tiles = shifted_tiles(secs[s], dx, dy, c.mpp, c.img_size)
                tiles = SA.model_view(model, {s: dataclasses.replace(secs[s], patches=tiles)}, c.mpp)[s]
                pred, known, _ = SA.predict_spots(model, tiles, c.mpp, top50)
                col = {g: k for k, g in enumerate(known)}
                sel = [g for g in top50 if g in col]
                grid[i, j] = np.nanmean(pearson_per_gene(data.normalised(secs[s], sel), pred[:, [col[g] for g in sel]]))
        i, j = np.unravel_index(np.argmax(grid), grid.shape)
        zero = int(np.argmin(np.abs(steps)))
        lines += [f"{s}: top-50 r with the spot centres moved by (dx, dy) µm; best {grid[i, j]:.3f} at "
                  f"({steps[j]:g}, {steps[i]:g}), {grid[zero, zero]:.3f} at (0, 0)", "",
                  "| dy \\ dx | " + " | ".join(f"{v:g}" for v in steps) + " |",
                  "|---:|" + "---:|" * len(steps)]
        lines += [f"| {dy:g} | " + " | ".join(f"{v:.3f}" for v in grid[i_]) + " |" for i_, dy in enumerate(steps)]
        lines.append("")
    return lines


def main(argv=None) -> None:  # noqa: D103
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("models", nargs="+", type=Path)
    p.add_argument("--root", type=Path, default=data.DEFAULT_ROOT)
    p.add_argument("--out", type=Path, default=HERE / "results" / "her2st_training_fit.md")
    p.add_argument("--degrade-mpp", type=float, default=None,
                   help="also score the sections with their tiles degraded to this µm/px (e.g. 3.2)")
    p.add_argument("--sections", nargs="+", default=SECTIONS, choices=SECTIONS, help="sections to score")
    p.add_argument("--tta", action="store_true", help="also rows with test-time augmentation (model.predict(tta=True))")
    p.add_argument("--shift-um", nargs=2, type=float, metavar=("MAX", "STEP"), default=None,
                   help="also the top-50 r with every spot centre moved over a ±MAX µm grid in STEP µm steps")
    args = p.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    secs = data.load_sections(SECTIONS, args.root, use_package=True)
    common = reduce(lambda a, b: a.intersection(b), [s.counts.columns for s in secs.values()])
    hvg = [str(g) for g in np.load(args.root / "hvg785.npy", allow_pickle=True) if str(g) in common]
    lines = [
        "# Training fit of the her2st models",
        "",
        "Command: `python benchmarks/her2st_training_fit.py " + " ".join(sys.argv[1:]) + "`",
        "",
        "Per section: mean per-gene Pearson r over the spots (and partial r controlling for log total UMI) "
        "of the model's prediction (spot-disc mean on a spot-centred tile at the model's geometry) with "
        "the measured log1p(CP10k); top 50 = the 50 most expressed genes of the model's training sections.",
        "",
    ]
    for model_dir in args.models:
        model = SA.load_model(str(model_dir))
        c = model.config
        data.attach_tiles(secs, c.mpp, c.img_size, black_to_white=True, log=lambda *a: None)
        role = roles(model_dir)
        train = [s for s in SECTIONS if role[s] == "train"]
        top50 = data.top_expressed(secs, train, common)
        lines += [f"## `{model_dir}` (trained on {', '.join(train)})", "",
                  "| section | role | spots | r (785) | partial r (785) | r (top 50) | partial r (top 50) |",
                  "|---|---|---:|---:|---:|---:|---:|"]
        own = SA.model_view(model, {s: secs[s] for s in args.sections}, c.mpp)  # degraded to its effective_mpp
        runs = [(s, own[s], s, False) for s in args.sections]
        if args.degrade_mpp:
            runs += [(s, degrade(secs[s].patches, c.mpp, args.degrade_mpp), f"{s} @ {args.degrade_mpp:g} µm/px", False)
                     for s in args.sections if s.startswith("C")]  # A is ≈3.2 µm/px already
        if args.tta:
            runs += [(s, p, f"{label}, TTA", True) for s, p, label, _ in list(runs)]
        fit = []  # the training sections as the model sees them (no TTA, no extra degradation)
        for s, patches, label, tta in runs:
            # one forward pass per section for both gene sets
            pred, known, _ = SA.predict_spots(model, patches, c.mpp, list(dict.fromkeys(hvg + top50)), tta=tta)
            scores = section_scores(secs[s], pred, known, hvg, top50)
            cells = " | ".join(f"{v:.3f}" for v in scores)
            lines.append(f"| {label} | {role[s]} | {len(secs[s].counts)} | {cells} |")
            if role[s] == "train" and label == s:
                fit.append((len(secs[s].counts), scores))
        if fit:
            cells = " | ".join(f"{v:.3f}" for v in np.mean([sc for _, sc in fit], axis=0))
            lines.append(f"| mean over training sections ({len(fit)}) | train | {sum(n for n, _ in fit)} | {cells} |")
        lines.append("")
        if args.shift_um:
            lines += shift_grids(model, secs, args.sections, top50, args.shift_um)
    data.emit_report("\n".join(lines), args.out)


if __name__ == "__main__":
    main()
