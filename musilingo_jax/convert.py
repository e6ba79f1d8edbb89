"""Hugging Face PyTorch <-> our Flax NNX parameter conversion: one key table, used both ways.

A model file (models/mert.py, models/llama.py) declares `HF_KEY_RULES`, a list of `KeyRule`s. Each rule
names an HF key pattern and our flat parameter path pattern (both with an optional `{i}` layer index)
and a `Transform` with its inverse. Import and export walk the same table, so they cannot drift.

Our flat paths are the NNX state paths joined by "." (e.g. "model.layers.3.self_attn.q_proj.kernel").
"""

from __future__ import annotations

import dataclasses
import re
from typing import Callable

import numpy as np


class ConversionError(ValueError):
  """A checkpoint does not fit the model: the message names the file, key and what was expected."""


@dataclasses.dataclass(frozen=True)
class Transform:
  name: str
  to_ours: Callable[[np.ndarray], np.ndarray]
  to_hf: Callable[[np.ndarray], np.ndarray]


IDENTITY = Transform("identity", lambda x: x, lambda x: x)
# torch Linear weight [out, in] <-> Flax kernel [in, out].
LINEAR = Transform("linear", lambda x: np.ascontiguousarray(x.T), lambda x: np.ascontiguousarray(x.T))
# torch Conv1d weight [out, in/groups, k] <-> Flax/lax conv kernel [k, in/groups, out] ("WIO").
CONV1D = Transform("conv1d", lambda x: np.ascontiguousarray(x.transpose(2, 1, 0)),
                   lambda x: np.ascontiguousarray(x.transpose(2, 1, 0)))


@dataclasses.dataclass(frozen=True)
class KeyRule:
  """`hf` <-> `ours`, e.g. KeyRule("model.layers.{i}.mlp.up_proj.weight",
  "model.layers.{i}.mlp.up_proj.kernel", LINEAR). `hf_aliases` are other HF spellings accepted on
  import (export writes `hf`)."""
  hf: str
  ours: str
  transform: Transform = IDENTITY
  hf_aliases: tuple[str, ...] = ()

  def _regex(self, pattern: str) -> re.Pattern:
    return re.compile("^" + re.escape(pattern).replace(re.escape("{i}"), r"(?P<i>\d+)") + "$")

  def match_ours(self, path: str) -> dict | None:
    m = self._regex(self.ours).match(path)
    return m.groupdict() if m else None

  def match_hf(self, key: str) -> dict | None:
    for pattern in (self.hf, *self.hf_aliases):
      m = self._regex(pattern).match(key)
      if m:
        return m.groupdict()
    return None

  def hf_names(self, groups: dict) -> list[str]:
    return [p.format(**groups) for p in (self.hf, *self.hf_aliases)]


def rule_for_ours(rules: list[KeyRule], path: str) -> tuple[KeyRule, dict]:
  for rule in rules:
    groups = rule.match_ours(path)
    if groups is not None:
      return rule, groups
  raise ConversionError(f"no key rule for our parameter {path!r}")


def rule_for_hf(rules: list[KeyRule], key: str) -> tuple[KeyRule, dict] | None:
  for rule in rules:
    groups = rule.match_hf(key)
    if groups is not None:
      return rule, groups
  return None


def _flat_params(model) -> dict[str, "nnx.Variable"]:
  """Base (checkpoint) parameters by flat path; LoRA adapters are not checkpoint keys."""
  from flax import nnx
  out = {}
  base = nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam))
  for path, var in nnx.to_flat_state(nnx.state(model, base)):
    out[".".join(str(p) for p in path)] = var
  return out


def load_hf_tensors(model, rules: list[KeyRule], tensors, *, source: str = "<tensors>",
                    ignore: tuple[str, ...] = ()) -> None:
  """Fill `model`'s parameters in place from HF-named numpy tensors (`tensors`: a Mapping).

  Raises ConversionError naming `source` and the key for a missing key, an unexpected key (one no rule
  consumes and no `ignore` regex matches) or a shape mismatch. The simple in-memory path; see the
  streaming importer for real checkpoints.
  """
  import jax.numpy as jnp
  params = _flat_params(model)
  used = set()
  for path, var in params.items():
    rule, groups = rule_for_ours(rules, path)
    names = [n for n in rule.hf_names(groups) if n in tensors]
    if not names:
      raise ConversionError(f"{source}: missing key {rule.hf.format(**groups)!r} (for our {path})")
    value = rule.transform.to_ours(np.asarray(tensors[names[0]]))
    if tuple(value.shape) != tuple(var.shape):
      raise ConversionError(f"{source}: key {names[0]!r} has shape {tuple(value.shape)} after "
                            f"{rule.transform.name} transform, expected {tuple(var.shape)} for our {path}")
    var.set_value(jnp.asarray(value, dtype=var.dtype))
    used.add(names[0])
  unexpected = [k for k in tensors if k not in used and not any(re.match(p, k) for p in ignore)]
  if unexpected:
    raise ConversionError(f"{source}: unexpected keys {sorted(unexpected)[:10]} "
                          f"({len(unexpected)} in all) that the model has no parameter for")


def export_hf_tensors(model, rules: list[KeyRule]) -> dict[str, np.ndarray]:
  """Our parameters as HF-named numpy tensors (torch layouts), via the same table."""
  out = {}
  for path, var in _flat_params(model).items():
    rule, groups = rule_for_ours(rules, path)
    out[rule.hf.format(**groups)] = rule.transform.to_hf(np.asarray(var[...]))
  return out
