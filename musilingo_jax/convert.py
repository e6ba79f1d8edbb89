"""Hugging Face PyTorch <-> our Flax NNX parameter conversion: one key table, used both ways.

A model file (models/mert.py, models/llama.py) declares `HF_KEY_RULES`, a list of `KeyRule`s. Each rule
names an HF key pattern and our flat parameter path pattern (both with an optional `{i}` layer index)
and a `Transform` with its inverse. Import and export walk the same table, so they cannot drift.

Our flat paths are the NNX state paths joined by "." (e.g. "model.layers.3.self_attn.q_proj.kernel").

  readers      TensorSource: keys(), get(key) -> np.ndarray one tensor at a time. open_source(path) picks
               SafetensorsSource (single or sharded with model.safetensors.index.json; our own header
               parser and plain reads), TorchBinSource (pytorch_model*.bin, mmap=True, weights_only=True) or
               GGUFSource (llama.cpp: HF names, dequantized, q/k rows un-permuted, HF config from metadata).
  import       import_model / import_pretrained: eval_shape the model, then read -> transform -> check ->
               cast -> device_put (target sharding) per tensor, so the host holds one model plus one tensor.
  export       export_llm_hf / export_encoder_hf (transformers directories, LoRA merged, streamed to
               safetensors); save_musilingo_pth / load_musilingo_pth (the reference's projection .pth).
  converted    convert_checkpoint -> OUT/params/{encoder,llm} (Orbax) + configs + tokenizer;
               load_converted restores against the abstract state onto any device count / mesh.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

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


# ----------------------------------------------------------------------------------------------------
# Readers: HF-named tensors, one at a time.
# ----------------------------------------------------------------------------------------------------

# config.json `model_type` (or GGUF `general.architecture`) values we can convert, by role.
LLM_TYPES = ("llama",)
ENCODER_TYPES = ("hubert", "mert", "mert_model")
_ROLE_TYPES = {"llm": LLM_TYPES, "encoder": ENCODER_TYPES, None: LLM_TYPES + ENCODER_TYPES}

# Base (checkpoint) parameters: every nnx.Param except LoRA adapters.
def _base_filter():
  from flax import nnx
  return nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam))


class TensorSource:
  """HF-named tensors read lazily, one at a time (never the whole checkpoint in memory).

  `name`: the file or directory, for messages. `config`: the HF config dict (config.json, or built from
  GGUF metadata), or None. `get` returns the tensor as stored (float32, float16 or bfloat16 via ml_dtypes;
  GGUF quantized tensors dequantized to float32) in the HF/torch layout.
  """
  name: str = "<tensors>"
  config: dict | None = None

  def keys(self) -> list[str]:
    raise NotImplementedError

  def get(self, key: str) -> np.ndarray:
    raise NotImplementedError

  def file_of(self, key: str) -> str:
    """The file holding `key` (for error messages)."""
    return self.name

  def close(self) -> None:
    pass

  def __contains__(self, key: str) -> bool:
    return key in set(self.keys())

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


class DictSource(TensorSource):
  """In-memory tensors (tests, and `export` -> `import` round trips)."""

  def __init__(self, tensors: Mapping[str, Any], *, name: str = "<tensors>", config: dict | None = None):
    self._tensors, self.name, self.config = tensors, name, config

  def keys(self):
    return list(self._tensors)

  def get(self, key):
    return np.asarray(self._tensors[key])


# --- safetensors: our own header parser + plain reads (no mmap), so host memory holds one tensor ---

def _st_dtypes() -> dict[str, np.dtype]:
  import ml_dtypes
  return {"F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
          "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
          "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8),
          "U16": np.dtype(np.uint16), "U32": np.dtype(np.uint32), "U64": np.dtype(np.uint64),
          "BOOL": np.dtype(np.bool_), "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
          "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2)}


class SafetensorsFile:
  """One .safetensors file. The header is checked against the file size on open, so a truncated or
  corrupt file fails at once with a ConversionError naming it; tensors are read with plain file reads."""

  def __init__(self, path: str | os.PathLike):
    self.path = str(path)
    size = os.path.getsize(self.path)
    self._f = open(self.path, "rb")
    head = self._f.read(8)
    if len(head) < 8:
      raise ConversionError(f"{self.path}: truncated or corrupt safetensors file ({size} bytes, no header)")
    n = int.from_bytes(head, "little")
    if n <= 0 or 8 + n > size:
      raise ConversionError(f"{self.path}: truncated or corrupt safetensors file (header of {n} bytes, "
                            f"file of {size} bytes)")
    try:
      header = json.loads(self._f.read(n))
    except ValueError as e:
      raise ConversionError(f"{self.path}: corrupt safetensors header ({e})") from None
    self.metadata = header.pop("__metadata__", None) or {}
    self._start = 8 + n
    dtypes = _st_dtypes()
    self._entries: dict[str, tuple[np.dtype, tuple[int, ...], int, int]] = {}
    for key, info in header.items():
      try:
        dtype = dtypes[info["dtype"]]
        shape = tuple(int(s) for s in info["shape"])
        a, b = (int(o) for o in info["data_offsets"])
      except (KeyError, TypeError, ValueError):
        raise ConversionError(f"{self.path}: corrupt safetensors header entry for {key!r}: {info}") from None
      if b - a != math.prod(shape) * dtype.itemsize:
        raise ConversionError(f"{self.path}: corrupt safetensors header: {key!r} {info['dtype']} {shape} "
                              f"does not fit its {b - a} bytes")
      if self._start + b > size:
        raise ConversionError(f"{self.path}: truncated safetensors file: tensor {key!r} ends at byte "
                              f"{self._start + b}, the file has {size} bytes")
      self._entries[key] = (dtype, shape, a, b)

  def keys(self) -> list[str]:
    return list(self._entries)

  def shape(self, key: str) -> tuple[int, ...]:
    return self._entries[key][1]

  def get(self, key: str) -> np.ndarray:
    dtype, shape, a, b = self._entries[key]
    out = np.empty(shape, dtype)
    buf = memoryview(out.reshape(-1).view(np.uint8))
    self._f.seek(self._start + a)
    if self._f.readinto(buf) != b - a:
      raise ConversionError(f"{self.path}: truncated safetensors file while reading {key!r}")
    return out

  def close(self):
    self._f.close()


class SafetensorsSource(TensorSource):
  """One or more .safetensors files (a sharded checkpoint lists them in model.safetensors.index.json)."""

  def __init__(self, files: Iterable[str | os.PathLike], *, name: str | None = None,
               config: dict | None = None):
    self._files = [SafetensorsFile(f) for f in files]
    self.name = name or self._files[0].path
    self.config = config
    self._where: dict[str, SafetensorsFile] = {}
    for f in self._files:
      for k in f.keys():
        if k in self._where:
          raise ConversionError(f"{self.name}: key {k!r} is in both {self._where[k].path} and {f.path}")
        self._where[k] = f

  def keys(self):
    return list(self._where)

  def get(self, key):
    return self._where[key].get(key)

  def file_of(self, key):
    return self._where[key].path if key in self._where else self.name

  def close(self):
    for f in self._files:
      f.close()


# --- torch .bin (pickled state dicts), memory-mapped ---

def _torch_to_numpy(t) -> np.ndarray:
  import ml_dtypes
  import torch
  t = t.detach()
  if t.dtype == torch.bfloat16:
    return t.contiguous().view(torch.int16).numpy().view(ml_dtypes.bfloat16)
  return t.numpy()


class TorchBinSource(TensorSource):
  """pytorch_model.bin or its shards (pytorch_model.bin.index.json), loaded with mmap=True and
  weights_only=True: tensors stay on disk until `get` copies one out."""

  def __init__(self, files: Iterable[str | os.PathLike], *, weight_map: dict[str, str] | None = None,
               name: str | None = None, config: dict | None = None):
    self._paths = [str(f) for f in files]
    self.name = name or self._paths[0]
    self.config = config
    self._loaded: dict[str, dict] = {}
    if weight_map is None:  # a single file: load it to learn its keys (cheap: mmap)
      weight_map = {k: self._paths[0] for k in self._load(self._paths[0])}
    self._where = dict(weight_map)

  def _load(self, path: str) -> dict:
    if path not in self._loaded:
      import torch
      if not os.path.exists(path):
        raise ConversionError(f"{self.name}: shard {path} listed in the index is missing")
      try:
        try:
          sd = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
        except RuntimeError as e:  # the legacy (pre-zip) format cannot be memory-mapped: read it whole
          if "mmap" not in str(e):
            raise
          sd = torch.load(path, map_location="cpu", weights_only=True)
      except Exception as e:  # noqa: BLE001 - torch raises many kinds for a bad file
        raise ConversionError(f"{path}: cannot read torch checkpoint ({type(e).__name__}: {e})") from None
      if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
      if not isinstance(sd, dict):
        raise ConversionError(f"{path}: expected a state dict, found {type(sd).__name__}")
      self._loaded[path] = sd
    return self._loaded[path]

  def keys(self):
    return list(self._where)

  def get(self, key):
    return _torch_to_numpy(self._load(self._where[key])[key])

  def file_of(self, key):
    return self._where.get(key, self.name)

  def close(self):
    self._loaded.clear()


# --- GGUF (llama.cpp) for LLaMA-family models ---

_GGUF_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
}
_GGUF_TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}


def gguf_to_hf_name(name: str) -> str | None:
  """llama.cpp tensor name -> HF LLaMA key ("blk.3.attn_q.weight" -> "model.layers.3.self_attn.q_proj.weight")."""
  m = re.match(r"^blk\.(\d+)\.(\w+)\.(weight|bias)$", name)
  if m and m.group(2) in _GGUF_LAYER_NAMES:
    return f"model.layers.{m.group(1)}.{_GGUF_LAYER_NAMES[m.group(2)]}.{m.group(3)}"
  m = re.match(r"^(\w+)\.(weight|bias)$", name)
  if m and m.group(1) in _GGUF_TOP_NAMES:
    return f"{_GGUF_TOP_NAMES[m.group(1)]}.{m.group(2)}"
  return None


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


def _f32(v) -> float:
  """A GGUF float32 as the short decimal it was written from (9.999999747e-06 -> 1e-05)."""
  return float(str(np.float32(v)))


_GGUF_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q",
                 12: "<d"}


def read_gguf_layout(path: str) -> tuple[dict[str, Any], list[tuple[str, tuple[int, ...], int, int]], int]:
  """(metadata, [(tensor name, ggml dims, ggml type, offset)], data start) of a GGUF v2/v3 file.

  Plain reads of the header only (gguf.GGUFReader builds a numpy view per vocabulary string, seconds for a
  49k vocabulary). Raises ConversionError naming the file when it is not GGUF or is cut short."""
  import struct
  size = os.path.getsize(path)
  with open(path, "rb") as f:
    def read(fmt):
      n = struct.calcsize(fmt)
      b = f.read(n)
      if len(b) != n:
        raise ConversionError(f"{path}: truncated GGUF file (header ends early at byte {f.tell()})")
      return struct.unpack(fmt, b)[0]

    def read_str():
      n = read("<Q")
      if n > size:
        raise ConversionError(f"{path}: corrupt GGUF header (string of {n} bytes)")
      b = f.read(n)
      if len(b) != n:
        raise ConversionError(f"{path}: truncated GGUF file (header ends early)")
      return b.decode("utf-8", errors="replace")

    def read_value(vtype):
      if vtype == 8:
        return read_str()
      if vtype == 9:
        itype, count = read("<I"), read("<Q")
        if count > size:
          raise ConversionError(f"{path}: corrupt GGUF header (array of {count} items)")
        if itype in _GGUF_SCALARS:
          dt = np.dtype(_GGUF_SCALARS[itype])
          b = f.read(dt.itemsize * count)
          if len(b) != dt.itemsize * count:
            raise ConversionError(f"{path}: truncated GGUF file (header ends early)")
          return np.frombuffer(b, dt).copy()
        return [read_value(itype) for _ in range(count)]
      if vtype not in _GGUF_SCALARS:
        raise ConversionError(f"{path}: corrupt GGUF header (unknown value type {vtype})")
      return read(_GGUF_SCALARS[vtype])

    if f.read(4) != b"GGUF":
      raise ConversionError(f"{path}: not a GGUF file (no 'GGUF' magic bytes)")
    version = read("<I")
    if version not in (2, 3):
      raise ConversionError(f"{path}: GGUF version {version} is not supported (expected 2 or 3)")
    n_tensors, n_kv = read("<Q"), read("<Q")
    meta = {}
    for _ in range(n_kv):
      key = read_str()
      meta[key] = read_value(read("<I"))
    tensors = []
    for _ in range(n_tensors):
      name = read_str()
      dims = tuple(read("<Q") for _ in range(read("<I")))
      tensors.append((name, dims, read("<I"), read("<Q")))
    align = int(meta.get("general.alignment", 32))
    start = -(-f.tell() // align) * align
  return meta, tensors, start


class GGUFSource(TensorSource):
  """A llama.cpp GGUF file of a LLaMA-architecture model: HF names, dequantized float32 (gguf.quants; F16
  tensors widened), q/k rows un-permuted, and an HF LlamaConfig-style dict built from the metadata.
  Tensors are read with plain file reads, one at a time."""

  def __init__(self, path: str | os.PathLike, *, expect: str | None = "llm"):
    import gguf
    self.path = self.name = str(path)
    self.meta, infos, start = read_gguf_layout(self.path)
    arch = self.meta.get("general.architecture")
    if arch not in LLM_TYPES or expect == "encoder":
      raise ConversionError(f"{self.path}: unsupported general.architecture {arch!r}"
                            f"{' for the encoder' if expect == 'encoder' else ''}; GGUF files are read for "
                            f"LLMs of architecture {list(LLM_TYPES)}")
    self.config = self._hf_config(arch)
    size = os.path.getsize(self.path)
    self._tensors = {}
    for name, dims, ttype, offset in infos:
      try:
        qtype = gguf.GGMLQuantizationType(ttype)
        block, type_size = gguf.GGML_QUANT_SIZES[qtype]
      except (ValueError, KeyError):
        raise ConversionError(f"{self.path}: tensor {name!r} has unknown ggml type {ttype}") from None
      n_bytes = math.prod(dims) // block * type_size
      if start + offset + n_bytes > size:
        raise ConversionError(f"{self.path}: truncated GGUF file: tensor {name!r} ends at byte "
                              f"{start + offset + n_bytes}, the file has {size} bytes")
      self._tensors[gguf_to_hf_name(name) or name] = (name, dims, qtype, start + offset, n_bytes)
    if "lm_head.weight" not in self._tensors:
      self.config["tie_word_embeddings"] = True

  def field(self, key: str, default=None):
    v = self.meta.get(key)
    return default if v is None else v

  def _need(self, key: str):
    v = self.field(key)
    if v is None:
      raise ConversionError(f"{self.path}: GGUF metadata field {key!r} is missing")
    return v

  def _hf_config(self, arch: str) -> dict:
    p = arch + "."
    tokens = self.field("tokenizer.ggml.tokens")
    vocab = self.field(p + "vocab_size") or (len(tokens) if tokens is not None else None)
    if vocab is None:
      raise ConversionError(f"{self.path}: cannot tell the vocabulary size (no {p}vocab_size, "
                            f"no tokenizer.ggml.tokens)")
    heads = int(self._need(p + "attention.head_count"))
    hidden = int(self._need(p + "embedding_length"))
    if self.field(p + "rope.scaling.type") not in (None, "none"):
      raise ConversionError(f"{self.path}: unsupported GGUF field {p}rope.scaling.type="
                            f"{self.field(p + 'rope.scaling.type')!r}")
    cfg = {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": hidden,
        "intermediate_size": int(self._need(p + "feed_forward_length")),
        "num_hidden_layers": int(self._need(p + "block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(self.field(p + "attention.head_count_kv", heads)),
        "head_dim": int(self.field(p + "rope.dimension_count", hidden // heads)),
        "max_position_embeddings": int(self.field(p + "context_length", 2048)),
        "rms_norm_eps": _f32(self.field(p + "attention.layer_norm_rms_epsilon", 1e-6)),
        "rope_theta": _f32(self.field(p + "rope.freq_base", 10000.0)),
        "vocab_size": int(vocab),
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": False,
    }
    for ours, key in (("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id"),
                      ("pad_token_id", "padding_token_id")):
      v = self.field("tokenizer.ggml." + key)
      if v is not None:
        cfg[ours] = int(v)
    return cfg

  def keys(self):
    return list(self._tensors)

  def shape(self, key: str) -> tuple[int, ...]:
    return tuple(int(d) for d in reversed(self._tensors[key][1]))

  def get(self, key):
    import gguf
    name, dims, qtype, offset, n_bytes = self._tensors[key]
    raw = np.fromfile(self.path, dtype=np.uint8, count=n_bytes, offset=offset)
    if raw.size != n_bytes:
      raise ConversionError(f"{self.path}: truncated GGUF file while reading {name!r}")
    rows = math.prod(dims[1:])
    try:
      w = gguf.quants.dequantize(raw.reshape(rows, -1), qtype)
    except NotImplementedError as e:
      raise ConversionError(f"{self.path}: tensor {name!r}: {e}") from None
    w = w.reshape(self.shape(key))
    if key.endswith("self_attn.q_proj.weight"):
      w = unpermute_qk(w, self.config["num_attention_heads"])
    elif key.endswith("self_attn.k_proj.weight"):
      w = unpermute_qk(w, self.config["num_key_value_heads"])
    return w


# --- opening a path ---

def read_config(directory: str | os.PathLike) -> dict | None:
  p = Path(directory) / "config.json"
  if not p.exists():
    return None
  try:
    return json.loads(p.read_text())
  except ValueError as e:
    raise ConversionError(f"{p}: not valid JSON ({e})") from None


def check_model_type(config: dict | None, *, where: str, expect: str | None) -> None:
  """ConversionError naming the `model_type` field unless it is one we convert (for `expect` role)."""
  if config is None:
    return
  mt = config.get("model_type")
  if mt not in _ROLE_TYPES[expect]:
    raise ConversionError(f"{where}: unsupported model_type {mt!r} in config field 'model_type'; "
                          f"supported{' for the ' + expect if expect else ''}: {list(_ROLE_TYPES[expect])}")


def open_source(path: str | os.PathLike, *, expect: str | None = None) -> TensorSource:
  """A TensorSource for an HF checkpoint directory (model.safetensors, sharded safetensors with
  model.safetensors.index.json, pytorch_model.bin or its index), a single .safetensors/.bin file, or a
  llama.cpp .gguf file (or a directory holding exactly one). `expect`: "llm", "encoder" or None (either);
  an unsupported config model_type / GGUF general.architecture raises ConversionError naming the field."""
  p = Path(path)
  if not p.exists():
    raise ConversionError(f"{p}: no such file or directory")
  if p.is_file():
    if p.suffix == ".gguf":
      return GGUFSource(p, expect=expect)
    config = read_config(p.parent)
    check_model_type(config, where=str(p.parent / "config.json"), expect=expect)
    if p.suffix == ".safetensors":
      return SafetensorsSource([p], config=config)
    if p.suffix in (".bin", ".pt", ".pth"):
      return TorchBinSource([p], config=config)
    raise ConversionError(f"{p}: unknown checkpoint file type {p.suffix!r}")
  config = read_config(p)
  check_model_type(config, where=str(p / "config.json"), expect=expect)
  for index_name, kind in (("model.safetensors.index.json", "st"), ("pytorch_model.bin.index.json", "bin")):
    index = p / index_name
    if index.exists():
      try:
        weight_map = json.loads(index.read_text())["weight_map"]
      except (ValueError, KeyError) as e:
        raise ConversionError(f"{index}: not a valid index file ({e})") from None
      files = sorted(set(weight_map.values()))
      if kind == "st":
        missing = [f for f in files if not (p / f).exists()]
        if missing:
          raise ConversionError(f"{index}: shard files {missing} are missing")
        src = SafetensorsSource([p / f for f in files], name=str(p), config=config)
        extra = set(weight_map) ^ set(src.keys())
        if extra:
          raise ConversionError(f"{index}: index and shards disagree on keys {sorted(extra)[:5]}")
        return src
      return TorchBinSource([p / f for f in files], weight_map={k: str(p / f) for k, f in weight_map.items()},
                            name=str(p), config=config)
  if (p / "model.safetensors").exists():
    return SafetensorsSource([p / "model.safetensors"], name=str(p / "model.safetensors"), config=config)
  if (p / "pytorch_model.bin").exists():
    return TorchBinSource([p / "pytorch_model.bin"], config=config)
  ggufs = sorted(p.glob("*.gguf"))
  if len(ggufs) == 1:
    return GGUFSource(ggufs[0], expect=expect)
  raise ConversionError(f"{p}: no model.safetensors, model.safetensors.index.json, pytorch_model.bin "
                        f"or single .gguf file found")


# ----------------------------------------------------------------------------------------------------
# Streaming import: abstract model -> one tensor at a time -> placed on its sharding.
# ----------------------------------------------------------------------------------------------------

def _path_str(path) -> str:
  return ".".join(str(p) for p in path)


def _np_dtype(dtype) -> np.dtype:
  import jax.numpy as jnp
  return np.dtype(jnp.dtype(dtype))


def _with_dtype(config, dtype, compute_dtype=None):
  """config with param_dtype = `dtype` and compute dtype = `compute_dtype` (default: `dtype`); None: unchanged."""
  import jax.numpy as jnp
  changes = {}
  if dtype is not None:
    changes.update(param_dtype=jnp.dtype(dtype), dtype=jnp.dtype(dtype))
  if compute_dtype is not None:
    changes.update(dtype=jnp.dtype(compute_dtype))
  return dataclasses.replace(config, **changes) if changes else config


def _config_from_hf(config_cls, hf_config: dict, dtype=None, compute_dtype=None,
                    overrides: Mapping[str, Any] | None = None):
  """config_cls.from_hf_config(hf_config) with `dtype`/`compute_dtype` (see _with_dtype), then `overrides`
  (our own fields: dtype, param_dtype, attention_impl, spec_augment, ...), which win over both."""
  overrides = dict(overrides or {})
  config = _with_dtype(config_cls.from_hf_config(hf_config, **overrides), dtype, compute_dtype)
  return dataclasses.replace(config, **overrides) if overrides else config


def _sharding_table(abstract_state, shardings, mesh, rules) -> dict[str, Any]:
  """Flat path -> target Sharding (or None = default device) for every leaf of `abstract_state`.

  `shardings`: None | one jax.sharding.Sharding for all | a callable(abstract nnx.State) -> a State/pytree of
  shardings | such a State/pytree itself | a Mapping flat path -> Sharding. With `mesh` (and logical-axis
  `rules`, default "fsdp") and no `shardings`, musilingo_jax.sharding.state_shardings picks them.
  """
  import jax
  from flax import nnx
  if shardings is None and mesh is not None:
    from musilingo_jax import sharding as sharding_lib
    shardings = lambda s: sharding_lib.state_shardings(s, mesh, rules or "fsdp")  # noqa: E731
  paths = [_path_str(p) for p, _ in nnx.to_flat_state(abstract_state)]
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
      flat[_path_str(p)] = v.get_value() if isinstance(v, nnx.Variable) else v
  return {p: flat.get(p) for p in paths}


def _place(value, sharding):
  import jax
  return jax.device_put(value, sharding) if sharding is not None else jax.device_put(value)


def abstract_model(model_cls, config, **model_kwargs):
  """The model's structure with ShapeDtypeStruct leaves: no memory, no compute (nnx.eval_shape)."""
  from flax import nnx
  return nnx.eval_shape(lambda: model_cls(config, rngs=nnx.Rngs(0), **model_kwargs))


