#!/usr/bin/env bash
# GPU benchmark for a machine with an NVIDIA GPU, the CUDA toolkit, CMake, Ninja and g++, but no
# Rust toolchain and no network. Run from a folder ("pack") made on a CPU machine by
# scripts/make-devpack.sh, holding:
#   qfilters, gguf-tools   Rust binaries linked against llama.cpp as shared libraries
#   llama.cpp/             the same (patched, see vendor/patches) llama.cpp source, trimmed
#   device-bench.sh        this script
# It builds libllama + ggml with CUDA for one architecture from that source, points the binaries
# at them through LD_LIBRARY_PATH, makes random-weight Q4_K models with `gguf-tools synth`
# (all cores, while the build runs), and runs:
#   1. checks (the test binaries need Rust, so the checks are hidden `qfilters bench` modes):
#      check-keys: cache key path vs graph path (Kcur nodes), and device scoring vs host
#      scoring, qfilters and knorm; check-moves: per-head eviction's head-slice moves against a
#      cache that never evicts. A missing llama_synchronize shows up here, and only on a GPU;
#   2. CUDA-graph reuse: llama.cpp's debug log over 64 decodes with the hook on (the patch keeps
#      split uids, so about one "CUDA Graph id … reused" per decode is expected);
#   3. hook overhead: `qfilters bench --compare --reps 5`, hook off vs on, budget = input
#      (nothing evicted, same live cells), 1B shape and full 32-layer 8B shape;
#   3b. keydiff-live's re-score of the live cells as one graph on the GPU, against knorm at
#      equal cells (1B shape, budget prompt/4, eviction every token);
#   4. long-context win: 8B shape, a 32K-token stream, budget 4096 vs the full cache, with the
#      bandwidth bound (weights + live KV bytes per decode step).
# Logs and JSON go to $OUT (default /tmp/qf-out); one table is printed last.
# Aimed at ~8 minutes on one H100/H200 with 16 cores (the CUDA build alone is ~5 of them).
#
# Knobs (environment): QF_CUDA=0 builds for the CPU (to test this script without a GPU);
# QF_LLAMA_LIB=DIR skips the build and uses libraries already in DIR; QF_SMALL=1 shrinks every
# workload to a smoke test; QF_ARCH (default 90: H100/H200); QF_TYPE (default q4_k);
# QF_REPS (default 5); QF_JOBS (default 18); QF_STEP_TIMEOUT seconds per step (default 150).

set -u
PACK=$(cd "$(dirname "$0")" && pwd)
OUT=${OUT:-/tmp/qf-out}
WORK=${QF_WORK:-/tmp/qf-work}
mkdir -p "$OUT" "$WORK"
CUDA=${QF_CUDA:-1}
SMALL=${QF_SMALL:-0}
ARCH=${QF_ARCH:-90}
JOBS=${QF_JOBS:-18}
TYPE=${QF_TYPE:-q4_k}
REPS=${QF_REPS:-5}
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
say "qfilters: $("$PACK/qfilters" --version)"

# Models first, in the background (all cores, mostly disk-bound): they overlap with the build.
if [ "$SMALL" = 1 ]; then
    SHAPE1=tiny; SHAPE8=tiny; TYPE=${QF_TYPE:-q4_0}   # tiny is 64 wide: no 256-value Q4_K blocks
else
    SHAPE1=1b; SHAPE8=8b
fi
M1="$WORK/m-$SHAPE1-$TYPE.gguf"
M8="$WORK/m-$SHAPE8-$TYPE-s1.gguf"
(TIMEFORMAT="synth $SHAPE1 $TYPE: %R s"; time "$PACK/gguf-tools" synth --shape "$SHAPE1" --type "$TYPE" -o "$M1" &&
 TIMEFORMAT="synth $SHAPE8 $TYPE (32 layers): %R s"; time "$PACK/gguf-tools" synth --shape "$SHAPE8" --type "$TYPE" --seed 1 -o "$M8") >"$OUT/synth.txt" 2>&1 &
PS=$!

if [ -n "${QF_LLAMA_LIB:-}" ]; then
    LIB="$QF_LLAMA_LIB"
    say "using prebuilt llama.cpp libraries in $LIB"
