"""MERT (the HuBERT architecture MusiLingo listens with) in Flax NNX, matching transformers.HubertModel.

    waveform [B, S] -> 7 strided convs (GELU; GroupNorm after conv 0) -> [B, T, 512]     (S/320 frames)
      -> LayerNorm + Linear -> [B, T, D] -> (SpecAugment, training only) -> zero padded frames
      -> + GELU(weight-normed grouped Conv1d) positional embedding
      -> L transformer layers (pre-LN for MERT-v1-330M, post-LN for MERT-v1-95M)

`MERT.__call__` returns every hidden state, in the reference order (docs/reference.md, Model):
  pre-LN  (do_stable_layer_norm=True):  [x + pos, out_1, ..., out_{L-1}, LayerNorm(out_L)]   L+1 states
  post-LN (do_stable_layer_norm=False): [LayerNorm(x + pos), out_1, ..., out_L]             L+1 states
transformers 5's HubertModel puts the un-normed out_L last on the pre-LN path (its `last_hidden_state`
is the normed one); transformers 4.x and MERT's own code return the normed one, as we do.

Parameter paths mirror the HF keys (see docs/DESIGN.md); `HF_KEY_RULES` is the conversion table. The
positional conv keeps its weight-norm pair (`weight_g` [1, 1, k], `weight_v` [out, in/groups, k]) in
torch layout, so both checkpoint spellings load with the identity transform.

Layers (`MERTConfig.scan_layers`): off, `encoder.layers` is an `nnx.List` run by a Python loop (paths
`encoder.layers.3.attention.q_proj.kernel`); on, one encoder layer with its variables stacked along a leading
layer axis (`layers.stacked`, paths `encoder.layers.attention.q_proj.kernel` [L, in, out]) run by `nnx.scan`,
whose per-layer outputs are the hidden states. Same numbers either way; `remat` applies per layer in both.

Not implemented (training-time only, and the MERT encoder is frozen): dropout, attention dropout and
LayerDrop. SpecAugment time masking is an option (`spec_augment`), active only in training mode.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from musilingo_jax.convert.rules import CONV1D, IDENTITY, LINEAR, ConversionError, KeyRule, ModelKind
from musilingo_jax.models import layers as layers_lib
from musilingo_jax.models.layers import LayerNorm, Linear, param
from musilingo_jax.sharding import constrain

log = logging.getLogger(__name__)

_EXACT_GELU = ("gelu", "gelu_python")  # both are the exact-erf GELU in transformers' ACT2FN


@dataclasses.dataclass(frozen=True)
class MERTConfig:
  hidden_size: int = 1024
  num_hidden_layers: int = 24
  num_attention_heads: int = 16
  intermediate_size: int = 4096
  conv_dim: tuple[int, ...] = (512,) * 7
  conv_kernel: tuple[int, ...] = (10, 3, 3, 3, 3, 2, 2)
  conv_stride: tuple[int, ...] = (5, 2, 2, 2, 2, 2, 2)
  conv_bias: bool = False
  feat_extract_norm: str = "group"  # "group": GroupNorm(C, C) after conv 0 only; "layer": LayerNorm after each
  do_stable_layer_norm: bool = True  # True: pre-LN (MERT-v1-330M); False: post-LN (MERT-v1-95M)
  num_conv_pos_embeddings: int = 128
  num_conv_pos_embedding_groups: int = 16
  layer_norm_eps: float = 1e-5
  feat_proj_layer_norm: bool = True
  mask_time_prob: float = 0.075
  mask_time_length: int = 10
  mask_time_min_masks: int = 2
  spec_augment: bool = False  # SpecAugment time masking, in training mode only (the reference's quirk)
  attention_impl: str | None = "xla"  # jax.nn.dot_product_attention implementation: "xla", "cudnn", None=auto
  # Activation sharding (sharding.Activations: mesh + logical rules) for the hidden states; None = none.
  # Static in the model's graph, so jit caches by it; not in repr (the demo's records key on the repr).
  activations: Any = dataclasses.field(default=None, repr=False)
  dtype: Any = jnp.float32  # compute dtype; norms and softmax run in f32 regardless
  param_dtype: Any = jnp.float32
  # Stacked layers run by nnx.scan, and each layer's rematerialisation policy (layers.REMAT_POLICIES). How the
  # model runs, not what it computes: not in repr (the demo's records key on the repr).
  scan_layers: bool = dataclasses.field(default=False, repr=False)
  remat: str = dataclasses.field(default="none", repr=False)

  def __post_init__(self):
    n = len(self.conv_dim)
    if len(self.conv_kernel) != n or len(self.conv_stride) != n:
      raise ValueError(f"conv_dim/conv_kernel/conv_stride lengths differ: {n}, {len(self.conv_kernel)}, "
                       f"{len(self.conv_stride)}")
    if self.hidden_size % self.num_attention_heads:
      raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_attention_heads "
                       f"{self.num_attention_heads}")
    if self.hidden_size % self.num_conv_pos_embedding_groups:
      raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_conv_pos_embedding_groups "
                       f"{self.num_conv_pos_embedding_groups}")
    if self.feat_extract_norm not in ("group", "layer"):
      raise ValueError(f"feat_extract_norm must be 'group' or 'layer', got {self.feat_extract_norm!r}")
    layers_lib.check_remat(self.remat, "MERTConfig")

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_attention_heads

  @property
  def num_hidden_states(self) -> int:
    return self.num_hidden_layers + 1

  def feature_lengths(self, num_samples):
    """Frames the conv stack makes from `num_samples` samples (int or int array): n -> (n - k) // s + 1."""
    n = num_samples
    for k, s in zip(self.conv_kernel, self.conv_stride):
      n = (n - k) // s + 1
    return n

  # ---- presets (the released MERT-v1 checkpoints' config.json) ----
  @classmethod
  def mert_v1_330m(cls, **overrides) -> "MERTConfig":
    return cls(**{**dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096,
                         do_stable_layer_norm=True, mask_time_prob=0.075, mask_time_length=10), **overrides})

  @classmethod
  def mert_v1_95m(cls, **overrides) -> "MERTConfig":
    return cls(**{**dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                         do_stable_layer_norm=False, mask_time_prob=0.05, mask_time_length=10), **overrides})

  @classmethod
  def tiny(cls, **overrides) -> "MERTConfig":
    """For tests and demos: hidden 32, 2 layers, 4 heads, 7x16 conv channels, pos conv kernel 16 / 4 groups."""
    return cls(**{**dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                         conv_dim=(16,) * 7, num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4,
                         do_stable_layer_norm=True, mask_time_prob=0.075, mask_time_length=2), **overrides})

  # ---- Hugging Face config.json ----
  @classmethod
  def from_hf_config(cls, d: dict, **overrides) -> "MERTConfig":
    """From a HubertConfig / MERTConfig config.json dict; `overrides` set our own fields (dtype, spec_augment...).

    Raises ConversionError naming the field for a value this port does not implement.
    """
    defaults = dict(hidden_act="gelu", feat_extract_activation="gelu", conv_pos_batch_norm=False,
                    mask_feature_prob=0.0, feature_extractor_cqt=False, deepnorm=False, adapter_attn_dim=None)

    def get(name):
      return d.get(name, defaults.get(name))

    def reject(name, expected):
      raise ConversionError(f"config field {name}={get(name)!r} is not supported (expected {expected})")

    for name in ("hidden_act", "feat_extract_activation"):
      if get(name) not in _EXACT_GELU:
        reject(name, "'gelu', the exact-erf GELU")
    if get("conv_pos_batch_norm"):
      reject("conv_pos_batch_norm", "false: the positional conv uses weight norm")
    if get("mask_feature_prob") and float(get("mask_feature_prob")) > 0:
      reject("mask_feature_prob", "0.0: SpecAugment feature masking is not implemented")
    if get("feature_extractor_cqt"):
      reject("feature_extractor_cqt", "false: MERT's CQT branch is not implemented")
    if get("deepnorm"):
      reject("deepnorm", "false")
    if get("adapter_attn_dim") is not None:
      reject("adapter_attn_dim", "null: attention adapters are not implemented")
    if d.get("feat_extract_norm", "group") not in ("group", "layer"):
      reject("feat_extract_norm", "'group' or 'layer'")
    conv_dim = tuple(d.get("conv_dim", cls.conv_dim))
    if "num_feat_extract_layers" in d and d["num_feat_extract_layers"] != len(conv_dim):
      reject("num_feat_extract_layers", f"len(conv_dim) = {len(conv_dim)}")

    fields = {f.name for f in dataclasses.fields(cls)}
    hf_fields = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "conv_bias",
                 "feat_extract_norm", "do_stable_layer_norm", "num_conv_pos_embeddings",
                 "num_conv_pos_embedding_groups", "layer_norm_eps", "feat_proj_layer_norm", "mask_time_prob",
                 "mask_time_length", "mask_time_min_masks")
    # HubertConfig's defaults where the dict is silent (they are the MERT-v1-95M numbers).
    hf_defaults = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                       do_stable_layer_norm=False, mask_time_prob=0.05)
    kw = {name: d.get(name, hf_defaults.get(name, getattr(cls, name))) for name in hf_fields}
    kw["conv_dim"] = conv_dim
    kw["conv_kernel"] = tuple(d.get("conv_kernel", cls.conv_kernel))
    kw["conv_stride"] = tuple(d.get("conv_stride", cls.conv_stride))
    bad = set(overrides) - fields
    if bad:
      raise TypeError(f"unknown MERTConfig fields {sorted(bad)}")
    kw.update(overrides)
    try:
      return cls(**kw)
    except ValueError as e:
      raise ConversionError(f"config: {e}") from e

  def to_hf_config(self) -> dict:
    """A config.json dict that transformers loads as HubertConfig(**d)."""
    return dict(
        architectures=["HubertModel"], model_type="hubert",
        hidden_size=self.hidden_size, num_hidden_layers=self.num_hidden_layers,
        num_attention_heads=self.num_attention_heads, intermediate_size=self.intermediate_size,
        hidden_act="gelu", feat_extract_activation="gelu", feat_extract_norm=self.feat_extract_norm,
        conv_dim=list(self.conv_dim), conv_kernel=list(self.conv_kernel), conv_stride=list(self.conv_stride),
        conv_bias=self.conv_bias, num_feat_extract_layers=len(self.conv_dim),
        num_conv_pos_embeddings=self.num_conv_pos_embeddings,
        num_conv_pos_embedding_groups=self.num_conv_pos_embedding_groups, conv_pos_batch_norm=False,
        do_stable_layer_norm=self.do_stable_layer_norm, layer_norm_eps=self.layer_norm_eps,
        feat_proj_layer_norm=self.feat_proj_layer_norm, apply_spec_augment=True,
        mask_time_prob=self.mask_time_prob, mask_time_length=self.mask_time_length,
        mask_time_min_masks=self.mask_time_min_masks, mask_feature_prob=0.0,
    )


