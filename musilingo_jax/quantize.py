"""int8 weight-only quantization of a frozen LLM for generation (`--dtype int8`).

Every `layers.Linear` kernel [in, out] (or stacked [L, in, out]) becomes int8 with float32 scales
(symmetric: scale = max |w| / 127 over the scaled block, q = round(w / scale)); the token embedding
[vocab, embed] (also the tied LM head) likewise, its rows in the role of output channels.

- group_size=None: one scale per output channel (the max over the whole input dimension); the dequantisation
  folds into the output: y = (x @ q) * scale, exact.
- group_size=g: one scale per output channel and block of g consecutive input rows (scales [in/g, out]; the
  embedding's [vocab, embed/g]), as GPTQ/AWQ-style "group-wise" int8 does: an outlier weight then coarsens
  only its own block. y = sum over blocks of (x_block @ q_block) * scale_block (layers.int8_dot). A tensor
  whose input dimension g does not divide keeps one scale per channel.

Decode at batch 1 streams every weight once per token, so int8 reads a quarter of the float32 bytes; whether
that becomes speed depends on the backend's int8-input matmul (benchmarks/decode_dtypes.py measures it, and
how often the greedy tokens agree with float32). Inference only: LoRA adapters are merged into their kernels
first; the encoder is left as it is.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from musilingo_jax.models import layers


# `--dtype int8`'s blocks: 64 input rows per scale. Measured on SmolLM2-135M over the demo questions
# (benchmarks/DECODE_DTYPES.md): the next token agrees with float32's on 97.0% of teacher-forced positions with
# blocks of 64, 94.9% with one scale per channel (bfloat16 weights: 97.2%), for 6% more bytes.
INT8_GROUP = 64


class QuantScale(nnx.Param):
  """The per-channel float32 scales of an int8 tensor (a frozen parameter like the tensor itself)."""


def _quantize(w: jax.Array, axis: int, group: int | None = None) -> tuple[jax.Array, jax.Array]:
  """Symmetric int8 over `axis` (the reduced dimension, -1 or -2): (q int8, scale float32 with `axis` removed),
  or with `group`: scales per block of `group` entries along `axis`, kept at its place ([..., n/group, ...])."""
  wf = w.astype(jnp.float32)
  if group is None:
    scale = jnp.max(jnp.abs(wf), axis=axis) / 127.0
    scale = jnp.where(scale > 0, scale, 1.0)
    q = jnp.clip(jnp.round(wf / jnp.expand_dims(scale, axis)), -127, 127).astype(jnp.int8)
    return q, scale
  axis = axis % w.ndim
  blocks = wf.reshape(*w.shape[:axis], w.shape[axis] // group, group, *w.shape[axis + 1:])
  scale = jnp.max(jnp.abs(blocks), axis=axis + 1) / 127.0
  scale = jnp.where(scale > 0, scale, 1.0)
  q = jnp.clip(jnp.round(blocks / jnp.expand_dims(scale, axis + 1)), -127, 127).astype(jnp.int8)
  return q.reshape(w.shape), scale


def _names(var) -> tuple:
  return tuple(var.get_metadata().get("out_sharding") or (None,) * var.get_value().ndim)


def quantize_int8(module, *, embeddings: bool = True, group_size: int | None = None) -> dict[str, int]:
  """Quantizes `module`'s Linear kernels and token embeddings in place (see the module docstring) -> {"tensors":
  how many, "bytes_before", "bytes_after"}. LoRA adapters are merged into their kernels first (and dropped).
  embeddings=False keeps the token embedding (and a tied LM head) in its float dtype. group_size: scales per
  block of that many input rows (None: per output channel)."""
  if group_size is not None and group_size < 1:
    raise ValueError(f"group_size must be a positive number of rows, got {group_size}")
  from musilingo_jax.models.llama import Embedding  # the LLM's embedding (models import nothing from here)
  stats = {"tensors": 0, "bytes_before": 0, "bytes_after": 0}
  jit_quant = jax.jit(_quantize, static_argnums=(1, 2))
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
    names = _names(var)
    group = group_size if group_size is not None and w.shape[axis] % group_size == 0 else None
    q, scale = jit_quant(w, axis, group)
    if group is None:
      kept = names[:axis] + (names[axis + 1:] if axis != -1 else ())
    else:  # the block dimension stays where the reduced one was, unsharded
      kept = names[:axis] + (None,) + (names[axis + 1:] if axis != -1 else ())
    setattr(node, attr, var.replace(q))
    node.quant_scale = QuantScale(scale, out_sharding=kept, eager_sharding=False)
    stats["tensors"] += 1
    stats["bytes_before"] += w.size * w.dtype.itemsize
    stats["bytes_after"] += q.size + scale.size * 4
  return stats


def is_quantized(node) -> bool:
  return getattr(node, "quant_scale", None) is not None