else
    BUILD="$WORK/llama-build"
    say "configuring llama.cpp (CUDA=$CUDA, arch $ARCH)"
    cmake -S "$PACK/llama.cpp" -B "$BUILD" -G Ninja -DCMAKE_BUILD_TYPE=Release \
        -DGGML_CUDA=$([ "$CUDA" = 1 ] && echo ON || echo OFF) -DCMAKE_CUDA_ARCHITECTURES="$ARCH" \
        -DGGML_NATIVE=OFF -DBUILD_SHARED_LIBS=ON -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_APP=OFF -DLLAMA_BUILD_TESTS=OFF \
        -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_COMMON=OFF -DLLAMA_CURL=OFF \
        -DLLAMA_OPENSSL=OFF -DGGML_OPENMP=OFF >"$OUT/build.log" 2>&1 || { tail -30 "$OUT/build.log"; say "cmake configure failed"; exit 1; }
    say "building target llama (-j$JOBS)"
    cmake --build "$BUILD" --target llama -j "$JOBS" >>"$OUT/build.log" 2>&1 || { tail -40 "$OUT/build.log"; say "llama.cpp build failed"; exit 1; }
    LIB="$BUILD/bin"
    tail -3 "$OUT/build.log" >"$OUT/build-tail.txt"; mv "$OUT/build-tail.txt" "$OUT/build.log"
    say "built: $(ls "$LIB" | tr '\n' ' ')"
fi
export LD_LIBRARY_PATH="$LIB${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"

wait $PS
say "$(grep synth "$OUT/synth.txt" | tr '\n' ' ')"
[ -s "$M1" ] && [ -s "$M8" ] || { cat "$OUT/synth.txt"; say "synth failed"; exit 1; }

Q="$PACK/qfilters"
run() { # name, args...: one bench, stdout+stderr into the log, JSON into $OUT/<name>.json
    local name=$1; shift
    say "qfilters bench $* (-> $name.json)"
    timeout "${QF_STEP_TIMEOUT:-150}" "$Q" bench -ngl "$NGL" --json "$OUT/$name.json" "$@" 2>&1 | tee -a "$LOG"
    local rc=${PIPESTATUS[0]}
    echo "$rc" >"$OUT/$name.rc"
    say "$name: exit $rc"
}

if [ "$SMALL" = 1 ]; then
    P=256; G=32; LP=1024; LG=64; LB=256; LR=2; REPS=${QF_REPS:-2}
else
    P=4096; G=256; LP=32512; LG=256; LB=4096; LR=3
fi
# 1. Checks on this backend.
run check-keys-knorm -m "$M1" --check-keys --policy knorm --prompt 512 --gen 32
run check-keys-qfilters -m "$M1" --check-keys --policy qfilters --prompt 512 --gen 32
run check-moves -m "$M1" --check-moves --prompt 160 --budget 48
# 2. CUDA-graph reuse over 64 decodes, hook on (llama.cpp's debug log, through --verbose).
say "CUDA-graph reuse: 64 decodes, hook on"
timeout "${QF_STEP_TIMEOUT:-150}" "$Q" bench -ngl "$NGL" -m "$M1" --prompt 64 --gen 64 --reps 1 --tail 0 --verbose >"$OUT/graph-reuse.log" 2>&1
echo "$?" >"$OUT/graph-reuse.rc"
grep -c "CUDA Graph id [0-9]* reused" "$OUT/graph-reuse.log" >"$OUT/graph-reuse.txt"
say "CUDA graphs reused: $(cat "$OUT/graph-reuse.txt") in 64 decodes (+1 prompt batch)"
# 3. Hook overhead at equal live cells (budget = input, nothing evicted).
run overhead-1b -m "$M1" --compare --prompt $P --gen $G --reps "$REPS"
run overhead-8b -m "$M8" --compare --prompt $P --gen $G --reps "$REPS"
# 3b. keydiff-live's re-score of the live cells, one graph on the GPU (LiveReduce::MeanDirection),
# against knorm at equal cells: eviction every token (--slack 0), a re-score per budget/16 tokens.
RB=$((P / 4 > 128 ? P / 4 : 128))   # above the default window (64) + sinks
run rescore-knorm-1b -m "$M1" --compare --prompt $P --gen $G --budget $RB --slack 0 --reps 2 --policy knorm
run rescore-live-1b -m "$M1" --compare --prompt $P --gen $G --budget $RB --slack 0 --reps 2 --policy keydiff-live
# 4. The long-context win: a 32K-token stream, budget 4096 vs the full cache.
run long-8b -m "$M8" --compare --prompt $LP --gen $LG --budget $LB --slack 32 --reps $LR --batch 256
# 5. The same on a q8_0 K and V cache (both arms; llama.cpp's -ctk/-ctv): does the win survive
# quantization? Per-head eviction copies whole q8_0 blocks (a host round trip per slice).
run long-8b-q8 -m "$M8" --compare --prompt $LP --gen $LG --budget $LB --slack 32 --reps $LR --batch 256 -ctk q8_0 -ctv q8_0

