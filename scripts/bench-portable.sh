#!/usr/bin/env bash
# The price of the portable default build: prefill and decode speed of the default build
# (runtime dispatch: ggml loads the CPU variant that fits this CPU, never an AMX one) against
# `--features native` (-march=native, AMX off) on this machine, interleaved in one run, one
# thread, full cache (nothing evicted), so only ggml's kernels differ.
# Usage: scripts/bench-portable.sh [REPS]   (or REPS=N scripts/bench-portable.sh)
# Builds both binaries first (into target/qfilters-native and target/qfilters-default; the
# default one finds its CPU variants in the build folder, see src/ffi/cpu_backend.rs).
set -euo pipefail
cd "$(dirname "$0")/.."
reps=${1:-${REPS:-5}}
cargo build --release --quiet --features native
cp target/release/qfilters target/qfilters-native
cargo build --release --quiet
cp target/release/qfilters target/qfilters-default
model=models/SmolLM2-135M-Instruct.Q4_1.gguf
data=${QFILTERS_DATA_DIR:-../shared/data}
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
head -c 8000 "$data/wikitext2-valid.txt" > "$out/prompt.txt"
echo "machine: $(nproc) CPUs, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)," \
  "flags: $(grep -m1 -o -w 'avx512f\|amx_tile' /proc/cpuinfo | sort -u | xargs)"
for build in default native; do echo "$build: $("target/qfilters-$build" --version)"; done
echo "uptime before: $(uptime)"
for rep in $(seq "$reps"); do
  for build in default native; do
    "target/qfilters-$build" run -m "$model" -f "$out/prompt.txt" -n 128 --policy none -t 1 \
      --json-stats "$out/s.json" > /dev/null 2>&1
    python3 - "$out/s.json" "$build" "$rep" "$(cut -d' ' -f1 /proc/loadavg)" >> "$out/rows.tsv" <<'PY'
import json, sys
s = json.load(open(sys.argv[1]))
print("\t".join([sys.argv[2], sys.argv[3], f'{s["prefill_tok_s"]:.1f}', f'{s["decode_tok_s"]:.1f}', sys.argv[4]]))
PY
    tail -1 "$out/rows.tsv"
  done
done
python3 - "$out/rows.tsv" <<'PY'
import sys, statistics as st
rows = [l.split("\t") for l in open(sys.argv[1])]
m = {b: (st.median(float(r[2]) for r in rows if r[0] == b), st.median(float(r[3]) for r in rows if r[0] == b)) for b in ("default", "native")}
print("\nbuild     prefill tok/s  decode tok/s   (medians, one thread)")
for b, (p, d) in m.items():
    print(f"{b:9} {p:13.1f} {d:13.1f}")
print(f"default / native: prefill {m['default'][0] / m['native'][0]:.3f}, decode {m['default'][1] / m['native'][1]:.3f}")
PY
echo "uptime after: $(uptime)"
