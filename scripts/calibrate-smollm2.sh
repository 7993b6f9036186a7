#!/usr/bin/env bash
# Calibrates Q-Filters for SmolLM2-135M-Instruct (calibrate's defaults: one 2048-token window of
# tinyshakespeare, 1000 samples per layer; within cosine 0.99 of 16K tokens, docs/RESULTS.md) into
# models/smollm2-qfilters.safetensors (+ models/config.json), unless they already exist.
# Needs the release binary: cargo build --release.
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=${MODEL:-models/SmolLM2-135M-Instruct.Q4_1.gguf}
DATA_DIR=${QFILTERS_DATA_DIR:-../shared/data}
OUT=${OUT:-models/smollm2-qfilters.safetensors}
BIN=${QFILTERS_BIN:-target/release/qfilters}
if [[ -f "$OUT" ]]; then
    echo "calibrate-smollm2: $OUT exists, nothing to do" >&2
    exit 0
fi
[[ -x "$BIN" ]] || { echo "calibrate-smollm2: $BIN missing; run cargo build --release" >&2; exit 1; }
[[ -f "$MODEL" ]] || { echo "calibrate-smollm2: $MODEL missing; run scripts/fetch-model.sh" >&2; exit 1; }
"$BIN" calibrate -m "$MODEL" --text "$DATA_DIR/tinyshakespeare.txt" \
    --seed 0 -o "$OUT"
