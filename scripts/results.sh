#!/usr/bin/env bash
# Regenerates docs/RESULTS.md: runs `qfilters eval` (perplexity, levers, passkey), writes JSON and
# SVG plots into docs/results/, then composes the tables with scripts/results_tables.py.
# Env: QFILTERS_DATA_DIR (default ../shared/data), MODEL, FILTERS, THREADS (default 1: on a
# shared CPU ggml's spinning threads collapse when oversubscribed; 1 thread was 10x faster here).
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${QFILTERS_BIN:-target/release/qfilters}
DATA=${QFILTERS_DATA_DIR:-../shared/data}
MODEL=${MODEL:-models/SmolLM2-135M-Instruct.Q4_1.gguf}
FILTERS=${FILTERS:-models/smollm2-qfilters.safetensors}
THREADS=${THREADS:-1}
OUT=docs/results
mkdir -p "$OUT"
[ -x "$BIN" ] || cargo build --release
[ -f "$FILTERS" ] || "$BIN" calibrate -m "$MODEL" --text "$DATA/tinyshakespeare.txt" --tokens 16384 -o "$FILTERS"
: > "$OUT/commands.txt"
run() { echo "$*" >> "$OUT/commands.txt"; echo "+ $*" >&2; "$@"; }

run "$BIN" eval ppl -m "$MODEL" -t "$THREADS" --text "$DATA/wikitext2-valid.txt" --tokens 4096 --chunk 16 \
  --budget 256,512 --policy none,streaming,knorm,random,qfilters --filters "$FILTERS" --check-full \
  --json "$OUT/ppl.json" --plot "$OUT/ppl.svg"
run "$BIN" eval ppl -m "$MODEL" -t "$THREADS" --text "$DATA/wikitext2-valid.txt" --tokens 4096 --chunk 16 \
  --budget 256 --policy qfilters,knorm --granularity head,position --window 64,128 --filters "$FILTERS" \
  --json "$OUT/ppl_levers.json" --plot "$OUT/ppl_levers.svg"
run "$BIN" eval passkey -m "$MODEL" -t "$THREADS" --filler "$DATA/tinyshakespeare.txt" --lengths 1024,2048 \
  --depths 0.1,0.5,0.9 --trials 2 --ratio 2,3,4 --policy none,streaming,knorm,qfilters --filters "$FILTERS" \
  --json "$OUT/passkey.json" --plot "$OUT/passkey.svg"
python3 scripts/results_tables.py "$OUT" > docs/RESULTS.md
echo "wrote docs/RESULTS.md" >&2
