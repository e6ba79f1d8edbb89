"""A training run whose every path is gs://, against a real GCS JSON API server on loopback (tests/gcs.py;
clients pointed at it by STORAGE_EMULATOR_HOST alone): the smoke preset with its records staged in the
bucket and its workdir in the bucket trains, evaluates and checkpoints; its metrics.jsonl, TensorBoard
events and (offline) W&B run hold the logged metrics; `kill -9` mid-run and the same command resumes from
the bucket with bitwise the same losses and parameters; a damaged latest checkpoint falls back to the one
before; an unreachable bucket or a missing object is one line naming the URL. One uninterrupted gs:// run
(module fixture) is the reference for all of them."""

import importlib.util
import json
import os
import signal
import struct
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
TRAIN = [sys.executable, str(ROOT / "scripts" / "train.py"), "--config",
         str(ROOT / "configs" / "finetune.py") + ":smoke"]
# The smoke run (4 steps, saves at 2 and 4) without its generation sample, evaluated at the end only, with
# an offline W&B run beside TensorBoard (when wandb is installed: requirements.txt pins it).
HAVE_WANDB = importlib.util.find_spec("wandb") is not None
COMMON = ["--config.eval.generate_samples=0", "--config.eval_every=100"] + (
    ["--config.log.wandb_project=musilingo-test", "--config.log.wandb_mode=offline"] if HAVE_WANDB else [])


def _env(**extra):
  env = dict(os.environ)  # STORAGE_EMULATOR_HOST (set by the gcs_bucket fixture) goes to the child
  env.update(XLA_FLAGS="--xla_force_host_platform_device_count=1", HF_HUB_OFFLINE="1", WANDB_SILENT="true")
  env.update({k: str(v) for k, v in extra.items()})
  return env


def _train(workdir, records, *args, cwd, wandb_dir, check=True, fault=(), env=None):
  """scripts/train.py on the smoke preset, records read from `records` (gs://), in a subprocess run from
  `cwd` (a local "gs:" folder would appear there if a path went through os.makedirs)."""
  cmd = TRAIN if not fault else [sys.executable, str(ROOT / "tests" / "fault_train.py"), *map(str, fault)] + TRAIN[2:]
  data = ["--config.data.dataset=musicqa", f"--config.data.records_dir={records}",
          "--config.data.train_split=train", "--config.data.eval_split=test"]
  proc = subprocess.run(cmd + ["--workdir", workdir] + data + COMMON + list(args), cwd=cwd,
                        env=env or _env(WANDB_DIR=wandb_dir), capture_output=True, text=True, timeout=900)
  if check and proc.returncode != 0:
    raise AssertionError(f"train.py exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
  return proc


def _gs(url):
  """An epath.Path of `url`, with this process's gcsfs listing cache dropped first: the runs are other
  processes, and gcsfs would otherwise answer from listings it made before they wrote."""
  from etils.epath import backend
  from musilingo_jax import storage
  backend.fsspec_backend.fs(url).invalidate_cache()
  return storage.path(url)


def _rows(workdir):
  return [json.loads(l) for l in (_gs(workdir) / "metrics.jsonl").read_text().splitlines()]


def _losses(workdir):
  return {r["step"]: r["loss"] for r in _rows(workdir) if r["split"] == "train"}


def _params(workdir, step):
  import orbax.checkpoint as ocp
  with ocp.StandardCheckpointer() as ckptr:
    tree = ckptr.restore(_gs(f"{workdir}/checkpoints/{step}/trainable"))
  return {k: np.asarray(v) for k, v in tree["llama_proj"].items()}


def _steps(workdir):
  """Finished checkpoint steps in the bucket (a step counts once its commit_success.txt exists)."""
  d = _gs(f"{workdir}/checkpoints")
  return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit() and (p / "commit_success.txt").exists())


