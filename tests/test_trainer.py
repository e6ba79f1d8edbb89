"""The training driver end to end (smoke preset, real subprocesses): config errors, exact resume after
kill -9, SIGTERM preemption, the NaN stop, and restoring onto a different device count."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import orbax.checkpoint as ocp
import pytest

ROOT = Path(__file__).resolve().parents[1]
TRAIN = [sys.executable, str(ROOT / "scripts" / "train.py"), "--config", str(ROOT / "configs" / "finetune.py") + ":smoke"]


def _env(devices=1, **extra):
  env = dict(os.environ)
  env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  env["HF_HUB_OFFLINE"] = "1"
  env.update({k: str(v) for k, v in extra.items()})
  return env


# The smoke run without its end-of-training generation sample, to keep these runs short.
COMMON = ["--config.eval.generate_samples=0", "--config.eval_every=100"]


def _train(workdir, *args, devices=1, check=True, fault=(), **env):
  """scripts/train.py in a subprocess; fault=("--kill-at-step", "3") runs it through tests/fault_train.py,
  which registers the matching trainer hook."""
  cmd = TRAIN if not fault else [sys.executable, str(ROOT / "tests" / "fault_train.py"), *map(str, fault)] + TRAIN[2:]
  proc = subprocess.run(cmd + ["--workdir", str(workdir)] + COMMON + list(args), env=_env(devices, **env),
                        capture_output=True, text=True, timeout=600)
  if check and proc.returncode != 0:
    raise AssertionError(f"train.py exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
  return proc


def _losses(workdir):
  rows = [json.loads(l) for l in (Path(workdir) / "metrics.jsonl").read_text().splitlines()]
  return {r["step"]: r["loss"] for r in rows if r["split"] == "train"}


def _params(workdir, step):
  path = Path(workdir) / "checkpoints" / str(step) / "trainable"
  with ocp.StandardCheckpointer() as ckptr:
    tree = ckptr.restore(path.absolute())
  return {k: np.asarray(v) for k, v in tree["llama_proj"].items()}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("uninterrupted")
  proc = _train(workdir)
  return workdir, proc


def test_smoke_preset_end_to_end(uninterrupted):
  workdir, proc = uninterrupted
  losses = _losses(workdir)
  assert sorted(losses) == [1, 2, 3, 4] and all(np.isfinite(list(losses.values())))
  assert (workdir / "tb").is_dir() and any((workdir / "tb").iterdir())
  assert "trainable parameters:" in proc.stdout and "llama_proj.kernel" in proc.stdout
  assert (workdir / "checkpoints" / "4").is_dir()
  assert (workdir / "demo_report.json").is_file()


def test_resume_after_kill_9_is_bitwise_identical(uninterrupted, tmp_path):
  ref_dir, _ = uninterrupted
  killed = _train(tmp_path, check=False, fault=("--kill-at-step", 3))
  assert killed.returncode == -signal.SIGKILL
  # Step 2's async save may still have been in flight at the kill: then only its temporary directory exists,
  # it is never taken for a checkpoint, and the run restarts from scratch. Either way the result is the same.
  complete = sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
  assert complete in ([], ["2"])
  resumed = _train(tmp_path)
  assert ("resumed from" in resumed.stdout) == (complete == ["2"])
  ref, got = _params(ref_dir, 4), _params(tmp_path, 4)
  for k in ref:
    np.testing.assert_array_equal(got[k], ref[k])
  ref_l, got_l = _losses(ref_dir), _losses(tmp_path)
  for step in (3, 4):
    assert got_l[step] == ref_l[step]


def test_sigterm_saves_and_exits_cleanly(tmp_path):
  proc = subprocess.Popen(TRAIN + ["--workdir", str(tmp_path), "--config.train.num_steps=400",
                                   "--config.save_every=1000"] + COMMON,
                          env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  metrics = tmp_path / "metrics.jsonl"
  deadline = time.time() + 300
  while time.time() < deadline and not (metrics.exists() and metrics.read_text().count("\n") >= 2):
    time.sleep(0.5)
  proc.send_signal(signal.SIGTERM)
  out, err = proc.communicate(timeout=300)
  assert proc.returncode == 0, err[-3000:]
  assert "preempted: saved step" in out
  steps = [int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()]
  assert len(steps) == 1 and 2 <= steps[0] < 400


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
  proc = _train(tmp_path, check=False, fault=("--nan-at-step", 2))
  assert proc.returncode == 2
  assert "non-finite loss" in proc.stderr and "last good checkpoint is step 2" in proc.stderr
  steps = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
  assert steps == [2]


def test_restore_onto_a_different_device_count(uninterrupted, tmp_path):
  """2 steps on a (2, 2, 1) FSDP mesh of 4 devices, then resumed on 1 device: the same as 4 steps on 1."""
  ref_dir, _ = uninterrupted
  _train(tmp_path, "--config.train.num_steps=2", "--config.mesh.shape=(2,2,1)", "--config.mesh.rules=fsdp",
         devices=4)
  assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()) == ["2"]
  _train(tmp_path, devices=1)
  a, b = _params(tmp_path, 4), _params(ref_dir, 4)
  for k in a:
    np.testing.assert_allclose(a[k], b[k], rtol=1e-5, atol=1e-6)


def _truncate_arrays(step_dir: Path) -> int:
  """Cuts every array data file of a checkpoint step (the OCDBT `d/` files) to half its size."""
  files = [f for item in ("trainable", "opt_state") for f in (step_dir / item).glob("**/d/*") if f.is_file()]
  for f in files:
    data = f.read_bytes()
    f.write_bytes(data[:len(data) // 2])
  return len(files)


def test_damaged_latest_checkpoint_falls_back_to_the_previous_one(uninterrupted, tmp_path):
  """Step 4's array files truncated: the same command warns naming step 4, sets it aside and resumes from
  step 2 to the same parameters and losses. With every step damaged it stops (exit 2, one line per step)
  and moves nothing: a config that no longer matches its checkpoints fails them all alike."""
  import shutil
  ref_dir, _ = uninterrupted
  workdir = tmp_path / "run"
  shutil.copytree(ref_dir, workdir)
  assert _truncate_arrays(workdir / "checkpoints" / "4") > 0
  proc = _train(workdir)
  warning = [l for l in proc.stderr.splitlines() if "does not restore" in l]
  assert len(warning) == 1 and "checkpoint step 4" in warning[0] and "resuming from step 2" in warning[0], \
      proc.stderr[-3000:]
  assert "OUT_OF_RANGE" in warning[0] or "DATA_LOSS" in warning[0] or "Error" in warning[0]
  assert "Traceback" not in proc.stderr
  assert f"resumed from {workdir}/checkpoints/2" in proc.stdout
  aside = [p.name for p in (workdir / "checkpoints").iterdir() if p.name.startswith("unrestorable-4-")]
  assert len(aside) == 1 and aside[0] in warning[0]
  ref, got = _params(ref_dir, 4), _params(workdir, 4)
  for k in ref:
    np.testing.assert_array_equal(got[k], ref[k])
  assert _losses(workdir)[4] == _losses(ref_dir)[4]

  for step in (2, 4):
    _truncate_arrays(workdir / "checkpoints" / str(step))
  proc = _train(workdir, check=False)
  assert proc.returncode == 2, proc.stderr[-3000:]
  last = [l for l in proc.stderr.splitlines() if l.strip()][-1]
  assert last.startswith(f"error: no checkpoint in {workdir}/checkpoints restores: step 4: ") and "step 2: " in last
  assert sorted(p.name for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()) == ["2", "4"]


def _smoke_config(**overrides):
  import importlib.util
  spec = importlib.util.spec_from_file_location("finetune", ROOT / "configs" / "finetune.py")
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  c = mod.get_config("smoke")
  for key, value in overrides.items():
    node = c
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  return c


@pytest.mark.parametrize("overrides,devices,field", [
    ({"train.trainable": "everything"}, 1, "train.trainable"),
    ({"mesh.shape": (3, 1, 1)}, 2, "mesh.shape"),
    ({"train.batch_size": 3, "mesh.shape": (2, 1, 1)}, 2, "train.batch_size"),
    ({"model.llm_gguf": "/nonexistent.gguf"}, 1, "model.llm_gguf"),
    ({"data.layout": "left"}, 1, "data.layout"),
    ({"train.accum_steps": 0}, 1, "train.accum_steps"),
])
def test_config_validation_errors_name_the_field(overrides, devices, field):
  from musilingo_jax import config as cfglib
  with pytest.raises(cfglib.ConfigError, match=f"config\\.{field}"):
    cfglib.validate(_smoke_config(**overrides), num_devices=devices)


def test_config_error_exits_before_any_compute(tmp_path):
  proc = _train(tmp_path, "--config.mesh.shape=(3,1,1)", check=False, devices=2)
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert "config.mesh.shape" in proc.stderr
  assert not (tmp_path / "checkpoints").exists()


def test_run_folder_carries_what_inference_needs(uninterrupted, tmp_path, monkeypatch):
  """The tokenizer and the feature statistics are in the run folder: inference from another cache (no demo
  records there) loads the same model."""
  from musilingo_jax import build
  workdir, _ = uninterrupted
  assert (workdir / "tokenizer" / "tokenizer_config.json").is_file()
  stats = json.loads((workdir / "feature_stats.json").read_text())
  monkeypatch.setenv("MUSILINGO_CACHE", str(tmp_path / "empty-cache"))
  model, tok, _ = build.load_for_inference(workdir=str(workdir), dtype="float32")
  np.testing.assert_array_equal(np.asarray(model.feature_norm.inv_std[...]), np.float32(stats["inv_std"]))
  np.testing.assert_array_equal(np.asarray(model.feature_norm.mean[...]), np.float32(stats["mean"]))
  assert tok.encode("a piano") and not any((tmp_path / "empty-cache").rglob("*.array_record*"))


def test_a_run_failing_in_setup_leaves_no_folder(tmp_path):
  workdir = tmp_path / "runs" / "new"
  proc = _train(workdir, "--config.data.max_len=8", check=False)
  assert proc.returncode != 0 and "config.data.max_len = 8" in proc.stderr, proc.stderr[-2000:]
  assert not workdir.exists()


def test_unknown_config_key_is_refused(tmp_path):
  proc = _train(tmp_path, "--config.train.no_such_key=1", check=False)
  assert proc.returncode != 0 and "no_such_key" in proc.stderr


def test_export_from_a_run_loads_in_transformers(uninterrupted, tmp_path):
  import torch
  import transformers
  workdir, _ = uninterrupted
  out = tmp_path / "exported"
  proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "export_pytorch.py"), "--workdir", str(workdir),
                         "--out", str(out), "--dtype", "float32"], env=_env(), capture_output=True, text=True,
                        timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  sd = torch.load(out / "musilingo_checkpoint.pth", map_location="cpu", weights_only=True)["model"]
  import jax.numpy as jnp
  from musilingo_jax import build
  model, _, _ = build.load_for_inference(workdir=str(workdir), dtype="float32")
  params = _params(workdir, 4)
  np.testing.assert_array_equal(np.asarray(model.llama_proj.kernel[...]), params["kernel"])
  np.testing.assert_array_equal(np.asarray(model.llama_proj.bias[...]), params["bias"])
  # The smoke preset standardises the projection's input; the export folds that in, so the .pth applied to
  # raw features (as the reference applies it) gives our model's audio embeddings.
  assert model.feature_norm is not None
  feats = np.random.default_rng(2).standard_normal((1, 3, params["kernel"].shape[0])).astype(np.float32)
  exported = feats @ sd["llama_proj.weight"].numpy().T + sd["llama_proj.bias"].numpy()
  np.testing.assert_allclose(exported, np.asarray(model.audio_embeddings({"features": jnp.asarray(feats)})),
                             rtol=1e-4, atol=1e-4)
  assert not np.allclose(sd["llama_proj.weight"].numpy(), params["kernel"].T)
  ref = transformers.LlamaForCausalLM.from_pretrained(out / "llm", torch_dtype=torch.float32).eval()
  hub = transformers.HubertModel.from_pretrained(out / "encoder").eval()
  ids = np.random.default_rng(0).integers(0, ref.config.vocab_size, (2, 12))
  audio = np.random.default_rng(1).standard_normal((1, 4000)).astype(np.float32)
  with torch.no_grad():
    ref_logits = ref(torch.tensor(ids)).logits.numpy()
    ref_hidden = hub(torch.tensor(audio)).last_hidden_state.numpy()
  ours, _ = model.llm(jnp.asarray(ids))
  np.testing.assert_allclose(np.asarray(ours), ref_logits, atol=1e-4, rtol=1e-4)
  np.testing.assert_allclose(np.asarray(model.encoder(jnp.asarray(audio))[-1]), ref_hidden, atol=1e-4, rtol=1e-4)
