#!/bin/bash
# From-scratch CNN rows of the her2st benchmarks trained on a GPU, from a pack of the benchmark's own
# tiles, targets and splits. Needs only python3 with numpy, pillow and torch there (no squall_sd).
#
#   bash benchmarks/her2st_cnn_gpu.sh PACK.npz OUTDIR [ARCH:PX:SEED ...]
#
# One job per ARCH:PX:SEED, all at once on the one GPU (default: densenet121:112:0 densenet121:112:1
# densenet121:112:2 densenet121:224:0 resnet18:112:0); each trains 39 epochs (the ResNet-18 rows
# trained on the CPU get the same), bf16 autocast, and writes OUTDIR/ARCH_PX_seedSEED.npz with the
# 8-view TTA predictions too. The packs:
#   held-out patient: python benchmarks/her2st_expression.py --mpp 2.0 --tile 112 --model none \
#                         --cnn-epochs 0 --cnn-export PACK.npz --out /tmp/pack_run.md
#                     then --cnn-preds OUTDIR/ARCH_PX_seedN.npz --seed N (her2st_expression.py) and
#                     her2st_expression_seeds.py RUN_N.json+EXTRA_N.json ...
#   validation:       python benchmarks/her2st_validation.py --cnn-export PACK.npz, then --cnn-preds ...
set -u
PACK=$1
OUTDIR=$2
shift 2
JOBS=("$@")
[ ${#JOBS[@]} -eq 0 ] && JOBS=(densenet121:112:0 densenet121:112:1 densenet121:112:2 densenet121:224:0 resnet18:112:0)
mkdir -p "$OUTDIR"
export PYTHONUNBUFFERED=1
HERE=$(dirname "$0")
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUTDIR/gpu.txt"
for j in "${JOBS[@]}"; do
  IFS=: read -r arch px seed <<< "$j"
  name=${arch}_${px}_seed$seed
  python3 "$HERE/_cnn_job.py" "$PACK" "$OUTDIR/$name.npz" --arch "$arch" --px "$px" --seed "$seed" \
    --device cuda --epochs 39 --bf16 --tta --minutes 2.5 > "$OUTDIR/log_$name.txt" 2>&1 &
done
wait
tail -n 2 "$OUTDIR"/log_*.txt