def _non_checkpoint_state(model_cls, config, model_kwargs):
  """Everything but the checkpoint parameters (LoRA adapters, RNG state), initialised under jit: the base
  parameters' initialisers are dead code there, so the full model is never materialised."""
  import jax
  from flax import nnx

  def init():
    model = model_cls(config, rngs=nnx.Rngs(0), **model_kwargs)
    return nnx.split(model, _base_filter(), ...)[2]
  return jax.jit(init)()


def import_model(model_cls, config, source: TensorSource, rules: list[KeyRule], *, ignore: tuple[str, ...] = (),
                 dtype=None, compute_dtype=None, shardings=None, mesh=None, sharding_rules=None,
                 progress: bool = False, **model_kwargs):
  """Builds `model_cls(config, rngs=..., **model_kwargs)` with its parameters read from `source`.

  The model is built abstractly (nnx.eval_shape); then each parameter's HF tensor is read alone, transformed
  by its KeyRule (the same table export uses), shape-checked, cast to the parameter dtype (`dtype` sets the
  config's param_dtype, and its compute dtype unless `compute_dtype` is given) and placed with
  jax.device_put on its target sharding (see `_sharding_table`: `shardings`, or `mesh` + logical
  `sharding_rules`), after which the host copy is dropped: peak host memory is about one copy of the model
  plus one tensor. Non-checkpoint state (LoRA adapters, RNG state) is initialised fresh.

  Raises ConversionError naming the source file, key and expected shape for a missing key, an unexpected
  key (one no rule consumes and no `ignore` regex matches) or a shape mismatch.
  """
  from flax import nnx
  config = _with_dtype(config, dtype, compute_dtype)
  abstract = abstract_model(model_cls, config, **model_kwargs)
  graphdef, base, rest = nnx.split(abstract, _base_filter(), ...)
  params = {_path_str(p): v for p, v in nnx.to_flat_state(base)}

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

  targets = _sharding_table(nnx.state(abstract), shardings, mesh, sharding_rules)
  it = plan
  if progress:
    from tqdm import tqdm
    it = tqdm(plan, desc=f"import {Path(source.name).name}", unit="tensor")
  for path, var, rule, name in it:
    raw = source.get(name)
    value = rule.transform.to_ours(raw)
    if tuple(value.shape) != tuple(var.shape):
      raise ConversionError(f"{source.file_of(name)}: key {name!r} has shape {tuple(raw.shape)} "
                            f"({tuple(value.shape)} after the {rule.transform.name} transform), expected "
                            f"{tuple(var.shape)} for our {path}")
    target = _np_dtype(var.dtype)
    if value.dtype != target:
      value = np.asarray(value, dtype=target, order="C")
    var.set_value(_place(value, targets[path]))
    del raw, value

  return _merge_with_rest(graphdef, base, rest, model_cls, config, model_kwargs, targets)


