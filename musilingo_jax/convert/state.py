"""NNX state plumbing shared by import (`convert.hf`) and restore (`convert.converted`).

Base (checkpoint) parameters are every nnx.Param except LoRA adapters; their flat paths are the NNX state
paths joined by ".". Models are built abstractly (nnx.eval_shape) and filled leaf by leaf, each placed on its
target sharding (`sharding_table`); non-checkpoint state (LoRA adapters, RNG state) is initialised fresh.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from musilingo_jax import sharding as sharding_lib


def base_filter():
  """Base (checkpoint) parameters: every nnx.Param except LoRA adapters."""
  return nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam))


def path_str(path) -> str:
  return ".".join(str(p) for p in path)


def flat_params(model) -> dict[str, nnx.Variable]:
  """Base (checkpoint) parameters by flat path; LoRA adapters are not checkpoint keys."""
  return {path_str(path): var for path, var in nnx.to_flat_state(nnx.state(model, base_filter()))}


def np_dtype(dtype) -> np.dtype:
  return np.dtype(jnp.dtype(dtype))


def with_dtype(config, dtype, compute_dtype=None):
  """config with param_dtype = `dtype` and compute dtype = `compute_dtype` (default: `dtype`); None: unchanged."""
  changes = {}
  if dtype is not None:
    changes.update(param_dtype=jnp.dtype(dtype), dtype=jnp.dtype(dtype))
  if compute_dtype is not None:
    changes.update(dtype=jnp.dtype(compute_dtype))
  return dataclasses.replace(config, **changes) if changes else config


def config_from_hf(config_cls, hf_config: dict, dtype=None, compute_dtype=None,
                   overrides: Mapping[str, Any] | None = None):
  """config_cls.from_hf_config(hf_config) with `dtype`/`compute_dtype` (see with_dtype), then `overrides`
  (our own fields: dtype, param_dtype, attention_impl, spec_augment, ...), which win over both."""
  overrides = dict(overrides or {})
  config = with_dtype(config_cls.from_hf_config(hf_config, **overrides), dtype, compute_dtype)
  return dataclasses.replace(config, **overrides) if overrides else config


def sharding_table(abstract_state, shardings, mesh, rules) -> dict[str, Any]:
  """Flat path -> target Sharding (or None = default device) for every leaf of `abstract_state`.

  `shardings`: None | one jax.sharding.Sharding for all | a callable(abstract nnx.State) -> a State/pytree of
  shardings | such a State/pytree itself | a Mapping flat path -> Sharding. With `mesh` (and logical-axis
  `rules`, default "fsdp") and no `shardings`, musilingo_jax.sharding.state_shardings picks them.
  """
  if shardings is None and mesh is not None:
    shardings = lambda s: sharding_lib.state_shardings(s, mesh, rules or "fsdp")  # noqa: E731
  paths = [path_str(p) for p, _ in nnx.to_flat_state(abstract_state)]
  if shardings is None:
    return dict.fromkeys(paths)
  if isinstance(shardings, jax.sharding.Sharding):
    return dict.fromkeys(paths, shardings)
  if callable(shardings) and not isinstance(shardings, (Mapping, nnx.State)):
    shardings = shardings(abstract_state)
  if isinstance(shardings, Mapping) and not isinstance(shardings, nnx.State) and all(
      isinstance(k, str) for k in shardings):
    flat = dict(shardings)
  else:
    state = shardings if isinstance(shardings, nnx.State) else nnx.State(shardings)
    flat = {}
    for p, v in nnx.to_flat_state(state):
      flat[path_str(p)] = v.get_value() if isinstance(v, nnx.Variable) else v
  return {p: flat.get(p) for p in paths}


def place(value, sharding):
  return jax.device_put(value, sharding) if sharding is not None else jax.device_put(value)


def abstract_model(model_cls, config, **model_kwargs):
  """The model's structure with ShapeDtypeStruct leaves: no memory, no compute (nnx.eval_shape)."""
  return nnx.eval_shape(lambda: model_cls(config, rngs=nnx.Rngs(0), **model_kwargs))


def _non_checkpoint_state(model_cls, config, model_kwargs):
  """Everything but the checkpoint parameters (LoRA adapters, RNG state), initialised under jit: the base
  parameters' initialisers are dead code there, so the full model is never materialised."""

  def init():
    model = model_cls(config, rngs=nnx.Rngs(0), **model_kwargs)
    return nnx.split(model, base_filter(), ...)[2]
  return jax.jit(init)()


def merge_with_rest(graphdef, base, rest, model_cls, config, model_kwargs, targets):
  """Merges the filled checkpoint state with freshly initialised non-checkpoint state (if any)."""
  if list(nnx.to_flat_state(rest)):
    rest = _non_checkpoint_state(model_cls, config, model_kwargs)
    for p, v in nnx.to_flat_state(rest):
      s = targets.get(path_str(p))
      if s is not None:
        v.set_value(jax.device_put(v.get_value(), s))
  return nnx.merge(graphdef, base, rest)
