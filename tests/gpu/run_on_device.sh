#!/usr/bin/env bash
# One shot of the GPU tests on a fresh CUDA machine: a venv with the project and its `vllm` and `test` extras
# (pip picks the torch that vLLM pins), the quick zoo, then `pytest -m gpu tests/gpu`. About 6-9 minutes on
# an H100 with PyPI in reach, most of it the install. Logs and timings go to $OUT (default ./gpu-logs).
#   WHEELHOUSE=DIR  install from the wheels in DIR alone (a machine that reaches no package index)
#   PY=python3      install into that interpreter's environment instead of a new venv (e.g. to reuse its torch)
# Usage, from anywhere: bash tests/gpu/run_on_device.sh
set -euo pipefail
cd "$(dirname "$0")/../.."

LOGS=${OUT:-$PWD/gpu-logs}
export MERGESEARCH_TEST_ZOO=${MERGESEARCH_TEST_ZOO:-/tmp/mergesearch-test-zoo}
# Nothing at run time needs the network: local model folders, no usage reports, vLLM's store on loopback.
# The test itself sets TRITON_F32_DEFAULT=ieee (float32 attention without TF32); set here too, before Python.
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1 VLLM_HOST_IP=127.0.0.1
export TRITON_F32_DEFAULT=ieee PYTHONUNBUFFERED=1
mkdir -p "$LOGS"
started=$SECONDS
step() { echo "== [$((SECONDS - started))s] $*" | tee -a "$LOGS/timings.txt"; }
failed() { echo "FAILED: $1 (last lines of $2):"; tail -n 40 "$2"; exit 1; }

step "machine"
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true; python3 --version; } \
    | tee "$LOGS/machine.txt"

step "install (.[vllm,test])"
if [[ -z "${PY:-}" ]]; then
    python3 -m venv /tmp/mergesearch-gpu-venv
    PY=/tmp/mergesearch-gpu-venv/bin/python
fi
pip_install=("$PY" -m pip install --progress-bar off --disable-pip-version-check)
if [[ -n "${WHEELHOUSE:-}" ]]; then pip_install+=(--no-index --find-links "$WHEELHOUSE"); fi
"${pip_install[@]}" -e ".[vllm,test]" > "$LOGS/install.log" 2>&1 || failed "install" "$LOGS/install.log"
"$PY" -m pip freeze > "$LOGS/freeze.txt"

step "versions (the GPU test would skip without CUDA or vLLM: fail here instead)"
"$PY" - <<'EOF' 2>&1 | tee -a "$LOGS/machine.txt"
import torch, transformers, vllm
assert torch.cuda.is_available(), "torch sees no CUDA GPU"
print(f"torch {torch.__version__} (CUDA {torch.version.cuda}), vllm {vllm.__version__}, "
      f"transformers {transformers.__version__}, {torch.cuda.get_device_name()}")
EOF

step "quick zoo at $MERGESEARCH_TEST_ZOO"
"$PY" -c "
import os
from workers.zoo import build_zoo
record = build_zoo(os.environ['MERGESEARCH_TEST_ZOO'], profile='quick')
print('zoo built in', record['build_seconds'], 's; ideal mean', record['ideal_mean'])
" > "$LOGS/zoo.log" 2>&1 || failed "zoo" "$LOGS/zoo.log"
tail -n 1 "$LOGS/zoo.log"

step "pytest -m gpu tests/gpu"
timeout 420 "$PY" -m pytest -m gpu tests/gpu -x -q -rs -p no:cacheprovider --durations=3 2>&1 \
    | tee "$LOGS/pytest.log"

step "done"
