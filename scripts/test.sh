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
# The third (gemma3: sliding-window layers), 253 MB.
scripts/fetch-model.sh gemma3
log=$(mktemp)
trap 'rm -f "$log"' EXIT
status=0
cargo test --release --workspace --all-targets "$@" 2>&1 | tee "$log" || status=$?
# Sum the per-binary counts into the plain closing line CI reads.
read -r passed failed < <(awk '/^test result:/ {
  for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i }
} END { print p + 0, f + 0 }' "$log")
# `qfilters serve` over HTTP with the official openai client (tests/server/test_serve.py), on
# the binary cargo test just built; it ends with `server tests: N passed, N failed`.
slog=$(mktemp)
trap 'rm -f "$log" "$slog"' EXIT
"${PYTHON:-python3}" tests/server/test_serve.py target/release/qfilters 2>&1 | tee "$slog" || status=1
read -r sp sf < <(awk '/^server tests:/ { p = $3; f = $5 } END { print p + 0, f + 0 }' "$slog")
# A script that died before its summary line counts as one failure.
grep -q '^server tests:' "$slog" || sf=$((sf + 1))
passed=$((passed + sp))
failed=$((failed + sf))
# docs.rs builds without network, cmake or a C++ compiler: build.rs's DOCS_RS branch makes the
# bindings from the headers alone. Checked as docs.rs runs it (own target folder; ~2 min the
# first time, seconds after), and counted as one test.
if DOCS_RS=1 RUSTDOCFLAGS="-D warnings" CARGO_TARGET_DIR=target/docs-rs \
  cargo doc --no-deps -p qfilters --quiet; then
  echo "docs.rs build: ok"
  passed=$((passed + 1))
else
  echo "docs.rs build: FAILED (DOCS_RS=1 cargo doc --no-deps -p qfilters)"
  failed=$((failed + 1))
  status=1
fi
echo
echo "tests: $passed passed, $failed failed"
exit $status
