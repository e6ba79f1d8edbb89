"""MusiLingo's trainable projection `llama_proj` in every form it is shipped in.

  * MusiLingo's own checkpoint (.pth), as the reference saves it (torch.save({"model": {"llama_proj.weight",
    "llama_proj.bias"}, ...}); see docs/reference.md): save_musilingo_pth / load_musilingo_pth;
  * our .npz (`kernel` [in, out], `bias` [out]);
  * a Hugging Face-layout release: a folder holding model.safetensors, or model-0000i-of-0000n.safetensors
    shards with model.safetensors.index.json (and usually config.json), in which the whole MusiLingo model
    is saved and the projection sits under some prefix (`model.llama_proj.weight`); or one .safetensors file.
    Only the two projection tensors are read: the index says which shard holds them, and only that shard
    is opened (its header, then the two tensors).

`read_projection(path)` takes any of them, local or gs:// (only the files it reads are staged).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from musilingo_jax import storage
from musilingo_jax.convert.readers import SafetensorsFile, torch_to_numpy
from musilingo_jax.convert.rules import ConversionError

PTH_KEYS = ("llama_proj.weight", "llama_proj.bias")
SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS_SINGLE = "model.safetensors"


def save_musilingo_pth(path: str | os.PathLike, proj_kernel, proj_bias) -> None:
  """torch.save({"model": {"llama_proj.weight": [out, in] fp32, "llama_proj.bias": [out] fp32}}): a file
  the reference loads with load_state_dict(ckpt["model"], strict=False). proj_kernel is ours, [in, out]."""
  import torch  # heavy (about 2 s to import); only the .pth paths need it
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
  import torch  # heavy (about 2 s to import); only the .pth paths need it
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
  w = torch_to_numpy(sd["llama_proj.weight"]).astype(np.float32)
  b = torch_to_numpy(sd["llama_proj.bias"]).astype(np.float32)
  if w.ndim != 2 or b.shape != (w.shape[0],):
    raise ConversionError(f"{path}: llama_proj.weight {w.shape} [out, in] and llama_proj.bias {b.shape} "
                          f"do not fit")
  return np.ascontiguousarray(w.T), b


def projection_keys(keys, where: str) -> tuple[str, str]:
  """The one (`<prefix>llama_proj.weight`, `<prefix>llama_proj.bias`) pair among a checkpoint's `keys`
  (the prefix is empty or ends with "."). ConversionError naming `where`: no such keys (a few keys found
  are listed), a weight without its bias, or pairs under several prefixes (ambiguous: they are named)."""
  keys = list(keys)
  weight, bias = PTH_KEYS
  prefixes = sorted({k[:-len(weight)] for k in keys
                     if k.endswith(weight) and (k == weight or k[:-len(weight)].endswith("."))})
  if not prefixes:
    shown = ", ".join(keys[:6]) + (f", ... ({len(keys)} keys)" if len(keys) > 6 else "")
    raise ConversionError(f"{where}: no llama_proj.weight / llama_proj.bias keys under any prefix: not a "
                          f"MusiLingo checkpoint (keys found: {shown or 'none'})")
  if len(prefixes) > 1:
    raise ConversionError(f"{where}: ambiguous: llama_proj.weight under {len(prefixes)} prefixes "
                          f"{[p + weight for p in prefixes]}; expected exactly one projection")
  prefix = prefixes[0]
  if prefix + bias not in set(keys):
    raise ConversionError(f"{where}: {prefix + weight} without {prefix + bias}")
  return prefix + weight, prefix + bias


def _fitting(where: str, weight_key: str, bias_key: str, w: np.ndarray, b: np.ndarray, dims) -> tuple:
  """(kernel [in, out], bias [out]) float32 from the torch layout, checked: w 2-D [out, in], b [out], and
  (in, out) == `dims` when given (the encoder's and the LLM's hidden sizes)."""
  w, b = np.asarray(w).astype(np.float32), np.asarray(b).astype(np.float32)
  if w.ndim != 2 or b.shape != (w.shape[0],):
    raise ConversionError(f"{where}: {weight_key} {w.shape} [out, in] and {bias_key} {b.shape} [out] do not fit")
  if dims is not None and (w.shape[1], w.shape[0]) != tuple(dims):
    raise ConversionError(f"{where}: the projection maps {w.shape[1]} -> {w.shape[0]} ({weight_key} "
                          f"{tuple(w.shape)}), the models need {dims[0]} (encoder dim) -> {dims[1]} (LLM dim)")
  return np.ascontiguousarray(w.T), b


def _read_safetensors_pair(files: dict[str, str], weight_key: str, bias_key: str):
  """The two tensors from local safetensors files ({key: local file}); each file opened once."""
  out, opened = {}, {}
  try:
    for key in (weight_key, bias_key):
      f = files[key]
      if f not in opened:
        opened[f] = SafetensorsFile(f)
      if key not in opened[f].keys():
        raise ConversionError(f"{f}: has no {key!r} (the index says it holds it)")
      out[key] = opened[f].get(key)
  finally:
    for f in opened.values():
      f.close()
  return out[weight_key], out[bias_key]


def read_release_projection(folder: str | os.PathLike, *, dims=None) -> tuple[np.ndarray, np.ndarray]:
  """The projection of a Hugging Face-layout MusiLingo release folder (local or gs://) -> (kernel [in, out]
  fp32, bias [out] fp32), reading only the two tensors: model.safetensors.index.json names the shard that
  holds them (only that one is staged and opened), else model.safetensors, else the folder's single
  .safetensors file; a folder holding no safetensors but exactly one .pth / .npz reads that file. Errors
  name the folder and the file: no llama_proj keys, several prefixes, shapes that do not fit (`dims`)."""
  root = storage.path(folder)
  where = os.fspath(folder)
  index = root / SAFETENSORS_INDEX
  if index.is_file():
    try:
      weight_map = json.loads(index.read_text())["weight_map"]
      if not isinstance(weight_map, dict):
        raise TypeError(f"weight_map is a {type(weight_map).__name__}")
    except (ValueError, KeyError, TypeError) as e:
      raise ConversionError(f"{os.fspath(index)}: not a valid safetensors index ({type(e).__name__}: {e})") from None
    wk, bk = projection_keys(weight_map, os.fspath(index))
    local = {}
    for key in (wk, bk):
      shard = root / weight_map[key]
      if not shard.is_file():
        raise ConversionError(f"{os.fspath(index)}: {key} is in {weight_map[key]}, which is missing from {where}")
      local[key] = storage.stage(shard)
    w, b = _read_safetensors_pair(local, wk, bk)
    return _fitting(f"{where} ({weight_map[wk]})", wk, bk, w, b, dims)
  names = sorted(p.name for p in root.iterdir()) if root.is_dir() else []
  single = [n for n in names if n.endswith(".safetensors")]
  if SAFETENSORS_SINGLE in single:
    single = [SAFETENSORS_SINGLE]
  if len(single) == 1:
    return read_safetensors_projection(root / single[0], dims=dims)
  others = [n for n in names if n.endswith((".pth", ".npz"))]
  if not single and len(others) == 1:
    return read_projection(root / others[0], dims=dims)
  found = ", ".join(names[:8]) + (", ..." if len(names) > 8 else "")
  raise ConversionError(f"{where}: not a MusiLingo release folder: expected {SAFETENSORS_SINGLE}, or shards with "
                        f"{SAFETENSORS_INDEX}, or one .pth / .npz (found: {found or 'nothing'})")


def read_safetensors_projection(path: str | os.PathLike, *, dims=None) -> tuple[np.ndarray, np.ndarray]:
  """The projection in one .safetensors file (local or gs://; keys `<prefix>llama_proj.weight` / `.bias`)."""
  local = storage.stage(path)
  f = SafetensorsFile(local)
  try:
    wk, bk = projection_keys(f.keys(), os.fspath(path))
    w, b = f.get(wk), f.get(bk)
  finally:
    f.close()
  return _fitting(os.fspath(path), wk, bk, w, b, dims)


def read_projection(path: str | os.PathLike, *, dims=None) -> tuple[np.ndarray, np.ndarray]:
  """(kernel [in, out] fp32, bias [out] fp32) from any projection form (module docstring): an .npz
  (`kernel`, `bias`), a MusiLingo .pth, a .safetensors file or a Hugging Face-layout release folder; local
  or gs://. `dims`: (encoder dim, LLM dim) the projection must have, checked with a message naming the file.
  ConversionError (one line, naming the file or folder) for anything it cannot use."""
  p = storage.path(path)
  where = os.fspath(path)
  if p.is_dir():
    return read_release_projection(path, dims=dims)
  if not p.exists():
    raise ConversionError(f"{where}: no such file or directory")
  name = p.name.lower()
  if name.endswith(".safetensors"):
    return read_safetensors_projection(path, dims=dims)
  local = storage.stage(path)
  if name.endswith(".npz"):
    try:
      with np.load(local) as z:
        missing = [k for k in ("kernel", "bias") if k not in z.files]
        if missing:
          raise ConversionError(f"{where}: .npz without {missing} (found {z.files}); expected kernel [in, out] "
                                f"and bias [out]")
        kernel, bias = z["kernel"], z["bias"]
    except ConversionError:
      raise
    except Exception as e:  # noqa: BLE001 - not an npz archive: one line
      raise ConversionError(f"{where}: not a readable .npz ({type(e).__name__}: {e})") from None
    kernel, bias = np.asarray(kernel), np.asarray(bias)
    if kernel.ndim != 2 or bias.shape != (kernel.shape[1],):
      raise ConversionError(f"{where}: kernel {kernel.shape} [in, out] and bias {bias.shape} [out] do not fit")
    return _fitting(where, "kernel.T", "bias", kernel.T, bias, dims)
  w, b = load_musilingo_pth(local)
  return _fitting(where, "llama_proj.weight", "llama_proj.bias", w.T, b, dims)
