"""LLaMA causal LM (Hugging Face `LlamaForCausalLM`, exactly), with a KV cache, in Flax NNX.

Parameter paths mirror the HF keys (`model.layers.3.self_attn.q_proj.kernel` <-> `...q_proj.weight`), so
`HF_KEY_RULES` is mechanical. Rotary embeddings use HF's rotate-half layout on unpermuted q/k weights, and
q is not pre-scaled: 1/sqrt(head_dim) is applied inside attention (as transformers does). Compute runs in
`cfg.dtype`; RMSNorm statistics, rotary angles, the attention softmax and the returned logits are float32.

Slots and masks. Every query and key has a *slot*: its index in the key/value sequence attention runs
over. Without a cache the T inputs sit at slots 0..T-1. With a cache (a fixed buffer of `max_len` slots per
layer), the T inputs are written at slots cache_index..cache_index+T-1 and attend over the whole buffer.
A query at slot q may attend the key at slot k iff k <= q and attention_mask[b, k] (1 = valid, 0 = pad)
(and, for packed rows, segment_ids[b, q] == segment_ids[b, k]).
`positions` (the rotary position ids) are independent of slots: a left-padded prompt uses
positions = cumsum(mask) - 1 while its slots stay 0..T-1.

Cache layout (`init_cache`): a list with one dict per layer, {"k": [B, max_len, n_kv, head_dim],
"v": [B, max_len, n_kv, head_dim]}, keys stored after rotary. `CACHE_AXES` gives their logical axes. With
`scan_layers` it is one dict of the layers' arrays stacked, [num_hidden_layers, B, max_len, n_kv, head_dim]
(`cache_axes(cfg)`); callers pass it around as an opaque pytree either way.

Layers (`LlamaConfig.scan_layers`): off, `model.layers` is an `nnx.List` of decoder layers run by a Python
loop (paths `model.layers.3.mlp.up_proj.kernel`); on, it is one decoder layer whose variables are stacked
along a leading layer axis (`layers.stacked`: `model.layers.mlp.up_proj.kernel` [L, in, out], logical axis
`sharding.LAYERS`) run by `nnx.scan`, so XLA compiles one layer instead of L and keeps one layer's gathered
weights alive at a time. Same numbers either way. `remat` rematerialises each layer's call in both forms.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from musilingo_jax.convert.rules import LINEAR, ConversionError, KeyRule, ModelKind
from musilingo_jax.models import layers
from musilingo_jax.sharding import LAYERS, constrain

log = logging.getLogger(__name__)

ROPE_TYPES = ("linear", "dynamic", "llama3")
ATTENTION_IMPLS = ("xla", "cudnn", None)
# Logical axes of each cache array [B, max_len, n_kv, head_dim].
CACHE_AXES = ("batch", None, "kv_heads", "head_dim")


def _err(field: str, value, expected: str) -> ConversionError:
  return ConversionError(f"LlamaConfig field {field!r} = {value!r} is not supported; expected {expected}")


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
  vocab_size: int = 32000
  hidden_size: int = 4096
  intermediate_size: int = 11008
  num_hidden_layers: int = 32
  num_attention_heads: int = 32
  num_key_value_heads: int | None = None  # None -> num_attention_heads
  head_dim: int | None = None  # None -> hidden_size // num_attention_heads
  rms_norm_eps: float = 1e-6
  rope_theta: float = 10000.0
  # None, or HF's rope_scaling as sorted (key, value) items without rope_theta, e.g.
  # (("factor", 8.0), ("high_freq_factor", 4.0), ("low_freq_factor", 1.0),
  #  ("original_max_position_embeddings", 8192), ("rope_type", "llama3")). A dict is accepted and frozen.
  rope_scaling: tuple[tuple[str, Any], ...] | None = None
  max_position_embeddings: int = 2048
  tie_word_embeddings: bool = False
  attention_bias: bool = False
  mlp_bias: bool = False
  hidden_act: str = "silu"
  bos_token_id: int | None = 1
  eos_token_id: int | tuple[int, ...] | None = 2
  pad_token_id: int | None = None
  dtype: Any = jnp.float32  # compute
  param_dtype: Any = jnp.float32
  attention_impl: str | None = "xla"  # jax.nn.dot_product_attention(implementation=...); None = JAX picks
  # Activation sharding (sharding.Activations: mesh + logical rules) for the hidden states; None = none.
  # Static in the model's graph, so jit caches by it; not in repr (the demo's records key on the repr).
  activations: Any = dataclasses.field(default=None, repr=False)
  # Stacked layers run by nnx.scan (see the module docstring) and each layer's rematerialisation policy
  # (layers.REMAT_POLICIES). How the model runs, not what it computes: not in repr.
  scan_layers: bool = dataclasses.field(default=False, repr=False)
  remat: str = dataclasses.field(default="none", repr=False)

  def __post_init__(self):
    set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731
    if self.num_key_value_heads is None:
      set_("num_key_value_heads", self.num_attention_heads)
    if self.head_dim is None:
      set_("head_dim", self.hidden_size // self.num_attention_heads)
    if isinstance(self.eos_token_id, (list, tuple)):
      set_("eos_token_id", tuple(int(i) for i in self.eos_token_id))
    set_("dtype", jnp.dtype(self.dtype))
    set_("param_dtype", jnp.dtype(self.param_dtype))
    if self.hidden_act != "silu":
      raise _err("hidden_act", self.hidden_act, '"silu"')
    if self.num_attention_heads % self.num_key_value_heads:
      raise _err("num_key_value_heads", self.num_key_value_heads,
                 f"a divisor of num_attention_heads={self.num_attention_heads}")
    if self.attention_impl not in ATTENTION_IMPLS:
      raise _err("attention_impl", self.attention_impl, f"one of {ATTENTION_IMPLS}")
    if self.remat not in layers.REMAT_POLICIES:
      raise _err("remat", self.remat, f"one of {layers.REMAT_POLICIES}")
    if self.rope_scaling is not None:
      set_("rope_scaling", _freeze_rope_scaling(dict(self.rope_scaling), self.max_position_embeddings))

  @property
  def rope(self) -> dict:
    """rope_scaling as a dict ({} when unscaled)."""
    return dict(self.rope_scaling or ())

  # ---- presets ------------------------------------------------------------------------------------
  @classmethod
  def vicuna_7b(cls, **overrides) -> "LlamaConfig":
    """Vicuna-7B v0 (LLaMA-7B + the v0 delta): the MusiLingo reference LLM."""
    return cls(**{**dict(vocab_size=32001, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=32, rms_norm_eps=1e-6, rope_theta=10000.0,
                         max_position_embeddings=2048, tie_word_embeddings=False), **overrides})

  @classmethod
  def tiny(cls, **overrides) -> "LlamaConfig":
    """A random-weights test model (2 layers, hidden 64, 4 heads of 16)."""
    return cls(**{**dict(vocab_size=101, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, rms_norm_eps=1e-6,
                         max_position_embeddings=64), **overrides})

  # ---- HF config.json -----------------------------------------------------------------------------
  @classmethod
  def from_hf_config(cls, d: Mapping[str, Any], **overrides) -> "LlamaConfig":
    """From a HF config dict (transformers 4 `rope_theta`/`rope_scaling` or 5 `rope_parameters` style).

    `overrides` set fields HF does not describe (dtype, param_dtype, attention_impl) or replace others.
    Raises ConversionError naming the first unsupported field.
    """
    d = dict(d)
    model_type = d.get("model_type", "llama")
    if model_type != "llama":
      raise _err("model_type", model_type, '"llama"')
    if d.get("attention_dropout") not in (None, 0, 0.0):
      raise _err("attention_dropout", d["attention_dropout"], "0.0 (dropout in attention is not implemented)")
    if d.get("partial_rotary_factor") not in (None, 1, 1.0):
      raise _err("partial_rotary_factor", d["partial_rotary_factor"], "1.0")
    params = dict(d.get("rope_parameters") or {})
    if params:  # transformers 5: theta and scaling live together
      theta = params.pop("rope_theta", d.get("rope_theta", 10000.0))
    else:
      theta = d.get("rope_theta", 10000.0)
      params = dict(d.get("rope_scaling") or {})
    if params.get("partial_rotary_factor") not in (None, 1, 1.0):
      raise _err("rope_scaling.partial_rotary_factor", params["partial_rotary_factor"], "1.0")
    params.pop("partial_rotary_factor", None)
    rope_type = params.pop("rope_type", params.pop("type", "default"))
    params.pop("type", None)
    rope_scaling = None if rope_type == "default" else {"rope_type": rope_type, **params}
    fields = {f.name for f in dataclasses.fields(cls)}
    kw = {k: d[k] for k in fields if k in d and k not in ("dtype", "rope_scaling", "rope_theta")}
    for k in ("num_key_value_heads", "head_dim"):
      if kw.get(k) is None:
        kw.pop(k, None)
    kw.update(rope_theta=float(theta), rope_scaling=rope_scaling)
    kw.update(overrides)
    return cls(**kw)

  def to_hf_config(self) -> dict:
    """A config.json dict that `transformers.LlamaConfig(**d)` loads (both the v4 and the v5 rope spelling)."""
    rope = self.rope
    rope_parameters = {"rope_type": rope.get("rope_type", "default"), "rope_theta": self.rope_theta,
                       **{k: v for k, v in rope.items() if k != "rope_type"}}
    eos = list(self.eos_token_id) if isinstance(self.eos_token_id, tuple) else self.eos_token_id
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": self.vocab_size, "hidden_size": self.hidden_size,
        "intermediate_size": self.intermediate_size, "num_hidden_layers": self.num_hidden_layers,
        "num_attention_heads": self.num_attention_heads, "num_key_value_heads": self.num_key_value_heads,
        "head_dim": self.head_dim, "hidden_act": self.hidden_act, "rms_norm_eps": self.rms_norm_eps,
        "max_position_embeddings": self.max_position_embeddings, "rope_theta": self.rope_theta,
        "rope_scaling": dict(rope) or None, "rope_parameters": rope_parameters,
        "tie_word_embeddings": self.tie_word_embeddings, "attention_bias": self.attention_bias,
        "attention_dropout": 0.0, "mlp_bias": self.mlp_bias, "bos_token_id": self.bos_token_id,
        "eos_token_id": eos, "pad_token_id": self.pad_token_id, "torch_dtype": self.param_dtype.name,
        "initializer_range": 0.02, "use_cache": True,
    }


_ROPE_REQUIRED = {"linear": ("factor",), "dynamic": ("factor",),
                  "llama3": ("factor", "low_freq_factor", "high_freq_factor")}


def _freeze_rope_scaling(rope: dict, max_position_embeddings: int) -> tuple | None:
  rope = dict(rope)
  rope.pop("rope_theta", None)  # lives in LlamaConfig.rope_theta
  rope_type = rope.pop("rope_type", rope.pop("type", "default"))
  rope.pop("type", None)
  if rope_type == "default":
    return None
  if rope_type not in ROPE_TYPES:
    raise _err("rope_scaling.rope_type", rope_type, f"one of {ROPE_TYPES} (or no scaling)")
  for k in _ROPE_REQUIRED[rope_type]:
    if k not in rope:
      raise _err(f"rope_scaling.{k}", None, f"a number for rope_type {rope_type!r}")
  if rope_type == "llama3":  # as transformers: defaults to the model's max positions
    rope.setdefault("original_max_position_embeddings", max_position_embeddings)
  rope["rope_type"] = rope_type
  return tuple(sorted(rope.items()))


# ---- rotary ---------------------------------------------------------------------------------------

def rope_inv_freq(cfg: LlamaConfig) -> np.ndarray:
  """[head_dim // 2] float32 inverse frequencies, computed in float32 as transformers does."""
  dim, f32 = cfg.head_dim, np.float32
  inv = f32(1.0) / (f32(cfg.rope_theta) ** (np.arange(0, dim, 2).astype(f32) / f32(dim)))
  rope = cfg.rope
  kind = rope.get("rope_type")
  if kind == "linear":
    inv = inv / f32(rope["factor"])
  elif kind == "llama3":
    factor, lo, hi = f32(rope["factor"]), f32(rope["low_freq_factor"]), f32(rope["high_freq_factor"])
    old_len = rope["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old_len / lo, old_len / hi
    wavelen = f32(2 * math.pi) / inv
    scaled = np.where(wavelen > low_wavelen, inv / factor, inv)
    smooth = (f32(old_len) / wavelen - lo) / (hi - lo)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    inv = np.where(medium, smoothed, scaled)
  return inv.astype(f32)


def _dynamic_inv_freq(cfg: LlamaConfig, positions: jax.Array) -> jax.Array:
  """Dynamic-NTK: the base grows once the longest sequence in this call exceeds max_position_embeddings.

  As transformers, seq_len = max(positions) + 1 over the whole call (keys already in a cache keep the
  frequencies they were written with).
  """
  dim, max_len = cfg.head_dim, cfg.max_position_embeddings
  factor = jnp.float32(cfg.rope["factor"])
  seq_len = jnp.maximum(jnp.max(positions) + 1, max_len).astype(jnp.float32)
  base = jnp.float32(cfg.rope_theta) * ((factor * seq_len / max_len) - (factor - 1)) ** (dim / (dim - 2))
  dynamic = 1.0 / (base ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim))
  return jnp.where(jnp.max(positions) + 1 > max_len, dynamic, jnp.asarray(rope_inv_freq(cfg)))


def rotary_cos_sin(cfg: LlamaConfig, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
  """cos, sin [B, T, head_dim] for integer positions [B, T]: angles in f32, cast to the compute dtype."""
  if cfg.rope.get("rope_type") == "dynamic":
    inv = _dynamic_inv_freq(cfg, positions)
  else:
    inv = jnp.asarray(rope_inv_freq(cfg))
  freqs = positions.astype(jnp.float32)[..., None] * inv  # [B, T, head_dim/2]
  emb = jnp.concatenate([freqs, freqs], axis=-1)
  return jnp.cos(emb).astype(cfg.dtype), jnp.sin(emb).astype(cfg.dtype)


def apply_rotary(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """HF rotate-half rotary on x [B, T, heads, head_dim] with cos/sin [B, T, head_dim]."""
  half = x.shape[-1] // 2
  rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
  return x * cos[:, :, None, :] + rotated * sin[:, :, None, :]


# ---- attention ------------------------------------------------------------------------------------

def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array,
                          implementation: str | None) -> jax.Array:
  """q [B, T, H, D], k/v [B, S, K, D] (K divides H: GQA), mask bool [B|1, 1, T, S] -> [B, T, H, D].

  Scale 1/sqrt(D), softmax in f32 (the XLA path computes logits in f32). A fully masked row gets a
  uniform softmax over its (masked) keys: finite, never NaN. Swap this function (Llama(attention_fn=...))
  to serve another kernel.
  """
  return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation=implementation)


AttentionFn = Callable[[jax.Array, jax.Array, jax.Array, jax.Array, str | None], jax.Array]


# ---- modules --------------------------------------------------------------------------------------

class Embedding(nnx.Module):
  """Token embedding `weight` [vocab, embed]; `attend` is the tied output projection."""

  def __init__(self, num: int, dim: int, *, rngs: nnx.Rngs, dtype, param_dtype):
    self.dtype = dtype
    self.weight = layers.param(rngs, layers.default_kernel_init, (num, dim), ("vocab", "embed"), param_dtype)
    self.quant_scale = nnx.data(None)  # int8 inference (musilingo_jax/quantize.py): scales per vocab row

  def __call__(self, ids: jax.Array) -> jax.Array:
    x = jnp.take(self.weight[...], ids, axis=0).astype(self.dtype)
    if self.quant_scale is not None:  # int8 rows: scale [vocab] (per row) or [vocab, G] (per group of embed/G)
      s = jnp.take(self.quant_scale[...], ids, axis=0).astype(self.dtype)
      if s.ndim == x.ndim:
        x = (x.reshape(*x.shape[:-1], s.shape[-1], -1) * s[..., None]).reshape(x.shape)
      else:
        x = x * s[..., None]
    return x

  def attend(self, h: jax.Array) -> jax.Array:
    if self.quant_scale is not None:
      return layers.int8_dot(h.astype(self.dtype), self.weight[...].T, self.quant_scale[...].T, self.dtype)
    return layers.dot(h, self.weight[...].T, self.dtype)  # [B, T, vocab]


class RMSNorm(nnx.Module):
  """HF LlamaRMSNorm: normalise in f32, cast back to the input dtype, times `weight`."""

  def __init__(self, dim: int, *, eps: float, dtype, param_dtype):
    self.eps, self.dtype = eps, dtype
    self.weight = layers.param(None, nnx.initializers.ones, (dim,), ("embed",), param_dtype)

  def __call__(self, x: jax.Array) -> jax.Array:
    xf = x.astype(jnp.float32)
    y = xf * jax.lax.rsqrt(jnp.mean(jnp.square(xf), axis=-1, keepdims=True) + self.eps)
    return self.weight[...].astype(self.dtype) * y.astype(x.dtype).astype(self.dtype)


class Attention(nnx.Module):

  def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs, lora: layers.LoRAConfig | None,
               attention_fn: AttentionFn):
    self.cfg, self.attention_fn = cfg, attention_fn
    e, h, kv, d = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    lin = lambda name, n_in, n_out, ax_in, ax_out: layers.Linear(  # noqa: E731
        n_in, n_out, use_bias=cfg.attention_bias, in_axis=ax_in, out_axis=ax_out, rngs=rngs, dtype=cfg.dtype,
        param_dtype=cfg.param_dtype, lora=layers.lora_for(name, lora))
    self.q_proj = lin("q_proj", e, h * d, "embed", "heads")
    self.k_proj = lin("k_proj", e, kv * d, "embed", "kv_heads")
    self.v_proj = lin("v_proj", e, kv * d, "embed", "kv_heads")
    self.o_proj = lin("o_proj", h * d, e, "heads", "embed")

  def __call__(self, x, cos, sin, mask, cache, cache_index, rngs=None):
    cfg = self.cfg
    b, t, _ = x.shape
    kq, kk, kv, ko = layers.split_key(rngs, 4)
    q = self.q_proj(x, rngs=kq).reshape(b, t, cfg.num_attention_heads, cfg.head_dim)
    k = self.k_proj(x, rngs=kk).reshape(b, t, cfg.num_key_value_heads, cfg.head_dim)
    v = self.v_proj(x, rngs=kv).reshape(b, t, cfg.num_key_value_heads, cfg.head_dim)
    q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
    new_cache = None
    if cache is not None:  # write the T new keys/values at slots cache_index.., attend over the buffer
      start = (0, cache_index, 0, 0)
      new_cache = {"k": jax.lax.dynamic_update_slice(cache["k"], k.astype(cache["k"].dtype), start),
                   "v": jax.lax.dynamic_update_slice(cache["v"], v.astype(cache["v"].dtype), start)}
      k, v = new_cache["k"].astype(cfg.dtype), new_cache["v"].astype(cfg.dtype)
    out = self.attention_fn(q, k, v, mask, cfg.attention_impl)  # [B, T, H, D]
    return self.o_proj(out.reshape(b, t, cfg.num_attention_heads * cfg.head_dim), rngs=ko), new_cache