def _merge_with_rest(graphdef, base, rest, model_cls, config, model_kwargs, targets):
  """Merges the filled checkpoint state with freshly initialised non-checkpoint state (if any)."""
  from flax import nnx
  if list(nnx.to_flat_state(rest)):
    import jax
    rest = _non_checkpoint_state(model_cls, config, model_kwargs)
    for p, v in nnx.to_flat_state(rest):
      s = targets.get(_path_str(p))
      if s is not None:
        v.set_value(jax.device_put(v.get_value(), s))
  return nnx.merge(graphdef, base, rest)


# ----------------------------------------------------------------------------------------------------
# Export: our parameters -> HF tensors through the same table (LoRA merged), streamed to safetensors.
# ----------------------------------------------------------------------------------------------------

def _merged_kernels(model) -> dict[str, Any]:
  """Flat kernel path -> kernel + LoRA delta, for every layers.Linear that has adapters."""
  from flax import nnx
  from musilingo_jax.models import layers
  out = {}
  for path, node in nnx.iter_graph(model):
    if isinstance(node, layers.Linear) and node.lora is not None:
      out[_path_str((*path, "kernel"))] = node.merged_kernel()
  return out


def _is_float(dtype) -> bool:
  import ml_dtypes
  return np.issubdtype(dtype, np.floating) or dtype in (np.dtype(ml_dtypes.bfloat16),)


