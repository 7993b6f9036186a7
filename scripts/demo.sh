#!/usr/bin/env bash
# The main job on the default model: fetch SmolLM2-135M-Instruct, build, calibrate its Q-Filters
# from the model itself, then compress a long prompt (~3,500 tokens) into a 256-cell KV cache
# and continue it. Prints the completion, then a stats line (peak cells, evicted, tok/s).
# Usage: scripts/demo.sh [PROMPT_FILE]
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
scripts/fetch-model.sh
cargo build --release --quiet
data=${QFILTERS_DATA_DIR:-../shared/data}
mkdir -p out
if [ -f "$data/tinyshakespeare.txt" ]; then
  calib_text="$data/tinyshakespeare.txt"
else
  # Anywhere else: calibrate on this repository's own prose and code (any varied text works).
  calib_text=out/calibration-text.txt
  cat README.md docs/*.md src/*.rs src/*/*.rs > "$calib_text"
fi
filters=models/smollm2-qfilters.safetensors
[ -f "$filters" ] || target/release/qfilters calibrate -m models/SmolLM2-135M-Instruct.Q4_1.gguf \
  --text "$calib_text" --seed 0 -o "$filters"
prompt=${1:-}
if [ -z "$prompt" ]; then
  prompt=out/demo-prompt.txt
  if [ -f "$data/wikitext2-valid.txt" ]; then
    head -c 15000 "$data/wikitext2-valid.txt" > "$prompt"
  else
    cat src/*.rs | head -c 15000 > "$prompt"
  fi
fi
target/release/qfilters run -m models/SmolLM2-135M-Instruct.Q4_1.gguf -f "$prompt" -n 64 \
  --policy qfilters --filters "$filters" --budget 256 \
  --json-stats out/demo-stats.json
echo "stats written to out/demo-stats.json" >&2
