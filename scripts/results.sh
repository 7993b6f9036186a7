#!/usr/bin/env bash
# Regenerates docs/RESULTS.md for SmolLM2-135M, Gemma-3-270M and Qwen2.5-Coder-0.5B: per model,
# calibrates Q-Filters on tinyshakespeare, tunes the eviction defaults on a development text
# (`calibrate --tune`, tinyshakespeare again: never the evaluation text), then measures streaming
# perplexity on held-out wikitext2-valid and passkey retrieval with the defaults a user gets
# with no flags (the tuned ones; K-norm gets the same tuning), and composes the tables with
# scripts/results_tables.py. Offline once the models are in models/.
#
# Every step writes its own JSON under docs/results/; RESUME=1 skips steps whose JSON exists,
# so an interrupted run (or one cut short with STEPS) continues where it stopped. Steps run one
# at a time, most important first. STEPS=N runs only the first N steps of the list (then the
# tables are composed from whatever JSON exists); the closing notes say which steps are missing.
# ONLY=REGEX runs only the steps whose JSON path matches it (e.g. ONLY=gemma3), the rest are
# listed and left as they are.
# Env: QFILTERS_DATA_DIR (default ../shared/data), THREADS (default 1: on a shared CPU ggml's
# spinning threads collapse when oversubscribed), QFILTERS_BIN.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${QFILTERS_BIN:-target/release/qfilters}
DATA=${QFILTERS_DATA_DIR:-../shared/data}
THREADS=${THREADS:-1}
OUT=docs/results
DEV=$DATA/tinyshakespeare.txt
EVAL=$DATA/wikitext2-valid.txt
mkdir -p "$OUT"
[ "${LIST:-0}" = 1 ] || [ -x "$BIN" ] || cargo build --release

# name -> GGUF, filters folder, calibration tokens
declare -A GGUF=(
  [qwen05]=models/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf
  [smollm2]=models/SmolLM2-135M-Instruct.Q4_1.gguf
  [gemma3]=models/gemma-3-270m-Q4_K_M.gguf
)
declare -A CAL_TOKENS=([qwen05]=8192 [smollm2]=16384 [gemma3]=8192)
# Each model's filters in their own folder: calibrate writes config.json beside them.
filters() { echo "models/$1-qfilters/model.safetensors"; }
tuned() { echo "models/$1-qfilters/tuned.safetensors"; }

