#!/usr/bin/env bash
# Makes devpack/ (gitignored) for scripts/device-bench.sh: the Rust binaries linked against
# llama.cpp as shared libraries, the llama.cpp source trimmed to what a CUDA build needs, and the
# script. The GPU machine builds its own CUDA libraries from that source and runs the binaries
# with LD_LIBRARY_PATH pointing at them.
#   LLAMA_CPP_DIR   llama.cpp source (default: vendor/llama.cpp-0.1.161, the pinned one, which
#                   build.rs patches with vendor/patches; a checkout of your own stays unpatched)
#   GGUF_TOOLS      a built gguf-tools binary (default: build this workspace's gguf-tools)
# The pack must stay under 64 MiB (what the GPU machine accepts); this script checks it.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
# Separate target dir: the shared-library build must not replace the default static one.
export CARGO_TARGET_DIR=${DEVPACK_TARGET_DIR:-$ROOT/target/dyn}
if [ -n "${LLAMA_CPP_DIR:-}" ]; then
    SRC=$LLAMA_CPP_DIR
    [ -f "$SRC/include/llama.h" ] || { echo "make-devpack: no llama.cpp source at $SRC (LLAMA_CPP_DIR)"; exit 1; }
    env -u QFILTERS_LLAMA_LIB_DIR cargo build --release --features dynamic-link --bin qfilters
else
    # The pinned source: build.rs unpacks and patches it; the pack carries that patched tree.
    env -u QFILTERS_LLAMA_LIB_DIR -u LLAMA_CPP_DIR cargo build --release --features dynamic-link --bin qfilters
    SRC=$ROOT/vendor/llama.cpp-0.1.161
    [ -f "$SRC/.qfilters-patches" ] || { echo "make-devpack: $SRC carries no patch stamp"; exit 1; }
fi
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
rm -rf docs models tests examples gguf-py pocs ci grammars common README.md .qfilters-sha256 .git media scripts
find tools -mindepth 1 -maxdepth 1 -type d -exec rm -rf {} +
find . -maxdepth 1 -name '*.py' -delete
for b in vulkan sycl opencl metal cann hexagon musa hip webgpu openvino zdnn zendnn virtgpu et rpc blas; do
    rm -rf "ggml/src/ggml-$b"
done
cd "$ROOT"
"$ROOT/devpack/qfilters" --version
KIB=$(du -sk devpack | cut -f1)
echo "devpack: $((KIB / 1024)) MiB ($(du -sh devpack/llama.cpp | cut -f1) of llama.cpp source)"
[ "$KIB" -lt $((64 * 1024)) ] || { echo "make-devpack: the pack is over 64 MiB"; exit 1; }
