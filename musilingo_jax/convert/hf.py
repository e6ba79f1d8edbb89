"""Hugging Face import and export through a model's key table (`ModelKind.rules`), both directions.

  import   import_model / import_pretrained: eval_shape the model, then read -> transform -> check -> cast
           -> device_put (target sharding) per tensor, so the host holds one model plus one tensor.
           load_hf_tensors: the simple in-memory path (tests, the torch reference).
  export   iter_hf_tensors / export_hf_tensors (numpy, torch layouts, LoRA merged); export_hf /
           export_pretrained write a transformers directory, streamed to safetensors by SafetensorsWriter.

The model family comes in as a `ModelKind` (its model module's `HF_KIND`): this package never imports the
models.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any, Mapping

import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx
from tqdm import tqdm

from musilingo_jax.convert import state as state_lib
from musilingo_jax.convert.readers import TensorSource, safetensors_dtypes, open_source
from musilingo_jax.convert.rules import ConversionError, KeyRule, ModelKind, rule_for_ours


def load_hf_tensors(model, rules: list[KeyRule], tensors, *, source: str = "<tensors>",
                    ignore: tuple[str, ...] = ()) -> None:
  """Fill `model`'s parameters in place from HF-named numpy tensors (`tensors`: a Mapping).

  Raises ConversionError naming `source` and the key for a missing key, an unexpected key (one no rule
  consumes and no `ignore` regex matches) or a shape mismatch. The simple in-memory path; see
  `import_model` for real checkpoints.
  """
  params = state_lib.flat_params(model)
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


# ----------------------------------------------------------------------------------------------------
# Streaming import: abstract model -> one tensor at a time -> placed on its sharding.
# ----------------------------------------------------------------------------------------------------

def import_model(model_cls, config, source: TensorSource, rules: list[KeyRule], *, ignore: tuple[str, ...] = (),
                 dtype=None, compute_dtype=None, shardings=None, mesh=None, sharding_rules=None,
                 progress: bool = False, **model_kwargs):
  """Builds `model_cls(config, rngs=..., **model_kwargs)` with its parameters read from `source`.

  The model is built abstractly (nnx.eval_shape); then each parameter's HF tensor is read alone, transformed
  by its KeyRule (the same table export uses), shape-checked, cast to the parameter dtype (`dtype` sets the
  config's param_dtype, and its compute dtype unless `compute_dtype` is given) and placed with
  jax.device_put on its target sharding (see `state.sharding_table`: `shardings`, or `mesh` + logical
  `sharding_rules`), after which the host copy is dropped: peak host memory is about one copy of the model
  plus one tensor. Non-checkpoint state (LoRA adapters, RNG state) is initialised fresh.

  Raises ConversionError naming the source file, key and expected shape for a missing key, an unexpected
  key (one no rule consumes and no `ignore` regex matches) or a shape mismatch.
  """
  config = state_lib.with_dtype(config, dtype, compute_dtype)
  abstract = state_lib.abstract_model(model_cls, config, **model_kwargs)
  graphdef, base, rest = nnx.split(abstract, state_lib.base_filter(), ...)
  params = {state_lib.path_str(p): v for p, v in nnx.to_flat_state(base)}

  # Plan and check the keys before reading any data.
  available = set(source.keys())
  plan, missing = [], []
  for path, var in params.items():
    rule, groups = rule_for_ours(rules, path)
    names = [n for n in rule.hf_names(groups) if n in available]
    if names:
      plan.append((path, var, rule, names[0]))
    else:
      missing.append(f"{rule.hf.format(**groups)!r} (for our {path})")
  if missing:
    raise ConversionError(f"{source.name}: missing keys {', '.join(missing[:10])}"
                          f"{f' and {len(missing) - 10} more' if len(missing) > 10 else ''}")
  used = {name for *_, name in plan}
  unexpected = sorted(k for k in available - used if not any(re.match(p, k) for p in ignore))
  if unexpected:
    raise ConversionError(f"{source.name}: unexpected keys {[f'{k} (in {source.file_of(k)})' for k in unexpected[:10]]}"
                          f" ({len(unexpected)} in all) that the model has no parameter for")

  targets = state_lib.sharding_table(nnx.state(abstract), shardings, mesh, sharding_rules)
  it = plan
  if progress:
    it = tqdm(plan, desc=f"import {Path(source.name).name}", unit="tensor")
  for path, var, rule, name in it:
    raw = source.get(name)
    value = rule.transform.to_ours(raw)
    if tuple(value.shape) != tuple(var.shape):
      raise ConversionError(f"{source.file_of(name)}: key {name!r} has shape {tuple(raw.shape)} "
                            f"({tuple(value.shape)} after the {rule.transform.name} transform), expected "
                            f"{tuple(var.shape)} for our {path}")
    target = state_lib.np_dtype(var.dtype)
    if value.dtype != target:
      value = np.asarray(value, dtype=target, order="C")
    var.set_value(state_lib.place(value, targets[path]))
    del raw, value

  return state_lib.merge_with_rest(graphdef, base, rest, model_cls, config, model_kwargs, targets)


def import_pretrained(kind: ModelKind, path: str | os.PathLike, *, dtype=None, compute_dtype=None,
                      shardings=None, mesh=None, sharding_rules=None, ignore: tuple[str, ...] = (),
                      progress: bool = False, config_overrides: Mapping[str, Any] | None = None,
                      **model_kwargs):
  """An HF directory / file or a GGUF -> (our model, its config), for the model family `kind` (a model
  module's HF_KIND, e.g. models.llama.HF_KIND or models.mert.HF_KIND).

  `config_overrides` set config fields HF does not describe (dtype, param_dtype, attention_impl,
  spec_augment, ...) and win over `dtype`/`compute_dtype`; `model_kwargs` go to the model constructor
  (e.g. lora=). See import_model for the rest."""
  with open_source(path, kind=kind) as src:
    if src.config is None:
      raise ConversionError(f"{path}: no config.json beside the weights")
    config = state_lib.config_from_hf(kind.config_cls, src.config, dtype, compute_dtype, config_overrides)
    model = import_model(kind.model_cls, config, src, kind.rules,
                         ignore=tuple(kind.ignore_for(config)) + tuple(ignore), shardings=shardings, mesh=mesh,
                         sharding_rules=sharding_rules, progress=progress, **model_kwargs)
  return model, config


# ----------------------------------------------------------------------------------------------------
# Export: our parameters -> HF tensors through the same table (LoRA merged), streamed to safetensors.
# ----------------------------------------------------------------------------------------------------

def _merged_kernels(model) -> dict[str, Any]:
  """Flat kernel path -> kernel + LoRA delta, for every linear layer that has adapters (models.layers.Linear:
  a `lora` attribute and `merged_kernel()`; matched by those, since this package does not import models)."""
  out = {}
  for path, node in nnx.iter_graph(model):
    if getattr(node, "lora", None) is not None and callable(getattr(node, "merged_kernel", None)):
      out[state_lib.path_str((*path, "kernel"))] = node.merged_kernel()
  return out


def _is_float(dtype) -> bool:
  return np.issubdtype(dtype, np.floating) or dtype in (np.dtype(ml_dtypes.bfloat16),)


def iter_hf_tensors(model, rules: list[KeyRule], *, dtype=None, prefer=None):
  """Yields (hf_key, numpy array in the torch layout), one at a time; LoRA adapters merged into kernels.

  `dtype`: cast floating tensors to it (None: as held). `prefer(rule, names) -> name` picks the HF spelling
  among a rule's `hf` and `hf_aliases` (default: `hf`)."""
  merged = _merged_kernels(model)
  for path, var in state_lib.flat_params(model).items():
    rule, groups = rule_for_ours(rules, path)
    names = rule.hf_names(groups)
    name = prefer(rule, names) if prefer else names[0]
    value = np.asarray(merged[path] if path in merged else var[...])
    value = rule.transform.to_hf(value)
    if dtype is not None and _is_float(value.dtype):
      value = np.asarray(value, dtype=state_lib.np_dtype(dtype))
    yield name, np.ascontiguousarray(value)


def export_hf_tensors(model, rules: list[KeyRule], *, dtype=None) -> dict[str, np.ndarray]:
  """Our parameters as HF-named, writable numpy tensors (torch layouts, LoRA merged), via the same table."""
  return {k: v if v.flags.writeable else v.copy() for k, v in iter_hf_tensors(model, rules, dtype=dtype)}


class SafetensorsWriter:
  """Streams tensors into one .safetensors file without holding them all: data goes to a side file as it
  comes, then the header and the data are joined."""

  def __init__(self, path: str | os.PathLike, metadata: dict[str, str] | None = None):
    self.path = Path(path)
    self._data_path = self.path.with_name(self.path.name + ".data.tmp")
    self._data = open(self._data_path, "wb")
    self._header: dict[str, Any] = {"__metadata__": {"format": "pt", **(metadata or {})}}
    self._offset = 0
    self._names = {v: k for k, v in safetensors_dtypes().items()}

  def add(self, key: str, array: np.ndarray) -> None:
    if key in self._header:
      raise ValueError(f"duplicate key {key!r}")
    array = np.ascontiguousarray(array)
    if array.dtype not in self._names:
      raise ConversionError(f"{self.path}: cannot write dtype {array.dtype} for {key!r}")
    data = array.reshape(-1).view(np.uint8)
    self._header[key] = {"dtype": self._names[array.dtype], "shape": list(array.shape),
                         "data_offsets": [self._offset, self._offset + data.size]}
    self._data.write(memoryview(data))
    self._offset += data.size

  def close(self) -> None:
    self._data.close()
    header = json.dumps(self._header, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)
    with open(self.path, "wb") as out, open(self._data_path, "rb") as data:
      out.write(len(header).to_bytes(8, "little"))
      out.write(header)
      shutil.copyfileobj(data, out, 64 << 20)
    self._data_path.unlink()

  def __enter__(self):
    return self

  def __exit__(self, exc_type, *exc):
    if exc_type is None:
      self.close()
    else:
      self._data.close()
      self._data_path.unlink(missing_ok=True)


def export_hf(model, rules: list[KeyRule], out_dir: str | os.PathLike, hf_config: dict, *, dtype=None,
              prefer=None) -> Path:
  """Writes out_dir/config.json and out_dir/model.safetensors (tensors streamed one at a time)."""
  out = Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  config = dict(hf_config)
  if dtype is not None:
    config["torch_dtype"] = config["dtype"] = state_lib.np_dtype(dtype).name
  (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
  with SafetensorsWriter(out / "model.safetensors") as w:
    for key, value in iter_hf_tensors(model, rules, dtype=dtype, prefer=prefer):
      w.add(key, value)
  return out


def export_pretrained(kind: ModelKind, model, out_dir: str | os.PathLike, dtype=None, *, tokenizer=None) -> Path:
  """Our model of family `kind` -> a transformers directory (config.json from model.cfg.to_hf_config() +
  model.safetensors, LoRA merged; HF spellings picked by kind.prefer): models.llama.HF_KIND gives a
  LlamaForCausalLM directory, models.mert.HF_KIND a HubertModel one. `dtype`: "float32", "bfloat16",
  "float16" or None (as held). `tokenizer` (anything with .save(directory)): saved beside it."""
  out = export_hf(model, kind.rules, out_dir, model.cfg.to_hf_config(), dtype=dtype, prefer=kind.prefer)
  if tokenizer is not None:
    tokenizer.save(out)
  return out
