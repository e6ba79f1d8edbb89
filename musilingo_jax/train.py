"""What trains, the optimizer and schedule of the reference, and the jitted train step.

The step is a pure function of (trainable, opt_state, frozen, batch, step): the model is split once
outside the hot loop (no split/merge per step), gradients are taken only with respect to `trainable`, the
frozen tree gets no optimizer state and is never donated, copied or differentiated (a 7B frozen tree must
cost nothing but its one copy).
"""

from __future__ import annotations

import collections
import copy
import dataclasses
import math
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx


TRAIN_MODES = ("projection", "projection+lora", "all")


def trainable_filter(mode: str):
  """The nnx filter for the leaves that train in `mode` (`projection` is the reference's)."""
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
  """Names and parameter counts of the trainable leaves (printed at start, so a wrong filter shows before the run)."""
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
  """The reference schedule at global iteration g (docs/reference.md, Training: MiniGPT-4's
  LinearWarmupCosineLRScheduler).

  warmup: min(init, warmup_lr + (init - warmup_lr) * g / warmup_steps) for g < warmup_steps;
  then min_lr + (init - min_lr) * 0.5 * (1 + cos(pi * g / S)), S = epochs * iters_per_epoch
  (the cosine clock includes warmup).
  """
  g = jnp.asarray(g, jnp.float32)
  total = cfg.epochs * cfg.iters_per_epoch
  warm = jnp.minimum(cfg.init_lr, cfg.warmup_lr + (cfg.init_lr - cfg.warmup_lr) * g / max(cfg.warmup_steps, 1))
  cos = cfg.min_lr + (cfg.init_lr - cfg.min_lr) * 0.5 * (1.0 + jnp.cos(jnp.pi * g / total))
  return jnp.where(g < cfg.warmup_steps, warm, cos)


def optimizer_schedule(cfg: ScheduleConfig, accum_steps: int, epoch_carry: bool = False) -> Callable:
  """LR for optimizer update k. The reference sets the LR at every micro-iteration and steps the
  optimizer after the last micro-batch of each accumulation window, so update k uses the LR of
  iteration k * accum + accum - 1. With epoch_carry (the reference's epochs, see `EpochCarry`) update k
  is the j-th of epoch e (iters_per_epoch // accum updates per epoch) and steps at iteration
  e * iters_per_epoch + (j + 1) * accum - 1."""
  if not epoch_carry:
    return lambda k: reference_lr(cfg, k * accum_steps + accum_steps - 1)
  per_epoch = cfg.iters_per_epoch // accum_steps
  if per_epoch < 1:
    raise ValueError(f"epoch_carry needs iters_per_epoch ({cfg.iters_per_epoch}) >= accum_steps ({accum_steps})")

  def schedule(k):
    e, j = jnp.divmod(jnp.asarray(k, jnp.int32), per_epoch)
    return reference_lr(cfg, e * cfg.iters_per_epoch + (j + 1) * accum_steps - 1)
  return schedule


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
  schedule = optimizer_schedule(sched_cfg, c.train.accum_steps, bool(c.train.get("epoch_carry", False)))
  tx = make_optimizer(schedule=schedule, weight_decay=c.train.weight_decay, b1=c.train.b1, b2=c.train.b2,
                      eps=c.train.eps, clip_norm=c.train.clip_norm or None)
  return tx, schedule


