#!/usr/bin/env bash
# Retrain the bundled default model end to end: grouped 3-fold cross-validation and the final
# model (train) -> export -> bundle into edge_runtime.
# usage: scripts/train_default.sh [DATA_ROOT] [RUN_DIR]
#   DATA_ROOT holds busi/Dataset_BUSI_with_GT and busbra/ (default ../shared/data);
#   RUN_DIR is the run folder (default runs/default). Seed 0 unless SEED is set in the
#   environment; logs to RUN_DIR/train.log. BUS-BRA has no normal scans, so edge-train adds
#   mirrored lesion-free views as normals by itself (training.lesionfree). --no-seg keeps the
#   bundled v2 recipe: the lesion head did not carry "normal" to a left-out scanner better
#   (docs/experiments.md, 2026-12-02), so the bundled model has no lesion output.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA="${1:-../shared/data}"
RUN="${2:-runs/default}"
SEED="${SEED:-0}"
mkdir -p "$RUN"
start=$(date +%s)
edge-train "$DATA/busi/Dataset_BUSI_with_GT" "$DATA/busbra" --output "$RUN" \
    --backbone efficientnet-lite0 --image-size 224 --frozen-epochs 4 --epochs 12 \
    --learning-rate 0.001 --pixel-noise 0.03 --no-seg \
    --batch-size 32 --folds 3 --seed "$SEED" 2>&1 | tee "$RUN/train.log"
edge-export "$RUN" --output "$RUN/export" --name default --calibration auto 2>&1 | tee "$RUN/export.log"
python -m export.bundle "$RUN" --data-root "$DATA"
echo "retrained the default model in $(( ($(date +%s) - start) / 60 )) min"
