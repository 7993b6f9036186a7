#!/usr/bin/env bash
# Makes devpack/ (gitignored) for scripts/device-bench.sh: the Rust binaries linked against
# llama.cpp as shared libraries, the llama.cpp source trimmed to what a CUDA build needs, and the
# script. The GPU machine builds its own CUDA libraries from that source and runs the binaries
# with LD_LIBRARY_PATH pointing at them.
#   LLAMA_CPP_DIR   llama.cpp source (default: vendor/llama.cpp-0.1.161, the pinned one)
#   GGUF_TOOLS      a built gguf-tools binary (default: build this workspace's gguf-tools)
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
SRC=${LLAMA_CPP_DIR:-$ROOT/vendor/llama.cpp-0.1.161}
[ -f "$SRC/include/llama.h" ] || { echo "make-devpack: no llama.cpp source at $SRC (set LLAMA_CPP_DIR)"; exit 1; }
# Separate target dir: the shared-library build must not replace the default static one.
export CARGO_TARGET_DIR=${DEVPACK_TARGET_DIR:-$ROOT/target/dyn}
env -u QFILTERS_LLAMA_LIB_DIR LLAMA_CPP_DIR="$SRC" cargo build --release --features dynamic-link --bin qfilters
if [ -z "${GGUF_TOOLS:-}" ]; then
    cargo build --release -p gguf-tools
    GGUF_TOOLS=$CARGO_TARGET_DIR/release/gguf-tools
fi
rm -rf devpack && mkdir -p devpack
cp "$CARGO_TARGET_DIR/release/qfilters" "$GGUF_TOOLS" devpack/
strip devpack/qfilters devpack/gguf-tools 2>/dev/null || true
cp scripts/device-bench.sh devpack/
cp -a "$SRC" devpack/llama.cpp
cd devpack/llama.cpp
rm -rf docs models tests examples gguf-py pocs ci grammars common README.md .qfilters-sha256 .git
find tools -mindepth 1 -maxdepth 1 -type d -exec rm -rf {} +
find . -maxdepth 1 -name '*.py' -delete
for b in vulkan sycl opencl metal cann hexagon musa hip webgpu openvino zdnn zendnn virtgpu et rpc blas; do
    rm -rf "ggml/src/ggml-$b"
done
cd "$ROOT"
echo "devpack: $(du -sh devpack | cut -f1) ($(du -sh devpack/llama.cpp | cut -f1) of llama.cpp source)"
