#!/usr/bin/env bash
# Install megatron-timeexpert and its development extras into ./.venv.
#
#   bash launch/install.sh            # CPU machine: torch 2.13.0 CPU build, megatron-core 0.16.1, PyAV, DALI
#   WITH_DALI=0 bash launch/install.sh  # skip the optional NVIDIA DALI wheel (its tests then skip)
#
# Idempotent: a second run only checks that everything is there.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
# pip install, quiet, without this machine's "Location ... is ignored" index warnings; keeps pip's status.
pipq() { python -m pip install -q "$@" 2>&1 | { grep -v "^WARNING: Location" || true; }; return "${PIPESTATUS[0]}"; }
pipq --upgrade pip
if ! python -c "import torch" 2>/dev/null; then
  # On CPU machines this resolves to the local CPU build; on GPU machines to the CUDA build.
  pipq torch==2.13.0
fi
pipq -e ".[dev]"
if [ "${WITH_DALI:-1}" = "1" ] && ! python -c "import nvidia.dali" 2>/dev/null; then
  pipq nvidia-dali-cuda120 || echo "install.sh: NVIDIA DALI did not install; the DALI decoder tests will be skipped"
fi
python - <<'PY'
import importlib.util, torch
from megatron.core import package_info
extras = {name: importlib.util.find_spec(mod) is not None
          for name, mod in [("dali", "nvidia.dali"), ("transformer-engine", "transformer_engine"), ("apex", "apex"), ("av", "av")]}
print(f"install.sh: torch {torch.__version__} (cuda={torch.cuda.is_available()}), megatron-core {package_info.__version__}, "
      + ", ".join(f"{k}={'yes' if v else 'no'}" for k, v in extras.items()))
PY
