#!/bin/bash
# The from-scratch CNN rows of benchmarks/her2st_expression.py trained on a GPU, from the pack of
# the benchmark's own tiles. Needs only python3 with numpy, pillow and torch there (no squall_sd).
#
# 1. here:      python benchmarks/her2st_expression.py --mpp 2.0 --tile 112 --model none --cnn-epochs 0 \
#                   --cnn-export PACK.npz --out /tmp/pack_run.md
# 2. on a GPU:  bash benchmarks/her2st_cnn_gpu.sh PACK.npz OUTDIR
#               (DenseNet-121 at 112 px, seeds 0-2; DenseNet-121 at 224 px and ResNet-18 at 112 px, seed 0;
#               39 epochs as the ResNet-18 row trained on the CPU, bf16 autocast, 8-view TTA; run at once)
# 3. here:      python benchmarks/her2st_expression.py --mpp 2.0 --tile 112 --model none --cnn-epochs 0 \
#                   --cnn-preds OUTDIR/densenet121_112_seedN.npz --seed N \
#                   --out benchmarks/results/her2st_expression_gpu_cnn_seedN.md
#               then her2st_expression_seeds.py RUN_N.json+her2st_expression_gpu_cnn_seedN.json ...
set -u
PACK=$1
OUTDIR=$2
mkdir -p "$OUTDIR"
export PYTHONUNBUFFERED=1
HERE=$(dirname "$0")
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUTDIR/gpu.txt"
COMMON="--device cuda --epochs 39 --bf16 --tta --minutes 2.5"
job() {  # name arch px seed
  python3 "$HERE/_cnn_job.py" "$PACK" "$OUTDIR/$1.npz" --arch "$2" --px "$3" --seed "$4" $COMMON \
    > "$OUTDIR/log_$1.txt" 2>&1
}
for s in 0 1 2; do job densenet121_112_seed$s densenet121 112 $s & done
job densenet121_224_seed0 densenet121 224 0 &
job resnet18_112_seed0 resnet18 112 0 &
wait
tail -n 2 "$OUTDIR"/log_*.txt
