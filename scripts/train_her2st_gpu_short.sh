#!/usr/bin/env bash
# The run actually used for the bundled model (GPU time was short): AC (bundled) and C (evaluated
# on A) side by side on one H100, each section folder listed 5x in data.train (longer epochs, fewer
# DataLoader restarts), 7 workers each; steps 200 / 250 / 300 (batch 64 / 64 / 32).
set -uo pipefail
SQUALL=${SQUALL:-squall}
D=../../data/her2st-shards
rep() { local s="" i x; for i in 1 2 3 4 5; do for x in "$@"; do s+="$D/$x,"; done; done; echo "[${s%,}]"; }
one() {
  local data=$2 r=../../runs/her2st/$1 c="--set data.num_workers=7 --set checkpoint.every_n_steps=100"
  $SQUALL train pretrain_image configs/her2st/pretrain_image_gpu.yaml $c --set trainer.max_steps=200 \
    --set run_dir=$r/pretrain_image --set "data.train=$data" &&
  $SQUALL train align configs/her2st/align_gpu.yaml $c --set trainer.max_steps=250 \
    --set run_dir=$r/align --set "data.train=$data" --set model.init_from=$r/pretrain_image/checkpoints/last &&
  $SQUALL train finetune configs/her2st/finetune_expression_gpu.yaml $c --set trainer.max_steps=300 \
    --set run_dir=$r/finetune --set "data.train=$data" --set model.init_from=$r/align/checkpoints/last
}
mkdir -p runs
one AC "$(rep A1 A2 C2 C3 C4 C5 C6)" > runs/her2st_AC.log 2>&1 &
p1=$!
one C "$(rep C2 C3 C4 C5 C6)" > runs/her2st_C.log 2>&1 &
p2=$!
wait $p1; wait $p2