# ----------------------------------------------------------------------------------------------------------
# Feature extractor: waveform -> frames


def _gelu(x):
  return jax.nn.gelu(x, approximate=False)


class Conv1d(nnx.Module):
  """Valid, strided torch Conv1d over [B, S, C_in]; kernel [k, in, out] (torch weight [out, in, k] transposed)."""

  def __init__(self, in_ch: int, out_ch: int, kernel: int, stride: int, *, use_bias: bool, rngs: nnx.Rngs,
               dtype, param_dtype):
    self.stride, self.dtype = stride, dtype
    init = nnx.initializers.variance_scaling(2.0, "fan_in", "normal", in_axis=(0, 1), out_axis=2)
    self.kernel = param(rngs, init, (kernel, in_ch, out_ch), ("conv_kernel", "conv_in", "conv_out"), param_dtype)
    self.bias = (param(None, nnx.initializers.zeros, (out_ch,), ("conv_out",), param_dtype)
                 if use_bias else None)

  def __call__(self, x: jax.Array) -> jax.Array:
    y = jax.lax.conv_general_dilated(x.astype(self.dtype), self.kernel[...].astype(self.dtype), (self.stride,),
                                     "VALID", dimension_numbers=("NWC", "WIO", "NWC"))
    if self.bias is not None:
      y = y + self.bias[...].astype(self.dtype)
    return y


