#!/usr/bin/env bash
# GPU check for one H100 / H200 (JAX with CUDA installed, no network): the MusiLingo train step at LLaMA-7B
# layer shapes in bf16; tokens/s, step time, MFU against the card's bf16 peak, and which attention ran
# (cuDNN flash, else XLA). Under 5 minutes. Installs nothing.
#
#   scripts/gpu_check.sh [OUT.json] [gpu_check.py options]     (default OUT.json: $OUT/gpu_check.json)
#   scripts/gpu_check.sh --cpu-smoke                          (tiny shapes on CPU: checks the script runs)
#
# Save the JSON as benchmarks/BENCHMARKS_GPU.json (beside BENCHMARKS.md) and `python -m benchmarks` reports it.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-.}/gpu_check.json"
if [[ $# -gt 0 && "$1" != --* ]]; then out="$1"; shift; fi
limit="${GPU_CHECK_TIMEOUT:-290}"

if ! python -c "import jax" 2>/dev/null; then
  echo "gpu_check: python cannot import jax. Install jax with CUDA (jax[cuda12]) on this machine first." >&2
  exit 2
fi
if [[ " $* " != *" --cpu-smoke "* ]]; then
  if ! python - <<'PY'
import sys, jax
try:
  gpus = jax.devices("gpu")
except RuntimeError as e:
  print(f"gpu_check: JAX finds no GPU backend ({e}).\n  Needs jax[cuda12] (jax-cuda12-plugin, jax-cuda12-pjrt) "
        "matching jax " + jax.__version__ + ", and an NVIDIA driver (nvidia-smi).", file=sys.stderr)
  sys.exit(2)
print(f"gpu_check: jax {jax.__version__}, {len(gpus)} GPU(s): {gpus[0].device_kind}")
PY
  then exit 2; fi
fi
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}"
export HF_HUB_OFFLINE=1
timeout --signal=TERM --kill-after=10 "$limit" python scripts/gpu_check.py --out "$out" "$@"
rc=$?
if [[ $rc -eq 124 ]]; then echo "gpu_check: stopped after ${limit} s (partial results, if any, in $out)" >&2; fi
exit $rc