def iter_hf_tensors(model, rules: list[KeyRule], *, dtype=None, prefer=None):
  """Yields (hf_key, numpy array in the torch layout), one at a time; LoRA adapters merged into kernels.

  `dtype`: cast floating tensors to it (None: as held). `prefer(rule, names) -> name` picks the HF spelling
  among a rule's `hf` and `hf_aliases` (default: `hf`)."""
  merged = _merged_kernels(model)
  for path, var in _flat_params(model).items():
    rule, groups = rule_for_ours(rules, path)
    names = rule.hf_names(groups)
    name = prefer(rule, names) if prefer else names[0]
    value = np.asarray(merged[path] if path in merged else var[...])
    value = rule.transform.to_hf(value)
    if dtype is not None and _is_float(value.dtype):
      value = np.asarray(value, dtype=_np_dtype(dtype))
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
    self._names = {v: k for k, v in _st_dtypes().items()}

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
    import shutil
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
    config["torch_dtype"] = config["dtype"] = _np_dtype(dtype).name
  (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
  with SafetensorsWriter(out / "model.safetensors") as w:
    for key, value in iter_hf_tensors(model, rules, dtype=dtype, prefer=prefer):
      w.add(key, value)
  return out


def export_llm_hf(llm_model, out_dir: str | os.PathLike, dtype=None, *, tokenizer=None) -> Path:
  """Our Llama -> a transformers LlamaForCausalLM directory (config.json + model.safetensors, LoRA merged).
  `dtype`: "float32", "bfloat16", "float16" or None (as held). `tokenizer` (ours): saved beside it."""
  from musilingo_jax.models import llama
  out = export_hf(llm_model, llama.HF_KEY_RULES, out_dir, llm_model.cfg.to_hf_config(), dtype=dtype)
  if tokenizer is not None:
    tokenizer.save(out)
  return out


def _current_hubert_name(rule: KeyRule, names: list[str]) -> str:
  """transformers 5's HubertModel spells the weight-norm pair parametrizations.weight.original0/1."""
  return next((n for n in names if ".parametrizations." in n), names[0])


def export_encoder_hf(mert_model, out_dir: str | os.PathLike, dtype=None) -> Path:
  """Our MERT -> a transformers HubertModel directory (config.json + model.safetensors), the weight-norm
  pair under the names current transformers uses (parametrizations.weight.original0/original1)."""
  from musilingo_jax.models import mert
  return export_hf(mert_model, mert.HF_KEY_RULES, out_dir, mert_model.cfg.to_hf_config(), dtype=dtype,
                   prefer=_current_hubert_name)


# ----------------------------------------------------------------------------------------------------
# MusiLingo's own checkpoint (.pth): just the trainable projection (SPEC section 6).
# ----------------------------------------------------------------------------------------------------

PTH_KEYS = ("llama_proj.weight", "llama_proj.bias")


def save_musilingo_pth(path: str | os.PathLike, proj_kernel, proj_bias) -> None:
  """torch.save({"model": {"llama_proj.weight": [out, in] fp32, "llama_proj.bias": [out] fp32}}): a file
  the reference loads with load_state_dict(ckpt["model"], strict=False). proj_kernel is ours, [in, out]."""
  import torch
  kernel = np.asarray(proj_kernel, dtype=np.float32)
  bias = np.asarray(proj_bias, dtype=np.float32)
  if kernel.ndim != 2 or bias.shape != (kernel.shape[1],):
    raise ConversionError(f"{path}: projection kernel {kernel.shape} [in, out] and bias {bias.shape} [out] "
                          f"do not fit")
  Path(path).parent.mkdir(parents=True, exist_ok=True)
  torch.save({"model": {"llama_proj.weight": torch.from_numpy(np.ascontiguousarray(kernel.T)),
                        "llama_proj.bias": torch.from_numpy(bias.copy())}}, str(path))


def load_musilingo_pth(path: str | os.PathLike, *, trusted: bool = False) -> tuple[np.ndarray, np.ndarray]:
  """A MusiLingo .pth (ours or a released one) -> (kernel [in, out] fp32, bias [out] fp32).

  Reads ckpt["model"] (or a bare state dict); optimizer/config/scaler/epoch are ignored. Strict about the
  two projection keys: a missing one, or any other key under "model", raises ConversionError naming the file.
  The file is unpickled with weights_only=True unless `trusted` (a file from a source you trust whose
  "config" entry holds objects the safe unpickler refuses).
  """
  import torch
  if not os.path.exists(path):
    raise ConversionError(f"{path}: no such file")
  try:
    ckpt = torch.load(str(path), map_location="cpu", weights_only=not trusted)
  except Exception as e:  # noqa: BLE001
    hint = "" if trusted else " (if the file is trusted, pass trusted=True to unpickle its other entries)"
    raise ConversionError(f"{path}: cannot read torch checkpoint ({type(e).__name__}: {e}){hint}") from None
  sd = ckpt.get("model", ckpt) if isinstance(ckpt, dict) else None
  if not isinstance(sd, dict):
    raise ConversionError(f"{path}: expected a dict with a 'model' state dict, found {type(ckpt).__name__}")
  missing = [k for k in PTH_KEYS if k not in sd]
  if missing:
    raise ConversionError(f"{path}: missing keys {missing} under 'model' (found {sorted(sd)[:10]})")
  extra = sorted(set(sd) - set(PTH_KEYS))
  if extra:
    raise ConversionError(f"{path}: unexpected keys {extra[:10]} under 'model'; a MusiLingo checkpoint holds "
                          f"only {list(PTH_KEYS)}")
  w = _torch_to_numpy(sd["llama_proj.weight"]).astype(np.float32)
  b = _torch_to_numpy(sd["llama_proj.bias"]).astype(np.float32)
  if w.ndim != 2 or b.shape != (w.shape[0],):
    raise ConversionError(f"{path}: llama_proj.weight {w.shape} [out, in] and llama_proj.bias {b.shape} "
                          f"do not fit")
  return np.ascontiguousarray(w.T), b


# ----------------------------------------------------------------------------------------------------
# Converted checkpoints: OUT/params/{encoder,llm} (Orbax), OUT/{encoder,llm}_config.json, OUT/tokenizer/.
# ----------------------------------------------------------------------------------------------------

ROLES = ("encoder", "llm")
_TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                    "added_tokens.json")


