#!/usr/bin/env bash
# "Across machines" in docs/BENCHMARKS.md: SmolLM2 on one machine against the same run split
# over two `qfilters rpc-server` processes on loopback (-ngl 20: layers 0-10 local, 11-20 on
# the first server, 21-29 and the output layer on the second), full cache and Q-Filters-style
# eviction (knorm: no filters needed) at budget 256; knorm also with every layer and the
# output on the first server (one-host: --rpc A -ngl 99).
# Prints one line per run: policy, layout, prompt tokens, prefill and decode tok/s, evicted,
# the bytes qfilters copied between host and cache for eviction (both ways, per round, and the
# copies per round: --json-stats' eviction_*), and whether the text matches the local run's.
# knorm also runs locally with --key-source host (the reference path), and once more per layout
# with -n 1: the difference from the -n 32 run is what the 31 decoded tokens cost each.
# Usage: scripts/rpc-bench.sh [chars of tinyshakespeare, default 9000]
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${QFILTERS_BIN:-target/release/qfilters}
DATA=${QFILTERS_DATA_DIR:-../shared/data}
MODEL=models/SmolLM2-135M-Instruct.Q4_1.gguf
tmp=$(mktemp -d)
pids=()
trap 'kill "${pids[@]}" 2>/dev/null; rm -rf "$tmp"' EXIT
head -c "${1:-9000}" "$DATA/tinyshakespeare.txt" > "$tmp/prompt.txt"
hosts=
for port in 50071 50072; do
  "$BIN" rpc-server --port "$port" -t 1 > /dev/null 2>&1 &
  pids+=($!)
  hosts=${hosts:+$hosts,}127.0.0.1:$port
done
sleep 2
echo "machine: $(lscpu | sed -n 's/^Model name: *//p'), $(nproc) cores; $("$BIN" --version)"
run() { # policy layout tokens -> $tmp/policy-layout[-n1].json
  local extra=()
  case "$2" in
    split) extra=(--rpc "$hosts" -ngl 20) ;;
    local-host) extra=(--key-source host) ;;
    one-host) extra=(--rpc "${hosts%%,*}" -ngl 99) ;;
  esac
  local out="$tmp/$1-$2.json"
  [ "$3" = 1 ] && out="$tmp/$1-$2-n1.json"
  "$BIN" run -m "$MODEL" -f "$tmp/prompt.txt" -n "$3" -t 1 --policy "$1" --budget 256 \
    --json-stats "$out" "${extra[@]}" > /dev/null 2>&1
}
for policy in none knorm; do
  layouts=(local split)
  [ "$policy" = knorm ] && layouts=(local local-host split one-host)
  for layout in "${layouts[@]}"; do
    run "$policy" "$layout" 32
    python3 - "$tmp/$policy-$layout.json" "$tmp/$policy-local.json" "$policy" "$layout" <<'PY'
import json, sys
s, ref = (json.load(open(p)) for p in sys.argv[1:3])
rounds = max(s['eviction_rounds'], 1)
print(f"{sys.argv[3]:6} {sys.argv[4]:10} prompt {s['prompt_tokens']} | prefill {s['prefill_tok_s']:.1f} tok/s | "
      f"decode {s['decode_tok_s']:.1f} tok/s | evicted {s['evicted']} | KV {s['kv_bytes'] / 2**20:.1f} MiB | "
      f"eviction {s['eviction_rounds']} rounds, {s['eviction_bytes_per_round'] / 1e3:.1f} kB/round "
      f"({s['eviction_bytes_to_host'] / 1e6:.2f} MB to host, {s['eviction_bytes_to_device'] / 1e6:.2f} MB to device), "
      f"{s['eviction_transfers'] / rounds:.0f} copies/round | "
      f"text {'same as local' if s['text'] == ref['text'] else 'DIFFERS'}")
PY
  done
done
for layout in local local-host split one-host; do
  run knorm "$layout" 1
  python3 - "$tmp/knorm-$layout.json" "$tmp/knorm-$layout-n1.json" "$layout" <<'PY'
import json, sys
a, b = (json.load(open(p)) for p in sys.argv[1:3])
n = a['generated_tokens'] - b['generated_tokens']
d = lambda k: (a[k] - b[k]) / n
print(f"knorm  {sys.argv[3]:10} per decoded token ({n}): {d('eviction_rounds'):.2f} rounds, "
      f"{d('eviction_bytes_to_host') / 1e3:.2f} kB to host, {d('eviction_bytes_to_device') / 1e3:.2f} kB to device, "
      f"{d('eviction_transfers'):.0f} copies, {d('head_slices_moved'):.0f} head slices moved")
PY
done
