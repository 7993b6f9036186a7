#!/usr/bin/env bash
# What a scorer costs at decode, against --policy knorm at equal cells: `qfilters bench
# --compare` (hook-off full cache, then the policy evicting to --budget) for each policy in
# POLICIES, in interleaved rounds (knorm, keydiff, …, knorm, keydiff, …) so that a change in the
# machine's load hits every policy alike. Each run's on/off decode ratio divides out the load of
# its own moment; a policy's cost is then its ratio over knorm's ratio of the same round, minus
# one (negative: faster than knorm); the same from the on-arm speeds alone is printed beside it.
# Prints one Markdown row per policy: per-round costs, medians, and the on-arm decode tok/s.
#
#   scripts/scorer-cost.sh                                             # SmolLM2
#   MODEL=models/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf ROUNDS=3 scripts/scorer-cost.sh
#
# Needs the release binary: cargo build --release. Policies that need filters get the model's
# embedded ones, else random unit filters (the same cost).
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=${MODEL:-models/SmolLM2-135M-Instruct.Q4_1.gguf}
BIN=${QFILTERS_BIN:-target/release/qfilters}
POLICIES=${POLICIES:-"knorm keydiff qfilters+keydiff"}
ROUNDS=${ROUNDS:-3}
# Eviction every generated token (slack 0), the most scoring rounds per token.
BENCH_ARGS=${BENCH_ARGS:-"--prompt 1024 --gen 256 --budget 256 --slack 0 --reps 1 -t 1"}
OUT=${OUT:-target/scorer-cost/$(basename "$MODEL" .gguf)}
[[ -x "$BIN" ]] || { echo "scorer-cost: $BIN missing; run cargo build --release" >&2; exit 1; }
[[ -f "$MODEL" ]] || { echo "scorer-cost: $MODEL missing" >&2; exit 1; }
mkdir -p "$OUT"
echo "model: $MODEL | bench --compare $BENCH_ARGS | $ROUNDS rounds | $(nproc) CPUs, load average at start $(cut -d' ' -f1-3 /proc/loadavg)"
for r in $(seq 1 "$ROUNDS"); do
    for p in $POLICIES; do
        echo "scorer-cost: round $r, $p" >&2
        # shellcheck disable=SC2086
        "$BIN" bench --compare -m "$MODEL" --policy "$p" $BENCH_ARGS \
            --json "$OUT/$r-$p.json" >"$OUT/$r-$p.log" 2>&1 </dev/null || {
            cat "$OUT/$r-$p.log" >&2
            exit 1
        }
    done
done
echo "load average at end $(cut -d' ' -f1-3 /proc/loadavg)"
python3 - "$OUT" "$ROUNDS" $POLICIES <<'EOF'
import json, statistics, sys
out, rounds, policies = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
get = lambda r, p: json.load(open(f"{out}/{r}-{p}.json"))
ref = policies[0]
print()
print(f"| policy | decode on/off per round | cost against {ref}, from on/off ratios | median | cost from on-arm tok/s | median | decode tok/s on (median) | evicted |")
print("|---|---|---|---:|---|---:|---:|---:|")
fmt = lambda xs, f: ", ".join(f % x for x in xs)
pct = lambda xs: fmt([100 * c for c in xs], "%+.1f %%")
for p in policies:
    ratios, costs, direct, speeds = [], [], [], []
    for r in range(1, rounds + 1):
        v, k = get(r, p), get(r, ref)
        ratios.append(v["decode_ratio"])
        costs.append(k["decode_ratio"] / v["decode_ratio"] - 1)
        direct.append(k["decode_tok_s_on"] / v["decode_tok_s_on"] - 1)
        speeds.append(v["decode_tok_s_on"])
    print(f"| {p} | {fmt(ratios, '%.3f')} | {pct(costs)} | {100 * statistics.median(costs):+.1f} % "
          f"| {pct(direct)} | {100 * statistics.median(direct):+.1f} % | {statistics.median(speeds):.2f} "
          f"| {get(1, p)['evicted_on']} |")
EOF
