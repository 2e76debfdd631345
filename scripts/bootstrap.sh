#!/usr/bin/env bash
# Create .venv and install tether into it. Idempotent: a second run is fast.
#
# On a machine without an NVIDIA GPU the CPU build of torch is installed *first*, so that
# the plain `torch>=2.4` requirement is already satisfied and pip never pulls the
# multi-GB CUDA build. Order of sources for the CPU build:
#   1. a local wheel (pip's find-links, e.g. /opt/wheels), no network;
#   2. the PyTorch CPU wheel index.
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRAS="${1:-dev}"
PY="${PYTHON:-python3}"
VENV="${TETHER_VENV:-.venv}"

if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
PIP="$VENV/bin/python -m pip"

if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1; then
    $PIP install -q "torch>=2.4" "numpy>=1.24"
  else
    echo "[bootstrap] no NVIDIA GPU: installing the CPU build of torch first"
    # numpy with it: torch imported without numpy warns "Failed to initialize NumPy", which no user can act on
    $PIP install -q --only-binary=:all: "torch==2.13.0" "numpy>=1.24" 2>/dev/null \
      && "$VENV/bin/python" -c "import torch,sys; sys.exit(0 if '+cpu' in torch.__version__ or not torch.version.cuda else 1)" \
      || $PIP install -q --index-url https://download.pytorch.org/whl/cpu "torch>=2.4" "numpy>=1.24"
  fi
fi

stamp="$VENV/.tether-installed-$EXTRAS"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  $PIP install -q -e ".[$EXTRAS]"
  touch "$stamp"
fi
