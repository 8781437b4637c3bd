#!/usr/bin/env bash
# Train the proposed v4 end to end: it passed its pre-registered criteria and every runtime gate
# (docs/prereg/2026-12-06e-v4-without-flips.md) and is not bundled, because its FP32 file is
# 33.7 MB, over the 20 MB a committed file may have (docs/frontier.md, "Session 9"). Two members,
# each trained by edge-train with the recipe (training/recipe.py; the second on
# EfficientNet-Lite2), each with the scanner-held-out protocol (BUSI's LOGIQ E9, BUS-BRA's Logiq 7
# and Logiq 5 left out in turn) and the final model on the 70/15/15 grouped split; then one graph
# averaging both, whose lesion map (the outline and the "normal" call) is Lite0's
# (python -m training.ensemble);
# then export. `python -m export.bundle RUN_DIR/v4 --data-root DATA_ROOT` would bundle it.
# usage: scripts/train_v4.sh [DATA_ROOT] [RUN_DIR]
#   DATA_ROOT holds busi/Dataset_BUSI_with_GT and busbra/ (default ../shared/data);
#   RUN_DIR is the run folder (default runs/v4): members in RUN_DIR/lite0 and RUN_DIR/lite2,
#   the ensemble in RUN_DIR/v4. Seed 0 unless SEED is set in the environment.
# Resumable: a step whose output is complete (a member's or the ensemble's protocol.json and
# model.keras, the exported default-int8.onnx) is not run again, so a stopped run loses at most
# the step in progress.
# Time on a shared 2-core host (the members side by side, other jobs running): Lite0 47-80 min,
# Lite2 56-90 min; then the ensemble's report about 10 min and its export about 5.
# INT8 keeps each member's first 2 convolutions in float (--float-convs 2; docs/experiments.md,
# decision 10).
set -euo pipefail
cd "$(dirname "$0")/.."
DATA="${1:-../shared/data}"
RUN="${2:-runs/v4}"
SEED="${SEED:-0}"
mkdir -p "$RUN"
start=$(date +%s)
trained() { [ -f "$RUN/$1/protocol.json" ] && [ -f "$RUN/$1/model.keras" ]; }
member() {  # folder, backbone: edge-train with the recipe (its defaults, written out)
    trained "$1" && return
    edge-train "$DATA/busi/Dataset_BUSI_with_GT" "$DATA/busbra" --output "$RUN/$1" \
        --backbone "$2" --image-size 160 --frozen-epochs 2 --epochs 6 \
        --learning-rate 0.001 --pixel-noise 0.03 --clutter 0.5 \
        --leave-scanner-out 'busi:GE LOGIQ E9' 'busbra:GE Logiq 7 @10-14MHz' \
        'busbra:GE Logiq 5 @10-12MHz' --batch-size 32 --seed "$SEED" 2>&1 | tee "$RUN/$1.log"
}
member lite0 efficientnet-lite0
member lite2 efficientnet-lite2
if ! trained v4; then
    python -m training.ensemble "$DATA/busi/Dataset_BUSI_with_GT" "$DATA/busbra" \
        --member "$RUN/lite0" --member "$RUN/lite2" --output "$RUN/v4" --image-size 160 \
        --lesion-from 1 2>&1 | tee "$RUN/v4.log"
fi
if [ ! -f "$RUN/v4/export/default-int8.onnx" ]; then
    edge-export "$RUN/v4" --output "$RUN/v4/export" --name default --float-convs 2 \
        --fp32-weights float16 2>&1 \
        | tee "$RUN/export.log"
fi
echo "to bundle it: python -m export.bundle $RUN/v4 --data-root $DATA"
echo "trained v4 in $(( ($(date +%s) - start) / 60 )) min"
