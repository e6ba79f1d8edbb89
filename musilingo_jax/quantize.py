"""int8 weight-only quantization of a frozen LLM for generation (`--dtype int8`).

Every `layers.Linear` kernel [in, out] (or stacked [L, in, out]) becomes int8 with one float32 scale per
output channel (symmetric: scale = max |w| over the input dimension / 127, q = round(w / scale)); the token
embedding [vocab, embed] (also the tied LM head) gets one scale per vocabulary row. Activations stay in the
model's compute dtype: y = (x @ q) * scale, the dequantisation folded into the output (exact: the scale is
per output channel). Decode at batch 1 streams every weight once per token, so int8 reads a quarter of the
float32 bytes; whether that becomes speed depends on the backend's int8-input matmul (benchmarks/decode.py
measures it). Inference only: LoRA adapters are merged into their kernels first; the encoder is left as it is.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from musilingo_jax.models import layers


class QuantScale(nnx.Param):
  """The per-channel float32 scales of an int8 tensor (a frozen parameter like the tensor itself)."""


def _quantize(w: jax.Array, axis: int) -> tuple[jax.Array, jax.Array]:
  """Symmetric int8 over `axis` (the reduced dimension): (q int8, scale float32 with `axis` removed)."""
  wf = w.astype(jnp.float32)
  scale = jnp.max(jnp.abs(wf), axis=axis) / 127.0
  scale = jnp.where(scale > 0, scale, 1.0)
  q = jnp.clip(jnp.round(wf / jnp.expand_dims(scale, axis)), -127, 127).astype(jnp.int8)
  return q, scale


def _names(var) -> tuple:
  return tuple(var.get_metadata().get("out_sharding") or (None,) * var.get_value().ndim)


def quantize_int8(module, *, embeddings: bool = True) -> dict[str, int]:
  """Quantizes `module`'s Linear kernels and token embeddings in place (see the module docstring) -> {"tensors":
  how many, "bytes_before", "bytes_after"}. LoRA adapters are merged into their kernels first (and dropped).
  embeddings=False keeps the token embedding (and a tied LM head) in its float dtype."""
  from musilingo_jax.models.llama import Embedding  # the LLM's embedding (models import nothing from here)
  stats = {"tensors": 0, "bytes_before": 0, "bytes_after": 0}
  jit_quant = jax.jit(_quantize, static_argnums=1)
  for path, node in list(nnx.iter_graph(module)):
    if isinstance(node, layers.Linear):
      if node.lora is not None:  # fold the adapters into the kernel first (as export does), then drop them
        node.kernel = node.kernel.replace(node.merged_kernel())
        node.lora = node.lora_a = node.lora_b = node.lora_dropout = None
      var, axis, attr = node.kernel, -2, "kernel"   # [..., in, out]: one scale per output channel
    elif isinstance(node, Embedding) and embeddings:
      var, axis, attr = node.weight, -1, "weight"   # [..., vocab, embed]: one scale per vocabulary row
    else:
      continue
    w = var.get_value()
    if w.dtype == jnp.int8:
      continue
    q, scale = jit_quant(w, axis)
    names = _names(var)
    kept = names[:axis] + (names[axis + 1:] if axis != -1 else ())
    setattr(node, attr, var.replace(q))
    node.quant_scale = QuantScale(scale, out_sharding=kept, eager_sharding=False)
    stats["tensors"] += 1
    stats["bytes_before"] += w.size * w.dtype.itemsize
    stats["bytes_after"] += q.size + scale.size * 4
  return stats


def is_quantized(node) -> bool:
  return getattr(node, "quant_scale", None) is not None
