"""Our converted-checkpoint format: OUT/params/<part> (Orbax), OUT/<part>_config.json, OUT/tokenizer/,
OUT/meta.json, plus any `ModelKind.extra_files` of the sources (MERT's preprocessor_config.json).

convert_checkpoint imports HF/GGUF checkpoints (convert.hf) and saves them; load_converted restores them
straight onto any device count / mesh. <part> is a ModelKind's name ("encoder", "llm"); the caller passes
the kinds (models.mert.HF_KIND, models.llama.HF_KIND) and writes / reads the tokenizer itself.

The parameters are stored per layer, as HF numbers them (`model.layers.3.mlp.up_proj.kernel`), whatever the
model's `scan_layers`: `save_params` unstacks a stacked-layer model's parameters, and `restore_params` stacks
them again (one stacked parameter at a time, on its target sharding) when it builds a model with the layers
stacked. One directory serves both settings.

The directory may be a gs:// URL: every path goes through etils.epath (musilingo_jax/storage.py), Orbax
writes and reads the arrays through tensorstore, the JSON files are written under a temporary name and
renamed, and the tokenizer is written locally then uploaded. meta.json is written last.
"""

from __future__ import annotations

import gc
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from musilingo_jax import sharding as sharding_lib
from musilingo_jax import storage
from musilingo_jax.convert import state as state_lib
from musilingo_jax.convert.hf import import_pretrained
from musilingo_jax.convert.rules import ConversionError, KeyRule, ModelKind, layer_entries

FORMAT = "musilingo_jax.convert/1"
TOKENIZER_DIR = "tokenizer"  # OUT/tokenizer: the LLM's tokenizer files (Tokenizer.from_dir reads them)

# Bytes Orbax may hold in flight (device -> host copies and tensorstore writes) while saving or restoring,
# at least the largest array: without a limit a save copies the whole model to host first, doubling peak
# host memory.
ORBAX_CONCURRENT_BYTES = 32 << 20
ORBAX_CHUNK_BYTES = 256 << 20  # restore_params reads the tree in partial restores of about this size


def _checkpointer(largest_bytes: int = 0):
  gb = max(ORBAX_CONCURRENT_BYTES, int(largest_bytes * 1.05) + (1 << 20)) / 1e9  # headroom for rounding
  return ocp.Checkpointer(ocp.PyTreeCheckpointHandler(
      save_concurrent_gb=gb, restore_concurrent_gb=gb, save_device_host_concurrent_gb=gb))


def _largest(tree) -> int:
  return max((int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree)), default=0)


def _key(path: str) -> tuple:
  """A flat path as the keys of a pure dict (list indices are ints, as nnx.State.to_pure_dict has them)."""
  return tuple(int(k) if k.isdigit() else k for k in path.split("."))


def _stacked_params(base, rules) -> dict[str, list]:
  """Flat path -> its layer entries (rules.layer_entries), for the stacked-layer parameters of `base`."""
  out = {}
  for p, v in nnx.to_flat_state(base):
    path = state_lib.path_str(p)
    entries = layer_entries(rules, path, v.get_value().shape) if rules is not None else []
    if entries and entries[0].layer is not None:
      out[path] = entries
  return out


def save_params(path: str | os.PathLike, model, rules: Sequence[KeyRule] | None = None) -> None:
  """The model's checkpoint parameters (no LoRA, no RNG state) as an Orbax pure-dict tree at `path`, per
  layer: a stacked-layer parameter (config `scan_layers`) is written as its L layers, under the paths the
  unrolled model has (the HF key table `rules` names them; required for such a model)."""
  base = nnx.state(model, state_lib.base_filter())
  stacked = _stacked_params(base, rules)
  if rules is None and any((_names(v) or (None,))[0] == sharding_lib.LAYERS for _, v in nnx.to_flat_state(base)):
    raise ValueError("save_params: the model's layers are stacked (scan_layers); pass its key table (rules=) to "
                     "store them per layer")
  items = []
  for p, v in nnx.to_flat_state(base):
    entries = stacked.get(state_lib.path_str(p))
    if entries is None:
      items.append((tuple(p), v.get_value()))
    else:
      items += [(_key(e.ours), v.get_value()[e.layer]) for e in entries]
  tree = _nest(items)
  ckptr = _checkpointer(_largest(tree))
  ckptr.save(_absolute(path), args=ocp.args.PyTreeSave(tree), force=True)  # synchronous


def _names(var) -> tuple | None:
  return var.get_metadata().get("out_sharding") if hasattr(var, "get_metadata") else None


def _absolute(path):
  """An etils.epath.Path: absolute when local, the URL as given when gs://."""
  p = storage.path(path)
  return p if storage.is_remote(path) else p.absolute()


