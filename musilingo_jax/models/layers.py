"""Small building blocks shared by the MERT and LLaMA ports.

Every parameter carries logical axis names in its `out_sharding` metadata (e.g. ("embed", "mlp")).
`musilingo_jax.sharding` maps those names to mesh axes with the rules in the config, so changing
data parallel <-> FSDP <-> tensor parallel is a config edit, never a model edit. Variables are
created with `eager_sharding=False`: a model can be built (or `nnx.eval_shape`d) without a mesh.

Parameter names follow Hugging Face's PyTorch names wherever possible (a `Linear` has `kernel`
[in, out], the transpose of torch's `weight` [out, in]), so the conversion key tables stay mechanical.

Repeated layers are built either as an `nnx.List` (unrolled: `layers.3.mlp.up_proj.kernel`) or, with a config's
`scan_layers`, by `stacked` (one module whose every variable has a leading layer axis named
`sharding.LAYERS`: `layers.mlp.up_proj.kernel` [L, in, out]) that the models run with `nnx.scan`. `remat`
wraps one layer's call in the config's rematerialisation policy (`REMAT_POLICIES`) in either form.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from musilingo_jax.sharding import LAYERS

Axes = tuple[str | None, ...]

default_kernel_init = nnx.initializers.normal(0.02)


def param(rngs: nnx.Rngs | None, init, shape: Sequence[int], names: Axes, dtype=jnp.float32,
          kind: type[nnx.Param] = nnx.Param) -> nnx.Param:
  """A parameter with logical axis names; `rngs=None` means an init that needs no key (zeros/ones)."""
  assert len(names) == len(shape), (names, shape)
  key = rngs.params() if rngs is not None else jax.random.key(0)
  return kind(init(key, tuple(shape), dtype), out_sharding=tuple(names), eager_sharding=False)


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
  """Low-rank adapters on chosen linear layers: y = x W + (dropout(x) A B) * alpha / rank.

  B starts at zero, so a freshly adapted model equals the base model exactly.
  """
  rank: int = 8
  alpha: float = 16.0
  dropout: float = 0.0
  # Names of the Linear layers that get adapters (the attribute name, e.g. "q_proj", "v_proj").
  target_modules: tuple[str, ...] = ("q_proj", "v_proj")

  @property
  def scale(self) -> float:
    return self.alpha / self.rank


def dot(x: jax.Array, w: jax.Array, dtype) -> jax.Array:
  """x [..., in] @ w [in, out] with both in `dtype`, accumulated in float32 and returned in `dtype`, forward and
  backward. For float32 this is the plain product. For bfloat16 it is what GPUs and TPUs do anyway, and on CPU
  it is the fast path: XLA:CPU's bf16 x bf16 -> f32 GEMM runs about 2.5x its f32 GEMM on an AMX machine, where
  a bf16-output dot, or one mixing f32 and bf16 inputs (what the default transpose of a mixed-precision dot
  gives), runs slower than f32 (benchmarks/STEP_BF16.md). So the gradient products are written out the same
  way (`_dot_f32acc`)."""
  x, w = x.astype(dtype), w.astype(dtype)
  if jnp.dtype(dtype) == jnp.float32:
    return jnp.dot(x, w)
  return _dot_f32acc(x, w)


@jax.custom_vjp
def _dot_f32acc(x: jax.Array, w: jax.Array) -> jax.Array:
  return jnp.dot(x, w, preferred_element_type=jnp.float32).astype(x.dtype)


def _dot_f32acc_fwd(x, w):
  return _dot_f32acc(x, w), (x, w)


def _dot_f32acc_bwd(res, g):
  x, w = res
  g = g.astype(x.dtype)
  dx = jnp.dot(g, w.T, preferred_element_type=jnp.float32).astype(x.dtype)
  x2, g2 = x.reshape(-1, x.shape[-1]), g.reshape(-1, g.shape[-1])
  dw = jnp.dot(x2.T, g2, preferred_element_type=jnp.float32).astype(w.dtype)   # dropped by XLA when w is frozen
  return dx, dw


_dot_f32acc.defvjp(_dot_f32acc_fwd, _dot_f32acc_bwd)


def int8_dot(x: jax.Array, q: jax.Array, scale: jax.Array, dtype) -> jax.Array:
  """x [..., in] @ (an int8 matrix q [in, out] dequantised by `scale`), computing in `dtype`. scale [out]: one
  per output channel, applied to the output (exact); scale [G, out]: one per output channel and group of in/G
  consecutive input rows, so the product is the sum of G partial products, each scaled (quantize.py)."""
  if scale.ndim == 1:
    return dot(x, q, dtype) * scale.astype(dtype)
  groups = scale.shape[0]
  size = q.shape[0] // groups
  y = None
  for g in range(groups):
    rows = slice(g * size, (g + 1) * size)
    part = dot(x[..., rows], q[rows], dtype) * scale[g].astype(dtype)
    y = part if y is None else y + part
  return y


class Linear(nnx.Module):
  """y = x @ kernel (+ bias), computed in `dtype`; optional LoRA adapter (nnx.LoRAParam leaves).

  kernel: [in, out] with logical names (in_axis, out_axis); bias: [out] with (out_axis,).
  """

  def __init__(self, in_features: int, out_features: int, *, use_bias: bool, in_axis: str | None,
               out_axis: str | None, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32,
               kernel_init=default_kernel_init, lora: LoRAConfig | None = None):
    self.in_features, self.out_features = in_features, out_features
    self.dtype = dtype
    self.kernel = param(rngs, kernel_init, (in_features, out_features), (in_axis, out_axis), param_dtype)
    self.bias = (param(None, nnx.initializers.zeros, (out_features,), (out_axis,), param_dtype)
                 if use_bias else None)
    self.lora = lora
    if lora is not None:
      self.lora_a = param(rngs, nnx.initializers.he_uniform(), (in_features, lora.rank),
                          (in_axis, None), jnp.float32, kind=nnx.LoRAParam)
      self.lora_b = param(None, nnx.initializers.zeros, (lora.rank, out_features),
                          (None, out_axis), jnp.float32, kind=nnx.LoRAParam)
      self.lora_dropout = nnx.Dropout(lora.dropout, rngs=rngs)
    else:
      self.lora_a = self.lora_b = self.lora_dropout = None
    self.quant_scale = nnx.data(None)  # int8 inference (musilingo_jax/quantize.py): per-output-channel scales

  def __call__(self, x: jax.Array, *, rngs: jax.Array | None = None) -> jax.Array:
    """rngs: a key for the LoRA dropout mask instead of the layer's own stream (stacked layers own none)."""
    x = x.astype(self.dtype)
    if self.quant_scale is not None:  # int8 kernel (musilingo_jax/quantize.py)
      y = int8_dot(x, self.kernel[...], self.quant_scale[...], self.dtype)
    else:
      y = dot(x, self.kernel[...], self.dtype)
    if self.bias is not None:
      y = y + self.bias[...].astype(self.dtype)
    if self.lora is not None:
      h = self.lora_dropout(x, rngs=rngs)
      y = y + (h @ self.lora_a[...].astype(self.dtype) @ self.lora_b[...].astype(self.dtype)
               ) * jnp.asarray(self.lora.scale, self.dtype)
    return y

  def merged_kernel(self) -> jax.Array:
    """kernel + A B * scale (in f32, cast back to the kernel's dtype): what export writes."""
    if self.quant_scale is not None:
      raise ValueError("an int8-quantized Linear is for inference only: export the float model")
    k = self.kernel[...]
    if self.lora is None:
      return k
    delta = (self.lora_a[...] @ self.lora_b[...]) * self.lora.scale
    return (k.astype(jnp.float32) + delta).astype(k.dtype)


