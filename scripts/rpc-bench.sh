#!/usr/bin/env bash
# "Across machines" in docs/BENCHMARKS.md: SmolLM2 on one machine against the same run split
# over two `qfilters rpc-server` processes on loopback (-ngl 20: 10 layers local, 10 on each
# server), full cache and Q-Filters-style eviction (knorm: no filters needed) at budget 256.
# Prints one line per run: policy, layout, prompt tokens, prefill and decode tok/s, evicted,
# and whether the text matches the local run's.
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
for policy in none knorm; do
  for layout in local split; do
    extra=()
    [ "$layout" = split ] && extra=(--rpc "$hosts" -ngl 20)
    "$BIN" run -m "$MODEL" -f "$tmp/prompt.txt" -n 32 -t 1 --policy "$policy" --budget 256 \
      --json-stats "$tmp/$policy-$layout.json" "${extra[@]}" > /dev/null 2>&1
    python3 - "$tmp/$policy-$layout.json" "$tmp/$policy-local.json" "$policy" "$layout" <<'PY'
import json, sys
s, ref = (json.load(open(p)) for p in sys.argv[1:3])
print(f"{sys.argv[3]:6} {sys.argv[4]:6} prompt {s['prompt_tokens']} | prefill {s['prefill_tok_s']:.1f} tok/s | "
      f"decode {s['decode_tok_s']:.1f} tok/s | evicted {s['evicted']} | KV {s['kv_bytes'] / 2**20:.1f} MiB | "
      f"text {'same as local' if s['text'] == ref['text'] else 'DIFFERS'}")
PY
  done
done
