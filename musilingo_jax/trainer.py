"""The training loop: config -> mesh -> models -> sharded jitted step -> logs, evals, Orbax checkpoints.

Re-running the same command resumes from the latest checkpoint (params, optimizer state, step and the
Grain iterator state), so a run killed at any point continues bitwise as if uninterrupted (on CPU).
SIGTERM (a TPU preemption notice) saves at the next step boundary and exits cleanly. A non-finite loss
stops the run before anything is saved from it: the last good checkpoint stays the latest.
"""

from __future__ import annotations

import json
import logging
import shutil
import signal
import sys
import tempfile
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from tqdm import tqdm

from musilingo_jax import build, checkpoint, sharding, storage
from musilingo_jax import config as cfglib
from musilingo_jax import train as trainlib
from musilingo_jax.experiment import Experiment
from musilingo_jax.pretrain.experiment import PretrainExperiment
from musilingo_jax.runlog import MetricsWriter

log = logging.getLogger("musilingo_jax")


class NonFiniteLoss(RuntimeError):
  pass


def calibrate_matmul_flops(n: int = 1024, repeats: int = 5, dtype=jnp.float32) -> float:
  """FLOP/s of an n x n `dtype` matmul on device 0, measured here (the MFU denominator on CPU; the GPU
  check's sanity figure in bf16). Dispatches all repeats, then waits: throughput, not per-call latency."""
  x = jnp.ones((n, n), dtype)
  f = jax.jit(lambda a: (a @ a).astype(dtype))
  f(x).block_until_ready()
  t = time.perf_counter()
  for _ in range(repeats):
    y = f(x)
  y.block_until_ready()
  return 2 * n ** 3 * repeats / (time.perf_counter() - t)


def gather_data_state(state: dict) -> dict:
  """Every process's data-iterator state in one JSON item (each process has its own Grain state): Orbax's
  JsonSave writes from the primary process only, so with several processes the states are all-gathered
  first. Collective: every process calls it at the same step (as every process calls save)."""
  if jax.process_count() == 1:
    return state
  raw = np.frombuffer(json.dumps(state).encode(), np.uint8)
  sizes = np.asarray(multihost_utils.process_allgather(np.asarray([raw.size], np.int32))).reshape(-1)
  buf = np.zeros(int(sizes.max()), np.uint8)
  buf[:raw.size] = raw
  rows = np.asarray(multihost_utils.process_allgather(buf)).reshape(len(sizes), -1)
  return {"per_process": [json.loads(bytes(rows[p, :sizes[p]]).decode()) for p in range(len(sizes))],
          "process_count": len(sizes)}


def own_data_state(saved: dict) -> dict:
  """This process's entry of a `gather_data_state` item (a one-process save is the state itself). With a
  different process count, the first entry goes on, and the pipeline refuses it with its clear message."""
  if "per_process" not in saved:
    return saved
  states = saved["per_process"]
  return states[jax.process_index()] if len(states) == jax.process_count() else states[0]


def _install_sigterm() -> dict:
  flag = {"stop": False}

  def handler(signum, frame):
    flag["stop"] = True
    log.warning("SIGTERM received: saving at the next step boundary, then exiting")

  signal.signal(signal.SIGTERM, handler)
  return flag


class Hook:
  """Called by `run` around each step (tests register these to inject faults into a real run): `on_batch`
  may replace this process's batch before the step, `after_step` runs after the step's metrics, eval and
  checkpoint. Subclass and override either."""

  def on_batch(self, step: int, batch: dict) -> dict:
    return batch

  def after_step(self, step: int) -> None:
    pass


# Hooks every `run` in this process calls after the ones it is given (a test's driver registers here before
# starting the command-line entry point).
HOOKS: list[Hook] = []


def experiment_class(c) -> type[Experiment]:
  """What config.task trains: MusiLingo (`Experiment`) or MERT-style encoder pretraining (`PretrainExperiment`)."""
  return PretrainExperiment if c.get("task", "musilingo") == "mert_pretrain" else Experiment


