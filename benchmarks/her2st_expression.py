"""her2st virtual-expression benchmark (docs/benchmarks/her2st_expression.md; design: evaluation.md §1).

Train on one patient, test on the other (C2–C6 ↔ A1, A2; only these sections have images), per-gene
Pearson r over the 785 published genes and the 50 most expressed (in training), next to the
depth-controlled partial r and side-by-side baselines on the same tiles, genes and split.

    python benchmarks/her2st_expression.py                 # full run (~15 min on 2 CPU cores)
    python benchmarks/her2st_expression.py --quick         # smoke run (~2 min)
    python benchmarks/her2st_expression.py --model squall-tiny-her2st --model random:squall-tiny

Methods (rows):
  depth oracle      log total UMI of the TEST spot × each gene's sign from training (uses measured
                    depth: a reference for what depth alone scores, not an image method)
  ridge-hand        ridge on hand-made tile features (RGB/HED stats, gradients, LBP)
  depth-proxy       image → predicted log total UMI (ridge, hand features) → genes (per-gene fit)
  ridge-emb[M]      frozen encoder M: standardise → PCA 256 → ridge (HEST-Benchmark style)
  densenet121       ST-Net-style DenseNet-121 regressor trained from scratch
  squall[M]         model M's own expression head (fine-tuned model), spot-disc aggregation
Every ridge alpha is picked by leave-one-section-out CV inside the training patient.

``--match-resolution`` scores every method on test tiles degraded to the training patient's image
resolution where the test images are sharper (A→C: patient A's images are ≈3.2 µm/px copies, C's
0.69 µm/px); ``her2st_validation.py --train-degrade-mpp 3.2`` measures on patient C alone why.
Without it, each of our models still sees the tiles as ``tl.predict_expression`` would cut them for it:
degraded to its ``config.effective_mpp`` where a section's image is sharper (``_squall_adapter.model_view``;
the shipped recipe's 3.202), for its embeddings and its head; the baselines see the tiles as read.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
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

from squall_sd.pp._resolution import degrade_target  # noqa: E402
from squall_sd.tl._evaluate import bh_adjust, partial_pearson_per_gene, pearson_per_gene  # noqa: E402

TTA_NOTE = "the same network, mean over the 8 rotations / mirror images of each tile"
PATIENT_SECTIONS = {"A": ["A1", "A2"], "C": ["C2", "C3", "C4", "C5", "C6"]}
SPLITS = {"C→A": ("C", "A"), "A→C": ("A", "C")}
ALPHAS = np.logspace(-1, 6, 22)


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--root", type=Path, default=data.DEFAULT_ROOT, help="her2st folder (../shared/data/her2st)"
    )
    p.add_argument(
        "--mpp", type=float, default=1.0, help="µm per pixel of the 224-px tiles (default 1.0)"
    )
    p.add_argument("--tile", type=int, default=224, help="tile edge in pixels (default 224)")
    p.add_argument("--splits", default="C→A,A→C", help="comma list of C→A, A→C (ASCII: C2A, A2C)")
    p.add_argument(
        "--model",
        action="append",
        default=[],
        help="model for the embedding and fine-tuned rows: registered name, checkpoint dir, or "
        "random:<config> (random init, sanity baseline), or none. Repeatable. Default: random:squall-tiny",
    )
    p.add_argument(
        "--split-model",
        action="append",
        default=[],
        metavar="SPLIT=MODEL",
        help="a model used in ONE split only (ASCII split names), e.g. C2A=runs/her2st-cpu2/C/bundle: "
        "the cross-patient model of a recipe, trained on that split's training patient. Its rows are "
        "named after --split-label, so the two splits' models share one row name. Repeatable, also "
        "per split: the n-th model given for a split takes the n-th --split-label.",
    )
    p.add_argument(
        "--split-label",
        action="append",
        default=[],
        help="row label of the --split-model models; repeat it to name the second, third ... model of "
        "each split (default: 'squall-tiny-her2st recipe, training patient only')",
    )
    p.add_argument(
        "--cnn-pack-mpp",
        type=float,
        default=None,
        help="µm/px of the 224-px tiles of the pack the --cnn-preds were trained on (default --mpp)",
    )
    p.add_argument(
        "--cnn-epochs", type=int, default=12, help="DenseNet-121 epochs (0 skips the row)"
    )
    p.add_argument(
        "--cnn-px", type=int, default=112, help="CNN input size: the tiles resized"
    )
    p.add_argument(
        "--cnn-arch", default="densenet121",
        help="comma list of from-scratch CNN baselines trained in this run: densenet121, resnet18",
    )
    p.add_argument("--cnn-bf16", action="store_true", help="bf16 autocast for the CNNs (CPU: ~1.7x faster)")
    p.add_argument(
        "--cnn-minutes", type=float, default=8.0, help="wall-time cap per DenseNet training"
    )
    p.add_argument("--device", default="cpu", help="torch device for DenseNet / models")
    p.add_argument(
        "--cnn-export",
        type=Path,
        default=None,
        help="write tiles + training targets + splits to this .npz for benchmarks/_cnn_job.py (GPU)",
    )
    p.add_argument(
        "--cnn-preds",
        type=Path,
        action="append",
        default=[],
        help="CNN predictions written by benchmarks/_cnn_job.py from a --cnn-export pack (repeatable)",
    )
    p.add_argument(
        "--tta", action="store_true",
        help="also rows with test-time augmentation (mean over the 8 rotations / mirror images of each tile) "
        "for our model's head and for every CNN",
    )
    p.add_argument(
        "--match-resolution",
        action="store_true",
        help="score every method on test tiles degraded to the training patient's image µm/px where the test "
        "images are sharper (A→C: C's tiles as if read from A's ≈3.2 µm/px images; box down, bilinear up); the "
        "rule and its check on patient C alone: benchmarks/her2st_validation.py --train-degrade-mpp",
    )
    p.add_argument(
        "--train-degrade-mpp",
        type=float,
        default=None,
        metavar="MPP",
        help="every baseline learns from training tiles degraded to MPP µm/px where the training image is sharper "
        "(as a model trained with data.effective_mpp=MPP does; ridge features and CNNs alike; our models keep "
        "their own view)",
    )
    p.add_argument("--threads", type=int, default=2)
    p.add_argument(
        "--quick", action="store_true", help="subset of spots, 1 CNN epoch at 64 px: smoke test"
    )
    p.add_argument(
        "--no-package", action="store_true", help="read her2st directly instead of squall_sd.io/pp"
    )
    p.add_argument(
        "--no-black-to-white", action="store_true", help="keep A's blacked-out background black"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=HERE / "results" / "her2st_expression.md")
    args = p.parse_args(argv)
    args.splits = [
        s.strip().replace("2", "→") if "→" not in s else s.strip() for s in args.splits.split(",")
    ]
    if not args.model:
        args.model = ["random:squall-tiny"]
    args.model = [m for m in args.model if m != "none"]
    labels = args.split_label or ["squall-tiny-her2st recipe, training patient only"]
    split_model = []  # (split, model, row label): the n-th model of a split takes the n-th label
    for item in args.split_model:
        sp, _, spec = item.partition("=")
        sp = sp.strip().replace("2", "→") if "→" not in sp else sp.strip()
        if sp not in SPLITS or not spec:
            p.error(f"--split-model expects SPLIT=MODEL with SPLIT in C2A, A2C; got {item!r}")
        n = sum(s == sp for s, _, _ in split_model)
        if n >= len(labels):
            p.error(f"--split-model: {n + 1} models for {sp} but {len(labels)} --split-label; name each one")
        split_model.append((sp, spec, labels[n]))
    args.split_model = split_model
    args.cnn_arch = [a.strip() for a in args.cnn_arch.split(",") if a.strip()]
    bad = [a for a in args.cnn_arch if a not in M.CNN_ARCHS]
    if bad:
        p.error(f"--cnn-arch: unknown {bad}; choose from {sorted(M.CNN_ARCHS)}")
    if args.cnn_pack_mpp is None:
        args.cnn_pack_mpp = args.mpp
    if args.quick:
        args.cnn_epochs = min(args.cnn_epochs, 1)
        args.cnn_px = 64
    return args


# --------------------------------------------------------------------------------- metrics
def softened(patches: np.ndarray, mpp: float, to: float) -> tuple[np.ndarray, np.ndarray]:
    """Tiles at ``mpp`` as if read from a ``to`` µm/px image, and their hand-made features."""
    tiles = M.degrade(patches, mpp, to)
    return tiles, M.hand_features(tiles, log=lambda *a: None)


def metrics(y: np.ndarray, pred: np.ndarray, depth: np.ndarray) -> dict:
    r, p = pearson_per_gene(y, pred, return_pvalue=True)
    q = bh_adjust(p)
    pr = partial_pearson_per_gene(y, pred, depth)
    fin = np.isfinite(r)
    return {
        "n": int(y.shape[0]),
        "genes": int(fin.sum()),
        "mean_r": float(np.nanmean(r)) if fin.any() else float("nan"),
        "median_r": float(np.nanmedian(r)) if fin.any() else float("nan"),
        "n_sig": int(np.sum((r > 0) & (q < 0.05))),
        "mean_partial_r": float(np.nanmean(pr)) if np.isfinite(pr).any() else float("nan"),
        "r": r,
    }


# ------------------------------------------------------------------------------------ main
def run(args) -> dict:
    t_start = time.time()
    import torch

    torch.set_num_threads(args.threads)
    log = print
    names = PATIENT_SECTIONS["A"] + PATIENT_SECTIONS["C"]
    log(f"loading sections {names} from {args.root}")
    secs = data.load_sections(names, args.root, use_package=not args.no_package)
    data.attach_tiles(secs, args.mpp, args.tile, black_to_white=not args.no_black_to_white)
    t_tiles = time.time() - t_start
    reader = {s.meta.get("reader") for s in secs.values()}
    tiler = {s.meta.get("tiles") for s in secs.values()}

    if args.quick:  # fixed random subset of spots per section
        rng = np.random.default_rng(args.seed)
        for s in secs.values():
            keep = np.sort(rng.choice(len(s.counts), size=min(60, len(s.counts)), replace=False))
            s.counts = s.counts.iloc[keep]
            s.centres_px = s.centres_px[keep]
            s.patches = s.patches[keep]

    common = reduce(lambda a, b: a.intersection(b), [s.counts.columns for s in secs.values()])
    hvg_all = [str(g) for g in np.load(args.root / "hvg785.npy", allow_pickle=True)]
    hvg = [g for g in hvg_all if g in common]
    log(
        f"genes: {len(hvg)} of {len(hvg_all)} hvg785 genes are measured in all 7 sections ({len(common)} common genes)"
    )

    feats_t = time.time()
    hand = {n: M.hand_features(s.patches, log=lambda *a: None) for n, s in secs.items()}
    log(f"hand features: {time.time() - feats_t:.1f}s")

    # squall models: load once; embed all tiles once per model
    model_rows = {}
    todo = [(spec, spec, None, spec) for spec in args.model]
    todo += [(f"{label} ({sp})", spec, sp, label) for sp, spec, label in args.split_model]
    for key, spec, only, label in todo:
        try:
            model = SA.load_model(spec, seed=args.seed)
            t = time.time()
            own = SA.model_view(model, secs, args.mpp)
            emb = {n: SA.embed_tiles(model, own[n], args.mpp) for n in secs}
            model_rows[key] = {
                "model": model,
                "tiles": own,
                "emb": emb,
                "embed_s": time.time() - t,
                "note": "",
                "split": only,
                "label": label,
                "spec": spec,
            }
            log(
                f"model {spec}: embedded {sum(len(e) for e in emb.values())} tiles in {time.time() - t:.1f}s "
                f"(dim {next(iter(emb.values())).shape[1]}, config mpp {model.config.mpp})"
            )
        except SA.ModelUnavailable as e:
            model_rows[key] = {"model": None, "note": str(e), "split": only, "label": key, "spec": spec}
            log(f"model {spec}: skipped — {e}")

    results = {"splits": {}, "genes": {"hvg785_in_data": len(hvg), "common": len(common)}}
    pack: dict = {
        "sections": names,
        "n_per_section": [len(secs[n].counts) for n in names],
        "splits": {},
    }
    pack_arrays: dict[str, np.ndarray] = {}
    cnn_preds = [(path, *_cnn_job.read_preds(path)) for path in args.cnn_preds]
    for split in args.splits:
        train_p, test_p = SPLITS[split]
        tr_names, te_names = PATIENT_SECTIONS[train_p], PATIENT_SECTIONS[test_p]
        log(f"\n=== split {split}: train {tr_names} → test {te_names}")
        top50 = data.top_expressed(secs, tr_names, common)  # training-set top-50 by mean CP10k+log1p
        targets = list(dict.fromkeys(hvg + top50))
        gidx = {
            "hvg": np.array([targets.index(g) for g in hvg]),
            "top50": np.array([targets.index(g) for g in top50]),
        }
        ytr = np.concatenate([data.normalised(secs[n], targets) for n in tr_names])
        groups = np.concatenate([[n] * len(secs[n].counts) for n in tr_names])
        dtr = np.concatenate([np.log1p(secs[n].total_umi) for n in tr_names])
        te = {
            n: {"y": data.normalised(secs[n], targets), "depth": np.log1p(secs[n].total_umi)}
            for n in te_names
        }
        # each section's tiles and hand-made features as the baselines see them in this split
        tiles = {n: secs[n].patches for n in names}
        feat = dict(hand)
        degraded = {}  # test section -> the µm/px its tiles were degraded to (--match-resolution)
        if args.match_resolution:
            train_mpp = max(secs[n].image_mpp for n in tr_names)
            for n in te_names:
                if secs[n].image_mpp < train_mpp and train_mpp > args.mpp:
                    degraded[n] = round(float(train_mpp), 3)
                    tiles[n], feat[n] = softened(secs[n].patches, args.mpp, degraded[n])
            if degraded:
                log(f"--match-resolution: test tiles of {sorted(degraded)} degraded to {train_mpp:.2f} µm/px")
        train_degraded = {}  # training section -> the µm/px its tiles were degraded to (--train-degrade-mpp)
        if args.train_degrade_mpp:
            for n in tr_names:
                to = degrade_target(secs[n].image_mpp, args.mpp, args.train_degrade_mpp)
                if to is not None:
                    train_degraded[n] = round(float(to), 3)
                    tiles[n], feat[n] = softened(secs[n].patches, args.mpp, to)
            if train_degraded:
                log(f"--train-degrade-mpp: training tiles of {sorted(train_degraded)} degraded to "
                    f"{args.train_degrade_mpp:g} µm/px")
        Xtr_hand = np.concatenate([feat[n] for n in tr_names])
        tiles_tr = np.concatenate([tiles[n] for n in tr_names])
        preds: dict[str, dict[str, np.ndarray]] = {}
        notes: dict[str, str] = {}
        timing: dict[str, float] = {}
        tag = f"{train_p}2{test_p}"
        pack["splits"][split] = {
            "tag": tag,
            "train": tr_names,
            "test": te_names,
            "targets": targets,
            "mpp": args.mpp,
            "test_degrade": degraded,
            "train_degrade": train_degraded,
        }
        pack_arrays[f"ytr_{tag}"] = ytr.astype(np.float32)

        # (0) depth oracle
        sign = np.sign(pearson_per_gene(ytr, np.tile(dtr[:, None], (1, len(targets)))))
        sign = np.where(np.isfinite(sign) & (sign != 0), sign, 1.0)
        preds["depth oracle (measured log UMI × sign)"] = {
            n: te[n]["depth"][:, None] * sign[None] for n in te_names
        }
        notes["depth oracle (measured log UMI × sign)"] = (
            "uses the test spots' MEASURED depth: reference, not an image method"
        )

        # (a) ridge on hand features
        t = time.time()
        pipe, alpha, cv = M.ridge_cv(Xtr_hand, ytr, groups, ALPHAS, None, gidx["hvg"])
        preds["ridge-hand"] = {n: pipe.predict(feat[n], alpha) for n in te_names}
        timing["ridge-hand"] = time.time() - t
        notes["ridge-hand"] = (
            f"{Xtr_hand.shape[1]} features, alpha {alpha:.3g} (CV r in {train_p} {cv['cv_best_r']:.3f})"
        )

        # (a') the same, hand features z-scored within each section (train and test alike): a crude
        # stain/scanner normalisation that uses the test IMAGES only, never test expression
        t = time.time()
        hz = {
            n: (feat[n] - feat[n].mean(0)) / np.where(feat[n].std(0) > 1e-12, feat[n].std(0), 1.0)
            for n in names
        }
        zpipe, zalpha, zcv = M.ridge_cv(
            np.concatenate([hz[n] for n in tr_names]), ytr, groups, ALPHAS, None, gidx["hvg"]
        )
        preds["ridge-hand, per-section z-scored features"] = {
            n: zpipe.predict(hz[n], zalpha) for n in te_names
        }
        timing["ridge-hand, per-section z-scored features"] = time.time() - t
        notes["ridge-hand, per-section z-scored features"] = (
            f"alpha {zalpha:.3g} (CV r in {train_p} {zcv['cv_best_r']:.3f}); standardises each section's image "
            "features with that section's own mean/sd (unlabelled test images only)"
        )

        # (b) depth proxy: hand features → log UMI → genes
        t = time.time()
        dpipe, dalpha, dcv = M.ridge_cv(Xtr_hand, dtr[:, None], groups, ALPHAS, None, None)
        slope, icpt = np.polyfit(dtr, ytr, 1)  # per-gene linear fit on measured training depth
        preds["depth-proxy (image → log UMI → genes)"] = {
            n: icpt[None] + slope[None] * dpipe.predict(feat[n], dalpha) for n in te_names
        }
        dr = {
            n: float(pearson_per_gene(te[n]["depth"], dpipe.predict(feat[n], dalpha)[:, 0])[0])
            for n in te_names
        }
        timing["depth-proxy (image → log UMI → genes)"] = time.time() - t
        notes["depth-proxy (image → log UMI → genes)"] = (
            f"alpha {dalpha:.3g}; r(predicted, measured log UMI) "
            + ", ".join(f"{k} {v:.2f}" for k, v in dr.items())
        )

        # (c) frozen embeddings → PCA 256 → ridge; (e) the model's own head
        for row in model_rows.values():
            if row["split"] not in (None, split):
                continue
            label = row["label"]
            key = f"ridge-emb[{label}]"
            if row["model"] is None:
                notes[key] = "skipped: " + row["note"]
                continue
            t = time.time()
            # the tiles this model sees: its own view, or the split's --match-resolution tiles where degraded
            seen = {**row["tiles"], **{n: tiles[n] for n in degraded}}
            emb = {**row["emb"], **{n: SA.embed_tiles(row["model"], seen[n], args.mpp) for n in degraded}}
            Xtr = np.concatenate([emb[n] for n in tr_names])
            epipe, ealpha, ecv = M.ridge_cv(Xtr, ytr, groups, ALPHAS, 256, gidx["hvg"])
            preds[key] = {n: epipe.predict(emb[n], ealpha) for n in te_names}
            timing[key] = time.time() - t + row["embed_s"]
            notes[key] = (
                f"dim {Xtr.shape[1]} → PCA {min(256, Xtr.shape[1], len(Xtr) - 1)}, alpha {ealpha:.3g} "
                f"(CV r {ecv['cv_best_r']:.3f})"
                + (f"; model {row['spec']}" if row["split"] else "")
            )
            key2 = f"squall head[{label}]"
            if row["spec"].startswith("random:"):
                continue  # a random head predicts noise; only trained models get this row
            for tta in (False, True) if args.tta else (False,):
                key3 = key2 + (" + TTA" if tta else "")
                try:
                    t = time.time()
                    out = {}
                    for n in te_names:
                        p_, known, how = SA.predict_spots(
                            row["model"], seen[n], args.mpp, targets, tta=tta
                        )
                        full = np.full((len(p_), len(targets)), np.nan)
                        full[:, [targets.index(g) for g in known]] = p_
                        out[n] = full
                    preds[key3] = out
                    timing[key3] = time.time() - t
                    notes[key3] = (
                        f"{how}; {len(known)} of {len(targets)} target genes in the vocabulary"
                        + (f"; model {row['spec']}" if row["split"] else "")
                    )
                except SA.ModelUnavailable as e:
                    notes[key3] = "skipped: " + str(e)

        # (d) CNNs from scratch on this run's tiles (same spots, genes and split)
        for arch in args.cnn_arch if args.cnn_epochs > 0 else []:
            key = f"{arch} (scratch)"
            t = time.time()
            predict, rec = M.train_densenet(
                tiles_tr,
                ytr,
                arch=arch,
                bf16=args.cnn_bf16,
                size=args.cnn_px,
                epochs=args.cnn_epochs,
                max_minutes=args.cnn_minutes,
                seed=args.seed,
                device=args.device,
                log=log,
            )
            preds[key] = {n: predict(tiles[n]) for n in te_names}
            timing[key] = time.time() - t
            if args.tta:  # the same test-time augmentation as our model's TTA row
                preds[f"{key} + TTA"] = {n: M.dihedral_mean(predict, tiles[n]) for n in te_names}
                notes[f"{key} + TTA"] = TTA_NOTE
            notes[key] = (
                f"{rec['params_M']:.1f}M params, {rec['input_px']} px input ({args.tile} px tiles at "
                f"{args.mpp} µm/px resized → {args.mpp * args.tile / rec['input_px']:.2f} µm/px), "
                f"{rec['epochs_run']}/{rec['epochs_planned']} epochs"
                + (" (time cap)" if rec["stopped_by_time_cap"] else "")
                + f", batch {rec['batch_size']}, AdamW lr {rec['lr']:g} cosine, MSE on z-scored genes, "
                f"dihedral aug, {rec['device']}" + (", bf16 autocast" if rec["bf16"] else "")
            )

        for path, records, arrs in cnn_preds:
            rec = records.get(split)
            if rec is None:
                continue
            if rec.get("test_degrade", {}) != degraded:
                raise ValueError(
                    f"{path}: its {split} predictions were made on test tiles degraded as "
                    f"{rec.get('test_degrade', {})}, this run degrades {degraded}; export the pack with the same "
                    "--match-resolution and train again"
                )
            key = f"{rec.get('arch', 'densenet121')} (scratch, {rec['input_px']} px, {rec['device']})"
            has_tta = all(f"{tag}__{n}__tta" in arrs for n in te_names)
            for k, suffix in [(key, "")] + ([(f"{key} + TTA", "__tta")] if has_tta else []):
                preds[k] = {}
                for n in te_names:
                    a = arrs[f"{tag}__{n}{suffix}"].astype(np.float64)
                    if a.shape != te[n]["y"].shape:
                        raise ValueError(
                            f"{path}: predictions for {n} have shape {a.shape}, expected {te[n]['y'].shape} "
                            "(export the pack with the same options, e.g. without --quick)"
                        )
                    preds[k][n] = a
            if has_tta:
                notes[f"{key} + TTA"] = TTA_NOTE
            timing[key] = rec["seconds"]
            notes[key] = (
                f"{rec['params_M']:.1f}M params, {rec['input_px']} px input at "
                f"{args.cnn_pack_mpp * args.tile / rec['input_px']:.2f} µm/px "
                f"({args.tile * args.cnn_pack_mpp:.0f} µm tiles"
                + (
                    f": the {args.tile}-px tiles resized, no finer detail"
                    if rec["input_px"] > args.tile
                    else ""
                )
                + (
                    f" at {args.cnn_pack_mpp:g} µm/px, NOT this run's {args.mpp:g} µm/px tiles: indicative only"
                    if args.cnn_pack_mpp != args.mpp
                    else ""
                )
                + "; JPEG q95 for transport), "
                f"{rec['epochs_run']}/{rec['epochs_planned']} epochs"
                + (" (time cap)" if rec["stopped_by_time_cap"] else "")
                + f", batch {rec['batch_size']}, AdamW lr {rec['lr']:g} cosine, MSE on z-scored genes, "
                f"dihedral aug, seed {rec.get('seed', 0)}, trained by benchmarks/_cnn_job.py on "
                f"{rec.get('gpu') or rec['device']}" + (", bf16 autocast" if rec.get("bf16") else "")
            )

        # evaluation: per test section and pooled
        split_res = {
            "train": tr_names,
            "test": te_names,
            "top50": top50,
            "methods": {},
            "notes": notes,
            "timing_s": timing,
        }
        if degraded:
            split_res["test_degrade"] = degraded
        if train_degraded:
            split_res["train_degrade"] = train_degraded
        for meth, pm in preds.items():
            res = {}
            for label, secs_ in [*[(n, [n]) for n in te_names], (f"pooled {test_p}", te_names)]:
                y = np.concatenate([te[n]["y"] for n in secs_])
                pr = np.concatenate([pm[n] for n in secs_])
                d = np.concatenate([te[n]["depth"] for n in secs_])
                res[label] = {}
                for gs in ("hvg", "top50"):
                    cols = gidx[gs]
                    ok = np.all(np.isfinite(pr[:, cols]), axis=0)
                    m = metrics(y[:, cols[ok]], pr[:, cols[ok]], d)
                    m.pop("r")
                    res[label][gs] = m
            split_res["methods"][meth] = res
        results["splits"][split] = split_res
        log(table_for_split(split, split_res, len(hvg)))

    if args.cnn_export is not None:
        _cnn_job.write_pack(args.cnn_export, np.concatenate([secs[n].patches for n in names]), pack, pack_arrays)
        log(
            f"pack for benchmarks/_cnn_job.py written to {args.cnn_export} "
            f"({args.cnn_export.stat().st_size / 1e6:.1f} MB)"
        )
    results["wall_s"] = time.time() - t_start
    results["tiles_s"] = t_tiles
    results["reader"] = sorted(str(r) for r in reader)
    results["tiler"] = sorted(str(t) for t in tiler)
    return results


def _f(x, nd=3):
    return "—" if x is None or (isinstance(x, float) and not np.isfinite(x)) else f"{x:.{nd}f}"


def table_for_split(split: str, res: dict, n_hvg: int) -> str:
    lines = [
        f"\n**Split {split}: train {', '.join(res['train'])} → test {', '.join(res['test'])}**"
        + (
            f" (test tiles degraded to the training images' µm/px: {res['test_degrade']})"
            if res.get("test_degrade")
            else ""
        )
        + (
            f" (the baselines' training tiles degraded to: {res['train_degrade']})"
            if res.get("train_degrade")
            else ""
        )
        + "\n",
        f"| method | test | spots | mean r ({n_hvg}) | median r | r>0 sig. (BH q<0.05) | mean partial r | "
        "mean r (top 50) | median r (top 50) | sig. (top 50) | mean partial r (top 50) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for meth, per in res["methods"].items():
        for label, m in per.items():
            h, t = m["hvg"], m["top50"]
            lines.append(
                f"| {meth} | {label} | {h['n']} | {_f(h['mean_r'])} | {_f(h['median_r'])} | "
                f"{h['n_sig']}/{h['genes']} | "
                f"{_f(h['mean_partial_r'])} | {_f(t['mean_r'])} | {_f(t['median_r'])} | {t['n_sig']}/{t['genes']} | "
                f"{_f(t['mean_partial_r'])} |"
            )
    lines.append("")
    for meth, note in res["notes"].items():
        tm = res["timing_s"].get(meth)
        lines.append(f"- {meth}: {note}" + (f" [{tm:.0f}s]" if tm is not None else ""))
    return "\n".join(lines)


KEY_METRICS = (
    ("partial r (785)", "hvg", "mean_partial_r"),
    ("r (top 50)", "top50", "mean_r"),
    ("r (785)", "hvg", "mean_r"),
    ("partial r (top 50)", "top50", "mean_partial_r"),
)


def section_means(res: dict) -> dict[str, dict[str, float]]:
    """Method → metric → mean over the test sections (not the pooled row) of the split."""
    out = {}
    for meth, per in res["methods"].items():
        secs = [m for label, m in per.items() if label in res["test"]]
        out[meth] = {
            name: float(np.mean([m[group][key] for m in secs])) if secs and all(
                m[group][key] is not None for m in secs) else float("nan")
            for name, group, key in KEY_METRICS
        }
    return out


def ours_and_baselines(methods) -> tuple[list[str], list[str]]:
    """Our model's head rows and the image baselines among ``methods`` (the depth oracle reads the
    measured answer and is not a baseline)."""
    ours = [m for m in methods if m.startswith("squall head")]
    base = [m for m in methods if not m.startswith(("squall head", "depth oracle"))]
    return ours, base


def summary_for_split(split: str, res: dict) -> str:
    """The key metrics as the mean over test sections, and whether the model's own head beats every image
    baseline (the depth oracle reads the measured answer and is not a baseline)."""
    means = section_means(res)
    lines = [
        f"\n**{split}** (train {', '.join(res['train'])}; test {', '.join(res['test'])}; "
        "mean over the test sections"
        + (f"; test tiles degraded to the training images' µm/px: {d}" if (d := res.get("test_degrade")) else "")
        + (f"; the baselines' training tiles degraded to: {d}" if (d := res.get("train_degrade")) else "")
        + ")\n",
        "| method | " + " | ".join(n for n, _, _ in KEY_METRICS) + " |",
        "|---|" + "---:|" * len(KEY_METRICS),
    ]
    for meth, vals in means.items():
        lines.append(f"| {meth} | " + " | ".join(_f(vals[n]) for n, _, _ in KEY_METRICS) + " |")
    ours, base = ours_and_baselines(means)
    for o in ours:
        for name, _, _ in KEY_METRICS[:2]:
            best = max(base, key=lambda b: means[b][name]) if base else None
            if best is None:
                continue
            ok = means[o][name] > means[best][name]
            lines.append(
                f"- {o}: {name} {means[o][name]:.3f} vs best baseline {means[best][name]:.3f} ({best}): "
                f"{'**beats every baseline**' if ok else '**does NOT beat every baseline**'}"
            )
    return "\n".join(lines)


def write_report(args, results: dict, argv: list[str]) -> str:
    cmd = "python benchmarks/her2st_expression.py " + " ".join(shlex.quote(a) for a in argv)
    head = [
        "# her2st virtual expression — results",
        "",
        f"Command: `{cmd}`  ",
        f"Machine: {platform.machine()} {platform.system()}, {os.cpu_count()} CPUs visible, torch threads "
        f"{args.threads}, device {args.device}; wall time {results['wall_s'] / 60:.1f} min (tiles "
        f"{results['tiles_s']:.0f}s){' — QUICK SMOKE RUN (60 spots per section)' if args.quick else ''}.  ",
        "Data: her2st A1, A2 (PNG, ≈3.2 µm/px) and C2–C6 (JPG, ≈0.69 µm/px); "
        f"reader: {', '.join(results['reader'])}; "
        f"tiles: {', '.join(results['tiler'])}; {args.tile}-px tiles at {args.mpp} µm/px "
        f"({args.tile * args.mpp:.0f} µm field, spot = 100 µm disc at the centre)"
        f"{'' if args.no_black_to_white else '; near-black (max channel < 16) pixels set to white'}"
        + (
            "; --match-resolution: where the test patient's images are sharper than the training patient's, every "
            "method sees the test tiles degraded to the training images' µm/px"
            if args.match_resolution
            else ""
        )
        + (
            f"; --train-degrade-mpp {args.train_degrade_mpp:g}: every baseline learns from training tiles degraded "
            "to it where the training image is sharper (our models keep their own view)"
            if args.train_degrade_mpp
            else ""
        )
        + ".  ",
        f"Genes: {results['genes']['hvg785_in_data']} of the 785 published genes (all measured in every section) "
        "and the 50 with the highest mean CP10k+log1p in the TRAINING patient. "
        "Normalisation CP10k + log1p over all genes.  ",
        "Metric: per gene Pearson r across the spots of one held-out section (or pooled over the test patient), "
        "mean / median over genes; 'sig.' = genes with r > 0 and BH q < 0.05 (two-sided t test); partial r controls "
        "for log1p total UMI of the test spot. "
        "Ridge alphas: leave-one-section-out CV inside the training patient only.",
    ]
    body = ["\n## Summary: mean over the test sections\n"]
    body += [summary_for_split(s, r) for s, r in results["splits"].items()]
    body += ["\n## Per section and pooled\n"]
    body += [
        table_for_split(s, r, results["genes"]["hvg785_in_data"])
        for s, r in results["splits"].items()
    ]
    text = "\n".join(head) + "\n" + "\n".join(body) + "\n"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    js = {k: v for k, v in results.items()}
    args.out.with_suffix(".json").write_text(json.dumps(js, indent=1, default=str))
    return text


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    results = run(args)
    text = write_report(args, results, argv)
    print("\n" + text)
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
