#!/usr/bin/env bash
# GPU benchmark for a machine with an NVIDIA GPU, the CUDA toolkit, CMake, Ninja and g++, but no
# Rust toolchain and no network. Run from a folder ("pack") made on a CPU machine by
# scripts/make-devpack.sh, holding:
#   qfilters, gguf-tools   Rust binaries linked against llama.cpp as shared libraries
#   llama.cpp/             the same llama.cpp source, trimmed to what the CUDA build needs
#   device-bench.sh        this script
# It builds libllama + ggml with CUDA from that source, points the binaries at them through
# LD_LIBRARY_PATH, makes random-weight models with `gguf-tools synth`, and runs:
#   1. check-keys: the cheap key path (K cache rows read after llama_decode) against the graph
#      path (Kcur nodes), scores compared, on CUDA;
#   2. hook overhead: `qfilters bench --compare`, hook off vs on, budget >= input (no eviction,
#      same live cells), 1B shape and 8B shape (layers cut, see below);
#   3. long-context win: 8B shape, a 32K-token stream, budget 4096 vs the full cache.
# Logs and JSON go to $OUT (default /tmp/qf-out); a short table is printed last.
# Aimed at ~8 minutes on one H100 with 16 cores (the CUDA build alone is ~5 of them).
#
# Knobs (environment): QF_CUDA=0 builds for the CPU (to test this script without a GPU);
# QF_LLAMA_LIB=DIR skips the build and uses libraries already in DIR; QF_SMALL=1 shrinks every
# workload to a smoke test; QF_8B_LAYERS (default 8) layers of the 8B shape; QF_ARCH (default 90).

set -u
PACK=$(cd "$(dirname "$0")" && pwd)
OUT=${OUT:-/tmp/qf-out}
WORK=${QF_WORK:-/tmp/qf-work}
mkdir -p "$OUT" "$WORK"
CUDA=${QF_CUDA:-1}
SMALL=${QF_SMALL:-0}
L8=${QF_8B_LAYERS:-8}
ARCH=${QF_ARCH:-90}
JOBS=${QF_JOBS:-18}
LOG="$OUT/bench.log"
: >"$LOG"
T0=$(date +%s)
say() { echo "[$(($(date +%s) - T0)) s] $*" | tee -a "$LOG"; }

NGL=0
export PATH="$PATH:/usr/local/cuda/bin"
if [ "$CUDA" = 1 ]; then
    NGL=99
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader >"$OUT/gpu.txt" 2>&1
    say "GPU: $(cat "$OUT/gpu.txt")"
    say "nvcc: $(nvcc --version | tail -1)"
fi
say "CPU cores: $(nproc), disk free in $WORK: $(df -h "$WORK" | awk 'NR==2{print $4}')"

# Models first, in the background: synth is single-threaded and overlaps with the build.
if [ "$SMALL" = 1 ]; then
    SHAPE1=tiny; SHAPE8=tiny; L8ARG=""
else
    SHAPE1=1b; SHAPE8=8b; L8ARG="--layers $L8"
fi
M1="$WORK/m-$SHAPE1.gguf"
M8="$WORK/m-$SHAPE8-l$L8.gguf"
(TIMEFORMAT="synth $SHAPE1: %R s"; time "$PACK/gguf-tools" synth --shape "$SHAPE1" -o "$M1") >"$OUT/synth1.txt" 2>&1 &
P1=$!
# shellcheck disable=SC2086
(TIMEFORMAT="synth $SHAPE8 $L8ARG: %R s"; time "$PACK/gguf-tools" synth --shape "$SHAPE8" $L8ARG --seed 1 -o "$M8") >"$OUT/synth8.txt" 2>&1 &
P8=$!

if [ -n "${QF_LLAMA_LIB:-}" ]; then
    LIB="$QF_LLAMA_LIB"
    say "using prebuilt llama.cpp libraries in $LIB"
else
    BUILD="$WORK/llama-build"
    say "configuring llama.cpp (CUDA=$CUDA)"
    cmake -S "$PACK/llama.cpp" -B "$BUILD" -G Ninja -DCMAKE_BUILD_TYPE=Release \
        -DGGML_CUDA=$([ "$CUDA" = 1 ] && echo ON || echo OFF) -DCMAKE_CUDA_ARCHITECTURES="$ARCH" \
        -DBUILD_SHARED_LIBS=ON -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_APP=OFF -DLLAMA_BUILD_TESTS=OFF \
        -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_COMMON=OFF -DLLAMA_CURL=OFF \
        -DLLAMA_OPENSSL=OFF -DGGML_OPENMP=OFF >"$OUT/build.log" 2>&1 || { tail -30 "$OUT/build.log"; say "cmake configure failed"; exit 1; }
    say "building target llama (-j$JOBS)"
    cmake --build "$BUILD" --target llama -j "$JOBS" >>"$OUT/build.log" 2>&1 || { tail -40 "$OUT/build.log"; say "llama.cpp build failed"; exit 1; }
    LIB="$BUILD/bin"
    tail -3 "$OUT/build.log" >"$OUT/build-tail.txt"; mv "$OUT/build-tail.txt" "$OUT/build.log"
    say "built: $(ls "$LIB" | tr '\n' ' ')"
