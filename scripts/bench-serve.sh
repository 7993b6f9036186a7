#!/usr/bin/env bash
# Load-test figures of `qfilters serve` for docs/BENCHMARKS.md: 200 chat requests (a short reply,
# max_tokens 4) from 8 concurrent clients against --parallel 2 --max-queue 4 --budget 128 on
# SmolLM2, one llama thread per slot. Prints the machine, the load before and after, the
# server's startup line (KV bytes reserved) and one line of figures: requests answered and
# refused, answered/s, p50/p95 latency, RSS after the first 20 requests, at the end and peak.
# It is the load test of tests/server/test_serve.py, run alone.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
scripts/fetch-model.sh
cargo build --release --quiet
echo "machine: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ *//'), $(nproc) CPUs, $(free -g | awk '/^Mem:/ {print $2}') GiB"
echo "before: $(uptime)"
SERVE_TESTS=test_bounded_load "${PYTHON:-python3}" tests/server/test_serve.py target/release/qfilters
echo "after: $(uptime)"
