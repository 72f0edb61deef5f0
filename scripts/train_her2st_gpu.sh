#!/usr/bin/env bash
# The three phases of squall-tiny-her2st for the three training sets of the recipe, run side by
# side on one GPU: AC (the bundled model), C (evaluated on A) and A (evaluated on C).
# Expects data/her2st-shards (scripts/train_her2st_prepare.py, or unpacked by
# scripts/train_her2st_transport.py) and a `squall` command (or SQUALL="python -m ...").
set -euo pipefail
SQUALL=${SQUALL:-squall}
D=../../data/her2st-shards
declare -A SETS=(
  [AC]="[$D/A1,$D/A2,$D/C2,$D/C3,$D/C4,$D/C5,$D/C6]"
  [C]="[$D/C2,$D/C3,$D/C4,$D/C5,$D/C6]"
  [A]="[$D/A1,$D/A2]"
)
one() {
  local name=$1 data=$2 r=../../runs/her2st/$1
  $SQUALL train pretrain_image configs/her2st/pretrain_image_gpu.yaml \
    --set run_dir=$r/pretrain_image --set "data.train=$data"
  $SQUALL train align configs/her2st/align_gpu.yaml \
    --set run_dir=$r/align --set "data.train=$data" --set model.init_from=$r/pretrain_image/checkpoints/last
  $SQUALL train finetune configs/her2st/finetune_expression_gpu.yaml \
    --set run_dir=$r/finetune --set "data.train=$data" --set model.init_from=$r/align/checkpoints/last
}
mkdir -p runs
pids=()
for name in "${!SETS[@]}"; do
  one "$name" "${SETS[$name]}" > "runs/her2st_$name.log" 2>&1 &
  pids+=($!)
done
rc=0
for p in "${pids[@]}"; do wait "$p" || rc=1; done
exit $rc
