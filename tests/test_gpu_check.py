"""scripts/gpu_check.sh runs end to end without a GPU (--cpu-smoke: tiny shapes, the same code path: build,
cuDNN attempt and its reported fallback to XLA, timed steps, the JSON report), so the script a GPU machine
runs is known to work before one is lent."""

import json
import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_cpu_smoke_writes_its_report(tmp_path):
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one CPU device, as on a 1-GPU machine
  env.update(JAX_PLATFORMS="cpu", OUT=str(tmp_path))
  proc = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), "--cpu-smoke"], env=env,
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
  report = json.loads((tmp_path / "gpu_check.json").read_text())
  assert report["cpu_smoke"] is True and report["platform"] == "cpu"
  assert {c["input"] for c in report["cases"]} == {"features", "audio"}
  for case in report["cases"]:
    assert case["finite"] and case["tokens_per_s"] > 0 and case["step_s"] > 0
    assert case["attention_ran"] == "xla"
    # cuDNN was asked for, could not run on CPU, and the fallback is reported, not hidden
    assert case["attention_requested"] == "cudnn" and case["fallbacks"][0]["attention"] == "cudnn"
    assert case["step_flops"] > 0 and case["mfu"] is None  # no bf16 peak is known for a CPU
