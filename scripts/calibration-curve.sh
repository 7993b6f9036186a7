#!/usr/bin/env bash
# How much calibration do filters need? Calibrates a reference (REF_TOKENS tokens, REF_SAMPLES
# samples/layer), then each setting of SETTINGS, and prints one Markdown row per setting: its
# wall time (calibrate's own "in X s": model load, tokenizing, decoding, the eigenvectors) and
# the cosine of each (layer, KV head) filter with the reference's (`qfilters filters compare`):
# the smallest, the mean, and how many pairs fall below 0.99.
#
# The first row repeats the reference's setting with another seed: the noise floor of the
# reference itself (a different sample of the same tokens).
#
#   scripts/calibration-curve.sh                       # SmolLM2, tinyshakespeare, 2 threads
#   MODEL=models/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf scripts/calibration-curve.sh
#   SETTINGS="1024:1024 2048:1000" scripts/calibration-curve.sh   # tokens:samples pairs
#
# Needs the release binary: cargo build --release.
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=${MODEL:-models/SmolLM2-135M-Instruct.Q4_1.gguf}
TEXT=${TEXT:-${QFILTERS_DATA_DIR:-../shared/data}/tinyshakespeare.txt}
BIN=${QFILTERS_BIN:-target/release/qfilters}
THREADS=${THREADS:-2}
SEQ_LEN=${SEQ_LEN:-2048}
REF_TOKENS=${REF_TOKENS:-16384}
REF_SAMPLES=${REF_SAMPLES:-3000}
SETTINGS=${SETTINGS:-"512:512 1024:1000 2048:1000 2048:2000 4096:1000 4096:3000 8192:3000"}
# Seed of the settings' position sampling (the reference keeps seed 0): another seed shows how
# much a setting's agreement depends on which positions it happened to sample.
SEED=${SEED:-0}
# NOISE=0 leaves out the first row (a second reference-sized calibration).
NOISE=${NOISE:-1}
OUT=${OUT:-target/calibration-curve/$(basename "$MODEL" .gguf)}
[[ -x "$BIN" ]] || { echo "calibration-curve: $BIN missing; run cargo build --release" >&2; exit 1; }
[[ -f "$MODEL" ]] || { echo "calibration-curve: $MODEL missing" >&2; exit 1; }
[[ -f "$TEXT" ]] || { echo "calibration-curve: $TEXT missing" >&2; exit 1; }
mkdir -p "$OUT"

# calibrate TOKENS SAMPLES SEED OUTPUT: prints "wall s / CPU s" (calibrate's own wall time;
# user + system CPU time of the whole process, which a shared machine's load does not inflate).
calibrate() {
    local log="$4.log"
    # Kept from an earlier run of the same setting (delete $OUT to measure again).
    if [[ ! -f "$4" || ! -f "$log" || ! -f "$4.cpu" ]]; then
        run_calibrate "$@"
    fi
    echo "$(sed -n 's/.*) in \([0-9.]*\) s,.*/\1/p' "$log") / $(cat "$4.cpu")"
}

run_calibrate() {
    local log="$4.log"
    /usr/bin/time -f "%U %S" -o "$4.time" "$BIN" calibrate -m "$MODEL" --text "$TEXT" --tokens "$1" --samples "$2" --seed "$3" \
        --seq-len "$SEQ_LEN" -t "$THREADS" -o "$4" 2>"$log" </dev/null || {
        cat "$log" >&2
        exit 1
    }
    awk '{ printf "%.1f", $1 + $2 }' "$4.time" >"$4.cpu"
}

# row LABEL TOKENS SAMPLES SECONDS FILE: one table row against the reference.
row() {
    "$BIN" filters compare "$REF" "$5" --json | python3 -c '
import json, sys
v = json.load(sys.stdin)
n = sum(len(r) for r in v["cosines"])
w = v["worst"]
a = sys.argv[1:]
print("| %s | %s | %s | %s | %.4f (layer %d, head %d) | %.4f | %d of %d |" % (
    a[0], a[1], a[2], a[3], v["min"], w["layer"], w["kv_head"], v["mean"], v["below"], n))
' "$1" "$2" "$3" "$4"
}

mkdir -p "$OUT/ref"
REF="$OUT/ref/filters.safetensors"
echo "calibration-curve: reference ($REF_TOKENS tokens, $REF_SAMPLES samples)…" >&2
ref_secs=$(calibrate "$REF_TOKENS" "$REF_SAMPLES" 0 "$REF")

echo "model: $MODEL | text: $TEXT | seq-len $SEQ_LEN | -t $THREADS | $(nproc) CPUs, load average $(cut -d' ' -f1-3 /proc/loadavg)"
echo "reference: $REF_TOKENS tokens, $REF_SAMPLES samples/layer, seed 0, ${ref_secs} s (wall / CPU)"
echo
echo "| setting | tokens | samples/layer | seconds (wall / CPU) | min cosine (where) | mean cosine | below 0.99 |"
echo "|---|---:|---:|---:|---|---:|---:|"
if [[ "$NOISE" != 0 ]]; then
    dir="$OUT/seed1"
    mkdir -p "$dir"
    secs=$(calibrate "$REF_TOKENS" "$REF_SAMPLES" 1 "$dir/filters.safetensors")
    row "reference, seed 1" "$REF_TOKENS" "$REF_SAMPLES" "$secs" "$dir/filters.safetensors"
fi
for s in $SETTINGS; do
    tokens=${s%%:*}
    samples=${s##*:}
    dir="$OUT/$tokens-$samples-seed$SEED"
    mkdir -p "$dir"
    secs=$(calibrate "$tokens" "$samples" "$SEED" "$dir/filters.safetensors")
    row "seed $SEED" "$tokens" "$samples" "$secs" "$dir/filters.safetensors"
done