class ChannelGroupNorm(nnx.Module):
  """torch GroupNorm(C groups, C channels): each channel normalised over time (f32 statistics), affine."""

  def __init__(self, channels: int, *, eps: float = 1e-5, dtype, param_dtype):
    self.eps, self.dtype = eps, dtype
    self.weight = param(None, nnx.initializers.ones, (channels,), ("conv_out",), param_dtype)
    self.bias = param(None, nnx.initializers.zeros, (channels,), ("conv_out",), param_dtype)

  def __call__(self, x: jax.Array, valid_frames: jax.Array | None = None) -> jax.Array:  # [B, T, C]
    """valid_frames [B]: statistics over each row's first frames only (a batch zero-padded to a static
    length normalises as if it had been padded only to `valid_frames`); None = all T frames."""
    xf = x.astype(jnp.float32)
    if valid_frames is None:
      mean = xf.mean(1, keepdims=True)
      var = jnp.square(xf - mean).mean(1, keepdims=True)
    else:
      w = (jnp.arange(x.shape[1])[None, :] < valid_frames[:, None]).astype(jnp.float32)[:, :, None]
      count = jnp.maximum(w.sum(1, keepdims=True), 1.0)
      mean = (xf * w).sum(1, keepdims=True) / count
      var = (jnp.square(xf - mean) * w).sum(1, keepdims=True) / count
    y = (xf - mean) * jax.lax.rsqrt(var + self.eps)
    return (y * self.weight[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)).astype(self.dtype)


