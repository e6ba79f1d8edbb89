"""The training loop: config -> mesh -> models -> sharded jitted step -> logs, evals, Orbax checkpoints.

Re-running the same command resumes from the latest checkpoint (params, optimizer state, step and the
Grain iterator state), so a run killed at any point continues bitwise as if uninterrupted (on CPU).
SIGTERM (a TPU preemption notice) saves at the next step boundary and exits cleanly. A non-finite loss
stops the run before anything is saved from it: the last good checkpoint stays the latest.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from musilingo_jax import build, checkpoint, sharding
from musilingo_jax import config as cfglib
from musilingo_jax import train as trainlib

log = logging.getLogger("musilingo_jax")


class NonFiniteLoss(RuntimeError):
  pass


class MetricsWriter:
  """TensorBoard event files (tensorboardX) + a JSONL file, written by process 0 only."""

  def __init__(self, workdir: str):
    self.enabled = jax.process_index() == 0
    if not self.enabled:
      return
    from tensorboardX import SummaryWriter
    self.tb = SummaryWriter(os.path.join(workdir, "tb"))
    self.jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")

  def write(self, step: int, metrics: dict[str, float], prefix: str = "train") -> None:
    if not self.enabled:
      return
    for k, v in metrics.items():
      self.tb.add_scalar(f"{prefix}/{k}", v, step)
    self.jsonl.write(json.dumps({"step": step, "split": prefix, **metrics}) + "\n")
    self.jsonl.flush()

  def close(self) -> None:
    if self.enabled:
      self.tb.close()
      self.jsonl.close()


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


def _count(module, filt) -> int:
  return sum(int(np.prod(v.get_value().shape)) for _, v in nnx.to_flat_state(nnx.state(module, filt)))


def step_flops(model, rows: int, seq_len: int, n_audio_tokens: int, *, trainable_mode: str,
               encoder_frames: int = 0, head_positions: int | None = None) -> float:
  """FLOPs one step must do (LESSONS.md 14), not 6N: per token the frozen LLM's matmuls forward (2N)
  and their activation gradients backward (2N; frozen weights get no weight gradients), attention
  (QK^T and AV: forward, and twice that backward), weight gradients only for trainable leaves
  (projection per audio token; LoRA/all per token), and the encoder's forward when it runs in the step.
  The LM head runs at `head_positions` per row when the loss computes logits only there
  (config.train.head_at_labels), else at every position. Counts the full (unmasked) attention matrix,
  which is what the kernels compute."""
  cfg = model.cfg.llm
  base = nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam))
  head = cfg.vocab_size * cfg.hidden_size
  n_body = _count(model.llm, base) - head  # the lookup is no matmul
  if not cfg.tie_word_embeddings:
    n_body -= head                          # the untied lm_head is counted apart
  attn_fwd = 4 * cfg.num_hidden_layers * seq_len * cfg.num_attention_heads * cfg.head_dim
  tokens = rows * seq_len
  head_tokens = rows * min(seq_len, head_positions or seq_len)
  flops = tokens * (4 * n_body + 3 * attn_fwd) + head_tokens * 4 * head
  d_enc, d_llm = model.cfg.encoder.hidden_size, cfg.hidden_size
  flops += 6 * d_enc * d_llm * rows * n_audio_tokens
  if trainable_mode == "projection+lora":
    flops += 2 * _count(model.llm, nnx.LoRAParam) * tokens
  elif trainable_mode == "all":
    flops += 2 * (n_body * tokens + head * head_tokens)
  if encoder_frames:
    n_enc = _count(model.encoder.encoder, nnx.Param)
    flops += 2 * n_enc * encoder_frames * rows
  return float(flops)


def gather_data_state(state: dict) -> dict:
  """Every process's data-iterator state in one JSON item (LESSONS.md 6): Orbax's JsonSave writes from the
  primary process only, so with several processes the states are all-gathered first. Collective: every
  process calls it at the same step (as every process calls save)."""
  if jax.process_count() == 1:
    return state
  from jax.experimental import multihost_utils
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


def run(c, workdir: str) -> dict[str, Any]:
  """Trains per config `c` in `workdir`; returns a summary dict (final step, last metrics, ...)."""
  os.makedirs(workdir, exist_ok=True)
  cfglib.validate(c, num_devices=jax.device_count(), need_data=False)
  if c.compilation_cache:
    jax.config.update("jax_compilation_cache_dir", c.compilation_cache)
  mesh = sharding.make_mesh(c.mesh.shape)
  rules = c.mesh.rules
  is_main = jax.process_index() == 0
  if is_main:
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(c.to_json_best_effort(indent=2))

  model, tokenizer, frozen_ref = build.build_model(c, mesh=mesh, rules=rules)
  data = build.build_data(c, tokenizer, model)
  model.eval()
  eval_graphdef, _, _ = trainlib.split_model(model, c.train.trainable)
  model.train()
  graphdef, trainable, frozen = trainlib.split_model(model, c.train.trainable)
  if is_main:
    print(trainlib.describe_trainable(trainable), flush=True)

  accum = c.train.accum_steps
  num_steps = cfglib.num_train_steps(c)
  tx, schedule = trainlib.optimizer_from_config(c)
  rep = sharding.replicated(mesh)
  trainable_sh = sharding.state_shardings(trainable, mesh, rules)
  frozen_sh = sharding.state_shardings(frozen, mesh, rules)
  opt_sh = trainlib.opt_state_shardings(tx, trainable, trainable_sh, rep)
  trainable = jax.device_put(trainable, trainable_sh)
  opt_state = jax.jit(tx.init, out_shardings=opt_sh)(trainable)

  train_it = data.train_iterator()
  ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), save_every=c.save_every,
                                 keep=c.keep, keep_best=c.keep_best)
  start = ckpt.latest_step() or 0
  if start:
    trainable, opt_state, data_state, meta = ckpt.restore(start, trainable=trainable, opt_state=opt_state)
    if data_state is not None:
      data.set_train_state(train_it, own_data_state(data_state))
    print(f"resumed from {ckpt.directory}/{start} (step {meta['step']})", flush=True)

  carry = None  # config.train.epoch_carry: the reference's epochs (train.EpochCarry)
  if c.train.get("epoch_carry", False):
    carry = trainlib.EpochCarry(train_it, accum_steps=accum, iters_per_epoch=c.train.iters_per_epoch,
                                get_state=lambda: data.get_train_state(train_it))
    carry.restore(own_data_state(data_state) if start and data_state is not None else None)
    carry_grads_fn = jax.jit(trainlib.make_grad_step(graphdef, n_micro=max(carry.leftover, 1), dropout_seed=c.seed,
                                                     loss_positions=cfglib.loss_positions(c)),
                             out_shardings=(trainable_sh, rep))
    no_carry = jax.jit(lambda t: jax.tree.map(jnp.zeros_like, t), out_shardings=trainable_sh)(trainable)
  step_fn = trainlib.make_train_step(graphdef, tx, accum_steps=accum,
                                     accum_reduce=c.train.accum_reduce, dropout_seed=c.seed,
                                     loss_positions=cfglib.loss_positions(c), carry_grads=carry is not None)
  batch_sh = None  # filled per key at the first batch
  eval_fn = jax.jit(trainlib.make_eval_step(eval_graphdef, loss_positions=cfglib.loss_positions(c)))

  writer = MetricsWriter(workdir)
  stop = _install_sigterm()
  peak = calibrate_matmul_flops() * jax.device_count()
  flops_per_step = None
  compiled = None
  last: dict[str, float] = {}
  progress = None
  if is_main:
    from tqdm import tqdm
    progress = tqdm(total=num_steps, initial=start, desc="train", unit="step", dynamic_ncols=True)
  # Fault injection for the resume / NaN tests (environment, so a test can aim at a real subprocess).
  fault_nan = int(os.environ.get("MUSILINGO_FAULT_NAN_AT_STEP", "-1"))
  fault_kill = int(os.environ.get("MUSILINGO_FAULT_KILL_AT_STEP", "-1"))
  t_last, tokens_since, label_tokens_since, last_log_step = time.perf_counter(), 0, 0, start
  step = start
  try:
    # The step and eval traces happen inside: hidden states keep the batch split (sharding.constrain).
    with sharding.activation_sharding(mesh, rules, c.mesh.get("constrain_activations", True)):
      while step < num_steps:
        left, local = (None, next(train_it)) if carry is None else carry.next_update(step)
        if step == fault_nan:
          local = {k: (v * np.nan if k in ("features", "audio") else v) for k, v in local.items()}
        gbatch = sharding.global_batch(local, mesh)
        if compiled is None:
          batch_sh = {k: v.sharding for k, v in gbatch.items()}
          compiled = trainlib.jit_train_step(step_fn, trainable_sh=trainable_sh, opt_sh=opt_sh,
                                             frozen_sh=frozen_sh, batch_sh=batch_sh, replicated=rep,
                                             carry_grads=carry is not None)
          seq_len = gbatch["input_ids"].shape[1]
          frames = (model.cfg.encoder.feature_lengths(gbatch["audio"].shape[-1])
                    if "audio" in gbatch else 0)
          flops_per_step = step_flops(model, gbatch["input_ids"].shape[0], seq_len, data.slots.tokens,
                                      trainable_mode=c.train.trainable, encoder_frames=int(frames),
                                      head_positions=cfglib.loss_positions(c))
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
                   "also gives NaN)" if cfglib.loss_positions(c) else ""))
        trainable, opt_state = new_trainable, new_opt
        step += 1
        tokens_since += int(np.prod(gbatch["input_ids"].shape))
        label_tokens_since += int(m["tokens"])
        if progress is not None:
          progress.update(1)
          progress.set_postfix(loss=f"{loss:.4f}")
        if step % c.log_every == 0 or step == num_steps:
          jax.block_until_ready(trainable)
          now = time.perf_counter()
          dt = (now - t_last) / (step - last_log_step)  # the first window includes compilation
          last = {"loss": loss, "lr": float(schedule(step - 1)), "grad_norm": float(m["grad_norm"]),
                  "tokens_per_s": tokens_since / (now - t_last),
                  "label_tokens_per_s": label_tokens_since / (now - t_last), "step_time_s": dt,
                  "mfu": flops_per_step / dt / peak}
          writer.write(step, last)
          t_last, tokens_since, label_tokens_since, last_log_step = now, 0, 0, step
        metrics_for_ckpt = None
        if step % c.eval_every == 0 or step == num_steps:
          ev = evaluate_loss(eval_fn, trainable, frozen, data.eval_batches(c.eval_batches), mesh)
          if c.eval.generate_samples:
            # Generation's jitted functions outlive this run: trace them without the run's constraints.
            with sharding.activation_sharding(mesh, rules, enabled=False):
              ev.update(data.generation_metrics(nnx.merge(eval_graphdef, trainable, frozen),
                                                c.eval.generate_samples))
          writer.write(step, ev, prefix="eval")
          last.update({f"eval_{k}": v for k, v in ev.items()})
          metrics_for_ckpt = {"eval_loss": ev["loss"]}
          if is_main:
            print(f"\nstep {step}: eval " + ", ".join(f"{k}={v:.4f}" for k, v in ev.items()), flush=True)
        if step % c.save_every == 0 or step == num_steps or stop["stop"]:
          ckpt.save(step, trainable=trainable, opt_state=opt_state,
                    data_state=gather_data_state(carry.data_state() if carry else data.get_train_state(train_it)),
                    config_json=c.to_json_best_effort(),
                    frozen_ref=frozen_ref, metrics=metrics_for_ckpt, force=True)
        if step == fault_kill:
          os.kill(os.getpid(), signal.SIGKILL)  # mid-run, possibly while an async save is in flight
        if stop["stop"]:
          print(f"\npreempted: saved step {step} to {ckpt.directory}; re-run the same command to resume",
                flush=True)
          break
  finally:
    if progress is not None:
      progress.close()
    ckpt.close()
    writer.close()
  model = nnx.merge(eval_graphdef, trainable, frozen)
  return {"step": step, "num_steps": num_steps, "metrics": last, "model": model, "tokenizer": tokenizer,
          "data": data, "preempted": stop["stop"]}


def evaluate_loss(eval_fn, trainable, frozen, batches, mesh) -> dict[str, float]:
  total, count = 0.0, 0
  for local in batches:
    s, n = eval_fn(trainable, frozen, sharding.global_batch(local, mesh))
    total += float(s)
    count += int(n)
  return {"loss": total / max(count, 1), "tokens": float(count)}
