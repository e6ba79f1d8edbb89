"""MusiLingo's own checkpoint (.pth): only the trainable projection `llama_proj`, as the reference saves it
(torch.save({"model": {"llama_proj.weight", "llama_proj.bias"}, ...}); see docs/reference.md).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from musilingo_jax.convert.readers import torch_to_numpy
from musilingo_jax.convert.rules import ConversionError

PTH_KEYS = ("llama_proj.weight", "llama_proj.bias")


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