def _demo_records(tmp) -> str:
  """The smoke preset's precomputed demo records (built on first use, then cached), as the run sees them."""
  code = (f"import importlib.util, os\n"
          f"spec = importlib.util.spec_from_file_location('finetune', {str(ROOT / 'configs' / 'finetune.py')!r})\n"
          f"m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)\n"
          f"c = m.get_config('smoke')\n"
          f"from musilingo_jax.experiment import Experiment\n"
          f"exp = Experiment.from_config(c)\n"
          f"print('RECORDS=' + os.path.dirname(exp.data.train_files[0]))\n")
  proc = subprocess.run([sys.executable, "-c", code], env=_env(), capture_output=True, text=True, timeout=900,
                        cwd=tmp)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return next(l.split("=", 1)[1] for l in proc.stdout.splitlines() if l.startswith("RECORDS="))


@pytest.fixture(scope="module")
def base(gcs_bucket):
  return f"{gcs_bucket}/run-{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="module")
def records(base, tmp_path_factory):
  """The smoke records, staged in the bucket (what a pod run reads)."""
  from musilingo_jax import storage
  local = _demo_records(tmp_path_factory.mktemp("records-cwd"))
  url = f"{base}/records"
  storage.upload_tree(local, url)
  return url


@pytest.fixture(scope="module")
def uninterrupted(base, records, tmp_path_factory):
  workdir = f"{base}/uninterrupted"
  cwd, wandb_dir = tmp_path_factory.mktemp("cwd"), tmp_path_factory.mktemp("wandb")
  proc = _train(workdir, records, cwd=cwd, wandb_dir=wandb_dir)
  return {"workdir": workdir, "proc": proc, "cwd": cwd, "wandb_dir": wandb_dir}


@pytest.fixture(scope="module")
def resumed(base, records, tmp_path_factory):
  """The same command killed with SIGKILL after step 3, then run again."""
  workdir = f"{base}/killed"
  cwd, wandb_dir = tmp_path_factory.mktemp("cwd-killed"), tmp_path_factory.mktemp("wandb-killed")
  killed = _train(workdir, records, cwd=cwd, wandb_dir=wandb_dir, check=False, fault=("--kill-at-step", 3))
  steps_at_kill = _steps(workdir)
  losses_at_kill = _losses(workdir)
  again = _train(workdir, records, cwd=cwd, wandb_dir=wandb_dir)
  return {"workdir": workdir, "killed": killed, "steps_at_kill": steps_at_kill, "losses_at_kill": losses_at_kill,
          "resumed": again, "cwd": cwd, "wandb_dir": wandb_dir}


def test_gs_run_trains_evaluates_and_checkpoints(uninterrupted, records):
  workdir = uninterrupted["workdir"]
  rows = _rows(workdir)
  losses = _losses(workdir)
  assert sorted(losses) == [1, 2, 3, 4] and all(np.isfinite(list(losses.values())))
  assert [r["step"] for r in rows if r["split"] == "eval"] == [4]
  assert json.loads((_gs(workdir) / "config.json").read_text())["data"]["records_dir"] == records
  assert _steps(workdir) == [2, 4]
  params = _params(workdir, 4)
  assert params["kernel"].ndim == 2 and np.isfinite(params["kernel"]).all()
  assert "trainable parameters:" in uninterrupted["proc"].stdout
  # Nothing went through os.makedirs / open(): no local "gs:" folder where the command ran.
  assert not (uninterrupted["cwd"] / "gs:").exists() and not any(uninterrupted["cwd"].iterdir())


def _tfrecords(data: bytes):
  """The records of a TFRecord file (an event file): length, its crc, the data, its crc."""
  pos = 0
  while pos < len(data):
    (n,) = struct.unpack("<Q", data[pos:pos + 8])
    yield data[pos + 12:pos + 12 + n]
    pos += 12 + n + 4


def test_tensorboard_events_read_back_from_the_bucket(uninterrupted):
  from tensorboardX.proto import event_pb2
  workdir = uninterrupted["workdir"]
  files = [p for p in (_gs(workdir) / "tb").iterdir() if "tfevents" in p.name]
  assert files
  scalars = {}
  for f in files:
    for rec in _tfrecords(f.read_bytes()):
      ev = event_pb2.Event.FromString(rec)
      for v in ev.summary.value:
        scalars[(v.tag, ev.step)] = v.simple_value
  losses = _losses(workdir)
  for step, loss in losses.items():
    assert scalars[("train/loss", step)] == np.float32(loss)
  eval_loss = next(r["loss"] for r in _rows(workdir) if r["split"] == "eval")
  assert scalars[("eval/loss", 4)] == np.float32(eval_loss)


