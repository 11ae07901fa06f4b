#!/usr/bin/env bash
# The GPU check, on one CUDA GPU (written for an H200; about 8 minutes at most):
#   bash bench/gpu_check.sh [OUT.json]        (default gpu_check.json in the current directory)
# (a) the GPU tests: python -m pytest -q -m gpu tests/test_gpu.py
# (b) bf16 training throughput and MFU of the owt-base model at ℓ = 1 and ℓ = 4 (synthetic token ids)
# (c) the planner's predicted peak memory (prime-scale plan --gpus 1 --gpu h200 --json: peak_bytes)
#     against torch.cuda.max_memory_allocated() of those training steps
# Every part runs under its own `timeout`; all figures go to OUT.json, a summary to stdout.
# Exit 0 when every part passed (and on a machine without CUDA, where nothing is measured).
set -uo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
out="$(realpath -m "${1:-gpu_check.json}")"
work="$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")"
trap 'rm -rf "$work"' EXIT
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}" PYTHONWARNINGS=ignore PRIME_SCALE_GPU_CHECK_DIR="$work"
cd "$repo" || exit 1
python="${PYTHON:-python}"

cuda=$("$python" -c 'import torch; print(int(torch.cuda.is_available()))' 2>/dev/null || echo 0)
[ "$cuda" = 1 ] && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null

echo "== (a) GPU tests (timeout 250 s)"
timeout -k 10 250 "$python" -m pytest -q -m gpu tests/test_gpu.py -p no:cacheprovider --junitxml "$work/pytest.xml"
pytest_rc=$?

if [ "$cuda" = 1 ]; then
  echo "== (b, c) owt-base bf16 throughput, MFU and memory at ℓ = 1 and 4, planner (timeout 190 s)"
  timeout -k 10 190 "$python" bench/gpu_check.py bench --work "$work" --per-ell-timeout 85 --plan-timeout 25 \
    || echo "bench/gpu_check.py bench: exit $? (timed out or failed; the report shows what was measured)"
fi

timeout -k 5 60 "$python" bench/gpu_check.py report --work "$work" --pytest-rc "$pytest_rc" --out "$out"