def _flatten_dict(tree: dict, prefix=()) -> list[tuple[tuple, Any]]:
  out = []
  for k, v in tree.items():
    if isinstance(v, dict):
      out += _flatten_dict(v, (*prefix, k))
    else:
      out.append(((*prefix, k), v))
  return out


def _nest(items, into: dict | None = None) -> dict:
  out = {} if into is None else into
  for keys, v in items:
    d = out
    for k in keys[:-1]:
      d = d.setdefault(k, {})
    d[keys[-1]] = v
  return out


def _restore_in_chunks(path, target: dict) -> dict:
  """Orbax restore of `target` (ShapeDtypeStruct leaves with shardings) in chunks of about
  ORBAX_CHUNK_BYTES (partial restores): one whole-tree restore holds read buffers for much of the model
  at once (measured +0.5x of the model in host memory), chunks keep that near one chunk."""
  largest = _largest(target)
  budget = max(ORBAX_CHUNK_BYTES, largest)
  ckptr = _checkpointer(largest)
  groups, cur, size = [], [], 0
  for keys, leaf in _flatten_dict(target):
    n = int(np.prod(leaf.shape)) * np.dtype(leaf.dtype).itemsize
    if cur and size + n > budget:
      groups.append(cur)
      cur, size = [], 0
    cur.append((keys, leaf))
    size += n
  if cur:
    groups.append(cur)
  out: dict = {}
  for group in groups:
    item = _nest(group)
    part = ckptr.restore(path, args=ocp.args.PyTreeRestore(
        item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item),
        partial_restore=len(groups) > 1))
    _nest(_flatten_dict(part), out)
  return out


def _without_layer_axis(sharding):
  """The sharding of one layer of a stacked array placed with `sharding` (its leading axis dropped)."""
  if isinstance(sharding, jax.sharding.NamedSharding):
    spec = tuple(sharding.spec)
    return jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(*spec[1:]))
  return sharding


def restore_params(path: str | os.PathLike, model_cls, config, *, shardings=None, mesh=None,
                   sharding_rules=None, rules: Sequence[KeyRule] | None = None, **model_kwargs):
  """Builds `model_cls(config)` from parameters saved by `save_params`, restoring straight onto the target
  shardings (default: the first device), so a checkpoint written on any device count restores onto any
  other. Parameters are cast to the config's param_dtype.

  A model with stacked layers (config `scan_layers`; `rules`, the HF key table, names its layers) restores
  the stored per-layer arrays, each on its stacked parameter's sharding less the layer axis, then stacks
  them one parameter at a time (device memory: the model plus one stacked parameter)."""
  abstract = state_lib.abstract_model(model_cls, config, **model_kwargs)
  graphdef, base, rest = nnx.split(abstract, state_lib.base_filter(), ...)
  targets = state_lib.sharding_table(nnx.state(abstract), shardings, mesh, sharding_rules)
  default = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  stacked = _stacked_params(base, rules)
  items, sds_of = [], {}
  for p, v in nnx.to_flat_state(base):
    sds = v.get_value()
    key = state_lib.path_str(p)
    sds_of[key] = jax.ShapeDtypeStruct(sds.shape, sds.dtype, sharding=targets[key] or default)
    if key in stacked:
      layer = _without_layer_axis(sds_of[key].sharding)
      items += [(_key(e.ours), jax.ShapeDtypeStruct(sds.shape[1:], sds.dtype, sharding=layer))
                for e in stacked[key]]
    else:
      items.append((tuple(p), sds_of[key]))
  target = _nest(items)
  if not storage.path(path).exists():
    raise ConversionError(f"{path}: no such checkpoint")
  try:
    restored = _restore_in_chunks(_absolute(path), target)
  except (ValueError, KeyError, FileNotFoundError) as e:
    raise ConversionError(f"{path}: checkpoint does not fit {model_cls.__name__}({type(config).__name__}): "
                          f"{e}") from None
  flat = dict(_flatten_dict(restored))
  for p, v in nnx.to_flat_state(base):
    key = state_lib.path_str(p)
    if key in stacked:
      layers = [flat.pop(_key(e.ours)) for e in stacked[key]]
      v.set_value(_stack(layers, sds_of[key].sharding))
      del layers
    else:
      v.set_value(flat.pop(tuple(p)))
  return state_lib.merge_with_rest(graphdef, base, rest, model_cls, config, model_kwargs, targets)


def _stack(arrays: list, sharding):
  """The layers' arrays as one [L, ...] array placed with `sharding`."""
  return jax.jit(lambda xs: jnp.stack(xs), out_shardings=sharding)(arrays)