class MLP(nnx.Module):

  def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs, lora: layers.LoRAConfig | None):
    e, m = cfg.hidden_size, cfg.intermediate_size
    lin = lambda name, n_in, n_out, ax_in, ax_out: layers.Linear(  # noqa: E731
        n_in, n_out, use_bias=cfg.mlp_bias, in_axis=ax_in, out_axis=ax_out, rngs=rngs, dtype=cfg.dtype,
        param_dtype=cfg.param_dtype, lora=layers.lora_for(name, lora))
    self.gate_proj = lin("gate_proj", e, m, "embed", "mlp")
    self.up_proj = lin("up_proj", e, m, "embed", "mlp")
    self.down_proj = lin("down_proj", m, e, "mlp", "embed")

  def __call__(self, x, rngs=None):
    kg, ku, kd = layers.split_key(rngs, 3)
    return self.down_proj(jax.nn.silu(self.gate_proj(x, rngs=kg)) * self.up_proj(x, rngs=ku), rngs=kd)


class DecoderLayer(nnx.Module):

  def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs, lora, attention_fn: AttentionFn):
    norm = lambda: RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, dtype=cfg.dtype,  # noqa: E731
                           param_dtype=cfg.param_dtype)
    self.input_layernorm = norm()
    self.self_attn = Attention(cfg, rngs=rngs, lora=lora, attention_fn=attention_fn)
    self.post_attention_layernorm = norm()
    self.mlp = MLP(cfg, rngs=rngs, lora=lora)

  def __call__(self, x, cos, sin, mask, cache, cache_index, rngs=None):
    """rngs: a key for the LoRA dropout of this layer's Linears (stacked layers own no RNG streams)."""
    k_attn, k_mlp = layers.split_key(rngs, 2)
    h, new_cache = self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, cache_index, k_attn)
    x = x + h
    return x + self.mlp(self.post_attention_layernorm(x), k_mlp), new_cache