def model_parts(role: str):
  """(model class, config class, key rules, ignore regexes for a config) for "encoder" or "llm"."""
  if role == "llm":
    from musilingo_jax.models import llama
    return llama.Llama, llama.LlamaConfig, llama.HF_KEY_RULES, llama.hf_ignore_keys
  if role == "encoder":
    from musilingo_jax.models import mert
    return mert.MERT, mert.MERTConfig, mert.HF_KEY_RULES, lambda cfg: ()
  raise ValueError(f"role must be one of {ROLES}, got {role!r}")


def import_pretrained(role: str, path: str | os.PathLike, *, dtype=None, compute_dtype=None, shardings=None,
                      mesh=None, sharding_rules=None, ignore: tuple[str, ...] = (), progress: bool = False,
                      config_overrides: Mapping[str, Any] | None = None, **model_kwargs):
  """An HF directory / file or a GGUF -> (our model, its config). role: "encoder" (MERT) or "llm" (Llama).

  `config_overrides` set config fields HF does not describe (dtype, param_dtype, attention_impl,
  spec_augment, ...) and win over `dtype`/`compute_dtype`; `model_kwargs` go to the model constructor
  (e.g. lora=). See import_model for the rest."""
  model_cls, config_cls, rules, ignore_for = model_parts(role)
  with open_source(path, expect=role) as src:
    if src.config is None:
      raise ConversionError(f"{path}: no config.json beside the weights")
    config = _config_from_hf(config_cls, src.config, dtype, compute_dtype, config_overrides)
    model = import_model(model_cls, config, src, rules, ignore=tuple(ignore_for(config)) + tuple(ignore),
                         shardings=shardings, mesh=mesh, sharding_rules=sharding_rules, progress=progress,
                         **model_kwargs)
  return model, config


