#!/usr/bin/env bash
# Retrain the bundled default model (v4) end to end: edge-train with its defaults (the recipe,
# training/recipe.py), written out flag by flag as the record. That trains two members, Lite0 and
# Lite2 at 160 px, each with the scanner-held-out protocol (BUSI's LOGIQ E9, BUS-BRA's Logiq 7 and
# Logiq 5 left out in turn) and the final model on the 70/15/15 grouped split, then averages them
# into one graph whose lesion map (the outline and the "normal" call) is Lite0's; then export and
# bundle. Chosen by criteria written before the runs (docs/prereg/2026-12-06e-*.md).
# usage: scripts/train_default.sh [DATA_ROOT] [RUN_DIR]
#   DATA_ROOT holds busi/Dataset_BUSI_with_GT and busbra/ (default ../shared/data);
#   RUN_DIR is the run folder (default runs/default): the graph in RUN_DIR/v4, its members in
#   RUN_DIR/v4/members/. Seed 0 unless SEED is set in the environment.
# The two members train side by side, a process each (edge-train's --jobs 2; their logs are in
# RUN_DIR/v4/members/*/train.log).
# Resumable: edge-train keeps a member whose training finished with the same options, and in a
# member in progress each protocol fold finished with the same options, data and split; a step
# whose output is complete (the graph's protocol.json and model.keras, the exported
# default-int8.onnx) is not run again, so a stopped run loses at most the fold (or final model)
# each member had in progress.
# Time on 2 cores: see docs/default-model.md. Deterministic on one kind of CPU: a retrain of seed 0
# on a fresh AMD EPYC host reproduced every criterion value of the protocol and the test split; on
# an Intel Xeon host the numbers move within the run-to-run spread (0.02; docs/default-model.md).
# INT8 keeps each member's first 2 convolutions in float (--float-convs 2; docs/experiments.md,
# decision 10); the FP32 file stores its convolution weights as float16 (--fp32-weights float16:
# 17 MB instead of 34, under the 20 MB a committed file may have; docs/prereg/2026-12-06f-*.md).
# v3, one Lite0: docs/default-model/v3/README.md.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA="${1:-../shared/data}"
RUN="${2:-runs/default}"
SEED="${SEED:-0}"
mkdir -p "$RUN"
start=$(date +%s)
if [ ! -f "$RUN/v4/protocol.json" ] || [ ! -f "$RUN/v4/model.keras" ]; then
    edge-train "$DATA/busi/Dataset_BUSI_with_GT" "$DATA/busbra" --output "$RUN/v4" \
        --backbone efficientnet-lite0 efficientnet-lite2 --lesion-from 1 --image-size 160 \
        --frozen-epochs 2 --epochs 6 --learning-rate 0.001 --pixel-noise 0.03 --clutter 0.5 \
        --scanner-style 0 --leave-scanner-out 'busi:GE LOGIQ E9' 'busbra:GE Logiq 7 @10-14MHz' \
        'busbra:GE Logiq 5 @10-12MHz' --batch-size 32 --seed "$SEED" 2>&1 | tee "$RUN/v4.log"
fi
if [ ! -f "$RUN/v4/export/default-int8.onnx" ]; then
    edge-export "$RUN/v4" --output "$RUN/v4/export" --name default --float-convs 2 \
        --fp32-weights float16 2>&1 | tee "$RUN/export.log"
fi
python -m export.bundle "$RUN/v4" --data-root "$DATA"
echo "retrained the default model in $(( ($(date +%s) - start) / 60 )) min"
