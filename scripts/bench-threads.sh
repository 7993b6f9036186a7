#!/usr/bin/env bash
# Decode and prefill speed of the default thread settings against fixed thread counts, on an
# idle machine and with one busy process (`yes > /dev/null`) beside it. Runs are interleaved so
# that a change of load hits every setting alike; prints one line per run and a median table.
# Usage: scripts/bench-threads.sh [REPS]   (needs a release build and the default model)
set -euo pipefail
cd "$(dirname "$0")/.."
reps=${1:-3}
bin=target/release/qfilters
model=models/SmolLM2-135M-Instruct.Q4_1.gguf
data=${QFILTERS_DATA_DIR:-../shared/data}
out=$(mktemp -d)
trap 'kill ${hog:-} 2>/dev/null || true; rm -rf "$out"' EXIT
head -c 8000 "$data/wikitext2-valid.txt" > "$out/prompt.txt"
# name|flags: the default (no flag at all), then fixed settings a user could choose.
settings=("default|" "t1|-t 1" "t2|-t 2" "t2-poll50|-t 2 --poll 50")
echo "machine: $(nproc) CPUs, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
for load in idle busy; do
  hog=
  if [ "$load" = busy ]; then yes > /dev/null & hog=$!; sleep 1; fi
  for rep in $(seq "$reps"); do
    for s in "${settings[@]}"; do
      name=${s%%|*}; flags=${s#*|}
      # shellcheck disable=SC2086
      env -u QFILTERS_THREADS "$bin" run -m "$model" -f "$out/prompt.txt" -n 64 --policy knorm \
        --budget 256 $flags --json-stats "$out/s.json" > /dev/null 2>&1
      python3 - "$out/s.json" "$load" "$name" "$rep" "$(cut -d' ' -f1 /proc/loadavg)" >> "$out/rows.tsv" <<'PY'
import json, sys
s = json.load(open(sys.argv[1]))
print("\t".join([sys.argv[2], sys.argv[3], sys.argv[4], str(s["threads"]),
                 f'{s["prefill_tok_s"]:.1f}', f'{s["decode_tok_s"]:.1f}', sys.argv[5]]))
PY
      tail -1 "$out/rows.tsv"
    done
  done
  if [ -n "$hog" ]; then kill "$hog"; wait "$hog" 2>/dev/null || true; hog=; fi
done
python3 - "$out/rows.tsv" <<'PY'
import sys, statistics as st
rows = [l.rstrip("\n").split("\t") for l in open(sys.argv[1])]
print("\nload: 'idle' = nothing added, 'busy' = one `yes > /dev/null` beside it; loadavg = median 1-min load")
print("load  setting     threads  prefill tok/s  decode tok/s  decode vs -t 1  loadavg")
for load in ("idle", "busy"):
    med = {}
    for name in dict.fromkeys(r[1] for r in rows):
        sel = [r for r in rows if r[0] == load and r[1] == name]
        med[name] = ("/".join(sorted(set(r[3] for r in sel))), st.median(float(r[4]) for r in sel),
                     st.median(float(r[5]) for r in sel), st.median(float(r[6]) for r in sel))
    for name, (t, p, d, la) in med.items():
        print(f"{load:5} {name:11} {t:>7} {p:14.1f} {d:13.1f} {d / med['t1'][2]:14.2f} {la:8.2f}")
PY
