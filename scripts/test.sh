#!/usr/bin/env bash
# The test command: fetches the test model if needed, then runs every test of the workspace.
# Usage: scripts/test.sh [extra cargo test arguments]
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/fetch-model.sh
cargo test --release --workspace "$@"
