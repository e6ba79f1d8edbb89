"""config.train.epoch_carry: the reference's epochs (iters_per_epoch micro-iterations, a step when
(i + 1) % accum == 0 with i restarting each epoch, gradients zeroed only after a step) against a plain
re-implementation of that loop."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from musilingo_jax import config as cfglib
from musilingo_jax import prompts
from musilingo_jax import train as trainlib
from musilingo_jax.models.musilingo import MusiLingo
from test_train_step import _configs, _features_batch

IPE, ACCUM, EPOCHS = 5, 2, 2
SCHED = trainlib.ScheduleConfig(init_lr=2e-3, min_lr=2e-4, warmup_lr=1e-4, warmup_steps=3, iters_per_epoch=IPE,
                                epochs=EPOCHS)


def reference_lr(g):
  """The reference's LinearWarmupCosineLRScheduler at global iteration g (warmup within the first epoch)."""
  if g < SCHED.warmup_steps:
    return min(SCHED.init_lr, SCHED.warmup_lr + (SCHED.init_lr - SCHED.warmup_lr) * g / SCHED.warmup_steps)
  total = SCHED.epochs * SCHED.iters_per_epoch
  return SCHED.min_lr + (SCHED.init_lr - SCHED.min_lr) * 0.5 * (1 + math.cos(math.pi * g / total))


class Groups:
  """The pipeline's iterator: batches of ACCUM interleaved micro-batches, with a checkpointable state."""

  def __init__(self, micro, start=0):
    self.groups = [prompts.interleave_micro_batches(micro[i:i + ACCUM]) for i in range(0, len(micro), ACCUM)]
    self.i = start

  def __iter__(self):
    return self

  def __next__(self):
    self.i += 1
    return self.groups[self.i - 1]

  def get_state(self):
    return {"i": self.i}


@pytest.fixture(scope="module")
def setup():
  cfg = _configs()
  model = MusiLingo.random(cfg, rngs=nnx.Rngs(params=0, dropout=1))
  graphdef, trainable, frozen = trainlib.split_model(model, "projection")
  micro = [_features_batch(cfg, 100 + i, rows=2) for i in range(EPOCHS * IPE + ACCUM)]  # spare at the end
  return graphdef, trainable, frozen, micro