def convert_checkpoint(out_dir: str | os.PathLike, parts: Iterable[tuple[ModelKind, str | os.PathLike]], *,
                       dtype="float32", ignore: tuple[str, ...] = (), progress: bool = True,
                       save_tokenizer: Callable[[Path], Path | None] | None = None) -> dict:
  """HF/GGUF checkpoints -> out_dir/params/<kind.name> (Orbax) + <kind.name>_config.json (our
  to_hf_config()) + the kind's extra_files found beside the source (MERT's preprocessor_config.json: the
  feature extractor settings) + meta.json, for each (kind, path) of `parts` in order. One model is held
  at a time, built tensor by tensor.

  `save_tokenizer(out_dir / "tokenizer")`, when given, writes the tokenizer there (e.g.
  tokenizer.copy_tokenizer(llm_path, ...)) and returns the directory, or None when there is none; meta.json
  records which ("tokenizer": "tokenizer" | None).
  """
  out = storage.makedirs(out_dir)  # an epath.Path: local or gs://
  meta: dict[str, Any] = {"format": FORMAT, "dtype": jnp.dtype(dtype).name, "sources": {}}
  for kind, path in parts:
    model, config = import_pretrained(kind, path, dtype=dtype, ignore=ignore, progress=progress)
    save_params(out / "params" / kind.name, model, kind.rules)
    storage.write_atomic(out / f"{kind.name}_config.json", json.dumps(config.to_hf_config(), indent=2) + "\n")
    meta["sources"][kind.name] = str(path)
    del model
    gc.collect()
    src = Path(path) if Path(path).is_dir() else Path(path).parent
    for name in kind.extra_files:
      if (src / name).is_file():
        storage.upload(src / name, out / name)
  if save_tokenizer is not None:
    if storage.is_remote(out_dir):  # tokenizer writers write local files: write them locally, then upload
      with tempfile.TemporaryDirectory(prefix="musilingo-tokenizer-") as tmp:
        tok = save_tokenizer(Path(tmp) / TOKENIZER_DIR)
        if tok is not None:
          storage.upload_tree(tok, out / TOKENIZER_DIR)
    else:
      tok = save_tokenizer(Path(os.fspath(out / TOKENIZER_DIR)))
    meta["tokenizer"] = TOKENIZER_DIR if tok is not None else None
  storage.write_atomic(out / "meta.json", json.dumps(meta, indent=2) + "\n")  # last: the directory is complete
  return meta


def load_converted(directory: str | os.PathLike, kinds: Sequence[ModelKind], *, dtype=None, compute_dtype=None,
                   shardings=None, mesh=None, sharding_rules=None,
                   model_kwargs: Mapping[str, Mapping[str, Any]] | None = None,
                   config_overrides: Mapping[str, Mapping[str, Any]] | None = None) -> tuple[list, dict]:
  """Reads a `convert_checkpoint` directory -> ([model or None for each of `kinds`, in order], meta).

  A kind whose params/<kind.name> is absent gives None. Parameters restore straight onto `shardings` (or
  `mesh` + logical `sharding_rules`, see hf.import_model; the same value serves every model) in `dtype`
  (default: the dtype they were converted in); `compute_dtype` defaults to `dtype`. `model_kwargs`
  ({"llm": {"lora": LoRAConfig}}) go to a kind's model constructor; `config_overrides` ({"encoder": {...},
  "llm": {...}}) set config fields HF does not describe (dtype, param_dtype, attention_impl, spec_augment,
  ...) and win over `dtype`/`compute_dtype`. meta: meta.json plus the configs used ("<name>_config").
  The tokenizer, if converted, is in directory / TOKENIZER_DIR (Tokenizer.from_dir reads it).
  """
  d = storage.path(directory)
  meta_path = d / "meta.json"
  meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
  dtype = dtype or meta.get("dtype")
  models = []
  for kind in kinds:
    params = d / "params" / kind.name
    cfg_path = d / f"{kind.name}_config.json"
    if not params.exists():
      models.append(None)
      continue
    if not cfg_path.exists():
      raise ConversionError(f"{cfg_path}: missing (needed to restore {params})")
    overrides = dict((config_overrides or {}).get(kind.name) or {})
    config = state_lib.config_from_hf(kind.config_cls, json.loads(cfg_path.read_text()), dtype, compute_dtype,
                                      overrides)
    kwargs = dict((model_kwargs or {}).get(kind.name) or {})
    models.append(restore_params(params, kind.model_cls, config, shardings=shardings, mesh=mesh,
                                 sharding_rules=sharding_rules, rules=kind.rules, **kwargs))
    meta[f"{kind.name}_config"] = config
  return models, meta
