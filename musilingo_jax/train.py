"""What trains, the optimizer and schedule of the reference, and the jitted train step.

The step is a pure function of (trainable, opt_state, frozen, batch, step): the model is split once
outside the hot loop (LESSONS.md 10), gradients are taken only with respect to `trainable`, the frozen
tree gets no optimizer state and is never donated, copied or differentiated (LESSONS.md 12).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx


TRAIN_MODES = ("projection", "projection+lora", "all")


def trainable_filter(mode: str):
  """The nnx filter for the leaves that train in `mode` (SPEC: `projection` is the reference)."""
  projection = nnx.All(nnx.Param, nnx.PathContains("llama_proj"))
  if mode == "projection":
    return projection
  if mode == "projection+lora":
    return nnx.Any(projection, nnx.LoRAParam)
  if mode == "all":
    return nnx.Param
  raise ValueError(f"config.train.trainable must be one of {TRAIN_MODES}, got {mode!r}")


def split_model(model: nnx.Module, mode: str):
  """(graphdef, trainable, frozen): frozen holds every other variable (weights, rng state)."""
  filt = trainable_filter(mode)
  graphdef, trainable, frozen = nnx.split(model, filt, ...)
  return graphdef, trainable, frozen


def describe_trainable(trainable: nnx.State) -> str:
  """Names and parameter counts of the trainable leaves (printed at start; LESSONS.md 11)."""
  lines, total = [], 0
  for path, var in nnx.to_flat_state(trainable):
    n = int(math.prod(var.get_value().shape))
    total += n
    lines.append(f"  {'.'.join(map(str, path))}: {tuple(var.get_value().shape)} = {n:,}")
  return "\n".join([f"trainable parameters: {total:,} in {len(lines)} arrays"] + lines)


# --- schedule and optimizer ---------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class ScheduleConfig:
  init_lr: float
  min_lr: float
  warmup_lr: float
  warmup_steps: int
  iters_per_epoch: int
  epochs: int


def reference_lr(cfg: ScheduleConfig, g):
  """SPEC.md section 3 (MiniGPT-4's LinearWarmupCosineLRScheduler) at global iteration g.

  warmup: min(init, warmup_lr + (init - warmup_lr) * g / warmup_steps) for g < warmup_steps;
  then min_lr + (init - min_lr) * 0.5 * (1 + cos(pi * g / S)), S = epochs * iters_per_epoch
  (the cosine clock includes warmup).
  """
  g = jnp.asarray(g, jnp.float32)
  total = cfg.epochs * cfg.iters_per_epoch
  warm = jnp.minimum(cfg.init_lr, cfg.warmup_lr + (cfg.init_lr - cfg.warmup_lr) * g / max(cfg.warmup_steps, 1))
  cos = cfg.min_lr + (cfg.init_lr - cfg.min_lr) * 0.5 * (1.0 + jnp.cos(jnp.pi * g / total))
  return jnp.where(g < cfg.warmup_steps, warm, cos)


def optimizer_schedule(cfg: ScheduleConfig, accum_steps: int) -> Callable:
  """LR for optimizer update k. The reference sets the LR at every micro-iteration and steps the
  optimizer after the last micro-batch of each accumulation window, so update k uses the LR of
  iteration k * accum + accum - 1."""
  return lambda k: reference_lr(cfg, k * accum_steps + accum_steps - 1)


def decay_mask(params):
  """Weight decay on matrices only (no decay on biases or other 1-D params), as the reference."""
  return jax.tree.map(lambda p: jnp.ndim(p) >= 2, params)


def make_optimizer(*, schedule: Callable, weight_decay: float = 0.05, b1: float = 0.9,
                   b2: float = 0.999, eps: float = 1e-8, clip_norm: float | None = None):
  tx = optax.adamw(schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, mask=decay_mask)
  if clip_norm:
    tx = optax.chain(optax.clip_by_global_norm(clip_norm), tx)
  return tx


# --- the step -----------------------------------------------------------------------------------

def optimizer_from_config(c) -> tuple[optax.GradientTransformation, Callable]:
  """(optimizer, per-optimizer-step lr schedule) from config.train (the trainer's and the AOT compiler's)."""
  sched_cfg = ScheduleConfig(c.train.init_lr, c.train.min_lr, c.train.warmup_lr, c.train.warmup_steps,
                             c.train.iters_per_epoch, c.train.epochs)
  schedule = optimizer_schedule(sched_cfg, c.train.accum_steps)
  tx = make_optimizer(schedule=schedule, weight_decay=c.train.weight_decay, b1=c.train.b1, b2=c.train.b2,
                      eps=c.train.eps, clip_norm=c.train.clip_norm or None)
  return tx, schedule


def _micro_batches(batch: dict, accum_steps: int) -> dict:
  """[A*B, ...] -> [A, B, ...], micro-batch a = rows b*A + a (keeps the batch dimension sharded)."""
  def one(x):
    x = x.reshape((x.shape[0] // accum_steps, accum_steps) + x.shape[1:])
    return jnp.moveaxis(x, 1, 0)
  return jax.tree.map(one, batch)


def make_train_step(graphdef, tx: optax.GradientTransformation, *, accum_steps: int = 1,
                    accum_reduce: str = "sum", dropout_seed: int = 0, loss_positions: int | None = None):
  """The pure step: (trainable, opt_state, frozen, batch, step) -> (trainable, opt_state, metrics).

  Gradient accumulation over `accum_steps` micro-batches of the given batch: "sum" adds the
  micro-batch gradients, as the reference does (its loss is not divided by the number of
  micro-steps); "mean" averages them. loss_positions: see MusiLingo.loss (None = logits everywhere).
  """
  if accum_reduce not in ("sum", "mean"):
    raise ValueError(f"config.train.accum_reduce must be 'sum' or 'mean', got {accum_reduce!r}")

  def loss_fn(trainable, frozen, batch, rng_step):
    # Fresh Variable objects inside this trace (reseeding mutates the rng state).
    frozen = jax.tree.map(lambda x: x, frozen)
    model = nnx.merge(graphdef, trainable, frozen)
    nnx.reseed(model, dropout=jax.random.fold_in(jax.random.key(dropout_seed), rng_step))
    return model.loss(batch, loss_positions=loss_positions)

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

  def step(trainable, opt_state, frozen, batch, step):
    if accum_steps == 1:
      (loss, count), grads = grad_fn(trainable, frozen, batch, step)
      losses = loss[None]
    else:
      micro = _micro_batches(batch, accum_steps)

      def body(carry, xs):
        grads_acc, count_acc = carry
        i, mb = xs
        (loss, count), g = grad_fn(trainable, frozen, mb, step * accum_steps + i)
        return (jax.tree.map(jnp.add, grads_acc, g), count_acc + count), loss

      zeros = jax.tree.map(jnp.zeros_like, trainable)
      (grads, count), losses = jax.lax.scan(
          body, (zeros, jnp.zeros((), jnp.int32)), (jnp.arange(accum_steps), micro))
      if accum_reduce == "mean":
        grads = jax.tree.map(lambda g: g / accum_steps, grads)
    updates, opt_state = tx.update(grads, opt_state, trainable)
    trainable = optax.apply_updates(trainable, updates)
    metrics = {"loss": losses.mean(), "tokens": count, "grad_norm": optax.global_norm(grads),
               "finite": jnp.isfinite(losses).all()}
    return trainable, opt_state, metrics

  return step


def make_eval_step(graphdef, *, loss_positions: int | None = None):
  """(trainable, frozen, batch) -> (loss summed over tokens, token count)."""
  def step(trainable, frozen, batch):
    model = nnx.merge(graphdef, trainable, frozen)
    loss, count = model.loss(batch, loss_positions=loss_positions)
    return loss * count, count
  return step


def jit_train_step(step_fn, *, trainable_sh, opt_sh, frozen_sh, batch_sh, replicated) -> Callable:
  """jit with explicit in/out shardings; donates only trainable and optimizer state."""
  return jax.jit(step_fn,
                 in_shardings=(trainable_sh, opt_sh, frozen_sh, batch_sh, replicated),
                 out_shardings=(trainable_sh, opt_sh, replicated),
                 donate_argnums=(0, 1))


def opt_state_shardings(tx, trainable, trainable_sh, replicated) -> Any:
  """Shardings of the optimizer state: each param-shaped leaf like its param, the rest replicated."""
  abstract = jax.eval_shape(tx.init, trainable)
  return optax.tree_map_params(tx, lambda _, s: s, abstract, trainable_sh,
                               transform_non_params=lambda _: replicated,
                               is_leaf=lambda x: isinstance(x, nnx.Variable))