def copy_tokenizer(llm_path: str | os.PathLike, out_dir: str | os.PathLike) -> Path | None:
  """Carries the LLM's tokenizer into out_dir: the HF tokenizer files of a directory, or a GGUF's own
  tokenizer (Tokenizer.from_gguf(...).save(...)). Returns out_dir, or None when there is none."""
  import shutil
  p, out = Path(llm_path), Path(out_dir)
  directory = p if p.is_dir() else p.parent
  found = [directory / f for f in _TOKENIZER_FILES if (directory / f).exists()]
  gguf_file = p if p.suffix == ".gguf" else None
  if gguf_file is None and p.is_dir() and not found and len(list(p.glob("*.gguf"))) == 1:
    gguf_file = next(p.glob("*.gguf"))
  if gguf_file is not None and "tokenizer.ggml.model" in read_gguf_layout(str(gguf_file))[0]:
    from musilingo_jax.tokenizer import Tokenizer
    out.mkdir(parents=True, exist_ok=True)
    Tokenizer.from_gguf(gguf_file).save(out)
    return out
  if not found:
    return None
  out.mkdir(parents=True, exist_ok=True)
  for f in found:
    shutil.copy2(f, out / f.name)
  return out


# Bytes Orbax may hold in flight (device -> host copies and tensorstore writes) while saving or restoring,
# at least the largest array: without a limit a save copies the whole model to host first, doubling peak
# host memory.
ORBAX_CONCURRENT_BYTES = 32 << 20
ORBAX_CHUNK_BYTES = 256 << 20  # restore_params reads the tree in partial restores of about this size


