"""scripts/rehearse.py --small: the user's whole command chain (convert, verify, precompute, train, evaluate,
generate, export, transformers reload) as subprocesses on tiny random HF checkpoints, the real LLaMA
tokenizer and three synthesized MusicQA clips at 16/44.1/48 kHz."""

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load_rehearse():
  """scripts/rehearse.py is a developer tool, not part of the package: loaded by path for its stage names."""
  spec = importlib.util.spec_from_file_location("rehearse", ROOT / "scripts" / "rehearse.py")
  mod = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = mod  # its dataclasses look their module up while the file runs
  spec.loader.exec_module(mod)
  return mod


rehearse = _load_rehearse()


def test_rehearse_small_chain(tmp_path):
  from musilingo_jax import assets
  try:
    assets.llama_tokenizer_model()
  except assets.AssetUnavailable as e:
    pytest.skip(str(e))
  work, report = tmp_path / "work", tmp_path / "report" / "rehearsal.md"
  # The user's environment: one CPU device (the suite's 8 virtual devices would not divide batch 2). XLA's
  # cheaper CPU code generation makes the ten processes' compiles ~20 % faster (tiny models: nothing to win).
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env.update(JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true")
  t0 = time.perf_counter()
  r = subprocess.run([sys.executable, "scripts/rehearse.py", "--small", "--out", str(work), "--report", str(report)],
                     cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
  wall = time.perf_counter() - t0
  assert r.returncode == 0, r.stdout[-6000:] + r.stderr[-3000:]

  info = json.loads(report.with_suffix(".json").read_text())
  stages = [s["stage"] for s in info["stages"]]
  assert stages == list(rehearse.STAGE_NAMES)
  for s in info["stages"]:
    assert s["status"] == "ok", s
    assert s["rc"] == 0 and s["wall_s"] > 0 and s["peak_rss_gib"] > 0, s
  by_name = {s["stage"]: s for s in info["stages"]}
  for name in ("inputs", "convert_hf", "precompute_Finetune", "train", "export_pytorch"):
    assert by_name[name]["output_bytes"] > 0, name

  table = report.read_text()
  for name in rehearse.STAGE_NAMES:
    assert f"| {name} | ok |" in table, name
  assert rehearse.NOTES_MARKER in table

  # The 372,000-native-sample crop gives different windows and token counts per source rate.
  tokens = {}
  for row in info["records"]:
    tokens.setdefault(row["source_rate"], set()).add(row["tokens"])
  assert set(tokens) == {16000, 44100, 48000}
  assert tokens[16000] == {6} and tokens[44100] == {2} and tokens[48000] == {2}

  out = r.stdout
  assert "4/4 within tol" in out                      # verify_conversion: every MERT state and the logits
  assert "reload: ok" in out and "bitwise equal" in out
  assert not work.exists()                            # removed without --keep
  print(f"rehearse --small: {wall:.0f} s wall, {sum(s['cpu_s'] for s in info['stages']):.0f} s CPU")
