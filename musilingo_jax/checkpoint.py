"""Orbax checkpoints of what changes: trainable params, optimizer state, step, data-iterator state, config.

Frozen weights are referenced (the converted checkpoint's path, or how the demo builds them), never
copied into each step. Saves are async; the manager keeps the last `keep` steps plus the best by eval
loss. Restores go against an abstract state carrying the *current* shardings, so a checkpoint written
on one mesh restores onto another device count (arrays are saved by their global shape). Every process
calls save; Orbax has the primary write metadata (one writer per file).

The directory may be local or gs:// (etils.epath paths; Orbax writes arrays through tensorstore). A step is
listed only once complete: locally it is written under a temporary name and renamed; on GCS (no atomic
rename) it is listed only once its `commit_success.txt` exists. Unfinished steps of a killed run are removed
when the next run opens the directory. `restore_latest` falls back to the newest step that restores when a
newer one does not (truncated or corrupt array files), setting the bad one aside with a warning.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
import traceback
from typing import Any, Callable

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from flax import nnx
from orbax.checkpoint import checkpoint_managers as cm

from musilingo_jax import storage


class CheckpointError(RuntimeError):
  """No checkpoint in the directory restores (one line per step tried)."""


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

  def __init__(self, directory: str | os.PathLike, *, save_every: int, keep: int, keep_best: bool = True):
    self.directory = run_path(directory)
    policies = [cm.LatestN(n=keep)]
    if keep_best:
      policies.append(cm.BestN(get_metric_fn=lambda m: m["eval_loss"], reverse=True, n=1,
                               keep_checkpoints_without_metrics=False))
    options = ocp.CheckpointManagerOptions(
        save_interval_steps=save_every, enable_async_checkpointing=True,
        preservation_policy=cm.AnyPreservationPolicy(policies), best_fn=None, create=True,
        cleanup_tmp_directories=True)  # a killed run's unfinished steps
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
    has_data = (self.directory / str(step) / "data").exists()
    items = {
        "trainable": ocp.args.StandardRestore(_abstract(trainable)),
        "opt_state": ocp.args.StandardRestore(_abstract(opt_state)),
        "meta": ocp.args.JsonRestore(),
    }
    if has_data:
      items["data"] = ocp.args.JsonRestore()
    out = self.manager.restore(step, args=ocp.args.Composite(**items))
    new_trainable = _fill(trainable, out["trainable"])
    new_opt = _fill(opt_state, out["opt_state"])
    return new_trainable, new_opt, out.get("data"), out["meta"]

  def restore_latest(self, *, trainable, opt_state, warn: Callable[[str], None] | None = None
                     ) -> tuple[int, Any, Any, dict | None, dict] | None:
    """The newest step that restores -> (step, trainable, opt_state, data_state, meta); None when there is
    no checkpoint. A newer step that does not restore (truncated or corrupt files: Orbax lists only
    finished steps, so this is damage after the fact) is set aside as `unrestorable-<step>-<time>` beside
    the steps, with a warning naming it, and the run goes on from the one before. When no step restores,
    CheckpointError names each step's error and nothing is moved (a config that no longer matches the
    checkpoints fails them all alike). With several processes, a step counts as restored only when it
    restored on every process."""
    warn = warn or _warn
    _quiet_closed_loop_callbacks()
    failed: list[tuple[int, str]] = []
    for step in sorted(self.manager.all_steps(), reverse=True):
      try:
        out, err = self.restore(step, trainable=trainable, opt_state=opt_state), None
      except Exception as e:  # noqa: BLE001 - any failure to read the step: try the one before
        out, err = None, _one_line(e)
      if _on_every_process(err is None):
        for bad, why in failed:
          moved = self._set_aside(bad)
          warn(f"warning: checkpoint step {bad} in {self.directory} does not restore ({why}); moved it to "
               f"{moved} and resuming from step {step}")
        if failed:
          self.manager.reload()
        return (step, *out)
      failed.append((step, err or "it failed to restore on another process"))
    if failed:
      raise CheckpointError(f"no checkpoint in {self.directory} restores: " + "; ".join(
          f"step {s}: {why}" for s, why in failed))
    return None

  def _set_aside(self, step: int) -> epath.Path:
    """Renames step `step`'s directory out of Orbax's sight (process 0; every process waits for it)."""
    dst = self.directory / f"unrestorable-{step}-{time.strftime('%Y%m%dT%H%M%S')}"
    if jax.process_index() == 0:
      (self.directory / str(step)).rename(dst)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      multihost_utils.sync_global_devices(f"checkpoint set aside {step}")
    return dst

  def restore_trainable(self, step: int | None, trainable):
    """Only the trainable parameters (for generation / export), onto `trainable`'s shardings."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"{self.directory}: no checkpoint to restore")
    out = self.manager.restore(step, args=ocp.args.Composite(
        trainable=ocp.args.StandardRestore(_abstract(trainable))))
    return _fill(trainable, out["trainable"]), step

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