def _checkpointer(largest_bytes: int = 0):
  import orbax.checkpoint as ocp
  gb = max(ORBAX_CONCURRENT_BYTES, int(largest_bytes * 1.05) + (1 << 20)) / 1e9  # headroom for rounding
  return ocp.Checkpointer(ocp.PyTreeCheckpointHandler(
      save_concurrent_gb=gb, restore_concurrent_gb=gb, save_device_host_concurrent_gb=gb))


def _largest(tree) -> int:
  import jax
  return max((int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree)), default=0)


def save_params(path: str | os.PathLike, model) -> None:
  """The model's checkpoint parameters (no LoRA, no RNG state) as an Orbax pure-dict tree at `path`."""
  import orbax.checkpoint as ocp
  from flax import nnx
  tree = nnx.state(model, _base_filter()).to_pure_dict()
  ckptr = _checkpointer(_largest(tree))
  ckptr.save(Path(path).absolute(), args=ocp.args.PyTreeSave(tree), force=True)  # synchronous


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


def _restore_in_chunks(path: Path, target: dict) -> dict:
  """Orbax restore of `target` (ShapeDtypeStruct leaves with shardings) in chunks of about
  ORBAX_CHUNK_BYTES (partial restores): one whole-tree restore holds read buffers for much of the model
  at once (measured +0.5x of the model in host memory), chunks keep that near one chunk."""
  import orbax.checkpoint as ocp
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


