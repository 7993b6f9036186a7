#!/usr/bin/env bash
# The test command: fetches the test model if needed, then runs every test of the workspace and
# closes with one summary line.
# Usage: scripts/test.sh [extra cargo test arguments]
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
scripts/fetch-model.sh
# The second architecture some tests need (qwen2: QKV bias, ChatML), 491 MB.
scripts/fetch-model.sh qwen05
log=$(mktemp)
trap 'rm -f "$log"' EXIT
status=0
cargo test --release --workspace --all-targets "$@" 2>&1 | tee "$log" || status=$?
# Sum the per-binary counts into the plain closing line CI reads.
read -r passed failed < <(awk '/^test result:/ {
  for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i }
} END { print p + 0, f + 0 }' "$log")
echo
echo "tests: $passed passed, $failed failed"
exit $status