fi
export LD_LIBRARY_PATH="$LIB${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"

wait $P1; wait $P8
say "$(cat "$OUT/synth1.txt" | tail -2 | tr '\n' ' ')"
say "$(cat "$OUT/synth8.txt" | tail -2 | tr '\n' ' ')"
[ -s "$M1" ] && [ -s "$M8" ] || { say "synth failed"; exit 1; }

Q="$PACK/qfilters"
run() { # name, args...: one bench, stdout+stderr into the log, JSON into $OUT/<name>.json
    local name=$1; shift
    say "qfilters bench $* (-> $name.json)"
    timeout "${QF_STEP_TIMEOUT:-150}" "$Q" bench -ngl "$NGL" --json "$OUT/$name.json" "$@" 2>&1 | tee -a "$LOG"
    say "$name: exit ${PIPESTATUS[0]}"
}

if [ "$SMALL" = 1 ]; then
    P=256; G=32; LP=1024; LG=64; LB=256; R=2
else
    P=4096; G=256; LP=32512; LG=256; LB=4096; R=3
fi
# 1. The cheap key path against the graph path, on this backend.
run check-keys -m "$M1" --check-keys --policy knorm --prompt 512 --gen 32
# 2. Hook overhead at equal live cells (budget = input, nothing evicted).
run overhead-1b -m "$M1" --compare --prompt $P --gen $G --reps $R
run overhead-8b -m "$M8" --compare --prompt $P --gen $G --reps $R
# 3. The long-context win: a 32K-token stream, budget 4096 vs the full cache.
run long-8b -m "$M8" --compare --prompt $LP --gen $LG --budget $LB --slack 32 --reps 2 --batch 256

say "done"
python3 - "$OUT" <<'EOF' | tee "$OUT/summary.txt"
import json, os, sys
out = sys.argv[1]
def load(n):
    try:
        return json.load(open(os.path.join(out, n + ".json")))
    except Exception as e:
        return None
gpu = open(os.path.join(out, "gpu.txt")).read().strip() if os.path.exists(os.path.join(out, "gpu.txt")) else "CPU"
print(f"\n== qfilters device bench: {gpu}")
ck = load("check-keys")
if ck:
    print(f"check-keys (cache vs graph scores): {ck['compared']} slots, max |d| {ck['max_abs_diff']:.5f}, max rel {ck['max_rel_diff']:.5f}; "
          f"K-index input reused after decode in {ck['cells_reused_after_decode']}/{ck['decodes']} decodes")
else:
    print("check-keys: no result")
print(f"{'run':<12} {'prompt':>6} {'gen':>4} {'budget':>6} | {'prefill off':>11} {'on':>9} {'ratio':>6} | {'decode off':>10} {'on':>8} {'ratio':>6} | {'tail off':>8} {'on':>8} {'ratio':>6} | {'KV MiB off':>10} {'on':>7}")
for n in ["overhead-1b", "overhead-8b", "long-8b"]:
    j = load(n)
    if not j:
        print(f"{n:<12} no result"); continue
    mib = lambda b: b / 1048576
    print(f"{n:<12} {j['prompt']:>6} {j['gen']:>4} {j['budget']:>6} | {j['prefill_tok_s_off']:>11.1f} {j['prefill_tok_s_on']:>9.1f} {j['prefill_ratio']:>6.3f} | "
          f"{j['decode_tok_s_off']:>10.1f} {j['decode_tok_s_on']:>8.1f} {j['decode_ratio']:>6.3f} | {j['tail_decode_tok_s_off']:>8.1f} {j['tail_decode_tok_s_on']:>8.1f} {j['tail_decode_ratio']:>6.3f} | "
          f"{mib(j['kv_bytes_off']):>10.1f} {mib(j['kv_bytes_on']):>7.1f}")
print("ratio = on/off (median of reps); tail = last 64 decode steps; overhead runs: budget = input, nothing evicted")
EOF