class ConvLayer(nnx.Module):
  """conv -> (GroupNorm | LayerNorm | nothing) -> GELU."""

  def __init__(self, cfg: MERTConfig, i: int, *, rngs: nnx.Rngs):
    in_ch = cfg.conv_dim[i - 1] if i > 0 else 1
    out_ch = cfg.conv_dim[i]
    self.conv = Conv1d(in_ch, out_ch, cfg.conv_kernel[i], cfg.conv_stride[i], use_bias=cfg.conv_bias,
                       rngs=rngs, dtype=cfg.dtype, param_dtype=cfg.param_dtype)
    if cfg.feat_extract_norm == "layer":  # torch nn.LayerNorm default eps, not config.layer_norm_eps
      self.layer_norm = LayerNorm(out_ch, eps=1e-5, axis_name="conv_out", dtype=cfg.dtype,
                                  param_dtype=cfg.param_dtype)
    elif i == 0:
      self.layer_norm = ChannelGroupNorm(out_ch, dtype=cfg.dtype, param_dtype=cfg.param_dtype)
    else:
      self.layer_norm = None

  def __call__(self, x: jax.Array, valid_frames: jax.Array | None = None) -> jax.Array:
    x = self.conv(x)
    if isinstance(self.layer_norm, ChannelGroupNorm):
      x = self.layer_norm(x, valid_frames)
    elif self.layer_norm is not None:
      x = self.layer_norm(x)
    return _gelu(x)


class FeatureEncoder(nnx.Module):
  def __init__(self, cfg: MERTConfig, *, rngs: nnx.Rngs):
    self.conv_layers = nnx.List([ConvLayer(cfg, i, rngs=rngs) for i in range(len(cfg.conv_dim))])
    self.activations = cfg.activations

  def __call__(self, input_values: jax.Array, pad_samples: jax.Array | None = None) -> jax.Array:
    """[B, S] -> [B, T, C]. pad_samples [B]: the length each row's audio was zero-padded to in a batch of
    unequal clips (only GroupNorm after conv 0 sees it: its statistics run over that length, as for an
    input of exactly that many samples); None = S."""
    x = input_values[:, :, None]
    for i, layer in enumerate(self.conv_layers):
      valid = None
      if i == 0 and pad_samples is not None:
        k, s = layer.conv.kernel.shape[0], layer.conv.stride
        valid = (pad_samples.astype(jnp.int32) - k) // s + 1
      x = constrain(layer(x, valid), self.activations)
    return x


class FeatureProjection(nnx.Module):
  def __init__(self, cfg: MERTConfig, *, rngs: nnx.Rngs):
    c = cfg.conv_dim[-1]
    self.layer_norm = (LayerNorm(c, eps=cfg.layer_norm_eps, axis_name="conv_out", dtype=cfg.dtype,
                                 param_dtype=cfg.param_dtype) if cfg.feat_proj_layer_norm else None)
    self.projection = Linear(c, cfg.hidden_size, use_bias=True, in_axis="conv_out", out_axis="embed", rngs=rngs,
                             dtype=cfg.dtype, param_dtype=cfg.param_dtype)

  def __call__(self, x: jax.Array) -> jax.Array:
    if self.layer_norm is not None:
      x = self.layer_norm(x)
    return self.projection(x)


# ----------------------------------------------------------------------------------------------------------
# Transformer encoder


