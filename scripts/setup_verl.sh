#!/usr/bin/env bash
# Install verl's loss code beside tether's main environment, for the verl parity tests
# (tests/unit/test_verl_parity.py), which `make test` and `make test-verl` run.
#
# `pip install verl` into tether's venv is not possible: verl 0.9.1 pins transformers<5.11 (tether's
# venv has 5.24, which TRL 1.16 and the HF loader use) and pulls ray[default],
# wandb and tensorboard. What the parity tests import (verl.trainer.ppo.core_algos, rollout_corr_helper,
# verl.workers.config) needs only a few pure-Python packages plus tensordict and, by name only, ray, so
# they are installed --no-deps into a target folder (.venv-verl) that is put on PYTHONPATH *after* the
# repository (verl's wheel ships a top-level `tests` package, removed here so it cannot shadow ours).
#
# ray: verl's loss code only names ray.ObjectRef (verl.protocol). When tether's venv has ray (the `dist`
# extra) that one is used; otherwise scripts/verl_stubs/ray, a stand-in that provides ObjectRef and fails
# loudly on anything else, is copied in instead of the 240 MB wheel (docs/adapters.md has the numbers).
# TETHER_VERL_REAL_RAY=1 installs the real ray==2.60.0 instead.
# Idempotent: a second run checks the import and exits.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
TARGET="${TETHER_VERL_DIR:-.venv-verl}"
case "$TARGET" in /*) ;; *) TARGET="$PWD/$TARGET" ;; esac
check() { PYTHONPATH="$PWD:$TARGET" "$PY" -c "import verl.trainer.ppo.core_algos, verl.trainer.ppo.rollout_corr_helper, verl.workers.config" 2>/dev/null; }
if check; then
  echo "[setup_verl] $TARGET already provides verl's loss code"
  exit 0
fi
RAY=()
if [ "${TETHER_VERL_REAL_RAY:-0}" = 1 ]; then
  RAY=("ray==2.60.0")
fi
"$PY" -m pip install -q --no-deps --target "$TARGET" "verl==0.9.1" omegaconf "antlr4-python3-runtime==4.9.3" \
  hydra-core codetiming "tensordict==0.10.0" cloudpickle orjson dill pyvers msgpack jsonschema \
  jsonschema-specifications attrs referencing rpds-py ${RAY[@]+"${RAY[@]}"}
rm -rf "$TARGET/tests" "$TARGET/scripts"
if [ ${#RAY[@]} = 0 ] && ! "$PY" -c "import ray" 2>/dev/null; then
  rm -rf "$TARGET/ray"
  cp -r scripts/verl_stubs/ray "$TARGET/ray"
  echo "[setup_verl] ray: tether's stand-in (scripts/verl_stubs/ray; TETHER_VERL_REAL_RAY=1 for the real one)"
fi
check && echo "[setup_verl] ok: PYTHONPATH=$PWD:$TARGET"
