#!/usr/bin/env bash
# CPU run of the squall-tiny-her2st recipe (what the bundled weights were trained with, after GPU
# time ran out): phases 1-3 with the *_tiny.yaml configs, larger step counts and batch 16.
#   bash scripts/train_her2st_cpu.sh AC   # bundled model (A+C)
#   bash scripts/train_her2st_cpu.sh C    # cross-patient model, evaluated on A
#   bash scripts/train_her2st_cpu.sh A    # cross-patient model, evaluated on C
set -euo pipefail
SQUALL=${SQUALL:-squall}
D=../../data/her2st-shards
case $1 in
  AC) data="[$D/A1,$D/A2,$D/C2,$D/C3,$D/C4,$D/C5,$D/C6]" ;;
  C) data="[$D/C2,$D/C3,$D/C4,$D/C5,$D/C6]" ;;
  A) data="[$D/A1,$D/A2]" ;;
esac
r=../../runs/her2st-cpu/$1
c="--set data.batch_size=16 --set data.num_workers=1 --set checkpoint.every_n_steps=50 --set trainer.log_every_n_steps=10"
$SQUALL train pretrain_image configs/her2st/pretrain_image_tiny.yaml $c --set trainer.max_steps=${P1:-60} \
  --set optim.lr=3.0e-4 --set run_dir=$r/pretrain_image --set "data.train=$data"
$SQUALL train align configs/her2st/align_tiny.yaml $c --set trainer.max_steps=${P2:-4} \
  --set optim.lr=3.0e-4 --set run_dir=$r/align --set "data.train=$data" --set model.init_from=$r/pretrain_image/checkpoints/last
$SQUALL train finetune configs/her2st/finetune_expression_tiny.yaml $c --set trainer.max_steps=${P3:-60} \
  --set run_dir=$r/finetune --set "data.train=$data" --set model.init_from=$r/align/checkpoints/last
