"""Our recipe and the from-scratch CNNs on the VALIDATION sections of the training patients.

``her2st_expression.py`` compares methods on the held-out patient, which must not steer the recipe.
This script asks the same question where the recipe is allowed to look: each method is trained on
the recipe's training sections and scored on its validation section (C model: C2–C5 → C6; A model:
A1 → A2, as ``scripts/train_her2st_spots.sh C|A``), with the same spot-centred tiles (112 px at
2 µm/px), the same targets (the 785 published genes + the 50 most expressed of the training
sections, log1p CP10k) and the same metrics as ``her2st_training_fit.py``. The CNNs train for a fixed
number of epochs (39, the C model's run) in ``_models.train_densenet``'s loop; ``squall-tiny`` there
is our recipe's ViT alone in that loop (mean-pooled tokens → Linear), which separates the backbone
from the rest of the recipe.

    python benchmarks/her2st_validation.py --model C=runs/her2st-seed2/C/bundle \
        --model A=runs/her2st-seed2/A/bundle --cnn-arch resnet18,squall-tiny --cnn-bf16 --seed 0

The CNNs can be trained on a GPU instead: ``--cnn-export PACK.npz`` writes the tiles, targets and
splits for ``benchmarks/_cnn_job.py`` (no squall_sd needed there), ``--cnn-preds PREDS.npz`` reads
its predictions back (repeatable).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from functools import reduce
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import _cnn_job  # noqa: E402
import _her2st_data as data  # noqa: E402
import _models as M  # noqa: E402
import _squall_adapter as SA  # noqa: E402
from her2st_training_fit import SECTIONS, section_scores  # noqa: E402

#: split -> (training sections, validation sections, pack tag): the recipe's C and A models
VAL_SPLITS = {"C": (["C2", "C3", "C4", "C5"], ["C6"], "Cval"), "A": (["A1"], ["A2"], "Aval")}
MPP, TILE = 2.0, 112


def parse_args(argv=None):  # noqa: D103
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", type=Path, default=data.DEFAULT_ROOT)
    p.add_argument("--splits", default="C,A", help="comma list of C, A")
    p.add_argument(
        "--model", action="append", default=[], metavar="SPLIT=DIR", help="our model of that split (repeatable)"
    )
    p.add_argument("--cnn-arch", default="", help=f"comma list of {sorted(M.CNN_ARCHS)} trained here")
    p.add_argument("--cnn-epochs", type=int, default=39)
    p.add_argument("--cnn-px", type=int, default=112)
    p.add_argument("--cnn-bf16", action="store_true")
    p.add_argument("--cnn-export", type=Path, default=None)
    p.add_argument("--cnn-preds", type=Path, action="append", default=[])
    p.add_argument("--tta", action="store_true", help="also the 8-view test-time augmentation rows")
    p.add_argument(
        "--train-degrade-mpp",
        type=float,
        default=None,
        help="train the CNNs here on tiles degraded to this µm/px (box down, bilinear up: as patient A's ≈3.2 "
        "µm/px images are) and score the validation sections both as they are and degraded the same way",
    )
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=HERE / "results" / "her2st_validation.md")
    args = p.parse_args(argv)
    args.splits = [s.strip() for s in args.splits.split(",") if s.strip()]
    args.cnn_arch = [a.strip() for a in args.cnn_arch.split(",") if a.strip()]
    bad = [s for s in args.splits if s not in VAL_SPLITS] + [a for a in args.cnn_arch if a not in M.CNN_ARCHS]
    models = []
    for item in args.model:
        sp, _, spec = item.partition("=")
        if sp not in VAL_SPLITS or not spec:
            p.error(f"--model expects SPLIT=DIR with SPLIT in {sorted(VAL_SPLITS)}; got {item!r}")
        models.append((sp, Path(spec)))
    args.model = models
    if bad:
        p.error(f"unknown split or --cnn-arch: {bad}")
    return args


def run(args) -> tuple[list[str], dict]:
    """Score every method on each split's validation sections; markdown lines and the numbers."""
    import torch

    torch.set_num_threads(args.threads)
    secs = data.load_sections(SECTIONS, args.root, use_package=True)
    data.attach_tiles(secs, MPP, TILE, black_to_white=True, log=lambda *a: None)
    common = reduce(lambda a, b: a.intersection(b), [s.counts.columns for s in secs.values()])
    hvg = [str(g) for g in np.load(args.root / "hvg785.npy", allow_pickle=True) if str(g) in common]
    preds_in = [_cnn_job.read_preds(path) for path in args.cnn_preds]
    pack = {"sections": SECTIONS, "n_per_section": [len(secs[s].counts) for s in SECTIONS], "splits": {}}
    pack_arrays = {}
    lines, numbers = [], {}
    for split in args.splits:
        train, val, tag = VAL_SPLITS[split]
        top50 = data.top_expressed(secs, train, common)
        targets = list(dict.fromkeys(hvg + top50))
        ytr = np.concatenate([data.normalised(secs[s], targets) for s in train])
        pack["splits"][split] = {"tag": tag, "train": train, "test": val, "targets": targets}
        pack_arrays[f"ytr_{tag}"] = ytr.astype(np.float32)
        rows: dict[str, dict[str, list[float]]] = {}
        notes: dict[str, str] = {}
        for sp, model_dir in args.model:
            if sp != split:
                continue
            sections = data.run_sections(model_dir)
            if sections is not None and (sections["train"] != train or sections["val"] != val):
                raise SystemExit(f"{model_dir} was trained on {sections}, not on {train} / validated on {val}")
            model = SA.load_model(str(model_dir))
            own = SA.model_view(model, {s: secs[s] for s in val}, MPP)  # degraded to its effective_mpp
            for tta in (False, True) if args.tta else (False,):
                key = f"squall head [{model_dir}]" + (" + TTA" if tta else "")
                rows[key] = {}
                for s in val:
                    pred, known, _ = SA.predict_spots(model, own[s], MPP, targets, tta=tta)
                    rows[key][s] = section_scores(secs[s], pred, known, hvg, top50)
        tiles_tr = np.concatenate([secs[s].patches for s in train])
        scored = {s: (secs[s], secs[s].patches) for s in val}  # row label -> (validation section, its tiles)
        if args.train_degrade_mpp:
            to = args.train_degrade_mpp
            tiles_tr = M.degrade(tiles_tr, MPP, to)
            scored.update({f"{s} @ {to:g} µm/px": (secs[s], M.degrade(secs[s].patches, MPP, to)) for s in val})
        for arch in args.cnn_arch:
            t = time.time()
            predict, rec = M.train_densenet(
                tiles_tr, ytr, arch=arch, bf16=args.cnn_bf16, size=args.cnn_px, epochs=args.cnn_epochs,
                seed=args.seed, device=args.device, log=print,
            )  # fmt: skip
            key = f"{arch} (scratch, seed {args.seed})" + (
                f", trained at {args.train_degrade_mpp:g} µm/px" if args.train_degrade_mpp else ""
            )
            rows[key] = {s: section_scores(sec, predict(t), targets, hvg, top50) for s, (sec, t) in scored.items()}
            if args.tta:
                rows[key + " + TTA"] = {
                    s: section_scores(sec, M.dihedral_mean(predict, t), targets, hvg, top50)
                    for s, (sec, t) in scored.items()
                }
            notes[key] = (
                f"{rec['params_M']:.2f}M params, {rec['epochs_run']} epochs, batch {rec['batch_size']}, AdamW lr "
                f"{rec['lr']:g} cosine, {rec['device']}{', bf16 autocast' if rec['bf16'] else ''} "
                f"[{time.time() - t:.0f}s]"
            )
        for records, arrs in preds_in:
            rec = records.get(split)
            if rec is None:
                continue
            where = rec.get("gpu") or rec["device"]
            key = f"{rec['arch']} (scratch, seed {rec['seed']}, {rec['input_px']} px, {where})"
            for suffix, k in [("", key), ("__tta", key + " + TTA")]:
                if all(f"{tag}__{s}{suffix}" in arrs for s in val):
                    rows[k] = {
                        s: section_scores(secs[s], arrs[f"{tag}__{s}{suffix}"].astype(np.float64), targets, hvg, top50)
                        for s in val
                    }
            notes[key] = (
                f"{rec['params_M']:.2f}M params, {rec['epochs_run']}/{rec['epochs_planned']} epochs, batch "
                f"{rec['batch_size']}, trained by _cnn_job.py from the --cnn-export pack (JPEG q95) "
                f"[{rec['seconds']:.0f}s]"
            )
        lines += [
            f"## {split} model: train {', '.join(train)}; validation {', '.join(val)}",
            "",
            "| method | section | r (785) | partial r (785) | r (top 50) | partial r (top 50) |",
            "|---|---|---:|---:|---:|---:|",
        ]
        for key, per in rows.items():
            lines += [f"| {key} | {s} | " + " | ".join(f"{v:.3f}" for v in vals) + " |" for s, vals in per.items()]
        lines += [""] + [f"- {k}: {v}" for k, v in notes.items()] + [""]
        numbers[split] = rows
    if args.cnn_export is not None:
        _cnn_job.write_pack(args.cnn_export, np.concatenate([secs[s].patches for s in SECTIONS]), pack, pack_arrays)
        print(f"pack written to {args.cnn_export} ({args.cnn_export.stat().st_size / 1e6:.1f} MB)")
    return lines, numbers


def main(argv=None) -> None:  # noqa: D103
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    lines, numbers = run(args)
    head = [
        "# her2st: methods on the validation sections of the training patients",
        "",
        "Command: `python benchmarks/her2st_validation.py " + " ".join(argv) + "`",
        "",
        "Per validation section: mean per-gene Pearson r (and partial r controlling for log total UMI) over the "
        "785 published genes and over the 50 most expressed genes of the training sections; spot-centred "
        f"{TILE}-px tiles at {MPP:g} µm/px. No held-out patient is read.",
        "",
    ]
    data.emit_report("\n".join(head + lines), args.out)
    args.out.with_suffix(".json").write_text(json.dumps(numbers, indent=1))


if __name__ == "__main__":
    main()