class WeightNormConv1d(nnx.Module):
  """torch Conv1d(D, D, k, padding=k//2, groups) under weight_norm(dim=2); g and v kept in torch layout.

  weight = g * v / ||v||, the norm taken over every axis of v but the kernel axis (torch norm_except_dim(v, 2, 2)).
  """

  def __init__(self, cfg: MERTConfig, *, rngs: nnx.Rngs):
    d, k, groups = cfg.hidden_size, cfg.num_conv_pos_embeddings, cfg.num_conv_pos_embedding_groups
    self.groups, self.kernel_size, self.dtype = groups, k, cfg.dtype
    init = nnx.initializers.variance_scaling(2.0, "fan_in", "normal", in_axis=(1, 2), out_axis=0)
    self.weight_v = param(rngs, init, (d, d // groups, k), ("conv_out", "conv_in", "conv_kernel"),
                          cfg.param_dtype)
    v = self.weight_v[...]
    # torch initialises g to ||v||, so the fresh layer's weight equals v.
    self.weight_g = param(None, lambda key, shape, dtype: self._norm(v).astype(dtype), (1, 1, k),
                          (None, None, "conv_kernel"), cfg.param_dtype)
    self.bias = param(None, nnx.initializers.zeros, (d,), ("conv_out",), cfg.param_dtype)

  @staticmethod
  def _norm(v: jax.Array) -> jax.Array:  # [out, in/g, k] -> [1, 1, k]
    vf = v.astype(jnp.float32)
    return jnp.sqrt(jnp.sum(vf * vf, axis=(0, 1), keepdims=True))

  def weight(self) -> jax.Array:
    """The effective torch weight [out, in/groups, k] in f32."""
    v = self.weight_v[...].astype(jnp.float32)
    return self.weight_g[...].astype(jnp.float32) * v / self._norm(v)

  def __call__(self, x: jax.Array) -> jax.Array:  # [B, T, D] -> [B, T + 1 - (k % 2 == 0), D]
    kernel = self.weight().transpose(2, 1, 0).astype(self.dtype)  # [k, in/g, out]
    pad = self.kernel_size // 2
    y = jax.lax.conv_general_dilated(x.astype(self.dtype), kernel, (1,), [(pad, pad)],
                                     dimension_numbers=("NWC", "WIO", "NWC"), feature_group_count=self.groups)
    return y + self.bias[...].astype(self.dtype)


class PositionalConvEmbedding(nnx.Module):
  def __init__(self, cfg: MERTConfig, *, rngs: nnx.Rngs):
    self.conv = WeightNormConv1d(cfg, rngs=rngs)
    self.num_pad_remove = 1 if cfg.num_conv_pos_embeddings % 2 == 0 else 0

  def __call__(self, x: jax.Array) -> jax.Array:
    y = self.conv(x)
    if self.num_pad_remove:
      y = y[:, :-self.num_pad_remove]
    return _gelu(y)


class Attention(nnx.Module):
  def __init__(self, cfg: MERTConfig, *, rngs: nnx.Rngs):
    d = cfg.hidden_size
    self.num_heads, self.head_dim, self.impl = cfg.num_attention_heads, cfg.head_dim, cfg.attention_impl
    kw = dict(use_bias=True, rngs=rngs, dtype=cfg.dtype, param_dtype=cfg.param_dtype)
    self.q_proj = Linear(d, d, in_axis="embed", out_axis="heads", **kw)
    self.k_proj = Linear(d, d, in_axis="embed", out_axis="heads", **kw)
    self.v_proj = Linear(d, d, in_axis="embed", out_axis="heads", **kw)
    self.out_proj = Linear(d, d, in_axis="heads", out_axis="embed", **kw)

  def __call__(self, x: jax.Array, frame_lengths: jax.Array | None) -> jax.Array:
    b, t, _ = x.shape
    split = lambda y: y.reshape(b, t, self.num_heads, self.head_dim)  # [B, T, N, H]
    q, k, v = split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x))
    # Padded keys are masked (large negative logit); padded queries still attend, as in HF.
    o = jax.nn.dot_product_attention(q, k, v, scale=self.head_dim ** -0.5, key_value_seq_lengths=frame_lengths,
                                     implementation=self.impl)
    return self.out_proj(o.reshape(b, t, -1))


class FeedForward(nnx.Module):
  def __init__(self, cfg: MERTConfig, *, rngs: nnx.Rngs):
    kw = dict(use_bias=True, rngs=rngs, dtype=cfg.dtype, param_dtype=cfg.param_dtype)
    self.intermediate_dense = Linear(cfg.hidden_size, cfg.intermediate_size, in_axis="embed", out_axis="mlp", **kw)
    self.output_dense = Linear(cfg.intermediate_size, cfg.hidden_size, in_axis="mlp", out_axis="embed", **kw)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.output_dense(_gelu(self.intermediate_dense(x)))


class EncoderLayer(nnx.Module):
  """HubertEncoderLayerStableLayerNorm (pre_ln=True) or HubertEncoderLayer (post-LN)."""

  def __init__(self, cfg: MERTConfig, *, rngs: nnx.Rngs):
    self.pre_ln = cfg.do_stable_layer_norm
    ln = lambda: LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps, axis_name="embed", dtype=cfg.dtype,
                           param_dtype=cfg.param_dtype)
    self.attention = Attention(cfg, rngs=rngs)
    self.layer_norm = ln()
    self.feed_forward = FeedForward(cfg, rngs=rngs)
    self.final_layer_norm = ln()

  def __call__(self, x: jax.Array, frame_lengths: jax.Array | None) -> jax.Array:
    if self.pre_ln:
      x = x + self.attention(self.layer_norm(x), frame_lengths)
      return x + self.feed_forward(self.final_layer_norm(x))
    x = self.layer_norm(x + self.attention(x, frame_lengths))
    return self.final_layer_norm(x + self.feed_forward(x))


