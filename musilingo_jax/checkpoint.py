"""Orbax checkpoints of what changes: trainable params, optimizer state, step, data-iterator state, config.

Frozen weights are referenced (the converted checkpoint's path, or how the demo builds them), never
copied into each step. Saves are async; the manager keeps the last `keep` steps plus the best by eval
loss. Restores go against an abstract state carrying the *current* shardings, so a checkpoint written
on one mesh restores onto another device count (LESSONS.md 4). Every process calls save; Orbax has the
primary write metadata (LESSONS.md 5). A step directory appears only once complete (atomic rename).
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx
from orbax.checkpoint import checkpoint_managers as cm


def _pure(state) -> Any:
  """nnx.State (or any pytree with Variables) -> plain nested dicts/arrays that Orbax stores."""
  if isinstance(state, nnx.State):
    return state.to_pure_dict()
  return jax.tree.map(lambda v: v.get_value() if isinstance(v, nnx.Variable) else v, state,
                      is_leaf=lambda x: isinstance(x, nnx.Variable))


def _abstract(tree) -> Any:
  """Abstract arrays with the target shardings (from live arrays or ShapeDtypeStructs)."""
  def one(x):
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None))
  return jax.tree.map(one, _pure(tree))


class Checkpointer:

  def __init__(self, directory: str, *, save_every: int, keep: int, keep_best: bool = True):
    self.directory = os.path.abspath(directory)
    policies = [cm.LatestN(n=keep)]
    if keep_best:
      policies.append(cm.BestN(get_metric_fn=lambda m: m["eval_loss"], reverse=True, n=1,
                               keep_checkpoints_without_metrics=False))
    options = ocp.CheckpointManagerOptions(
        save_interval_steps=save_every, enable_async_checkpointing=True,
        preservation_policy=cm.AnyPreservationPolicy(policies), best_fn=None, create=True)
    self.manager = ocp.CheckpointManager(self.directory, options=options)

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, *, trainable, opt_state, data_state: dict | None, config_json: str,
           frozen_ref: dict, metrics: dict | None = None, force: bool = False) -> bool:
    meta = {"step": int(step), "frozen": frozen_ref, "config": json.loads(config_json),
            "process_count": jax.process_count()}
    items = {
        "trainable": ocp.args.StandardSave(_pure(trainable)),
        "opt_state": ocp.args.StandardSave(_pure(opt_state)),
        "meta": ocp.args.JsonSave(meta),
    }
    if data_state is not None:
      items["data"] = ocp.args.JsonSave(data_state)
    return self.manager.save(step, args=ocp.args.Composite(**items), metrics=metrics, force=force)

  def restore(self, step: int, *, trainable, opt_state) -> tuple[Any, Any, dict | None, dict]:
    """Restores onto the shardings of the given (live or abstract) `trainable` / `opt_state`."""
    names = set(self.manager.item_metadata(step).keys()) if hasattr(self.manager, "item_metadata") else set()
    items = {
        "trainable": ocp.args.StandardRestore(_abstract(trainable)),
        "opt_state": ocp.args.StandardRestore(_abstract(opt_state)),
        "meta": ocp.args.JsonRestore(),
    }
    if not names or "data" in names:
      items["data"] = ocp.args.JsonRestore()
    out = self.manager.restore(step, args=ocp.args.Composite(**items))
    new_trainable = _fill(trainable, out["trainable"])
    new_opt = _fill(opt_state, out["opt_state"])
    return new_trainable, new_opt, out.get("data"), out["meta"]

  def restore_trainable(self, step: int | None, trainable):
    """Only the trainable parameters (for generation / export), onto `trainable`'s shardings."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"{self.directory}: no checkpoint to restore")
    out = self.manager.restore(step, args=ocp.args.Composite(
        trainable=ocp.args.StandardRestore(_abstract(trainable))))
    return _fill(trainable, out["trainable"]), step

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def _fill(template, pure):
  """Puts restored pure arrays back into the template's structure (nnx.State or optax state)."""
  if isinstance(template, nnx.State):
    new = jax.tree.map(lambda x: x, template)
    new.replace_by_pure_dict(pure)
    return new
  leaves, treedef = jax.tree.flatten(_pure(template))
  restored = jax.tree.leaves(pure)
  if len(leaves) != len(restored):
    raise ValueError(f"checkpoint has {len(restored)} optimizer-state arrays, expected {len(leaves)}")
  pure_tree = jax.tree.unflatten(treedef, restored)
  return jax.tree.map(lambda v, x: v.replace(x) if isinstance(v, nnx.Variable) else x, template,
                      pure_tree, is_leaf=lambda x: isinstance(x, nnx.Variable))


def save_pure(path: str, tree) -> None:
  """A one-off synchronous save of a pytree (e.g. converted frozen weights)."""
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(os.path.abspath(path), _pure(tree))


def restore_pure(path: str, abstract=None):
  with ocp.StandardCheckpointer() as ckptr:
    return ckptr.restore(os.path.abspath(path), abstract)


def to_numpy(tree):
  return jax.tree.map(lambda x: np.asarray(x), tree)