say "done"
python3 - "$OUT" "$TYPE" <<'EOF' | tee "$OUT/summary.txt"
import json, os, sys
out, wtype = sys.argv[1], sys.argv[2]
def load(n):
    try:
        return json.load(open(os.path.join(out, n + ".json")))
    except Exception:
        return None
def rc(n):
    try:
        return open(os.path.join(out, n + ".rc")).read().strip()
    except Exception:
        return "?"
gpu = open(os.path.join(out, "gpu.txt")).read().strip() if os.path.exists(os.path.join(out, "gpu.txt")) else "CPU"
print(f"\n== qfilters device bench: {gpu}; synth models, {wtype} weights")
for n in ["check-keys-knorm", "check-keys-qfilters"]:
    ck = load(n)
    if ck:
        dh = ck.get("device_vs_host", {})
        print(f"{n}: exit {rc(n)} | cache vs graph: {ck['compared']} slots, max rel {ck['max_rel_diff']:.5f} | "
              f"device vs host: max rel {dh.get('max_rel_diff', float('nan')):.6f} | device scoring batches {ck.get('device_score_batches')} | "
              f"K-index reused after decode {ck['cells_reused_after_decode']}/{ck['decodes']}")
    else:
        print(f"{n}: exit {rc(n)}, no result")
cm = load("check-moves")
if cm:
    print(f"check-moves: exit {rc('check-moves')} | {cm['checked']} slots, {cm['moved']} moved, max |d| {cm['max_abs_diff']:.6f}, "
          f"{cm['head_slices_moved']} slices in {cm['device_move_rounds']} device rounds")
else:
    print(f"check-moves: exit {rc('check-moves')}, no result")
try:
    reuse = open(os.path.join(out, "graph-reuse.txt")).read().strip()
except Exception:
    reuse = "?"
print(f"CUDA graphs reused in 64 decodes (hook on): {reuse}  (exit {rc('graph-reuse')})")
print()
hdr = ["run", "prompt", "gen", "budget", "prefill off", "on", "ratio", "decode off", "on", "ratio", "tail ratio", "bound", "share", "KV MiB off", "on", "goal"]
rows = []
for n in ["overhead-1b", "overhead-8b", "long-8b", "long-8b-q8"]:
    j = load(n)
    if not j:
        rows.append([n, f"no result (exit {rc(n)})"]); continue
    mib = lambda b: b / 1048576
    if j["evicting"]:
        ok = j["tail_decode_ratio"] >= 1.5 and j.get("tail_decode_share_of_bound", 0) >= 0.9 and j["prefill_ratio"] >= 1.0 and j["kv_bytes_ratio"] >= 7
        goal = ("MET" if ok else "not met") + " (tail >=1.5x, >=0.9 of bound, prefill >=1.0x, KV /7)"
    else:
        ok = j["decode_ratio"] >= 0.97 and j["prefill_ratio"] >= 0.95
        goal = ("MET" if ok else "not met") + " (decode >=0.97, prefill >=0.95)"
    rows.append([n, j["prompt"], j["gen"], j["budget"], f"{j['prefill_tok_s_off']:.1f}", f"{j['prefill_tok_s_on']:.1f}", f"{j['prefill_ratio']:.3f}",
                 f"{j['decode_tok_s_off']:.1f}", f"{j['decode_tok_s_on']:.1f}", f"{j['decode_ratio']:.3f}", f"{j['tail_decode_ratio']:.3f}",
                 f"{j.get('bandwidth_bound', 0):.2f}", f"{j.get('tail_decode_share_of_bound', 0):.2f}",
                 f"{mib(j['kv_bytes_off']):.1f}", f"{mib(j['kv_bytes_on']):.1f}", goal])
print("| " + " | ".join(hdr) + " |")
print("|" + "---|" * len(hdr))
for r in rows:
    print("| " + " | ".join(str(x) for x in r) + " |")
print("ratio = on/off (median of reps); tail = last 64 decode steps; bound = (weights + live KV bytes per step) full / budgeted; "
      "share = tail ratio / bound; overhead runs: budget = input, nothing evicted")
k, l = load("rescore-knorm-1b"), load("rescore-live-1b")
if k and l:
    print(f"keydiff-live (re-score on the device) against knorm, budget {l['budget']}, slack 0: decode on/off "
          f"{l['decode_ratio']:.3f} vs {k['decode_ratio']:.3f}, cost {100 * (k['decode_ratio'] / l['decode_ratio'] - 1):+.1f} % "
          f"(on-arm {l['decode_tok_s_on']:.1f} vs {k['decode_tok_s_on']:.1f} tok/s)")
else:
    print(f"keydiff-live re-score: no result (exit {rc('rescore-knorm-1b')}, {rc('rescore-live-1b')})")
EOF
