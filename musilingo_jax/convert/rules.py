"""The conversion vocabulary every other piece speaks: key rules, layout transforms, `ModelKind`.

The leaf of the import graph: stdlib and numpy only, so a model module can declare its table
(`HF_KEY_RULES`, `HF_KIND`) without loading readers, jax conversion code or Orbax.

A `KeyRule` names an HF key pattern and our flat parameter path pattern (both with an optional `{i}` layer
index) and a `Transform` with its inverse. Import and export walk the same table, so they cannot drift.
Our flat paths are the NNX state paths joined by "." (e.g. "model.layers.3.self_attn.q_proj.kernel").

Stacked layers (a model built with `scan_layers`): a rule whose `ours` has a `{i}.` component also matches
that pattern without it (`model.layers.self_attn.q_proj.kernel`): one parameter whose leading axis is the
layer, holding HF's `model.layers.{i}...` tensors for i = 0..L-1 (`layer_entries`). Import stacks them,
export unstacks them; each per-layer tensor goes through the same transform as an unrolled one.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable, Sequence

import numpy as np


class ConversionError(ValueError):
  """A checkpoint does not fit the model: the message names the file, key and what was expected."""


@dataclasses.dataclass(frozen=True)
class Transform:
  name: str
  to_ours: Callable[[np.ndarray], np.ndarray]
  to_hf: Callable[[np.ndarray], np.ndarray]


IDENTITY = Transform("identity", lambda x: x, lambda x: x)
# Layout transforms return numpy views (no copy): the importer's device_put (or the exporter's write) makes
# the one contiguous copy, so a tensor is never held twice on the host.
# torch Linear weight [out, in] <-> Flax kernel [in, out].
LINEAR = Transform("linear", lambda x: x.T, lambda x: x.T)
# torch Conv1d weight [out, in/groups, k] <-> Flax/lax conv kernel [k, in/groups, out] ("WIO").
CONV1D = Transform("conv1d", lambda x: x.transpose(2, 1, 0), lambda x: x.transpose(2, 1, 0))


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

  @property
  def stacked_ours(self) -> str | None:
    """Our path pattern for the layers stacked along a leading axis (`ours` without its `{i}.`), or None
    when the rule has no layer index."""
    return self.ours.replace("{i}.", "") if "{i}." in self.ours else None

  def match_stacked(self, path: str) -> dict | None:
    pattern = self.stacked_ours
    if pattern is None:
      return None
    m = self._regex(pattern).match(path)
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


def stacked_rule_for_ours(rules: list[KeyRule], path: str) -> tuple[KeyRule, dict] | None:
  """The rule whose stacked form (`KeyRule.stacked_ours`) matches our `path`, with its groups (no `i`), or
  None when `path` is not a stacked-layer parameter."""
  for rule in rules:
    groups = rule.match_stacked(path)
    if groups is not None:
      return rule, groups
  return None


@dataclasses.dataclass(frozen=True)
class LayerEntry:
  """One HF tensor held by our parameter: `rule` with `groups` (including "i" for a layer); `layer` is the
  index along our parameter's leading axis for a stacked parameter, None for an unrolled one (the tensor
  is the whole parameter)."""
  rule: KeyRule
  groups: dict
  layer: int | None

  @property
  def ours(self) -> str:
    """The unrolled (per-layer) spelling of our path, e.g. model.layers.3.mlp.up_proj.kernel."""
    return self.rule.ours.format(**self.groups)

  def hf_names(self) -> list[str]:
    return self.rule.hf_names(self.groups)


def layer_entries(rules: list[KeyRule], path: str, shape: Sequence[int]) -> list[LayerEntry]:
  """The HF tensors our parameter `path` (of `shape`) holds: one entry for an unrolled path, shape[0]
  entries (layer 0..L-1) for a stacked one. Raises ConversionError when no rule covers `path`."""
  stacked = stacked_rule_for_ours(rules, path)
  if stacked is None:
    rule, groups = rule_for_ours(rules, path)
    return [LayerEntry(rule, groups, None)]
  rule, groups = stacked
  if not shape:
    raise ConversionError(f"our stacked parameter {path!r} has no leading layer axis")
  return [LayerEntry(rule, {**groups, "i": str(i)}, i) for i in range(int(shape[0]))]


def rule_for_hf(rules: list[KeyRule], key: str) -> tuple[KeyRule, dict] | None:
  for rule in rules:
    groups = rule.match_hf(key)
    if groups is not None:
      return rule, groups
  return None


def _no_ignores(config) -> tuple[str, ...]:
  return ()


@dataclasses.dataclass(frozen=True, eq=False)
class ModelKind:
  """What conversion needs to know about one model family; its model module builds it (`HF_KIND`), and
  callers hand it to `convert.hf` / `convert.converted` so that the convert package never imports models.

  name: the part's name in messages ("for the encoder") and in a converted directory (params/<name>,
    <name>_config.json). model_cls(config, rngs=..., **kwargs) builds the model; config_cls has
    from_hf_config(dict, **overrides) and to_hf_config(). rules: the HF key table. hf_types: the config.json
    `model_type` (or GGUF `general.architecture`) values this kind reads. ignore_for(config): regexes of HF
    keys that are not parameters. prefer(rule, names) -> name: the HF spelling export writes (default: the
    rule's `hf`). extra_files: files of the source directory a converted directory keeps beside the params.
  """
  name: str
  model_cls: Any
  config_cls: Any
  rules: Sequence[KeyRule]
  hf_types: tuple[str, ...]
  ignore_for: Callable[[Any], tuple[str, ...]] = _no_ignores
  prefer: Callable[[KeyRule, list[str]], str] | None = None
  extra_files: tuple[str, ...] = ()


# --- llama.cpp's q/k row order (pure numpy; the GGUF reader undoes it, tests redo it) ---

def unpermute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
  """Undoes llama.cpp's q/k row permutation (interleaved rotary) -> HF rotate-half rows. w: [rows, cols]."""
  rows = w.shape[0]
  rest = w.shape[1:]
  return w.reshape(n_heads, rows // n_heads // 2, 2, *rest).swapaxes(1, 2).reshape(rows, *rest)


def permute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
  """The inverse of `unpermute_qk` (HF rows -> llama.cpp rows)."""
  rows = w.shape[0]
  rest = w.shape[1:]
  return w.reshape(n_heads, 2, rows // n_heads // 2, *rest).swapaxes(1, 2).reshape(rows, *rest)
