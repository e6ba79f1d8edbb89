"""Hugging Face import and export through a model's key table (`ModelKind.rules`), both directions.

  import   import_model / import_pretrained: eval_shape the model, then read -> transform -> check -> cast
           -> device_put (target sharding) per tensor, so the host holds one model plus one tensor.
           load_hf_tensors: the simple in-memory path (tests, the torch reference).
  export   iter_hf_tensors / export_hf_tensors (numpy, torch layouts, LoRA merged); export_hf /
           export_pretrained write a transformers directory, streamed to safetensors by SafetensorsWriter.

The model family comes in as a `ModelKind` (its model module's `HF_KIND`): this package never imports the
models.

Stacked layers (models built with `scan_layers`): a parameter such as `model.layers.mlp.up_proj.kernel`
[L, in, out] holds the L HF tensors `model.layers.{i}.mlp.up_proj.weight` (`rules.layer_entries`). Import
reads and transforms them one at a time into one host array per parameter, then places it (host memory: one
model plus one stacked parameter); export slices one layer at a time on the device, then copies it out.
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
from musilingo_jax.convert.rules import ConversionError, KeyRule, ModelKind, layer_entries


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
    entries = layer_entries(rules, path, var.shape)
    parts = []
    for e in entries:
      names = [n for n in e.hf_names() if n in tensors]
      if not names:
        raise ConversionError(f"{source}: missing key {e.rule.hf.format(**e.groups)!r} (for our {e.ours})")
      value = e.rule.transform.to_ours(np.asarray(tensors[names[0]]))
      want = _entry_shape(var.shape, e)
      if tuple(value.shape) != want:
        raise ConversionError(f"{source}: key {names[0]!r} has shape {tuple(value.shape)} after "
                              f"{e.rule.transform.name} transform, expected {want} for our {e.ours}")
      parts.append(value)
      used.add(names[0])
    value = parts[0] if entries[0].layer is None else np.stack(parts)
    var.set_value(jnp.asarray(value, dtype=var.dtype))
  unexpected = [k for k in tensors if k not in used and not any(re.match(p, k) for p in ignore)]
  if unexpected:
    raise ConversionError(f"{source}: unexpected keys {sorted(unexpected)[:10]} "
                          f"({len(unexpected)} in all) that the model has no parameter for")


def _entry_shape(shape, entry) -> tuple[int, ...]:
  """The shape one HF tensor has in our layout: the parameter's, without the layer axis when stacked."""
  return tuple(shape) if entry.layer is None else tuple(shape[1:])


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
  plus one tensor. A stacked-layer parameter (config `scan_layers`) is assembled on the host from its L
  layer tensors, each read and transformed alone, then placed (one stacked parameter held at a time).
  Non-checkpoint state (LoRA adapters, RNG state) is initialised fresh.

  Raises ConversionError naming the source file, key and expected shape for a missing key, an unexpected
  key (one no rule consumes and no `ignore` regex matches) or a shape mismatch.
  """
  config = state_lib.with_dtype(config, dtype, compute_dtype)
  abstract = state_lib.abstract_model(model_cls, config, **model_kwargs)
  graphdef, base, rest = nnx.split(abstract, state_lib.base_filter(), ...)
  params = {state_lib.path_str(p): v for p, v in nnx.to_flat_state(base)}

  # Plan and check the keys before reading any data.
  available = set(source.keys())
  plan, missing = [], []  # plan: (path, var, [(entry, hf name)]) per parameter
  for path, var in params.items():
    found = []
    for e in layer_entries(rules, path, var.shape):
      names = [n for n in e.hf_names() if n in available]
      if names:
        found.append((e, names[0]))
      else:
        missing.append(f"{e.rule.hf.format(**e.groups)!r} (for our {e.ours})")
    plan.append((path, var, found))
  if missing:
    raise ConversionError(f"{source.name}: missing keys {', '.join(missing[:10])}"
                          f"{f' and {len(missing) - 10} more' if len(missing) > 10 else ''}")
  used = {name for *_, found in plan for _, name in found}
  unexpected = sorted(k for k in available - used if not any(re.match(p, k) for p in ignore))
  if unexpected:
    raise ConversionError(f"{source.name}: unexpected keys {[f'{k} (in {source.file_of(k)})' for k in unexpected[:10]]}"
                          f" ({len(unexpected)} in all) that the model has no parameter for")

  targets = state_lib.sharding_table(nnx.state(abstract), shardings, mesh, sharding_rules)
  it = plan
  if progress:
    it = tqdm(plan, desc=f"import {Path(source.name).name}", unit="tensor")
  for path, var, found in it:
    target = state_lib.np_dtype(var.dtype)
    stacked = found[0][0].layer is not None
    # A stacked parameter: its layers go into one host array as they are read (each cast on the way in).
    host = np.empty(tuple(var.shape), target) if stacked else None
    for e, name in found:
      raw = source.get(name)
      value = e.rule.transform.to_ours(raw)
      want = _entry_shape(var.shape, e)
      if tuple(value.shape) != want:
        raise ConversionError(f"{source.file_of(name)}: key {name!r} has shape {tuple(raw.shape)} "
                              f"({tuple(value.shape)} after the {e.rule.transform.name} transform), expected "
                              f"{want} for our {e.ours}")
      if stacked:
        host[e.layer] = value
      elif value.dtype != target:
        value = np.asarray(value, dtype=target, order="C")
      del raw
    var.set_value(state_lib.place(host if stacked else value, targets[path]))
    del host, value

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


def iter_hf_tensors(model, rules: list[KeyRule], *, dtype=None, prefer=None, merge_lora: bool = True):
  """Yields (hf_key, numpy array in the torch layout), one at a time; LoRA adapters merged into kernels
  (merge_lora=False: the base kernels, as the adapters found them).

  `dtype`: cast floating tensors to it (None: as held). `prefer(rule, names) -> name` picks the HF spelling
  among a rule's `hf` and `hf_aliases` (default: `hf`)."""
  merged = _merged_kernels(model) if merge_lora else {}
  for path, var in state_lib.flat_params(model).items():
    held = merged[path] if path in merged else var[...]
    for e in layer_entries(rules, path, var.shape):
      names = e.hf_names()
      name = prefer(e.rule, names) if prefer else names[0]
      # A stacked parameter is sliced on its device, so one layer at a time comes to the host.
      value = e.rule.transform.to_hf(np.asarray(held if e.layer is None else held[e.layer]))
      if dtype is not None and _is_float(value.dtype):
        value = np.asarray(value, dtype=state_lib.np_dtype(dtype))
      yield name, np.ascontiguousarray(value)