def run(c, workdir: str, *, hooks: list[Hook] | tuple[Hook, ...] = ()) -> dict[str, Any]:
  """Trains per config `c` in `workdir`; returns a summary dict (final step, last metrics, ...). Local
  paths in the config are made absolute first (config.json then means the same from any directory)."""
  c = cfglib.absolute_paths(c)
  cfglib.validate(c, num_devices=jax.device_count(), num_processes=jax.process_count(), need_data=False)
  new_local = not storage.is_remote(workdir) and not storage.path(workdir).exists()
  workdir = check_run_paths(c, workdir)
  if c.compilation_cache:
    jax.config.update("jax_compilation_cache_dir", c.compilation_cache)
  hooks = list(hooks) + HOOKS
  mesh = sharding.make_mesh(c.mesh.shape)
  is_main = jax.process_index() == 0
  try:
    if is_main:
      (workdir / "config.json").write_text(c.to_json_best_effort(indent=2))
    exp = experiment_class(c).from_config(c, mesh)
    if is_main:
      save_run_assets(workdir, exp.tokenizer, exp.model)
  except BaseException:
    if new_local and is_main:  # failed while setting up: leave no run folder behind that holds no run
      shutil.rmtree(workdir, ignore_errors=True)
    raise
  data = exp.data
  if is_main:
    print(trainlib.describe_trainable(exp.trainable), flush=True)

  accum = c.train.accum_steps
  num_steps = cfglib.num_train_steps(c)
  trainable, opt_state = exp.init_state()
  frozen = exp.frozen

  train_it = data.train_iterator()
  ckpt = checkpoint.Checkpointer(workdir / "checkpoints", save_every=c.save_every, keep=c.keep,
                                 keep_best=c.keep_best)
  start, data_state = 0, None
  # The newest checkpoint that restores; a newer, damaged one is set aside with a warning.
  restored = ckpt.restore_latest(trainable=trainable, opt_state=opt_state, warn=_warn if is_main else _quiet)
  if restored is not None:
    start, trainable, opt_state, data_state, meta = restored
    if data_state is not None:
      data.set_train_state(train_it, own_data_state(data_state))
    if is_main:
      print(f"resumed from {ckpt.directory}/{start} (step {meta['step']})", flush=True)

  carry = None  # config.train.epoch_carry: the reference's epochs (train.EpochCarry)
  if c.train.get("epoch_carry", False):
    carry = trainlib.EpochCarry(train_it, accum_steps=accum, iters_per_epoch=c.train.iters_per_epoch,
                                get_state=lambda: data.get_train_state(train_it))
    carry.restore(own_data_state(data_state) if data_state is not None else None)
    carry_grads_fn = exp.grad_step(max(carry.leftover, 1))
    no_carry = jax.jit(lambda t: jax.tree.map(jnp.zeros_like, t), out_shardings=exp.trainable_sh)(trainable)
  eval_fn = exp.eval_step()

  writer = MetricsWriter(workdir, c)
  stop = _install_sigterm()
  peak = calibrate_matmul_flops() * jax.device_count()
  flops_per_step = tokens_per_step = None
  compiled = None
  last: dict[str, float] = {}
  progress = None
  if is_main:
    progress = tqdm(total=num_steps, initial=start, desc="train", unit="step", dynamic_ncols=True)
  t_last, tokens_since, label_tokens_since, last_log_step = time.perf_counter(), 0, 0, start
  step = start

  def run_eval(at: int) -> dict[str, float]:
    ev = evaluate_loss(eval_fn, trainable, frozen, data.eval_batches(c.eval_batches), mesh)
    ev.update(exp.extra_eval_metrics(trainable, at))
    writer.write(at, ev, prefix="eval")
    if is_main:
      print(f"\nstep {at}: eval " + ", ".join(f"{k}={v:.4f}" for k, v in ev.items()), flush=True)
    return ev

  try:
    if start == 0 and c.get("eval_at_start", False):  # the untrained model's eval row (step 0)
      run_eval(0)
      writer.flush()
    while step < num_steps:
      left, local = (None, next(train_it)) if carry is None else carry.next_update(step)
      for hook in hooks:
        local = hook.on_batch(step, local)
      gbatch = sharding.global_batch(local, mesh)
      if compiled is None:
        compiled = exp.train_step({k: v.sharding for k, v in gbatch.items()}, carry_grads=carry is not None)
        flops_per_step, tokens_per_step = exp.step_cost(gbatch)
      carried = ()
      if carry is not None:  # the previous epoch's leftover micro-batches' gradients (zeros when none)
        carried = (no_carry if left is None else carry_grads_fn(
            trainable, frozen, sharding.global_batch(left, mesh), jnp.asarray((num_steps + step) * accum))[0],)
      new_trainable, new_opt, m = compiled(trainable, opt_state, frozen, gbatch, jnp.asarray(step, jnp.int32),
                                           *carried)
      loss = float(m["loss"])
      if not bool(m["finite"]):
        raise NonFiniteLoss(
            f"non-finite loss ({loss}) at step {step}: stopping. Nothing from this step was saved; the "
            f"last good checkpoint is step {ckpt.latest_step()} in {ckpt.directory}"
              + (" (with config.train.head_at_labels, a row with more label tokens than prompt.max_txt_len "
                 "also gives NaN)" if exp.loss_positions else ""))
      trainable, opt_state = new_trainable, new_opt
      step += 1
      tokens_since += tokens_per_step
      label_tokens_since += int(m["tokens"])
      if progress is not None:
        progress.update(1)
        progress.set_postfix(loss=f"{loss:.4f}")
      if step % c.log_every == 0 or step == num_steps:
        jax.block_until_ready(trainable)
        now = time.perf_counter()
        dt = (now - t_last) / (step - last_log_step)  # the first window includes compilation
        last = {"loss": loss, "lr": float(exp.schedule(step - 1)), "grad_norm": float(m["grad_norm"]),
                "tokens_per_s": tokens_since / (now - t_last),
                "label_tokens_per_s": label_tokens_since / (now - t_last), "step_time_s": dt,
                "mfu": flops_per_step / dt / peak}
        writer.write(step, last)
        t_last, tokens_since, label_tokens_since, last_log_step = now, 0, 0, step
      metrics_for_ckpt = None
      if step % c.eval_every == 0 or step == num_steps:
        ev = run_eval(step)
        last.update({f"eval_{k}": v for k, v in ev.items()})
        metrics_for_ckpt = {"eval_loss": ev["loss"]}
      if step % c.log_every == 0 or step % c.eval_every == 0 or step == num_steps:
        writer.flush()  # durable up to here (a gs:// workdir: uploaded), before the save and any hook
      if step % c.save_every == 0 or step == num_steps or stop["stop"]:
        ckpt.save(step, trainable=trainable, opt_state=opt_state,
                  data_state=gather_data_state(carry.data_state() if carry else data.get_train_state(train_it)),
                  config_json=c.to_json_best_effort(),
                  frozen_ref=exp.frozen_ref, metrics=metrics_for_ckpt, force=True)
      for hook in hooks:
        hook.after_step(step)
      if stop["stop"]:
        print(f"\npreempted: saved step {step} to {ckpt.directory}; re-run the same command to resume",
              flush=True)
        break
  finally:
    if progress is not None:
      progress.close()
    ckpt.close()
    writer.close()
  return {"step": step, "num_steps": num_steps, "metrics": last, "model": exp.merged(trainable),
          "tokenizer": exp.tokenizer, "data": data, "preempted": stop["stop"]}