def _wandb_history(wandb_dir):
  """{step: {key: value}} from every offline run's .wandb file under `wandb_dir`, read with wandb's own
  record schema (wandb_internal_pb2.Record) from its log format (a 7-byte header, then 32 KiB blocks of
  records, each with a 7-byte header: crc32c, length, type FULL/FIRST/MIDDLE/LAST)."""
  from wandb.proto import wandb_internal_pb2 as pb
  out: dict[str, dict[int, dict]] = {}
  for path in sorted(Path(wandb_dir).glob("wandb/offline-run-*/run-*.wandb")):
    data = path.read_bytes()
    assert data[:4] == b":W&B", data[:7]
    pos, block, buf, history = 7, 32768, b"", {}
    while pos + 7 <= len(data):
      left = block - pos % block
      if left < 7:
        pos += left
        continue
      _, n, kind = struct.unpack("<IHB", data[pos:pos + 7])
      pos += 7
      if kind == 0 and n == 0:
        pos += left - 7
        continue
      buf += data[pos:pos + n]
      pos += n
      if kind in (1, 4):  # FULL or LAST
        rec = pb.Record.FromString(buf)
        buf = b""
        if rec.WhichOneof("record_type") == "history":
          row = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in rec.history.item}
          history[int(row["_step"])] = row
    out[path.name] = history
  return out


@pytest.mark.skipif(not HAVE_WANDB, reason="wandb not installed (pip install -e '.[wandb]')")
def test_wandb_offline_run_has_the_logged_metrics(uninterrupted):
  runs = _wandb_history(uninterrupted["wandb_dir"])
  run_id = (_gs(uninterrupted["workdir"]) / "wandb_run_id").read_text().strip()
  assert list(runs) == [f"run-{run_id}.wandb"]
  history = runs[f"run-{run_id}.wandb"]
  losses = _losses(uninterrupted["workdir"])
  assert sorted(history) == [1, 2, 3, 4]
  for step, loss in losses.items():
    assert history[step]["train/loss"] == pytest.approx(loss, rel=1e-12)
  assert "eval/loss" in history[4] and "eval/loss" not in history[3]


def test_kill_9_then_the_same_command_resumes_from_the_bucket_bitwise(uninterrupted, resumed):
  assert resumed["killed"].returncode == -signal.SIGKILL
  # Step 2's save may still have been in flight at the kill: an unfinished step is never taken for a
  # checkpoint (no commit_success.txt), and the run restarts from scratch; either way the result is the same.
  assert resumed["steps_at_kill"] in ([], [2])
  assert sorted(resumed["losses_at_kill"]) == [1, 2, 3]  # every log up to the kill reached the bucket
  assert ("resumed from" in resumed["resumed"].stdout) == (resumed["steps_at_kill"] == [2])
  ref, got = _losses(uninterrupted["workdir"]), _losses(resumed["workdir"])
  for step in (1, 2, 3, 4):
    assert got[step] == ref[step]
  a, b = _params(resumed["workdir"], 4), _params(uninterrupted["workdir"], 4)
  for k in a:
    np.testing.assert_array_equal(a[k], b[k])
  if HAVE_WANDB:  # the resumed run continued the same W&B run (one id per run directory)
    ids = {p.name for p in Path(resumed["wandb_dir"]).glob("wandb/offline-run-*/run-*.wandb")}
    run_id = (_gs(resumed["workdir"]) / "wandb_run_id").read_text().strip()
    assert ids == {f"run-{run_id}.wandb"}