def run_path(p: str | os.PathLike) -> epath.Path:
  """A run path as an epath.Path: a gs:// URL as given, a local path made absolute (Orbax wants one)."""
  return storage.path(p) if storage.is_remote(p) else storage.path(p).absolute()


def _warn(msg: str) -> None:
  print(msg, file=sys.stderr, flush=True)


def _one_line(e: BaseException) -> str:
  """An exception as one short line: its type and its message's last informative line (a tensorstore
  error's last line names the file and the cause, e.g. OUT_OF_RANGE: Error reading "..." in OCDBT ...)."""
  lines = [l.strip() for l in str(e).splitlines() if l.strip()]
  text = next((l for l in lines if any(k in l for k in ("OUT_OF_RANGE", "DATA_LOSS", "NOT_FOUND",
                                                          "FAILED_PRECONDITION", "INVALID_ARGUMENT"))),
              lines[0] if lines else "")
  text = text if len(text) <= 300 else text[:297] + "..."
  return f"{type(e).__name__}: {text}" if text else type(e).__name__


def _quiet_closed_loop_callbacks() -> None:
  """When a restore fails, Orbax closes the asyncio loop it restored in while tensorstore still finishes
  reads in flight; their completion callbacks, called from tensorstore's native threads, then raise "Event
  loop is closed" in `loop.call_soon_threadsafe`, and tensorstore reports each as unraisable: one traceback
  each on stderr (a dozen on GCS). Exactly those are dropped (a RuntimeError whose outermost Python frame
  is `call_soon_threadsafe`: no Python caller); everything else prints as before."""
  if getattr(sys.unraisablehook, "_musilingo_quiet", False):
    return
  previous = sys.unraisablehook  # tensorstore reports a failing callback as "unraisable"

  def hook(unraisable):
    tb = unraisable.exc_traceback
    if (isinstance(unraisable.exc_value, RuntimeError) and str(unraisable.exc_value) == "Event loop is closed"
        and tb is not None and tb.tb_frame.f_code.co_name == "call_soon_threadsafe"):
      return
    if tb is not None and any("orbax/checkpoint/_src/serialization" in f.filename
                              for f in traceback.extract_tb(tb)):
      return  # the failed restore's own reads, ending after it was reported
    previous(unraisable)

  hook._musilingo_quiet = True
  sys.unraisablehook = hook
  logging.getLogger("asyncio").addFilter(_OrphanedDeserialize())


class _OrphanedDeserialize(logging.Filter):
  """The same failed restore also leaves Orbax's `async_deserialize` tasks whose error nobody awaits; asyncio
  logs each as "Task exception was never retrieved" with a traceback when it is collected. The failure is
  already reported (the warning naming the step): drop exactly those records, keep every other."""

  def filter(self, record: logging.LogRecord) -> bool:
    if not record.getMessage().startswith("Task exception was never retrieved"):
      return True
    text = record.getMessage()
    if record.exc_info and record.exc_info[0] is not None:
      text += "".join(traceback.format_exception(*record.exc_info))
    return "async_deserialize" not in text and "orbax/checkpoint/_src/serialization" not in text


def _on_every_process(ok: bool) -> bool:
  if jax.process_count() == 1:
    return ok
  from jax.experimental import multihost_utils
  return bool(np.all(np.asarray(multihost_utils.process_allgather(np.asarray([int(ok)], np.int32)))))
