"""Checkpoint readers: HF-named tensors read lazily, one at a time (never the whole checkpoint in memory).

open_source(path) picks SafetensorsSource (single or sharded with model.safetensors.index.json; our own header
parser and plain reads), TorchBinSource (pytorch_model*.bin, mmap=True, weights_only=True) or GGUFSource
(llama.cpp: HF names, dequantized, q/k rows un-permuted, an HF config built from the metadata).
`read_gguf_layout` reads a GGUF header alone (the tokenizer uses it for the vocabulary).
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
from pathlib import Path
from typing import Any, Iterable

import ml_dtypes
import numpy as np

from musilingo_jax.convert.rules import ConversionError, ModelKind, unpermute_qk

# GGUF `general.architecture` values GGUFSource reads: its tensor names and config are LLaMA's.
GGUF_ARCHITECTURES = ("llama",)


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


# --- safetensors: our own header parser + plain reads (no mmap), so host memory holds one tensor ---

def safetensors_dtypes() -> dict[str, np.dtype]:
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
    dtypes = safetensors_dtypes()
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

def torch_to_numpy(t) -> np.ndarray:
  """A torch tensor -> numpy (bfloat16 as ml_dtypes.bfloat16, which torch's .numpy() refuses)."""
  import torch  # heavy and optional: only for .bin/.pth checkpoints
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
      import torch  # heavy and optional: only for .bin checkpoints
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
    return torch_to_numpy(self._load(self._where[key])[key])

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


def _f32(v) -> float:
  """A GGUF float32 as the short decimal it was written from (9.999999747e-06 -> 1e-05)."""
  return float(str(np.float32(v)))


_GGUF_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q",
                 12: "<d"}


def read_gguf_layout(path: str) -> tuple[dict[str, Any], list[tuple[str, tuple[int, ...], int, int]], int]:
  """(metadata, [(tensor name, ggml dims, ggml type, offset)], data start) of a GGUF v2/v3 file.

  Plain reads of the header only (gguf.GGUFReader builds a numpy view per vocabulary string, seconds for a
  49k vocabulary). Raises ConversionError naming the file when it is not GGUF or is cut short."""
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

  def __init__(self, path: str | os.PathLike, *, kind: ModelKind | None = None):
    import gguf  # optional (llama.cpp's package): only for .gguf files
    self.path = self.name = str(path)
    self.meta, infos, start = read_gguf_layout(self.path)
    arch = self.meta.get("general.architecture")
    wrong_kind = kind is not None and arch not in kind.hf_types
    if arch not in GGUF_ARCHITECTURES or wrong_kind:
      raise ConversionError(f"{self.path}: unsupported general.architecture {arch!r}"
                            f"{f' for the {kind.name}' if wrong_kind else ''}; GGUF files are read for "
                            f"LLMs of architecture {list(GGUF_ARCHITECTURES)}")
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
    import gguf  # optional (llama.cpp's package): only for .gguf files
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


def check_model_type(config: dict | None, *, where: str, kind: ModelKind | None) -> None:
  """ConversionError naming the `model_type` field unless `kind` reads it (no check without a kind)."""
  if config is None or kind is None:
    return
  mt = config.get("model_type")
  if mt not in kind.hf_types:
    raise ConversionError(f"{where}: unsupported model_type {mt!r} in config field 'model_type'; "
                          f"supported for the {kind.name}: {list(kind.hf_types)}")


def open_source(path: str | os.PathLike, *, kind: ModelKind | None = None) -> TensorSource:
  """A TensorSource for an HF checkpoint directory (model.safetensors, sharded safetensors with
  model.safetensors.index.json, pytorch_model.bin or its index), a single .safetensors/.bin file, or a
  llama.cpp .gguf file (or a directory holding exactly one). With a `kind`, a config model_type / GGUF
  general.architecture it does not read raises ConversionError naming the field (without one, any
  config.json model_type is accepted; GGUF files must be of GGUF_ARCHITECTURES either way)."""
  p = Path(path)
  if not p.exists():
    raise ConversionError(f"{p}: no such file or directory")
  if p.is_file():
    if p.suffix == ".gguf":
      return GGUFSource(p, kind=kind)
    config = read_config(p.parent)
    check_model_type(config, where=str(p.parent / "config.json"), kind=kind)
    if p.suffix == ".safetensors":
      return SafetensorsSource([p], config=config)
    if p.suffix in (".bin", ".pt", ".pth"):
      return TorchBinSource([p], config=config)
    raise ConversionError(f"{p}: unknown checkpoint file type {p.suffix!r}")
  config = read_config(p)
  check_model_type(config, where=str(p / "config.json"), kind=kind)
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
    return GGUFSource(ggufs[0], kind=kind)
  raise ConversionError(f"{p}: no model.safetensors, model.safetensors.index.json, pytorch_model.bin "
                        f"or single .gguf file found")
