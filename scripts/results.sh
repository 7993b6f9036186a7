#!/usr/bin/env bash
# Regenerates docs/RESULTS.md: runs `qfilters eval` (perplexity, levers, passkey ratio curve, and
# Gemma-3-270M when present), writes JSON and SVG plots into docs/results/, then composes the
# tables with scripts/results_tables.py. Two evals run at a time.
# Env: QFILTERS_DATA_DIR (default ../shared/data), MODEL, FILTERS, THREADS (default 1: on a
# shared CPU ggml's spinning threads collapse when oversubscribed; 1 thread was 10x faster here).
# About 20 minutes on a 2-core CPU with -t 1.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${QFILTERS_BIN:-target/release/qfilters}
DATA=${QFILTERS_DATA_DIR:-../shared/data}
MODEL=${MODEL:-models/SmolLM2-135M-Instruct.Q4_1.gguf}
FILTERS=${FILTERS:-models/smollm2-qfilters.safetensors}
GEMMA=${GEMMA:-models/gemma-3-270m-Q4_K_M.gguf}
# Its own folder: calibrate writes config.json beside the filters, and two filter sets in one
# folder would share (and overwrite) it.
GEMMA_FILTERS=${GEMMA_FILTERS:-models/gemma3-qfilters/model.safetensors}
THREADS=${THREADS:-1}
# The recency prior chosen by the lever sweep (tokens of age per standard deviation of score).
RECENCY=${RECENCY:-128}
OUT=docs/results
mkdir -p "$OUT"
[ -x "$BIN" ] || cargo build --release
: > "$OUT/commands.txt"
# RESUME=1 keeps the JSON of steps that already finished (the command is still listed).
run() {
  echo "$*" >> "$OUT/commands.txt"
  local prev="" a
  for a in "$@"; do
    if [ "$prev" = "--json" ] && [ "${RESUME:-0}" = 1 ] && [ -s "$a" ]; then echo "= kept $a" >&2; return 0; fi
    prev=$a
  done
  echo "+ $*" >&2
  "$@" > /dev/null
}

[ -f "$FILTERS" ] || run "$BIN" calibrate -m "$MODEL" -t "$THREADS" --text "$DATA/tinyshakespeare.txt" --tokens 16384 -o "$FILTERS"

# Perplexity (4096 tokens) and the passkey ratio curve run side by side.
run "$BIN" eval ppl -m "$MODEL" -t "$THREADS" --text "$DATA/wikitext2-valid.txt" --tokens 4096 --chunk 16 \
  --budget 256,512 --policy none,streaming,knorm,qfilters --recency 0,"$RECENCY" --window 32 \
  --filters "$FILTERS" --check-full --json "$OUT/ppl.json" --plot "$OUT/ppl.svg" &
PPL=$!
run "$BIN" eval passkey -m "$MODEL" -t "$THREADS" --filler "$DATA/tinyshakespeare.txt" --format chat \
  --lengths 1024 --depths 0.25,0.5,0.75 --trials 1 --ratio 1.5,2,3,4 \
  --policy none,streaming,knorm,qfilters --recency 0,"$RECENCY" --window 32 --filters "$FILTERS" \
  --json "$OUT/passkey.json" --plot "$OUT/passkey.svg"
wait $PPL

# Levers at budget 256 on 2048 tokens: granularity x recency prior, and the recent window.
run "$BIN" eval ppl -m "$MODEL" -t "$THREADS" --text "$DATA/wikitext2-valid.txt" --tokens 2048 --chunk 16 \
  --budget 256 --policy qfilters --granularity head,position --recency 0,32,"$RECENCY" --window 32 \
  --filters "$FILTERS" --json "$OUT/ppl_levers.json" --plot "$OUT/ppl_levers.svg" &
LEV=$!
if [ -f "$GEMMA" ]; then
  mkdir -p "$(dirname "$GEMMA_FILTERS")"
  [ -f "$GEMMA_FILTERS" ] || run "$BIN" calibrate -m "$GEMMA" -t "$THREADS" --text "$DATA/tinyshakespeare.txt" --tokens 8192 -o "$GEMMA_FILTERS" \
    && run "$BIN" eval ppl -m "$GEMMA" -t "$THREADS" --text "$DATA/wikitext2-valid.txt" --tokens 2048 --chunk 16 \
      --budget 256 --policy none,streaming,knorm,qfilters --recency 0,"$RECENCY" --window 32 \
      --filters "$GEMMA_FILTERS" --json "$OUT/gemma_ppl.json" --plot "$OUT/gemma_ppl.svg" \
    || echo "gemma: failed, see above" >&2
fi
wait $LEV
python3 scripts/results_tables.py "$OUT" > docs/RESULTS.md
echo "wrote docs/RESULTS.md" >&2
