#!/usr/bin/env bash
# A real inference engine for kvrouter's tests: llama.cpp's C++ `llama-server`, built from the
# llama.cpp source vendored in the pinned llama-cpp-python sdist on PyPI (Debian has no
# llama.cpp package), and a tiny random-weight llama GGUF with the real Llama-2 vocabulary
# (the vocab-only GGUF that ships in the same sdist).
#
#   scripts/real_engine.sh build    download the sdist, build llama-server (cached, idempotent)
#   scripts/real_engine.sh model    write the tiny model (cached, idempotent; builds nothing)
#   scripts/real_engine.sh path     print "<llama-server path> <model path>" (exit 1 if missing)
#   scripts/real_engine.sh all      build + model + path
#
# Cache: ${KVROUTER_ENGINE_CACHE:-$HOME/.cache/kvrouter/real-engines}/llama-cpp-python-<version>/
#   bin/llama-server    the binary (installed last, atomically: its presence means "built")
#   vocab/              the vocab-only GGUF copied out of the sdist
#   models/             the tiny model(s)
#   build.log           the last build's output
# A lock file per version serialises concurrent runs; the source and build trees are removed
# once the binary is installed. The binary is built with GGML_NATIVE=OFF, i.e. for the x86-64-v3
# set (SSE4.2, AVX, AVX2, BMI2, FMA, F16C; ggml's default without NATIVE, spelled out below)
# rather than -march=native, so that a cached copy runs on any machine of this kind, not only on
# the CPU that built it (KVROUTER_ENGINE_CPU_FLAGS overrides the -DGGML_* flags).
#
# Needs: cmake, ninja (or make), a C++17 compiler, and a Python with pip (the build step) and
# the `gguf` and `numpy` packages (the model step; both are in kvrouter's test extra).
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
VERSION=${KVROUTER_LLAMA_CPP_PY_VERSION:-0.3.36}
CACHE=${KVROUTER_ENGINE_CACHE:-$HOME/.cache/kvrouter/real-engines}
KEY="$CACHE/llama-cpp-python-$VERSION"
BIN="$KEY/bin/llama-server"
VOCAB="$KEY/vocab/ggml-vocab-llama-spm.gguf"
MODEL="$KEY/models/tiny-llama-spm-256x4.gguf"
JOBS=${KVROUTER_ENGINE_JOBS:-$(nproc)}
CPU_FLAGS=${KVROUTER_ENGINE_CPU_FLAGS:--DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON}

if [ -n "${PYTHON:-}" ]; then PY=$PYTHON
elif [ -x "$HERE/../.venv/bin/python" ]; then PY="$HERE/../.venv/bin/python"
else PY=python3; fi

LOG_TAG=real-engine
# shellcheck source=scripts/lib.sh
. "$HERE/lib.sh"

built() { [ -x "$BIN" ] && [ -s "$VOCAB" ]; }

build() {
  built && { log "llama-server cached: $BIN"; return; }
  lock "$KEY/.lock"
  built && { log "llama-server cached: $BIN (built by a concurrent run)"; return; }
  local tool
  for tool in cmake c++; do
    command -v "$tool" >/dev/null || die "$tool not found (Debian: apt-get install cmake ninja-build g++)"
  done
  local gen=(); command -v ninja >/dev/null && gen=(-G Ninja)
  local t0 work; t0=$(now)
  work="$KEY/work.$$"
  rm -rf "$KEY"/work.*            # leftovers of an interrupted run (we hold the lock)
  mkdir -p "$work"
  "$PY" -m pip download -q --no-deps --no-binary :all: "llama-cpp-python==$VERSION" -d "$work" \
    > "$work/download.log" 2>&1 || { cat "$work/download.log" >&2; die "cannot download the sdist"; }
  tar xzf "$work/llama_cpp_python-$VERSION.tar.gz" -C "$work"
  local src="$work/llama_cpp_python-$VERSION/vendor/llama.cpp"
  [ -f "$src/CMakeLists.txt" ] || die "no vendored llama.cpp in the sdist ($src)"
  log "sdist llama-cpp-python $VERSION fetched and unpacked in $(since "$t0") s"
  local t1; t1=$(now)
  log "building llama-server with $JOBS jobs (~6-12 minutes on 2 cores; progress in $KEY/build.log)"
  # shellcheck disable=SC2086  # CPU_FLAGS is a list of -D options
  if ! { nice -n 19 cmake -S "$src" -B "$work/build" "${gen[@]}" -DCMAKE_BUILD_TYPE=Release \
          -DBUILD_SHARED_LIBS=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
          -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_UI=OFF \
          -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF \
          -DGGML_NATIVE=OFF $CPU_FLAGS \
        && nice -n 19 cmake --build "$work/build" --target llama-server -j "$JOBS"; } \
        > "$KEY/build.log" 2>&1; then
    tail -40 "$KEY/build.log" >&2
    die "llama-server build failed (full log: $KEY/build.log)"
  fi
  mkdir -p "$KEY/bin" "$KEY/vocab"
  cp "$src/models/ggml-vocab-llama-spm.gguf" "$VOCAB.tmp" && mv "$VOCAB.tmp" "$VOCAB"
  cp "$work/build/bin/llama-server" "$BIN.tmp" && mv "$BIN.tmp" "$BIN"
  rm -rf "$work"
  "$BIN" --version > /dev/null 2>&1 || die "$BIN does not run"
  log "llama-server built in $(since "$t1") s ($(since "$t0") s with the download): $BIN"
}

model() {
  [ -s "$MODEL" ] && { log "model cached: $MODEL"; return; }
  [ -s "$VOCAB" ] || die "no vocabulary at $VOCAB: run '$0 build' first"
  lock "$KEY/.lock"
  [ -s "$MODEL" ] && return
  local t0; t0=$(now)
  mkdir -p "$KEY/models"
  "$PY" "$HERE/realengine/tiny_gguf.py" --vocab "$VOCAB" --out "$MODEL.tmp" \
    || die "cannot write the model (needs the gguf and numpy packages in $PY)"
  mv "$MODEL.tmp" "$MODEL"
  log "model written in $(since "$t0") s: $MODEL"
}

path() {
  [ -x "$BIN" ] || die "llama-server not built: run '$0 build'"
  [ -s "$MODEL" ] || die "model not written: run '$0 model'"
  echo "$BIN $MODEL"
}

case "${1:-}" in
  build) build ;;
  model) model ;;
  path) path ;;
  all) build; model; path ;;
  *) sed -n '2,10p' "$0" >&2; exit 2 ;;
esac