def iter_lora_adapters(model, rules: list[KeyRule]):
  """Yields (HF weight key of the adapted Linear, A [in, r], B [r, out]) as float32 numpy, one layer at a time,
  for every Linear with LoRA adapters (`lora_a` / `lora_b` leaves), unrolled or stacked (one entry per layer).
  E.g. ("model.layers.0.self_attn.q_proj.weight", A, B): what a PEFT adapter file is written from."""
  for path, node in nnx.iter_graph(model):
    if getattr(node, "lora", None) is None or getattr(node, "lora_a", None) is None:
      continue
    kernel = state_lib.path_str((*path, "kernel"))
    a, b = node.lora_a[...], node.lora_b[...]
    for e in layer_entries(rules, kernel, node.kernel.shape):
      i = e.layer
      yield (e.rule.hf.format(**e.groups), np.asarray(a if i is None else a[i], np.float32),
             np.asarray(b if i is None else b[i], np.float32))


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


DEFAULT_MAX_SHARD_BYTES = 5 * 10**9  # transformers' save_pretrained default in 4.x ("5GB")
SINGLE_FILE, INDEX_FILE = "model.safetensors", "model.safetensors.index.json"


class ShardedSafetensorsWriter:
  """Streams tensors into safetensors shards of at most `max_shard_bytes` each (a tensor larger than that gets a
  shard of its own), as `save_pretrained` lays them out: one shard is `model.safetensors`; several are
  `model-0000i-of-0000n.safetensors` plus `model.safetensors.index.json` ({"metadata": {"total_size"},
  "weight_map": {key: shard}}). Shards are written under temporary names and renamed when all are done."""

  def __init__(self, out_dir: str | os.PathLike, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
               metadata: dict[str, str] | None = None):
    self.out = Path(out_dir)
    self.max_bytes, self.metadata = int(max_shard_bytes), metadata
    self._shards: list[tuple[Path, list[str]]] = []
    self._writer: SafetensorsWriter | None = None
    self._bytes = self._total = 0

  def add(self, key: str, array: np.ndarray) -> None:
    n = int(array.nbytes)
    if self._writer is None or (self._bytes and self._bytes + n > self.max_bytes):
      self._next_shard()
    self._writer.add(key, array)
    self._shards[-1][1].append(key)
    self._bytes += n
    self._total += n

  def _next_shard(self) -> None:
    if self._writer is not None:
      self._writer.close()
    tmp = self.out / f".shard-{len(self._shards):05d}.safetensors.tmp"
    self._writer, self._bytes = SafetensorsWriter(tmp, self.metadata), 0
    self._shards.append((tmp, []))

  def close(self) -> list[Path]:
    """Finishes the last shard, renames them all into place, writes the index when sharded; -> the files."""
    if self._writer is None:
      self._next_shard()
    self._writer.close()
    n = len(self._shards)
    names = [SINGLE_FILE] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    for (tmp, _), name in zip(self._shards, names):
      os.replace(tmp, self.out / name)
    (self.out / INDEX_FILE).unlink(missing_ok=True)
    if n > 1:
      index = {"metadata": {"total_size": self._total},
               "weight_map": {k: name for (_, keys), name in zip(self._shards, names) for k in keys}}
      (self.out / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
      stale = self.out / SINGLE_FILE
      stale.unlink(missing_ok=True)  # a single-file export of an earlier run in the same folder
    return [self.out / name for name in names]

  def __enter__(self):
    return self

  def __exit__(self, exc_type, *exc):
    if exc_type is None:
      self.close()
    else:
      if self._writer is not None:
        self._writer.__exit__(exc_type, *exc)
      for tmp, _ in self._shards:
        tmp.unlink(missing_ok=True)


def export_hf(model, rules: list[KeyRule], out_dir: str | os.PathLike, hf_config: dict, *, dtype=None,
              prefer=None, merge_lora: bool = True, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> Path:
  """Writes out_dir/config.json and the weights as `save_pretrained` does (tensors streamed one at a time):
  model.safetensors, or shards of at most `max_shard_bytes` with model.safetensors.index.json."""
  out = Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  config = dict(hf_config)
  if dtype is not None:
    config["torch_dtype"] = config["dtype"] = state_lib.np_dtype(dtype).name
  (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
  with ShardedSafetensorsWriter(out, max_shard_bytes) as w:
    for key, value in iter_hf_tensors(model, rules, dtype=dtype, prefer=prefer, merge_lora=merge_lora):
      w.add(key, value)
  return out


def export_pretrained(kind: ModelKind, model, out_dir: str | os.PathLike, dtype=None, *, tokenizer=None,
                      merge_lora: bool = True, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> Path:
  """Our model of family `kind` -> a transformers directory (config.json from model.cfg.to_hf_config() +
  safetensors, sharded above `max_shard_bytes`, LoRA merged unless merge_lora=False; HF spellings picked by
  kind.prefer): models.llama.HF_KIND gives a LlamaForCausalLM directory, models.mert.HF_KIND a HubertModel
  one. `dtype`: "float32", "bfloat16", "float16" or None (as held). `tokenizer` (anything with
  .save(directory)): saved beside it."""
  out = export_hf(model, kind.rules, out_dir, model.cfg.to_hf_config(), dtype=dtype, prefer=kind.prefer,
                  merge_lora=merge_lora, max_shard_bytes=max_shard_bytes)
  if tokenizer is not None:
    tokenizer.save(out)
  return out