def _run(setup, *, drop_carry=False):
  graphdef, trainable, frozen, micro = setup
  tx = trainlib.make_optimizer(schedule=trainlib.optimizer_schedule(SCHED, ACCUM, epoch_carry=True))
  step = jax.jit(trainlib.make_train_step(graphdef, tx, accum_steps=ACCUM, carry_grads=True))
  grads_fn = jax.jit(trainlib.make_grad_step(graphdef, n_micro=IPE % ACCUM))
  it = Groups(micro)
  carry = trainlib.EpochCarry(it, accum_steps=ACCUM, iters_per_epoch=IPE, get_state=it.get_state)
  opt_state = tx.init(trainable)
  zeros = jax.tree.map(jnp.zeros_like, trainable)
  carried_counts = []
  for k in range(carry.num_updates(EPOCHS)):
    left, batch = carry.next_update(k)
    carried_counts.append(0 if left is None else len(left["input_ids"]) // 2)
    carried = zeros if left is None or drop_carry else grads_fn(trainable, frozen, left, 1000 + k)[0]
    trainable, opt_state, m = step(trainable, opt_state, frozen, batch, jnp.asarray(k), carried)
    assert bool(m["finite"])
  return trainable, opt_state, carried_counts, carry


def _reference_loop(setup):
  """The reference's _train_inner_loop, one micro-batch at a time, with optax AdamW at the reference LR."""
  graphdef, params, frozen, micro = setup
  opt = optax.inject_hyperparams(optax.adamw, static_args=("mask",))(
      learning_rate=0.0, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.05, mask=trainlib.decay_mask)
  state = opt.init(params)
  grad = jax.jit(jax.grad(lambda p, b: nnx.merge(graphdef, p, frozen).loss(b)[0]))
  buf = jax.tree.map(jnp.zeros_like, params)
  stream = iter(micro)
  steps = []
  for epoch in range(EPOCHS):
    for i in range(IPE):
      g = epoch * IPE + i                       # lr_scheduler.step(cur_epoch=epoch, cur_step=i)
      buf = jax.tree.map(jnp.add, buf, grad(params, next(stream)))  # loss.backward() adds into .grad
      if (i + 1) % ACCUM == 0:
        state.hyperparams["learning_rate"] = jnp.asarray(reference_lr(g))
        updates, state = opt.update(buf, state, params)
        params = optax.apply_updates(params, updates)
        buf = jax.tree.map(jnp.zeros_like, params)  # optimizer.zero_grad() only after a step
        steps.append(g)
  return params, steps


def _max_diff(a, b):
  return max(float(jnp.abs(x - y).max()) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_epoch_carry_equals_the_reference_loop(setup):
  ours, opt_state, carried_counts, carry = _run(setup)
  ref, ref_steps = _reference_loop(setup)
  # 2 updates per epoch (at iterations 1, 3 and 6, 8); the 5th micro-batch of epoch 0 goes into update 2.
  assert ref_steps == [1, 3, 6, 8] and carry.num_updates(EPOCHS) == 4
  assert carried_counts == [0, 0, 1, 0]
  has_count = lambda x: "count" in getattr(x, "_fields", ())  # noqa: E731
  counts = [int(x.count) for x in jax.tree.leaves(opt_state, is_leaf=has_count) if has_count(x)]
  assert counts and set(counts) == {4}  # Adam's and the schedule's step counters
  assert _max_diff(ours, ref) < 1e-6
  assert _max_diff(ours, setup[1]) > 1e-4  # it trained
  # Epoch 1's leftover (the 10th micro-batch) is never applied: it waits in the buffer. The state to save:
  # the pipeline before its 5th batch (micro-batches 8, 9), of which one micro-batch was used.
  assert carry.data_state() == {"i": 4, "micro_offset": 1}
  # Without the carried gradient the result is measurably different: the test sees the carry.
  dropped, _, _, _ = _run(setup, drop_carry=True)
  assert _max_diff(dropped, ref) > 1e-5


def test_schedule_and_step_count():
  big = trainlib.ScheduleConfig(init_lr=3e-5, min_lr=1e-5, warmup_lr=1e-6, warmup_steps=5000,
                                iters_per_epoch=5000, epochs=6)
  sched = trainlib.optimizer_schedule(big, 16, epoch_carry=True)
  for k, g in ((0, 15), (311, 311 * 16 + 15), (312, 5000 + 15), (313, 5000 + 31), (624, 10000 + 15)):
    np.testing.assert_allclose(float(sched(k)), float(trainlib.reference_lr(big, g)), rtol=1e-6)
  plain = trainlib.optimizer_schedule(big, 16)
  np.testing.assert_allclose(float(plain(312)), float(trainlib.reference_lr(big, 312 * 16 + 15)), rtol=1e-6)
  c = cfglib.base_config()
  c.train.iters_per_epoch, c.train.accum_steps, c.train.epochs = 5000, 16, 6
  assert cfglib.num_train_steps(c) == 1875
  c.train.epoch_carry = True
  assert cfglib.num_train_steps(c) == 6 * 312
  c.train.accum_reduce = "mean"
  with pytest.raises(cfglib.ConfigError, match="train.accum_reduce"):
    cfglib.validate(c, need_data=False)
  c.train.accum_reduce, c.train.iters_per_epoch = "sum", 8
  with pytest.raises(cfglib.ConfigError, match="iters_per_epoch"):
    cfglib.validate(c, need_data=False)


def test_resume_inside_a_pipeline_batch_continues_the_same_stream():
  """A checkpoint after an update that ended inside a pipeline batch: the pipeline state from before that
  batch plus micro_offset restores the exact micro-batch stream."""
  micro = [{"input_ids": np.full((2, 3), i, np.int32)} for i in range(40)]
  ipe, accum = 7, 3  # 2 updates per epoch, 1 micro-batch carried

  def stream(carry, ks):
    out = []
    for k in ks:
      left, b = carry.next_update(k)
      out.append((None if left is None else left["input_ids"][:, 0].tolist(), b["input_ids"][:, 0].tolist()))
    return out

  def fresh(start=0):
    it = Groups.__new__(Groups)
    it.groups = [prompts.interleave_micro_batches(micro[i:i + accum]) for i in range(0, len(micro), accum)]
    it.i = start
    return it, trainlib.EpochCarry(it, accum_steps=accum, iters_per_epoch=ipe, get_state=it.get_state)

  _, whole = fresh()
  everything = stream(whole, range(6))
  # Micro-batch ids in the reference's order: update 2 first takes the 7th micro-batch (id 6) of epoch 0.
  # (Rows interleaved: micro-batch a = rows b * accum + a.)
  assert everything[:3] == [(None, [0, 1, 2, 0, 1, 2]), (None, [3, 4, 5, 3, 4, 5]), ([6, 6], [7, 8, 9, 7, 8, 9])]
  for cut in range(1, 5):
    _, first = fresh()
    stream(first, range(cut))
    state = first.data_state()
    it, again = fresh(state["i"])
    again.restore(state)
    assert stream(again, range(cut, 6)) == everything[cut:], cut