def restore_params(path: str | os.PathLike, model_cls, config, *, shardings=None, mesh=None,
                   sharding_rules=None, **model_kwargs):
  """Builds `model_cls(config)` from parameters saved by `save_params`, restoring straight onto the target
  shardings (default: the first device), so a checkpoint written on any device count restores onto any
  other. Parameters are cast to the config's param_dtype."""
  import jax
  from flax import nnx
  abstract = abstract_model(model_cls, config, **model_kwargs)
  graphdef, base, rest = nnx.split(abstract, _base_filter(), ...)
  targets = _sharding_table(nnx.state(abstract), shardings, mesh, sharding_rules)
  default = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  for p, v in nnx.to_flat_state(base):
    sds = v.get_value()
    v.set_value(jax.ShapeDtypeStruct(sds.shape, sds.dtype, sharding=targets[_path_str(p)] or default))
  target = base.to_pure_dict()
  if not Path(path).exists():
    raise ConversionError(f"{path}: no such checkpoint")
  try:
    restored = _restore_in_chunks(Path(path).absolute(), target)
  except (ValueError, KeyError, FileNotFoundError) as e:
    raise ConversionError(f"{path}: checkpoint does not fit {model_cls.__name__}({type(config).__name__}): "
                          f"{e}") from None
  nnx.replace_by_pure_dict(base, restored)
  return _merge_with_rest(graphdef, base, rest, model_cls, config, model_kwargs, targets)


def convert_checkpoint(out_dir: str | os.PathLike, *, mert: str | os.PathLike | None = None,
                       llm: str | os.PathLike | None = None, dtype="float32", ignore: tuple[str, ...] = (),
                       progress: bool = True) -> dict:
  """HF/GGUF checkpoints -> out_dir/params/{encoder,llm} (Orbax) + {encoder,llm}_config.json (our
  to_hf_config()) + tokenizer/ (the LLM's) + preprocessor_config.json (MERT's feature extractor settings,
  when the MERT directory has one) + meta.json. One model is held at a time, built tensor by tensor."""
  import gc
  import jax.numpy as jnp
  out = Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  meta: dict[str, Any] = {"format": "musilingo_jax.convert/1", "dtype": jnp.dtype(dtype).name, "sources": {}}
  for role, path in (("encoder", mert), ("llm", llm)):
    if path is None:
      continue
    model, config = import_pretrained(role, path, dtype=dtype, ignore=ignore, progress=progress)
    save_params(out / "params" / role, model)
    (out / f"{role}_config.json").write_text(json.dumps(config.to_hf_config(), indent=2) + "\n")
    meta["sources"][role] = str(path)
    del model
    gc.collect()
    if role == "encoder":  # MERT's feature extractor settings (do_normalize), which the data path follows
      src = Path(path) if Path(path).is_dir() else Path(path).parent
      if (src / "preprocessor_config.json").is_file():
        import shutil
        shutil.copy2(src / "preprocessor_config.json", out / "preprocessor_config.json")
  if llm is not None:
    tok = copy_tokenizer(llm, out / "tokenizer")
    meta["tokenizer"] = "tokenizer" if tok is not None else None
  (out / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
  return meta


def load_converted(directory: str | os.PathLike, *, dtype=None, compute_dtype=None, shardings=None, mesh=None,
                   sharding_rules=None, lora=None, roles: tuple[str, ...] = ROLES,
                   config_overrides: Mapping[str, Mapping[str, Any]] | None = None):
  """Reads a `convert_checkpoint` directory -> (encoder MERT | None, llm Llama | None, Tokenizer | None, meta).

  Parameters restore straight onto `shardings` (or `mesh` + logical `sharding_rules`, see import_model; the
  same value serves both models) in `dtype` (default: the dtype they were converted in); `compute_dtype`
  defaults to `dtype`. `lora` (a layers.LoRAConfig) adds fresh adapters to the LLM. `roles` picks what to
  load; `config_overrides` ({"encoder": {...}, "llm": {...}}) sets config fields HF does not describe
  (dtype, param_dtype, attention_impl, spec_augment, ...) and wins over `dtype`/`compute_dtype`.
  meta: meta.json plus the configs used ("encoder_config", "llm_config").
  """
  unknown = set(roles) - set(ROLES)
  if unknown:
    raise ValueError(f"roles must be among {ROLES}, got {sorted(unknown)}")
  d = Path(directory)
  meta_path = d / "meta.json"
  meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
  dtype = dtype or meta.get("dtype")
  models = {}
  for role in ROLES:
    cfg_path = d / f"{role}_config.json"
    if role not in roles or not (d / "params" / role).exists():
      models[role] = None
      continue
    if not cfg_path.exists():
      raise ConversionError(f"{cfg_path}: missing (needed to restore {d / 'params' / role})")
    model_cls, config_cls, _, _ = model_parts(role)
    overrides = dict((config_overrides or {}).get(role) or {})
    config = _config_from_hf(config_cls, json.loads(cfg_path.read_text()), dtype, compute_dtype, overrides)
    kwargs = {"lora": lora} if role == "llm" and lora is not None else {}
    models[role] = restore_params(d / "params" / role, model_cls, config, shardings=shardings, mesh=mesh,
                                  sharding_rules=sharding_rules, **kwargs)
    meta[f"{role}_config"] = config
  tokenizer = None
  if "llm" in roles and (d / "tokenizer").is_dir():
    from musilingo_jax.tokenizer import Tokenizer
    tokenizer = Tokenizer.from_dir(d / "tokenizer")
  return models["encoder"], models["llm"], tokenizer, meta
