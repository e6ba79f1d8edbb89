"""Multi-host proof on one machine: 2 processes x 4 CPU devices (jax.distributed over localhost, gloo CPU
collectives) train the smoke preset on an (8, 1, 1) mesh with per-process data shards, save with Orbax, and a
second launch resumes; losses and params equal the single-process 8-device run.

  python -m pytest -m slow tests/test_multihost.py        (about 3-6 min on 2 busy cores; also run by
                                                            `python -m benchmarks --multihost`)

Layout "packed": the union of the per-process batches is then the single-process global batch array for
array. (With "reference" each process pads the middle to its own rows' longest prompt, as the reference's
per-GPU collater does, so the positions and the loss legitimately differ from a one-process batch.)
"""

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import orbax.checkpoint as ocp
import pytest

ROOT = Path(__file__).resolve().parents[1]

# A small driver around trainer.run (scripts/train.py would also write the demo report we do not need here).
DRIVER = textwrap.dedent("""
    import importlib.util, json, sys
    sys.path.insert(0, {root!r})
    from musilingo_jax import launch
    multi = launch.maybe_initialize_distributed()
    import jax
    from musilingo_jax import trainer
    spec = importlib.util.spec_from_file_location("finetune", {root!r} + "/configs/finetune.py")
    mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod)
    c = mod.get_config("smoke")
    c.mesh.shape = (8, 1, 1)
    c.train.batch_size = 8
    c.data.layout = "packed"
    c.data.pack_segments = 1  # one example per row: the union over processes is the one-process batch
    c.eval.generate_samples = 0
    c.eval_every = 100
    c.train.num_steps = int(sys.argv[2])
    out = trainer.run(c, sys.argv[1])
    print("RESULT", json.dumps({{"process": jax.process_index(), "processes": jax.process_count(),
                                "devices": jax.device_count(), "local": jax.local_device_count(),
                                "step": out["step"], "multi": multi}}), flush=True)
""")


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _env(devices: int, **extra) -> dict:
  env = dict(os.environ)
  env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  env["HF_HUB_OFFLINE"] = "1"
  for k in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
    env.pop(k, None)
  env.update({k: str(v) for k, v in extra.items()})
  return env


def _launch(workdir: Path, steps: int, processes: int, timeout: int = 600) -> list[dict]:
  """Runs the driver in `processes` processes (4 devices each when > 1, else 8); returns their RESULT lines."""
  cmd = [sys.executable, "-c", DRIVER.format(root=str(ROOT)), str(workdir), str(steps)]
  if processes == 1:
    procs = [subprocess.Popen(cmd, env=_env(8), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)]
  else:
    addr = f"localhost:{_free_port()}"
    procs = [subprocess.Popen(cmd, env=_env(8 // processes, JAX_COORDINATOR_ADDRESS=addr,
                                             JAX_NUM_PROCESSES=processes, JAX_PROCESS_ID=i),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(processes)]
  results, failures = [], []
  for i, p in enumerate(procs):
    try:
      out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
      for q in procs:
        q.kill()
      raise AssertionError(f"process {i} timed out after {timeout} s")
    if p.returncode != 0:
      failures.append(f"process {i} exited {p.returncode}:\n{out[-2000:]}\n{err[-4000:]}")
    results += [json.loads(line[len("RESULT "):]) for line in out.splitlines() if line.startswith("RESULT ")]
  if failures:
    raise AssertionError("\n".join(failures))
  return results


def _losses(workdir: Path) -> dict[int, float]:
  rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  return {r["step"]: r["loss"] for r in rows if r["split"] == "train"}


def _checkpoint(workdir: Path, step: int) -> dict[str, np.ndarray]:
  import jax
  out = {}
  one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  with ocp.StandardCheckpointer() as ckptr:
    for item in ("trainable", "opt_state"):
      path = (workdir / "checkpoints" / str(step) / item).absolute()
      meta = ckptr.metadata(path)
      meta = getattr(meta, "item_metadata", meta)
      # Onto this (one-device) process, whatever topology wrote it.
      target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=one), meta)
      tree = ckptr.restore(path, target)
      for path, leaf in _flatten(tree, item):
        out[path] = np.asarray(leaf)
  return out


def _flatten(tree, prefix):
  if isinstance(tree, dict):
    for k, v in tree.items():
      yield from _flatten(v, f"{prefix}.{k}")
  elif isinstance(tree, (list, tuple)):
    for i, v in enumerate(tree):
      yield from _flatten(v, f"{prefix}.{i}")
  elif tree is not None:  # optax's empty states restore as None
    yield prefix, tree


@pytest.mark.slow
def test_two_processes_train_save_resume_equal_one_process(tmp_path):
  # The single-process run first: it also builds the demo set and its precomputed features (once, cached),
  # so the two processes below only read them.
  single = tmp_path / "single"
  res = _launch(single, 4, processes=1)
  assert res and res[0]["devices"] == 8 and res[0]["processes"] == 1

  multi = tmp_path / "multi"
  first = _launch(multi, 2, processes=2)
  assert sorted(r["process"] for r in first) == [0, 1]
  assert all(r["processes"] == 2 and r["devices"] == 8 and r["local"] == 4 and r["step"] == 2 for r in first)
  steps = sorted(int(p.name) for p in (multi / "checkpoints").iterdir() if p.name.isdigit())
  assert steps == [2]
  second = _launch(multi, 4, processes=2)  # resumes from step 2 (params, optimizer, both data iterators)
  assert all(r["step"] == 4 for r in second)

  want, got = _losses(single), _losses(multi)
  assert sorted(want) == sorted(got) == [1, 2, 3, 4]
  # Process 0 alone writes the logs: each step's line once, one TensorBoard event file per launch.
  rows = [json.loads(line) for line in (multi / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in rows if r["split"] == "train"] == [1, 2, 3, 4]
  assert len([p for p in (multi / "tb").iterdir() if "tfevents" in p.name]) == 2
  np.testing.assert_allclose([got[s] for s in range(1, 5)], [want[s] for s in range(1, 5)], rtol=1e-5)
  a, b = _checkpoint(single, 4), _checkpoint(multi, 4)
  assert sorted(a) == sorted(b)
  for k in a:
    np.testing.assert_allclose(b[k], a[k], rtol=1e-5, atol=1e-6, err_msg=k)
  # Each process's data-iterator state is in the checkpoint (all-gathered: Orbax's JSON item is written by
  # the primary process only), and each resumed from its own.
  data = json.loads((multi / "checkpoints" / "4" / "data" / "metadata").read_text())
  assert data["process_count"] == 2
  assert [s["process_index"] for s in data["per_process"]] == [0, 1]
  assert all(s["batches"] == 4 for s in data["per_process"])
