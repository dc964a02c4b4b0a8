#!/usr/bin/env bash
# The coco preset's model (R50-FPN Faster R-CNN, AMP, 640-800 px short side up to 1333) on one GPU:
# step time and peak memory of a supervised step, and of each method's step with and without LSM,
# at the paper's per-GPU batch (32 + 32 images over 8 GPUs = 4 + 4). COCO itself is not on the GPU
# machine, so the images are the synthetic generator's at COCO size (640 px, resized by the coco
# augmentation); random-init weights (no model hub there); each method starts from a 20-iteration
# burn-in (STAC: a 30-iteration supervised teacher). Usage: bash benchmarks/gpu_coco.sh [OUT_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-${OUT:-/tmp}}
home=$(mktemp -d /tmp/bench-gpu-XXXX)
ov="data.dataset=synthetic data.synth.train_images=64 data.synth.val_images=8 data.synth.image_size=640
    data.ratio=25 data.num_workers=0 model.weights=none
    solver.ims_per_batch_labeled=${LABELED:-4} solver.ims_per_batch_unlabeled=${UNLABELED:-4}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
python3 -c 'import torch, torchvision; print("torch", torch.__version__, "torchvision", torchvision.__version__)' | tee -a "$out/gpu.txt"
python3 benchmarks/step_time.py --preset coco --device cuda --iters ${ITERS:-15} --home "$home" $ov 2>&1 | tee "$out/step_time.txt"
python3 benchmarks/lsm_overhead.py --preset coco --device cuda --iters ${ITERS:-8} --home "$home" --methods ${METHODS:-ubteacher,softteacher,pseco,stac} \
    $ov semi.burn_in=20 solver.max_iter=30 2>&1 | tee "$out/lsm_overhead.txt"