def torch_linear(in_features: int, out_features: int, *, rngs: nnx.Rngs, in_axis: str | None = None,
                 out_axis: str | None = "embed", dtype=jnp.float32) -> Linear:
  """A float32 Linear with bias initialised as torch.nn.Linear is by default: kernel, then bias, each
  uniform in +-1/sqrt(in_features), drawn in that order from `rngs.params()` (the reference's llama_proj)."""
  bound = 1.0 / (in_features ** 0.5)
  init = lambda key, shape, dtype: jax.random.uniform(key, shape, dtype, -bound, bound)  # noqa: E731
  lin = Linear(in_features, out_features, use_bias=True, in_axis=in_axis, out_axis=out_axis, rngs=rngs,
               dtype=dtype, kernel_init=init)
  lin.bias.set_value(init(rngs.params(), (out_features,), jnp.float32))
  return lin


def lora_for(name: str, lora: LoRAConfig | None) -> LoRAConfig | None:
  """The adapter config for the Linear called `name`, or None if it is not a target."""
  return lora if lora is not None and name in lora.target_modules else None


class LayerNorm(nnx.Module):
  """torch.nn.LayerNorm over the last axis (f32 statistics), params `weight`/`bias` as in HF."""

  def __init__(self, dim: int, *, eps: float, axis_name: str | None, dtype=jnp.float32,
               param_dtype=jnp.float32):
    self.eps, self.dtype = eps, dtype
    self.weight = param(None, nnx.initializers.ones, (dim,), (axis_name,), param_dtype)
    self.bias = param(None, nnx.initializers.zeros, (dim,), (axis_name,), param_dtype)

  def __call__(self, x: jax.Array) -> jax.Array:
    xf = x.astype(jnp.float32)
    mean = xf.mean(-1, keepdims=True)
    var = jnp.square(xf - mean).mean(-1, keepdims=True)
    y = (xf - mean) * jax.lax.rsqrt(var + self.eps)
    y = y * self.weight[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
    return y.astype(self.dtype)


# ---- repeated layers: stacked construction and per-layer rematerialisation ----------------------------------

# config `remat` -> jax.checkpoint policy per layer call: "none" = no rematerialisation (every residual of the
# backward pass is kept); "full" = keep only the layer's inputs, recompute the rest in the backward pass;
# the others are jax.checkpoint_policies of that name (which intermediates are kept).
REMAT_POLICIES = ("none", "full", "dots_saveable", "dots_with_no_batch_dims_saveable", "nothing_saveable")


def check_remat(name: str, owner: str) -> None:
  if name not in REMAT_POLICIES:
    raise ValueError(f"{owner} field 'remat' = {name!r} is not supported; expected one of {REMAT_POLICIES}")


def remat(fn: Callable, policy: str, *, prevent_cse: bool = True) -> Callable:
  """`fn(layer, *args)` (a layer's call) under the named rematerialisation policy (`REMAT_POLICIES`); `fn`
  itself for "none". Inside `nnx.scan` pass prevent_cse=False (the scan already keeps XLA from merging the
  recomputation with the forward pass, and the barrier would cost speed)."""
  check_remat(policy, "remat")
  if policy == "none":
    return fn
  chosen = None if policy == "full" else getattr(jax.checkpoint_policies, policy)
  # graph_updates=False (as the models' nnx.scan): the layer may hold variables of an outer trace (generate
  # merges the model outside its decode loop); only variables that change (LoRA dropout's RNG count) are
  # written back.
  return nnx.remat(fn, policy=chosen, prevent_cse=prevent_cse, graph_updates=False)


def stacked(make: Callable[[nnx.Rngs], nnx.Module], n: int, rngs: nnx.Rngs) -> nnx.Module:
  """`n` layers `make(rngs)` as ONE module whose variables carry a leading axis of size n (nnx.vmap over the
  constructor with the rng streams split n ways, so each layer draws its own initial values): parameters and
  LoRA adapters. Each variable's logical axes get `sharding.LAYERS` in front (the sharding rules replicate
  it), so a [in, out] kernel becomes [n, in, out] named (LAYERS, in_axis, out_axis). Run it with `nnx.scan`
  over axis 0.

  The stacked module owns no RNG streams: its Dropout layers (LoRA dropout) draw from keys passed at call
  time (`Linear(x, rngs=key)`, split per layer by the model from one stream of its own), since a stream with
  a [n] key cannot be reseeded by `nnx.reseed` with one scalar key, which is how training seeds dropout."""

  @nnx.split_rngs(splits=n)
  @nnx.vmap(in_axes=(0,), out_axes=0, axis_size=n, transform_metadata={nnx.PARTITION_NAME: LAYERS})
  def build(rngs):
    return make(rngs)

  module = build(rngs)
  for _, node in nnx.iter_graph(module):
    if isinstance(node, nnx.Dropout):
      node.rngs = nnx.data(None)
  left = [".".join(map(str, p)) for p, node in nnx.iter_graph(module) if isinstance(node, nnx.RngStream)]
  if left:
    raise ValueError(f"stacked layers must not own RNG streams (nnx.reseed cannot seed them): {left}")
  return module


def split_key(key: jax.Array | None, n: int) -> list:
  """n keys from `key`, or n Nones (the layers then use their own streams)."""
  return [None] * n if key is None else list(jax.random.split(key, n))