def save_run_assets(workdir, tokenizer, model) -> None:
  """What inference needs from a run besides its config and checkpoints, kept in the run folder so it needs
  nothing else (no records, no cache): the tokenizer (workdir/tokenizer/) and the feature statistics of
  config.model.feature_norm (workdir/feature_stats.json: mean, std)."""
  if tokenizer is not None:
    if storage.is_remote(workdir):
      with tempfile.TemporaryDirectory(prefix="musilingo-tok-") as tmp:
        tokenizer.save(tmp)
        storage.upload_tree(tmp, workdir / build.RUN_TOKENIZER_DIR)
    else:
      tokenizer.save(workdir / build.RUN_TOKENIZER_DIR)
  norm = getattr(model, "feature_norm", None)
  if norm is not None:
    inv = np.asarray(norm.inv_std[...], np.float32)
    stats = {"mean": np.asarray(norm.mean[...], np.float32).tolist(), "inv_std": inv.tolist(),
             "std": (1.0 / inv.astype(np.float64)).tolist()}  # float32 values, exact in JSON
    storage.write_atomic(workdir / build.RUN_FEATURE_STATS, json.dumps(stats))


def _warn(msg: str) -> None:
  print(msg, file=sys.stderr, flush=True)


def _quiet(msg: str) -> None:  # processes other than 0: process 0 says it
  del msg


def check_run_paths(c, workdir):
  """Every path the run will touch, before anything is built or compiled: the workdir can be written, the
  records and the converted checkpoint can be read (local or gs://). Returns the workdir as an epath.Path.
  A missing object or an unreachable bucket is a storage.StorageError, one line naming the URL (local
  paths are also checked by config.validate, which stays offline)."""
  out = storage.check_writable(workdir, "--workdir")
  for field in ("data.records_dir", "model.checkpoint"):
    group, name = field.split(".")
    value = c[group].get(name, "")
    if value and storage.is_remote(value):
      storage.check_readable(value, f"config.{field} =")
  if c.compilation_cache and storage.is_remote(c.compilation_cache):
    storage.check_writable(c.compilation_cache, "config.compilation_cache =")
  return checkpoint.run_path(out)


def evaluate_loss(eval_fn, trainable, frozen, batches, mesh) -> dict[str, float]:
  """The token-weighted eval loss over `batches`. eval_fn (Experiment.eval_step) returns (loss summed over
  tokens, token count), and may add a dict of further metrics summed the same way: their means come out
  beside the loss (pretraining's loss terms, from the same forward pass)."""
  total, count, sums = 0.0, 0, {}
  for local in batches:
    s, n, *more = eval_fn(trainable, frozen, sharding.global_batch(local, mesh))
    total += float(s)
    count += int(n)
    for k, v in (more[0] if more else {}).items():
      sums[k] = sums.get(k, 0.0) + float(v)
  return {"loss": total / max(count, 1), "tokens": float(count), **{k: v / max(count, 1) for k, v in sums.items()}}