class LlamaModel(nnx.Module):
  """HF `LlamaModel` (the `model.` prefix): embeddings, decoder layers, final norm. `layers` is an nnx.List
  of DecoderLayer, or with cfg.scan_layers one DecoderLayer stacked along a leading layer axis."""

  def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs, lora, attention_fn: AttentionFn):
    self.embed_tokens = Embedding(cfg.vocab_size, cfg.hidden_size, rngs=rngs, dtype=cfg.dtype,
                                  param_dtype=cfg.param_dtype)
    make = lambda r: DecoderLayer(cfg, rngs=r, lora=lora, attention_fn=attention_fn)  # noqa: E731
    if cfg.scan_layers:
      self.layers = layers.stacked(make, cfg.num_hidden_layers, rngs)
    else:
      self.layers = nnx.List([make(rngs) for _ in range(cfg.num_hidden_layers)])
    self.norm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, dtype=cfg.dtype, param_dtype=cfg.param_dtype)


class Llama(nnx.Module):
  """HF `LlamaForCausalLM`. `lm_head` is None when embeddings are tied (logits = h @ embed.T)."""

  def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs, lora: layers.LoRAConfig | None = None,
               attention_fn: AttentionFn = dot_product_attention):
    self.cfg = cfg
    self.lora = lora
    self.model = LlamaModel(cfg, rngs=rngs, lora=lora, attention_fn=attention_fn)
    self.lm_head = None if cfg.tie_word_embeddings else layers.Linear(
        cfg.hidden_size, cfg.vocab_size, use_bias=False, in_axis="embed", out_axis="vocab", rngs=rngs,
        dtype=cfg.dtype, param_dtype=cfg.param_dtype)  # no adapter: config.train.lora.target_modules excludes it
    # Stacked layers own no RNG streams (layers.stacked): their LoRA dropout keys come from this one stream,
    # split per layer at each call (nnx.reseed seeds it as it seeds the unrolled layers' streams).
    self.dropout_rngs = nnx.data(None)
    if cfg.scan_layers and lora is not None and lora.dropout > 0:
      self.dropout_rngs = rngs["dropout"].fork()

  def embed(self, input_ids: jax.Array) -> jax.Array:
    """[B, T] int -> [B, T, hidden] in the compute dtype (for splicing other embeddings in)."""
    return self.model.embed_tokens(input_ids)

  def init_cache(self, batch: int, max_len: int, dtype=None) -> list[dict[str, jax.Array]] | dict[str, jax.Array]:
    """Zeros: per layer {"k", "v"} of [batch, max_len, num_key_value_heads, head_dim]; with cfg.scan_layers
    one {"k", "v"} of [num_hidden_layers, batch, max_len, num_key_value_heads, head_dim]."""
    cfg = self.cfg
    shape = (batch, max_len, cfg.num_key_value_heads, cfg.head_dim)
    dtype = cfg.dtype if dtype is None else dtype
    if cfg.scan_layers:
      shape = (cfg.num_hidden_layers, *shape)
      return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}
    return [{"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)} for _ in range(cfg.num_hidden_layers)]

  def final_hidden(self, input_ids=None, *, inputs_embeds=None, attention_mask=None, positions=None,
                   cache=None, cache_index=None, segment_ids=None) -> tuple[jax.Array, list | dict | None]:
    """The final-norm hidden states [B, T, hidden] (compute dtype) and the new cache; see `__call__`."""
    cfg = self.cfg
    if (input_ids is None) == (inputs_embeds is None):
      raise ValueError("pass exactly one of input_ids / inputs_embeds")
    if (cache is None) != (cache_index is None):
      raise ValueError("cache and cache_index go together")
    x = self.embed(input_ids) if input_ids is not None else inputs_embeds.astype(cfg.dtype)  # [B, T, E]
    b, t = x.shape[:2]
    offset = 0 if cache is None else cache_index
    q_slots = offset + jnp.arange(t)  # [T]
    n_slots = t if cache is None else cache_slots(cache)
    if positions is None:
      positions = jnp.broadcast_to(q_slots[None], (b, t))
    mask = (jnp.arange(n_slots)[None, :] <= q_slots[:, None])[None, None]  # [1, 1, T, S] causal
    if attention_mask is not None:
      if attention_mask.shape[-1] != n_slots:
        raise ValueError(f"attention_mask covers {attention_mask.shape[-1]} key slots, expected {n_slots} "
                         f"({'the cache length' if cache is not None else 'the input length'})")
      mask = mask & attention_mask.astype(bool)[:, None, None, :]  # [B, 1, T, S]
    if segment_ids is not None:  # packed rows: a query attends only keys of its own example (block-diagonal)
      if cache is not None:
        raise ValueError("segment_ids (packed rows) are for training and scoring, not with a KV cache")
      mask = mask & (segment_ids[:, :, None] == segment_ids[:, None, :])[:, None]  # [B, 1, T, T]
    log.info("llama forward traced: attention implementation=%s, dtype=%s, T=%d, S=%d",
             cfg.attention_impl, cfg.dtype.name, t, n_slots)
    cos, sin = rotary_cos_sin(cfg, positions)
    x = constrain(x, cfg.activations)
    if cfg.scan_layers:
      x, new_cache = self._scan_layers(x, cos, sin, mask, cache, cache_index)
    else:
      call = layers.remat(_layer_call, cfg.remat)
      new_cache = None if cache is None else []
      for i, layer in enumerate(self.model.layers):
        x, layer_cache = call(layer, x, cos, sin, mask, None if cache is None else cache[i], cache_index)
        x = constrain(x, cfg.activations)
        if cache is not None:
          new_cache.append(layer_cache)
    return self.model.norm(x), new_cache

  def _scan_layers(self, x, cos, sin, mask, cache, cache_index):
    """The stacked layers under nnx.scan: the carry is the hidden state (and, decoding, the whole stacked
    cache, updated in place one layer slice at a time); cos/sin/mask are closed over. The activation
    sharding applies to each layer's output inside the body, as in the loop. graph_updates=False: the layers
    may be variables of an outer trace (generate merges the model outside its decode loop); the simple scan
    writes back only the variables that change (LoRA dropout's RNG counts)."""
    cfg = self.cfg
    call = layers.remat(_layer_call, cfg.remat, prevent_cse=False)
    keys = self._layer_dropout_keys()  # [L] keys, or None without active dropout
    if cache is None:
      @nnx.scan(in_axes=(nnx.Carry, 0, 0), out_axes=nnx.Carry, graph_updates=False)
      def run(h, layer, key):
        h, _ = call(layer, h, cos, sin, mask, None, None, key)
        return constrain(h, cfg.activations)
      return run(x, self.model.layers, keys), None

    @nnx.scan(in_axes=(nnx.Carry, 0, 0, 0), out_axes=nnx.Carry, graph_updates=False)
    def run_cached(carry, layer, i, key):
      h, k_all, v_all = carry
      layer_cache = {"k": k_all[i], "v": v_all[i]}
      h, new = call(layer, h, cos, sin, mask, layer_cache, cache_index, key)
      k_all = jax.lax.dynamic_update_index_in_dim(k_all, new["k"], i, 0)
      v_all = jax.lax.dynamic_update_index_in_dim(v_all, new["v"], i, 0)
      return constrain(h, cfg.activations), k_all, v_all

    index = jnp.arange(cfg.num_hidden_layers, dtype=jnp.int32)
    x, k_all, v_all = run_cached((x, cache["k"], cache["v"]), self.model.layers, index, keys)
    return x, {"k": k_all, "v": v_all}

  def _layer_dropout_keys(self) -> jax.Array | None:
    """One LoRA dropout key per stacked layer, drawn from `dropout_rngs`, when some dropout is active
    (training mode, rate > 0); None otherwise (nothing is drawn, so eval and decoding mutate no state)."""
    if self.dropout_rngs is None:
      return None
    active = any(isinstance(node, nnx.Dropout) and node.rate > 0 and not node.deterministic
                 for _, node in nnx.iter_graph(self.model.layers))
    return jax.random.split(self.dropout_rngs(), self.cfg.num_hidden_layers) if active else None

  def lm_logits(self, h: jax.Array) -> jax.Array:
    """Hidden [B, T, hidden] -> float32 logits [B, T, vocab]."""
    out = self.model.embed_tokens.attend(h) if self.lm_head is None else self.lm_head(h)
    return out.astype(jnp.float32)

  def __call__(self, input_ids=None, *, inputs_embeds=None, attention_mask=None, positions=None, cache=None,
               cache_index=None, segment_ids=None) -> tuple[jax.Array, list | dict | None]:
    """Causal LM forward. Returns (logits [B, T, vocab] float32, new cache or None).

    input_ids [B, T] int | inputs_embeds [B, T, hidden] (exactly one). attention_mask [B, S] (1 valid, 0 pad)
    over the key slots: S = T without a cache, the cache length with one. positions [B, T] int rotary ids
    (default: the slots). cache (from `init_cache`) with cache_index (int or traced scalar): the inputs are
    written at slots cache_index..cache_index+T-1 (prefill or decode, same code). segment_ids [B, T] int
    (packed rows, no cache): a query attends only keys with its own segment id (with positions restarting
    at 0 per segment, each example computes exactly what it computes alone).
    """
    h, new_cache = self.final_hidden(input_ids, inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                                     positions=positions, cache=cache, cache_index=cache_index,
                                     segment_ids=segment_ids)
    return self.lm_logits(h), new_cache


def _layer_call(layer: DecoderLayer, x, cos, sin, mask, cache, cache_index, rngs=None):
  """One decoder layer's call as a function of the layer (what layers.remat wraps)."""
  return layer(x, cos, sin, mask, cache, cache_index, rngs)


def cache_slots(cache) -> int:
  """The key/value slots of a cache from `init_cache` (either layout)."""
  k = cache["k"] if isinstance(cache, dict) else cache[0]["k"]
  return k.shape[-3]


def cache_axes(cfg: LlamaConfig) -> tuple[str | None, ...]:
  """Logical axes of each cache array: CACHE_AXES, behind the layer axis when the layers are scanned."""
  return ((LAYERS,) + CACHE_AXES) if cfg.scan_layers else CACHE_AXES


# ---- HF conversion --------------------------------------------------------------------------------

def _linear_rules(prefix: str, names: tuple[str, ...]) -> list[KeyRule]:
  rules = []
  for n in names:
    rules.append(KeyRule(f"model.layers.{{i}}.{prefix}.{n}.weight", f"model.layers.{{i}}.{prefix}.{n}.kernel",
                         LINEAR))
    # Only consulted when the config has attention_bias / mlp_bias (import/export walk our parameters).
    rules.append(KeyRule(f"model.layers.{{i}}.{prefix}.{n}.bias", f"model.layers.{{i}}.{prefix}.{n}.bias"))
  return rules


HF_KEY_RULES: list[KeyRule] = [
    KeyRule("model.embed_tokens.weight", "model.embed_tokens.weight"),
    *_linear_rules("self_attn", ("q_proj", "k_proj", "v_proj", "o_proj")),
    *_linear_rules("mlp", ("gate_proj", "up_proj", "down_proj")),
    KeyRule("model.layers.{i}.input_layernorm.weight", "model.layers.{i}.input_layernorm.weight"),
    KeyRule("model.layers.{i}.post_attention_layernorm.weight",
            "model.layers.{i}.post_attention_layernorm.weight"),
    KeyRule("model.norm.weight", "model.norm.weight"),
    # Untied models only: a tied model has no lm_head parameter, so export never writes this key.
    KeyRule("lm_head.weight", "lm_head.kernel", LINEAR),
]

# HF checkpoint keys that are not parameters: rotary inverse-frequency buffers (older checkpoints saved them).
HF_IGNORE_KEYS: tuple[str, ...] = (r"^model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq$",
                                   r"^model\.rotary_emb\.inv_freq$")
# A tied model's PyTorch state_dict still lists lm_head.weight (the embedding, shared); its safetensors do not.
TIED_IGNORE_KEYS: tuple[str, ...] = (r"^lm_head\.weight$",)


def hf_ignore_keys(cfg: LlamaConfig) -> tuple[str, ...]:
  """The `ignore` regexes for `convert.hf.load_hf_tensors`: HF_IGNORE_KEYS, plus lm_head.weight when tied."""
  return HF_IGNORE_KEYS + (TIED_IGNORE_KEYS if cfg.tie_word_embeddings else ())


# What musilingo_jax.convert needs to import / export / restore this model (it never imports the models).
HF_KIND = ModelKind("llm", Llama, LlamaConfig, HF_KEY_RULES, hf_types=("llama",), ignore_for=hf_ignore_keys)
