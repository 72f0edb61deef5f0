#!/usr/bin/env bash
# Recipe choices of squall-tiny-her2st (the variants differ from configs/her2st/spots_finetune_tiny.yaml
# in the one named setting; "base" and "patchify" are without colour/blur augmentation), each measured on the validation sections of the TRAINING
# patients only (C model: train C2-C5, validate C6; A model: train A1, validate A2; never the other
# patient). One run per variant and model, early-stopped on val/loss like the recipe; the table is
# made by `python scripts/her2st_curves.py --summary runs/her2st-ablation/*/*/finetune`.
#   bash scripts/train_her2st_ablation.sh base patchify aug_mild aug_strong grid fov448 mpp1 ...
set -euo pipefail
for v in "$@"; do
  for m in ${MODELS:-C A}; do
    args=(); data=data/her2st-spots112
    case $v in
      base) args=(--set "data.augment={flips: true, rot90: true, stain_jitter: 0.0, color_jitter: 0.0, blur: 0.0}") ;;
      patchify) args=(--set model.overrides.stem=patchify --set "data.augment={flips: true, rot90: true, stain_jitter: 0.0, color_jitter: 0.0, blur: 0.0}") ;;
      squall_init) args=(--set model.overrides.init=squall) ;;
      aug_mild) ;;  # the recipe's augmentation (configs/her2st/spots_finetune_tiny.yaml)
      aug_strong) args=(--set "data.augment={flips: true, rot90: true, stain_jitter: 0.2, color_jitter: 0.2, blur: 1.0}") ;;
      grid) data=data/her2st-grid112; args=(--set "data.augment={flips: true, rot90: true, stain_jitter: 0.0, color_jitter: 0.0, blur: 0.0}") ;;  # compare with base
      fov448) data=data/her2st-spots112-4um; args=(--set model.overrides.mpp=4.0) ;;  # compare with aug_mild
      mpp1) data=data/her2st-spots224-1um; args=(--set model.overrides.mpp=1.0 --set model.overrides.img_size=224 --set model.overrides.expr_size=56) ;;
      pretrained) args=(--set model.init_from=../../runs/her2st-pretrain/checkpoints/last) ;;
      *) echo "unknown variant $v" >&2; exit 2 ;;
    esac
    DATA=$data RUNS=../../runs/her2st-ablation/$v bash scripts/train_her2st_spots.sh $m "${args[@]}" \
      > logs/abl_${v}_$m.log 2>&1 || echo "variant $v $m failed (logs/abl_${v}_$m.log)"
  done
done