def _truncate_arrays(step_dir) -> int:
  """Cuts every array data file of a checkpoint step (the OCDBT `d/` files) to half its size."""
  n = 0
  for item in ("trainable", "opt_state"):
    root = _gs(f"{step_dir}/{item}")
    for d in [*root.glob("d/*"), *root.glob("ocdbt.process_*/d/*")]:
      data = d.read_bytes()
      d.write_bytes(data[:len(data) // 2])
      n += 1
  return n


def test_damaged_latest_checkpoint_on_gcs_falls_back_to_the_previous_one(uninterrupted, resumed, records):
  workdir = resumed["workdir"]
  assert _steps(workdir) == [2, 4]
  assert _truncate_arrays(f"{workdir}/checkpoints/4") > 0
  proc = _train(workdir, records, cwd=resumed["cwd"], wandb_dir=resumed["wandb_dir"])
  warning = [l for l in proc.stderr.splitlines() if "does not restore" in l]
  assert len(warning) == 1 and "checkpoint step 4" in warning[0] and "resuming from step 2" in warning[0], \
      proc.stderr[-3000:]
  assert "Traceback" not in proc.stderr
  assert f"resumed from {workdir}/checkpoints/2" in proc.stdout
  aside = [p.name for p in _gs(f"{workdir}/checkpoints").iterdir() if p.name.startswith("unrestorable-4-")]
  assert len(aside) == 1 and aside[0] in warning[0]
  assert _steps(workdir) == [2, 4]
  a, b = _params(workdir, 4), _params(uninterrupted["workdir"], 4)
  for k in a:
    np.testing.assert_array_equal(a[k], b[k])
  assert _losses(workdir)[4] == _losses(uninterrupted["workdir"])[4]


def test_unreachable_bucket_and_missing_objects_fail_in_one_line(base, records, tmp_path):
  import gcs
  cases = [
      # nothing listens at the storage endpoint
      (dict(STORAGE_EMULATOR_HOST=f"http://127.0.0.1:{gcs.closed_port()}"), [],
       f"error: --workdir {base}/x: bucket gs://{gcs.BUCKET} unreachable"),
      # the bucket does not exist
      ({}, [], "error: --workdir gs://no-such-bucket-musilingo/x: bucket gs://no-such-bucket-musilingo does not exist"),
      # a missing records folder
      ({}, [f"--config.data.records_dir={base}/no-such-records"],
       f"error: config.data.records_dir = {base}/no-such-records: not found"),
  ]
  for env, args, expected in cases:
    workdir = "gs://no-such-bucket-musilingo/x" if "no-such-bucket" in expected else f"{base}/x"
    proc = _train(workdir, records, *args, cwd=tmp_path, wandb_dir=tmp_path, check=False,
                  env=_env(WANDB_DIR=tmp_path, **env))
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = [l for l in proc.stderr.splitlines() if l.strip()]
    assert lines[-1].startswith(expected), lines[-5:]
    assert "Traceback" not in proc.stderr
    assert "trainable parameters" not in proc.stdout  # stopped before the model was built
  assert not (tmp_path / "gs:").exists()


def test_log_writer_on_gcs_rotates_event_files_and_appends_after_a_restart(gcs_prefix, monkeypatch):
  """runlog in-process: every flush leaves complete objects in the bucket; an event file over the rotation
  size is closed and a new one begun (uploads stay small); a second writer (a resumed run) appends to
  metrics.jsonl after what the bucket holds; a writer on another process than 0 writes nothing."""
  from tensorboardX.proto import event_pb2
  from musilingo_jax import runlog
  monkeypatch.setattr(runlog, "TB_ROTATE_BYTES", 2048)
  idle = runlog.MetricsWriter(gcs_prefix, enabled=False)
  idle.write(1, {"loss": 1.0})
  idle.flush()
  idle.close()
  assert not _gs(gcs_prefix).exists()
  for start in (0, 40):
    writer = runlog.MetricsWriter(gcs_prefix, enabled=True)
    for step in range(start + 1, start + 41):
      writer.write(step, {"loss": 1.0 / step, "lr": 0.1})
      writer.flush()
      assert _losses(gcs_prefix)[step] == 1.0 / step  # durable at each flush
    writer.close()
  assert sorted(_losses(gcs_prefix)) == list(range(1, 81))
  files = [p for p in (_gs(gcs_prefix) / "tb").iterdir() if "tfevents" in p.name]
  assert len(files) > 2  # rotated (and a new file per writer)
  steps = set()
  for f in files:
    data = f.read_bytes()
    assert len(data) < 2048 + 1024
    for rec in _tfrecords(data):
      ev = event_pb2.Event.FromString(rec)
      steps |= {ev.step for v in ev.summary.value if v.tag == "train/loss"}
  assert steps == set(range(1, 81))