def _layer_call(layer: EncoderLayer, x: jax.Array, frame_lengths: jax.Array | None) -> jax.Array:
  """One encoder layer's call as a function of the layer (what layers.remat wraps)."""
  return layer(x, frame_lengths)


class Encoder(nnx.Module):
  def __init__(self, cfg: MERTConfig, *, rngs: nnx.Rngs):
    self.pre_ln = cfg.do_stable_layer_norm
    self.pos_conv_embed = PositionalConvEmbedding(cfg, rngs=rngs)
    self.layer_norm = LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps, axis_name="embed", dtype=cfg.dtype,
                                param_dtype=cfg.param_dtype)
    if cfg.scan_layers:
      self.layers = layers_lib.stacked(lambda r: EncoderLayer(cfg, rngs=r), cfg.num_hidden_layers, rngs)
    else:
      self.layers = nnx.List([EncoderLayer(cfg, rngs=rngs) for _ in range(cfg.num_hidden_layers)])
    self.activations = cfg.activations
    self.scan_layers, self.remat = cfg.scan_layers, cfg.remat

  def __call__(self, x: jax.Array, frame_mask: jax.Array | None) -> list[jax.Array]:
    frame_lengths = None
    if frame_mask is not None:
      x = jnp.where(frame_mask[:, :, None], x, jnp.zeros((), x.dtype))  # padded frames -> 0 before pos conv
      frame_lengths = frame_mask.sum(-1).astype(jnp.int32)
    x = constrain(x + self.pos_conv_embed(x), self.activations)
    if not self.pre_ln:
      x = self.layer_norm(x)
    states = [x]
    if self.scan_layers:
      call, act = layers_lib.remat(_layer_call, self.remat, prevent_cse=False), self.activations

      @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=(nnx.Carry, 0), graph_updates=False)
      def run(h, layer):
        h = constrain(call(layer, h, frame_lengths), act)
        return h, h

      x, outs = run(x, self.layers)  # outs [L, B, T, D]: every layer's output
      states += [outs[i] for i in range(outs.shape[0])]
    else:
      call = layers_lib.remat(_layer_call, self.remat)
      for layer in self.layers:
        x = constrain(call(layer, x, frame_lengths), self.activations)
        states.append(x)
    if self.pre_ln:
      states[-1] = self.layer_norm(x)
    return states


# ----------------------------------------------------------------------------------------------------------
# SpecAugment time masking