def _micro_batches(batch: dict, accum_steps: int) -> dict:
  """[A*B, ...] -> [A, B, ...], micro-batch a = rows b*A + a (keeps the batch dimension sharded)."""
  def one(x):
    x = x.reshape((x.shape[0] // accum_steps, accum_steps) + x.shape[1:])
    return jnp.moveaxis(x, 1, 0)
  return jax.tree.map(one, batch)


def _grad_fn(graphdef, dropout_seed: int, loss_positions: int | None):
  """value_and_grad of the loss w.r.t. trainable: (trainable, frozen, batch, rng_step) -> ((loss, count), g)."""
  def loss_fn(trainable, frozen, batch, rng_step):
    # Fresh Variable objects inside this trace (reseeding mutates the rng state).
    frozen = jax.tree.map(lambda x: x, frozen)
    model = nnx.merge(graphdef, trainable, frozen)
    nnx.reseed(model, dropout=jax.random.fold_in(jax.random.key(dropout_seed), rng_step))
    return model.loss(batch, loss_positions=loss_positions)

  return jax.value_and_grad(loss_fn, has_aux=True)


def _accumulate(grad_fn, trainable, frozen, batch, n_micro: int, rng_base):
  """Gradients summed over the n_micro micro-batches of `batch` (rows b*n + a = micro-batch a), the
  micro-batch losses [n] and the label-token count; micro-batch i reseeds dropout with rng_base + i."""
  if n_micro == 1:
    (loss, count), grads = grad_fn(trainable, frozen, batch, rng_base)
    return grads, count, loss[None]
  micro = _micro_batches(batch, n_micro)

  def body(carry, xs):
    grads_acc, count_acc = carry
    i, mb = xs
    (loss, count), g = grad_fn(trainable, frozen, mb, rng_base + i)
    return (jax.tree.map(jnp.add, grads_acc, g), count_acc + count), loss

  zeros = jax.tree.map(jnp.zeros_like, trainable)
  (grads, count), losses = jax.lax.scan(body, (zeros, jnp.zeros((), jnp.int32)), (jnp.arange(n_micro), micro))
  return grads, count, losses


def make_train_step(graphdef, tx: optax.GradientTransformation, *, accum_steps: int = 1,
                    accum_reduce: str = "sum", dropout_seed: int = 0, loss_positions: int | None = None,
                    carry_grads: bool = False):
  """The pure step: (trainable, opt_state, frozen, batch, step) -> (trainable, opt_state, metrics).

  Gradient accumulation over `accum_steps` micro-batches of the given batch: "sum" adds the
  micro-batch gradients, as the reference does (its loss is not divided by the number of
  micro-steps); "mean" averages them. loss_positions: see MusiLingo.loss (None = logits everywhere).
  carry_grads (config.train.epoch_carry; "sum" only): the step takes a sixth argument, gradients of
  micro-batches before this update (`make_grad_step`; zeros when there are none), added to the sum.
  """
  if accum_reduce not in ("sum", "mean"):
    raise ValueError(f"config.train.accum_reduce must be 'sum' or 'mean', got {accum_reduce!r}")
  if carry_grads and accum_reduce != "sum":
    raise ValueError("carried gradients (config.train.epoch_carry) need accum_reduce='sum', as the reference")
  grad_fn = _grad_fn(graphdef, dropout_seed, loss_positions)

  def update(trainable, opt_state, frozen, batch, step, carried):
    grads, count, losses = _accumulate(grad_fn, trainable, frozen, batch, accum_steps, step * accum_steps)
    if accum_reduce == "mean" and accum_steps > 1:
      grads = jax.tree.map(lambda g: g / accum_steps, grads)
    finite = jnp.isfinite(losses).all()
    if carried is not None:
      grads = jax.tree.map(jnp.add, grads, carried)
      finite = finite & jnp.isfinite(optax.global_norm(carried))
    updates, opt_state = tx.update(grads, opt_state, trainable)
    trainable = optax.apply_updates(trainable, updates)
    metrics = {"loss": losses.mean(), "tokens": count, "grad_norm": optax.global_norm(grads), "finite": finite}
    return trainable, opt_state, metrics

  if carry_grads:
    return update

  def step(trainable, opt_state, frozen, batch, step):
    return update(trainable, opt_state, frozen, batch, step, None)

  return step


def make_grad_step(graphdef, *, n_micro: int, dropout_seed: int = 0, loss_positions: int | None = None):
  """(trainable, frozen, batch of n_micro micro-batches, rng_base) -> (summed gradients, metrics): the
  micro-batches an `EpochCarry` carries into the next update, with no optimizer step."""
  grad_fn = _grad_fn(graphdef, dropout_seed, loss_positions)

  def grads_only(trainable, frozen, batch, rng_base):
    grads, count, losses = _accumulate(grad_fn, trainable, frozen, batch, n_micro, rng_base)
    return grads, {"loss": losses.mean(), "tokens": count, "finite": jnp.isfinite(losses).all()}

  return grads_only


class EpochCarry:
  """The reference's epochs (config.train.epoch_carry): its loop runs iters_per_epoch micro-iterations per
  epoch with i restarting at 0, steps the optimizer when (i + 1) % accum == 0 and zeroes the gradients
  only after a step. So an epoch makes iters_per_epoch // accum updates, and the gradients of its last
  iters_per_epoch % accum micro-batches are summed into the next epoch's first update (the last epoch's
  are never applied). Update k (the j-th of epoch e) uses the LR of iteration
  e * iters_per_epoch + (j + 1) * accum - 1 (`optimizer_schedule(..., epoch_carry=True)`).

  `batches` is the pipeline's iterator of [accum * B] batches (micro-batch a = rows b * accum + a); this
  regroups its stream of micro-batches in the reference's order: `next_update(k)` returns (the leftover
  micro-batches to carry into update k, or None; update k's batch). `data_state()` / `restore(state)`
  keep a checkpoint exact when an update ends inside a pipeline batch: the pipeline state from before that
  batch plus `micro_offset`, the micro-batches of it already used.
  """

  def __init__(self, batches: Iterator[dict], *, accum_steps: int, iters_per_epoch: int,
               get_state: Callable[[], dict] | None = None):
    if iters_per_epoch < accum_steps:
      raise ValueError(f"epoch_carry needs iters_per_epoch ({iters_per_epoch}) >= accum_steps ({accum_steps}): "
                       "the reference would never step the optimizer")
    self.accum = accum_steps
    self.per_epoch = iters_per_epoch // accum_steps   # updates per epoch
    self.leftover = iters_per_epoch % accum_steps      # micro-batches carried into the next epoch
    self._it, self._get_state = batches, get_state
    self._buf: collections.deque = collections.deque()
    self._state_before: dict | None = None

  def num_updates(self, epochs: int) -> int:
    return epochs * self.per_epoch

  def carried_before(self, k: int) -> int:
    """Micro-batches whose gradients are added into update k (the previous epoch's leftover)."""
    return self.leftover if k > 0 and k % self.per_epoch == 0 else 0

  def _fetch(self) -> None:
    if self._get_state is not None:
      self._state_before = copy.deepcopy(self._get_state())
    batch = next(self._it)
    a = self.accum
    self._buf.extend({k: v[i::a] for k, v in batch.items()} for i in range(a))

  def _take(self, n: int) -> dict:
    while len(self._buf) < n:
      self._fetch()
    micro = [self._buf.popleft() for _ in range(n)]
    if n == 1:
      return dict(micro[0])
    keys = micro[0].keys()
    out = {}
    for key in keys:  # interleave: micro-batch a = rows b * n + a (as the train step takes them apart)
      stacked = np.stack([m[key] for m in micro], axis=1)
      out[key] = stacked.reshape((-1,) + stacked.shape[2:])
    return out

  def next_update(self, k: int) -> tuple[dict | None, dict]:
    n = self.carried_before(k)
    left = self._take(n) if n else None
    return left, self._take(self.accum)

  def data_state(self) -> dict:
    """The pipeline state to checkpoint after an update (needs get_state)."""
    if not self._buf:
      return self._get_state()
    return dict(self._state_before, micro_offset=self.accum - len(self._buf))

  def restore(self, state: dict | None) -> None:
    """After the pipeline iterator was set to `state`: skip the micro-batches the saved run had used."""
    self._buf.clear()
    offset = int((state or {}).get("micro_offset", 0))
    if offset:
      self._fetch()
      for _ in range(offset):
        self._buf.popleft()


def make_eval_step(graphdef, *, loss_positions: int | None = None):
  """(trainable, frozen, batch) -> (loss summed over tokens, token count)."""
  def step(trainable, frozen, batch):
    model = nnx.merge(graphdef, trainable, frozen)
    loss, count = model.loss(batch, loss_positions=loss_positions)
    return loss * count, count
  return step


def jit_train_step(step_fn, *, trainable_sh, opt_sh, frozen_sh, batch_sh, replicated,
                   carry_grads: bool = False) -> Callable:
  """jit with explicit in/out shardings; donates only trainable and optimizer state. carry_grads: the
  step takes carried gradients (sharded as trainable) as a sixth argument."""
  return jax.jit(step_fn,
                 in_shardings=(trainable_sh, opt_sh, frozen_sh, batch_sh, replicated)
                 + ((trainable_sh,) if carry_grads else ()),
                 out_shardings=(trainable_sh, opt_sh, replicated),
                 donate_argnums=(0, 1))


def opt_state_shardings(tx, trainable, trainable_sh, replicated) -> Any:
  """Shardings of the optimizer state: each param-shaped leaf like its param, the rest replicated."""
  abstract = jax.eval_shape(tx.init, trainable)
  return optax.tree_map_params(tx, lambda _, s: s, abstract, trainable_sh,
                               transform_non_params=lambda _: replicated,
                               is_leaf=lambda x: isinstance(x, nnx.Variable))
