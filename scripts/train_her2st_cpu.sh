#!/usr/bin/env bash
# CPU run of the squall-tiny-her2st recipe (what the bundled weights were trained with): phases 1-3
# with the configs/her2st/*_tiny.yaml configs (in-memory shards, HED jitter 0.2, per-section
# z-scored fine-tuning targets, backbone lr 0.1x), batch 16, one thread, nice 19.
#   bash scripts/train_her2st_cpu.sh AC   # bundled model (A+C)
#   bash scripts/train_her2st_cpu.sh C    # cross-patient model, evaluated on A
#   bash scripts/train_her2st_cpu.sh A    # cross-patient model, evaluated on C
# Step counts: P1 (pretrain_image), P2 (align), P3 (finetune) environment variables.
# The PID of the python process currently training is written to $PIDFILE (default
# /tmp/squall_train.pid) at the start of each phase and the file is removed at the end, so that
# other jobs (e.g. timing runs) can pause it with kill -STOP / -CONT.
set -euo pipefail
SQUALL=${SQUALL:-squall}
PIDFILE=${PIDFILE:-/tmp/squall_train.pid}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} MKL_NUM_THREADS=${MKL_NUM_THREADS:-1}
D=../../data/her2st-shards
case $1 in
  AC) data="[$D/A1,$D/A2,$D/C2,$D/C3,$D/C4,$D/C5,$D/C6]" ;;
  C) data="[$D/C2,$D/C3,$D/C4,$D/C5,$D/C6]" ;;
  A) data="[$D/A1,$D/A2]" ;;
  *) echo "usage: $0 AC|C|A" >&2; exit 2 ;;
esac
r=${RUNS:-../../runs/her2st-cpu}/$1
P1=${P1:-150} P2=${P2:-60} P3=${P3:-600}
c="--set data.batch_size=16 --set data.num_workers=0 --set checkpoint.every_n_steps=100 --set trainer.log_every_n_steps=10"
trap 'rm -f "$PIDFILE"' EXIT
phase() {  # phase CONFIG ARGS...: run one phase in the background, publish its PID, wait for it
  nice -n 19 $SQUALL train "$@" &
  echo $! > "$PIDFILE"
  wait $!
}
phase pretrain_image configs/her2st/pretrain_image_tiny.yaml $c --set trainer.max_steps=$P1 \
  --set optim.warmup_steps=$((P1 / 20)) --set run_dir=$r/pretrain_image --set "data.train=$data"
phase align configs/her2st/align_tiny.yaml $c --set trainer.max_steps=$P2 \
  --set optim.warmup_steps=$((P2 / 20)) --set run_dir=$r/align --set "data.train=$data" \
  --set model.init_from=$r/pretrain_image/checkpoints/last
phase finetune configs/her2st/finetune_expression_tiny.yaml $c --set trainer.max_steps=$P3 \
  --set optim.warmup_steps=$((P3 / 20)) --set run_dir=$r/finetune --set "data.train=$data" \
  --set model.init_from=$r/align/checkpoints/last