def time_mask_indices(key: jax.Array, frame_lengths: jax.Array, num_frames: int, *, mask_prob: float,
                      mask_length: int, min_masks: int = 0) -> jax.Array:
  """Random time-mask spans [B, T] bool, in the spirit of HF's `_compute_mask_indices`, jit-friendly.

  Per row of valid length n: int(mask_prob * n / mask_length + eps) spans (eps ~ U[0, 1) shared by the batch,
  at least `min_masks`, at most T // mask_length and n - mask_length + 1), with distinct start positions drawn
  uniformly from [0, n - mask_length]; spans may overlap. Unlike HubertModel (which passes no attention mask
  here), spans stay inside each row's valid frames.
  """
  k_eps, k_start = jax.random.split(key)
  n = frame_lengths.astype(jnp.int32)  # [B]
  eps = jax.random.uniform(k_eps, ())
  num = jnp.floor(mask_prob * n / mask_length + eps).astype(jnp.int32)
  num = jnp.maximum(num, min_masks)
  num = jnp.where(num * mask_length > num_frames, num_frames // mask_length, num)
  num = jnp.minimum(num, jnp.maximum(n - (mask_length - 1), 0))
  pos = jnp.arange(num_frames)
  can_start = pos[None, :] <= (n - mask_length)[:, None]  # [B, T]
  scores = jnp.where(can_start, jax.random.uniform(k_start, (n.shape[0], num_frames)), -1.0)
  rank = jnp.argsort(jnp.argsort(-scores, axis=-1), axis=-1)  # 0 = highest score
  starts = (rank < num[:, None]) & can_start
  # frame t is masked if a span starts in (t - mask_length, t]
  c = jnp.cumsum(starts.astype(jnp.int32), axis=-1)
  c_before = jnp.pad(c, ((0, 0), (mask_length, 0)))[:, :num_frames]
  return (c - c_before) > 0


# ----------------------------------------------------------------------------------------------------------


class MERT(nnx.Module):
  """transformers.HubertModel (eval mode) in NNX; `__call__` returns the list of hidden states [B, T, D].

  Training mode (`model.train()`, or `nnx.view(model, deterministic=False)`) only matters when
  `cfg.spec_augment` is on: then the time-mask spans draw from the 'dropout' rng stream (of the `rngs` given
  at construction, or of `rngs` passed to the call).
  """

  def __init__(self, cfg: MERTConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.feature_extractor = FeatureEncoder(cfg, rngs=rngs)
    self.feature_projection = FeatureProjection(cfg, rngs=rngs)
    self.encoder = Encoder(cfg, rngs=rngs)
    # HF creates masked_spec_embed only when some masking is configured; so do we (the keys must match).
    self.masked_spec_embed = (param(rngs, nnx.initializers.uniform(1.0), (cfg.hidden_size,), ("embed",),
                                    cfg.param_dtype) if cfg.mask_time_prob > 0 else None)
    self.deterministic = True  # eval mode by default, like a loaded HF model
    self.rngs = nnx.data(rngs["dropout"].fork() if cfg.spec_augment else None)
    log.info("MERT attention: jax.nn.dot_product_attention(implementation=%r)", cfg.attention_impl)

  def set_view(self, deterministic: bool | None = None):
    """Used by nnx.view / Module.train / Module.eval."""
    if deterministic is not None:
      self.deterministic = deterministic

  def feature_lengths(self, num_samples):
    return self.cfg.feature_lengths(num_samples)

  def frame_mask(self, attention_mask: jax.Array, num_frames: int) -> jax.Array:
    """Sample-level mask [B, S] -> frame-level mask [B, T] (frames before the conv output length of sum(mask))."""
    lengths = self.feature_lengths(attention_mask.astype(jnp.int32).sum(-1))
    return jnp.arange(num_frames)[None, :] < lengths[:, None]

  def __call__(self, input_values: jax.Array, attention_mask: jax.Array | None = None, *,
               mask_time_indices: jax.Array | None = None, deterministic: bool | None = None,
               rngs: nnx.Rngs | jax.Array | None = None, pad_samples: jax.Array | None = None) -> list[jax.Array]:
    """input_values [B, S] float waveform; attention_mask [B, S] (1 = real sample) or None.

    pad_samples [B]: with a static S longer than the batch needs, the length the batch would have been
    padded to (its longest clip): the outputs at frames before that length then equal a run on exactly
    that many samples (see FeatureEncoder).

    mask_time_indices [B, T] bool: explicit frames to replace by masked_spec_embed (as HF, in any mode).
    Returns cfg.num_hidden_states arrays [B, T, hidden] in `cfg.dtype`; with a mask, padded frames hold junk.
    The same as `encode_features(extract_features(input_values, pad_samples), attention_mask, ...)`.
    """
    return self.encode_features(self.extract_features(input_values, pad_samples), attention_mask,
                                mask_time_indices=mask_time_indices, deterministic=deterministic, rngs=rngs)

  def extract_features(self, input_values: jax.Array, pad_samples: jax.Array | None = None) -> jax.Array:
    """The conv feature extractor alone: [B, S] waveform -> [B, T, conv_dim[-1]] (what HuBERT's feature
    penalty and `feature_grad_mult` act on in pretraining; musilingo_jax.pretrain)."""
    return self.feature_extractor(input_values, pad_samples)

  def encode_features(self, features: jax.Array, attention_mask: jax.Array | None = None, *,
                      mask_time_indices: jax.Array | None = None, deterministic: bool | None = None,
                      rngs: nnx.Rngs | jax.Array | None = None) -> list[jax.Array]:
    """Conv features [B, T, C] -> the hidden states: feature projection, time masking (explicit
    `mask_time_indices`, or SpecAugment in training mode), positional conv and the transformer layers.
    attention_mask [B, S] is the sample-level mask of the waveform the features came from."""
    cfg = self.cfg
    x = features
    t = x.shape[1]
    frame_mask = None if attention_mask is None else self.frame_mask(attention_mask, t)
    x = self.feature_projection(x)  # [B, T, D]
    deterministic = self.deterministic if deterministic is None else deterministic
    if mask_time_indices is None and cfg.spec_augment and not deterministic and cfg.mask_time_prob > 0:
      key = self._augment_key(rngs)
      lengths = (jnp.full((x.shape[0],), t, jnp.int32) if frame_mask is None
                 else frame_mask.sum(-1).astype(jnp.int32))
      mask_time_indices = time_mask_indices(key, lengths, t, mask_prob=cfg.mask_time_prob,
                                            mask_length=cfg.mask_time_length, min_masks=cfg.mask_time_min_masks)
    if mask_time_indices is not None:
      if self.masked_spec_embed is None:
        raise ValueError("mask_time_indices given, but the model has no masked_spec_embed (mask_time_prob == 0)")
      x = jnp.where(mask_time_indices[:, :, None], self.masked_spec_embed[...].astype(x.dtype), x)
    return self.encoder(x, frame_mask)

  def _augment_key(self, rngs) -> jax.Array:
    if isinstance(rngs, nnx.Rngs):
      return rngs["dropout"]()
    if isinstance(rngs, nnx.RngStream):
      return rngs()
    if rngs is not None:
      return rngs
    if self.rngs is None:
      raise ValueError("SpecAugment is on in training mode but no rngs were given: pass rngs= to MERT(...) "
                       "or to the call")
    return self.rngs()


# ----------------------------------------------------------------------------------------------------------
# Hugging Face key table (HubertModel state_dict names <-> our paths)

HF_KEY_RULES: list[KeyRule] = [
    KeyRule("masked_spec_embed", "masked_spec_embed"),
    KeyRule("feature_extractor.conv_layers.{i}.conv.weight", "feature_extractor.conv_layers.{i}.conv.kernel",
            CONV1D),
    KeyRule("feature_extractor.conv_layers.{i}.conv.bias", "feature_extractor.conv_layers.{i}.conv.bias"),
    KeyRule("feature_extractor.conv_layers.{i}.layer_norm.weight",
            "feature_extractor.conv_layers.{i}.layer_norm.weight"),
    KeyRule("feature_extractor.conv_layers.{i}.layer_norm.bias", "feature_extractor.conv_layers.{i}.layer_norm.bias"),
    KeyRule("feature_projection.layer_norm.weight", "feature_projection.layer_norm.weight"),
    KeyRule("feature_projection.layer_norm.bias", "feature_projection.layer_norm.bias"),
    KeyRule("feature_projection.projection.weight", "feature_projection.projection.kernel", LINEAR),
    KeyRule("feature_projection.projection.bias", "feature_projection.projection.bias"),
    KeyRule("encoder.pos_conv_embed.conv.weight_g", "encoder.pos_conv_embed.conv.weight_g", IDENTITY,
            hf_aliases=("encoder.pos_conv_embed.conv.parametrizations.weight.original0",)),
    KeyRule("encoder.pos_conv_embed.conv.weight_v", "encoder.pos_conv_embed.conv.weight_v", IDENTITY,
            hf_aliases=("encoder.pos_conv_embed.conv.parametrizations.weight.original1",)),
    KeyRule("encoder.pos_conv_embed.conv.bias", "encoder.pos_conv_embed.conv.bias"),
    KeyRule("encoder.layer_norm.weight", "encoder.layer_norm.weight"),
    KeyRule("encoder.layer_norm.bias", "encoder.layer_norm.bias"),
    *[KeyRule(f"encoder.layers.{{i}}.attention.{p}.weight", f"encoder.layers.{{i}}.attention.{p}.kernel", LINEAR)
      for p in ("q_proj", "k_proj", "v_proj", "out_proj")],
    *[KeyRule(f"encoder.layers.{{i}}.attention.{p}.bias", f"encoder.layers.{{i}}.attention.{p}.bias")
      for p in ("q_proj", "k_proj", "v_proj", "out_proj")],
    *[KeyRule(f"encoder.layers.{{i}}.feed_forward.{p}.weight", f"encoder.layers.{{i}}.feed_forward.{p}.kernel",
              LINEAR) for p in ("intermediate_dense", "output_dense")],
    *[KeyRule(f"encoder.layers.{{i}}.feed_forward.{p}.bias", f"encoder.layers.{{i}}.feed_forward.{p}.bias")
      for p in ("intermediate_dense", "output_dense")],
    *[KeyRule(f"encoder.layers.{{i}}.{n}.{w}", f"encoder.layers.{{i}}.{n}.{w}")
      for n in ("layer_norm", "final_layer_norm") for w in ("weight", "bias")],
]


def _current_hubert_name(rule: KeyRule, names: list[str]) -> str:
  """transformers 5's HubertModel spells the weight-norm pair parametrizations.weight.original0/1."""
  return next((n for n in names if ".parametrizations." in n), names[0])


# What musilingo_jax.convert needs to import / export / restore this model (it never imports the models).
# Export writes the weight-norm pair under the names current transformers uses; a converted directory keeps
# the source's preprocessor_config.json (the feature extractor's do_normalize, which the data path follows).
HF_KIND = ModelKind("encoder", MERT, MERTConfig, HF_KEY_RULES, hf_types=("hubert", "mert", "mert_model"),
                    prefer=_current_hubert_name, extra_files=("preprocessor_config.json",))