# Every step, run or not, goes to steps.txt (LIST=1: only that, nothing runs), so the tables can
# say what is still missing; commands.txt lists the steps this invocation reached.
if [ "${LIST:-0}" = 1 ]; then : > "$OUT/steps.txt"; else LIST=1 scripts/results.sh; : > "$OUT/commands.txt"; fi
n=0
# selected PATH: whether ONLY (a regex, default everything) lets a step that writes PATH run.
selected() { [ -z "${ONLY:-}" ] || [[ $1 =~ $ONLY ]]; }
# step JSON cmd...: runs cmd unless RESUME=1 and JSON exists; always listed in commands.txt.
step() {
  local json=$1; shift
  local shown="$*"; shown=${shown//$DATA/../shared/data}; shown=${shown//$BIN/target/release/qfilters}
  if [ "${LIST:-0}" = 1 ]; then echo "$shown" >> "$OUT/steps.txt"; return 0; fi
  n=$((n + 1))
  if [ -n "${STEPS:-}" ] && [ "$n" -gt "$STEPS" ]; then echo "- skipped (STEPS): $json" >&2; return 0; fi
  if ! selected "$json"; then return 0; fi
  echo "$shown" >> "$OUT/commands.txt"
  if [ "${RESUME:-0}" = 1 ] && [ -s "$json" ]; then echo "= kept $json" >&2; return 0; fi
  echo "+ $(date -u +%T) $*" >&2
  "$@" > /dev/null
}

prepare() { # model: filters (calibrated once) and tuned defaults
  local m=$1 g=${GGUF[$1]}
  [ "${LIST:-0}" = 1 ] || [ -f "$g" ] || { echo "$g missing: scripts/fetch-model.sh $m" >&2; return 1; }
  [ "${LIST:-0}" = 1 ] || mkdir -p "models/$m-qfilters"
  step "$(filters "$m")" "$BIN" calibrate -m "$g" -t "$THREADS" --text "$DEV" --tokens "${CAL_TOKENS[$m]}" -o "$(filters "$m")"
  # The tuned copy must be redone if the sweep's JSON is missing, and vice versa.
  # Not when STEPS leaves the tune step out (it is step n+1): its JSON is then kept as it is.
  if [ "${LIST:-0}" != 1 ] && [ ! -s "$(tuned "$m")" ] && selected "$OUT/${m}_tune.json" \
    && { [ -z "${STEPS:-}" ] || [ $((n + 1)) -le "$STEPS" ]; }; then
    rm -f "$OUT/${m}_tune.json"
  fi
  # calibrate's default grid for Q-Filters (recency 0/32/128/512 x window 32/64/128, then
  # granularity: 13 settings), then KeyDiff, the combinations with KeyDiff and the references StreamingLLM
  # and K-norm at recency 0 and the prior found (up to 7 more), on 4096 tokens, so the sweep
  # sees eviction's steady state (~75 s a setting for a 0.5B model on one core). The filters
  # then carry the chosen policy as well (defaults.policy).
  step "$OUT/${m}_tune.json" "$BIN" calibrate -m "$g" -t "$THREADS" --filters "$(filters "$m")" --tune "$DEV" \
    --tune-tokens 4096 --tune-budget 256 --tune-chunk 32 \
    --tune-json "$OUT/${m}_tune.json" -o "$(tuned "$m")"
}

ppl() { # model: full cache and StreamingLLM (no filters), then K-norm and Q-Filters (tuned)
  local m=$1 g=${GGUF[$1]}
  step "$OUT/${m}_ppl_base.json" "$BIN" eval ppl -m "$g" -t "$THREADS" --text "$EVAL" --tokens 4096 --batch 16 \
    --budget 256,512 --policy none,streaming --check-full --json "$OUT/${m}_ppl_base.json"
  # One JSON per budget, so a cut-short run keeps what finished.
  local b
  for b in 256 512; do
    step "$OUT/${m}_ppl_b$b.json" "$BIN" eval ppl -m "$g" -t "$THREADS" --text "$EVAL" --tokens 4096 --batch 16 \
      --budget "$b" --policy knorm,qfilters --filters "$(tuned "$m")" --json "$OUT/${m}_ppl_b$b.json"
  done
}

# The quality-per-byte frontier: the full cache and each policy on f16, q8_0 and q4_0 K/V caches
# (llama.cpp's -ctk/-ctv; K and V pair up), perplexity against the KV MiB llama.cpp allocated,
# with the Pareto front (eval --frontier). llama.cpp rounds a context up to 256 cells, so each
# budget fills one: budget + batch 16 + 16 margin = 256, 512, 1024 cells; and 2^k - 1 tokens
# make the full cache (tokens + 1 cells) exactly 2^k. The 0.5B model gets a shorter stream
# (about 15 min on one core instead of an hour).
frontier() { # model tokens budgets
  local m=$1 tokens=$2 budgets=$3 g=${GGUF[$1]}
  step "$OUT/${m}_frontier_ppl.json" "$BIN" eval ppl -m "$g" -t "$THREADS" --text "$EVAL" --tokens "$tokens" \
    --batch 16 --budget "$budgets" --policy none,streaming,qfilters -ctk f16,q8_0,q4_0 -ctv f16,q8_0,q4_0 \
    --filters "$(tuned "$m")" --json "$OUT/${m}_frontier_ppl.json" --frontier "$OUT/${m}_frontier_ppl.svg"
}

passkey() { # model length depth ratios policies: 10 documents per cell, one JSON per piece
  local m=$1 len=$2 depth=$3 ratios=$4 policies=$5
  local json="$OUT/${m}_passkey_L${len}_d${depth}_r${ratios//,/-}_${policies//,/-}.json"
  step "$json" "$BIN" eval passkey -m "${GGUF[$m]}" -t "$THREADS" --filler "$DEV" --format "${FORMAT[$m]:-chat}" \
    --lengths "$len" --depths "$depth" --trials 10 --ratio "$ratios" --policy "$policies" \
    --filters "$(tuned "$m")" --json "$json"
}

# KeyDiff (no filters) at the tuned window and granularity of each model (what K-norm and Q-Filters
# get from the tuned filters), with its tuned recency prior and without one; needle retrieval in
# prose (wikitext2-valid) for every policy. Flags rather than the tuned file for KeyDiff: it reads
# no filters, so nothing would apply the file's defaults to it.
declare -A TUNED_FLAGS=([qwen05]="--window 128 --granularity head" [smollm2]="--window 32 --granularity head" [gemma3]="--window 32 --granularity head")
# The prompt format of the retrieval tasks: chat, except where the GGUF has no chat template
# (Gemma-3-270M is the base model).
declare -A FORMAT=([gemma3]=plain)
declare -A TUNED_RECENCY=([qwen05]=512 [smollm2]=32 [gemma3]=128)
keydiff() { # model: perplexity at 256 and 512, passkey at 2x/4x with the key at depth 0.2
  local m=$1 g=${GGUF[$1]} b
  for b in 256 512; do
    # shellcheck disable=SC2086
    step "$OUT/${m}_ppl_keydiff_b$b.json" "$BIN" eval ppl -m "$g" -t "$THREADS" --text "$EVAL" --tokens 4096 --chunk 16 \
      --budget "$b" --policy keydiff ${TUNED_FLAGS[$m]} --recency "0,${TUNED_RECENCY[$m]}" --json "$OUT/${m}_ppl_keydiff_b$b.json"
  done
  # The two combined (standardised scores, weight 1), with Q-Filters' tuned defaults.
  step "$OUT/${m}_ppl_qfilters+keydiff_b256-512.json" "$BIN" eval ppl -m "$g" -t "$THREADS" --text "$EVAL" --tokens 4096 \
    --chunk 16 --budget 256,512 --policy qfilters+keydiff --filters "$(tuned "$m")" --json "$OUT/${m}_ppl_qfilters+keydiff_b256-512.json"
}
keydiff_passkey() { # model depth
  local m=$1 depth=$2
  local json="$OUT/${m}_passkey_L1024_d${depth}_r2-4_keydiff.json"
  # shellcheck disable=SC2086
  step "$json" "$BIN" eval passkey -m "${GGUF[$m]}" -t "$THREADS" --filler "$DEV" --format "${FORMAT[$m]:-chat}" \
    --lengths 1024 --depths "$depth" --trials 10 --ratio 2,4 --policy keydiff ${TUNED_FLAGS[$m]} --recency 0 --json "$json"
}
# retrieval MODEL NAME FLAGS...: passkey (filler $DEV) and needle (prose filler $EVAL) in 1K
# documents, key at depth 0.2, 2x and 4x, 10 documents per cell; one JSON per task, named NAME.
retrieval() {
  local m=$1 name=$2 task filler json
  shift 2
  for task in passkey needle; do
    json="$OUT/${m}_${task}_L1024_d0.2_r2-4_${name}.json"
    filler=$DEV
    [ "$task" = needle ] && filler=$EVAL
    step "$json" "$BIN" eval "$task" -m "${GGUF[$m]}" -t "$THREADS" --filler "$filler" --format "${FORMAT[$m]:-chat}" \
      --lengths 1024 --depths 0.2 --trials 10 --ratio 2,4 "$@" --json "$json"
  done
}
# Expected Attention (issue 22) scores keys with the query statistics calibrate stores in the
# filters, so it runs with the tuned filters, at KeyDiff's window and granularity (the other
# rows'), with the tuned recency prior and without one like KeyDiff; passkey and needle without
# one, like KeyDiff.
expected_attention() { # model: perplexity at 256 and 512, passkey and needle at 2x/4x, depth 0.2
  local m=$1 g=${GGUF[$1]} b
  # shellcheck disable=SC2086
  for b in 256 512; do
    step "$OUT/${m}_ppl_expected-attention_b$b.json" "$BIN" eval ppl -m "$g" -t "$THREADS" --text "$EVAL" --tokens 4096 \
      --chunk 16 --budget "$b" --policy expected-attention --filters "$(tuned "$m")" ${TUNED_FLAGS[$m]} --recency "0,${TUNED_RECENCY[$m]}" \
      --json "$OUT/${m}_ppl_expected-attention_b$b.json"
  done
  # shellcheck disable=SC2086
  retrieval "$m" expected-attention --policy expected-attention --filters "$(tuned "$m")" ${TUNED_FLAGS[$m]} --recency 0
}
# KeyDiff re-scored over the live cells at each round (kvpress's variant; issue 22 asks for both
# to be measured), at the same settings as KeyDiff: perplexity with and without the prior,
# passkey and needle without one.
keydiff_live() { # model
  local m=$1 g=${GGUF[$1]} b
  for b in 256 512; do
    # shellcheck disable=SC2086
    step "$OUT/${m}_ppl_keydiff-live_b$b.json" "$BIN" eval ppl -m "$g" -t "$THREADS" --text "$EVAL" --tokens 4096 --chunk 16 \
      --budget "$b" --policy keydiff-live ${TUNED_FLAGS[$m]} --recency "0,${TUNED_RECENCY[$m]}" --json "$OUT/${m}_ppl_keydiff-live_b$b.json"
  done
  # shellcheck disable=SC2086
  retrieval "$m" keydiff-live --policy keydiff-live ${TUNED_FLAGS[$m]} --recency 0
}
# Expected Attention with KeyDiff (weight 1), the best perplexity of the 2,048-token probes, with
# the tuned filters' settings.
ea_keydiff() { # model
  local m=$1 json="$OUT/$1_ppl_expected-attention+keydiff_b256-512.json"
  # shellcheck disable=SC2086
  step "$json" "$BIN" eval ppl -m "${GGUF[$m]}" -t "$THREADS" --text "$EVAL" --tokens 4096 --chunk 16 --budget 256,512 \
    --policy expected-attention+keydiff --filters "$(tuned "$m")" ${TUNED_FLAGS[$m]} --json "$json"
}
# The two combinations' retrieval (standardised scores, weight 1), at the settings of the other
# retrieval rows: the tuned filters, KeyDiff's window and granularity, no recency prior. Gemma's
# tune chose qfilters+keydiff, so its summary row needs these cells.
mix_retrieval() { # model
  local m=$1
  # shellcheck disable=SC2086
  retrieval "$m" qfilters+keydiff-expected-attention+keydiff --policy qfilters+keydiff,expected-attention+keydiff \
    --filters "$(tuned "$m")" ${TUNED_FLAGS[$m]} --recency 0
}
needle() { # model: 1K documents, needle at depth 0.2, 2x and 4x, 10 documents per cell
  local m=$1 g=${GGUF[$1]}
  local pre="$OUT/${m}_needle_L1024_d0.2_r2-4"
  # shellcheck disable=SC2086
  step "${pre}_none-streaming.json" "$BIN" eval needle -m "$g" -t "$THREADS" --filler "$EVAL" --format "${FORMAT[$m]:-chat}" \
    --lengths 1024 --depths 0.2 --trials 10 --ratio 2,4 --policy none,streaming ${TUNED_FLAGS[$m]} --json "${pre}_none-streaming.json"
  # shellcheck disable=SC2086
  step "${pre}_keydiff.json" "$BIN" eval needle -m "$g" -t "$THREADS" --filler "$EVAL" --format "${FORMAT[$m]:-chat}" \
    --lengths 1024 --depths 0.2 --trials 10 --ratio 2,4 --policy keydiff ${TUNED_FLAGS[$m]} --recency 0 --json "${pre}_keydiff.json"
  step "${pre}_knorm-qfilters.json" "$BIN" eval needle -m "$g" -t "$THREADS" --filler "$EVAL" --format "${FORMAT[$m]:-chat}" \
    --lengths 1024 --depths 0.2 --trials 10 --ratio 2,4 --policy knorm,qfilters --filters "$(tuned "$m")" --json "${pre}_knorm-qfilters.json"
}

# Most important first: the bar's model (Qwen) and its perplexity, then its passkey cell at 2x,
# then SmolLM2, Gemma, and the rest of the passkey grid (keys in the first half: depths 0.1-0.4,
# lengths 1K-4K, ratios 2x and 4x, 10 documents per cell).
prepare qwen05
ppl qwen05
passkey qwen05 1024 0.2 2 qfilters
passkey qwen05 1024 0.2 2 streaming
passkey qwen05 1024 0.2 2 none
prepare smollm2
ppl smollm2
passkey qwen05 1024 0.2 2 knorm
passkey qwen05 1024 0.2 4 streaming,qfilters,knorm
passkey smollm2 1024 0.2 2,4 none,streaming,knorm,qfilters
for m in smollm2 qwen05; do keydiff "$m"; done
keydiff_passkey smollm2 0.2
keydiff_passkey qwen05 0.2
needle smollm2
needle qwen05
keydiff_passkey qwen05 0.1
keydiff_passkey qwen05 0.3
expected_attention qwen05
expected_attention smollm2
for m in smollm2 qwen05; do ea_keydiff "$m"; done
for m in smollm2 qwen05; do keydiff_live "$m"; done
# Gemma only where it was fetched (scripts/fetch-model.sh gemma3); always listed.
has_gemma() { [ "${LIST:-0}" = 1 ] || [ -f "${GGUF[gemma3]}" ]; }
if has_gemma; then
  prepare gemma3 && ppl gemma3
  keydiff gemma3
  expected_attention gemma3
  ea_keydiff gemma3
  passkey gemma3 1024 0.2 2,4 none,streaming,knorm,qfilters
  keydiff_passkey gemma3 0.2
  needle gemma3
  keydiff_live gemma3
  mix_retrieval gemma3
fi
for m in smollm2 qwen05; do mix_retrieval "$m"; done
frontier smollm2 2047 224,480,992
frontier qwen05 1023 224,480
if has_gemma; then frontier gemma3 2047 224,480,992; fi
# The retrieval frontier: passkey rate against KV MiB, full cache and eviction at 2x on f16, q8_0
# and q4_0 caches, on the model whose full cache finds the key (Qwen). KeyDiff (needs no filters,
# best of the policies on this test) at its tuned window, without a recency prior.
passkey_frontier() { # model
  local m=$1 json="$OUT/$1_frontier_passkey.json"
  # shellcheck disable=SC2086
  step "$json" "$BIN" eval passkey -m "${GGUF[$m]}" -t "$THREADS" --filler "$DEV" --format "${FORMAT[$m]:-chat}" \
    --lengths 1024 --depths 0.2 --trials 10 --ratio 2 --policy none,streaming,keydiff ${TUNED_FLAGS[$m]} --recency 0 \
    -ctk f16,q8_0,q4_0 -ctv f16,q8_0,q4_0 --json "$json" --frontier "$OUT/$1_frontier_passkey.svg"
}
passkey_frontier qwen05
for m in qwen05 smollm2; do
  for len in 1024 2048 4096; do
    for depth in 0.1 0.2 0.3 0.4; do
      [ "$len/$depth" = 1024/0.2 ] && continue
      passkey "$m" "$len" "$depth" 2,4 none,streaming,knorm,qfilters
    done
  done
done
[ "${LIST:-0}" = 1 ] && exit 0
python3 scripts/results_tables.py "$OUT" > docs/RESULTS.md
echo "wrote docs/RESULTS.md" >&2
