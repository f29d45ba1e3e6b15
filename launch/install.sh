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
python -m pip install -q --upgrade pip 2>&1 | grep -v "^WARNING: Location" || true
if ! python -c "import torch" 2>/dev/null; then
  # On CPU machines this resolves to the local CPU build; on GPU machines to the CUDA build.
  python -m pip install -q torch==2.13.0 2>&1 | grep -v "^WARNING: Location" || true
fi
python -m pip install -q -e ".[dev]" 2>&1 | grep -v "^WARNING: Location" || true
if [ "${WITH_DALI:-1}" = "1" ] && ! python -c "import nvidia.dali" 2>/dev/null; then
  python -m pip install -q nvidia-dali-cuda120 2>&1 | grep -v "^WARNING: Location" \
    || echo "install.sh: NVIDIA DALI did not install; the DALI decoder tests will be skipped"
fi
python - <<'PY'
import importlib.util, torch
from megatron.core import package_info
extras = {name: importlib.util.find_spec(mod) is not None
          for name, mod in [("dali", "nvidia.dali"), ("transformer-engine", "transformer_engine"), ("apex", "apex"), ("av", "av")]}
print(f"install.sh: torch {torch.__version__} (cuda={torch.cuda.is_available()}), megatron-core {package_info.__version__}, "
      + ", ".join(f"{k}={'yes' if v else 'no'}" for k, v in extras.items()))
PY
