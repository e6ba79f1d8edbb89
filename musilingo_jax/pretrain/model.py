"""MERT-style pretraining on our Flax MERT: span masking, the prediction heads, the loss.

    audio [B, S] -> MERT.extract_features (conv stack)                 -> conv features [B, T, C]
       feature penalty  mean(features^2)                                (HuBERT's features_pen)
       gradient into the conv stack scaled by feature_grad_mult         (fairseq's GradMultiply; MERT 0.1)
    -> MERT.encode_features with mask_time_indices (spans -> masked_spec_embed)   -> hidden states
    -> last hidden state h [B, T, D] -> MERTPretrainHeads:
       codebook i: cos(final_proj_i(h), label_emb_i[k]) / logit_temp over its K_i codes  (HuBERT / MERT)
       CQT:        cqt_proj(h) -> [B, T, bins]                          (MERT's encoder_cqt_model.fc)

loss = sum_i CE_i + cqt_weight * MSE_cqt + feature_pen_weight * features_pen, where CE_i is the mean
cross-entropy of codebook i and MSE_cqt the mean squared error per bin, both over the masked frames (HuBERT's
pred_masked_weight 1; MERT's loss_weights [10, 1] for the penalty and the CQT loss). `nomask_weight` (HuBERT's
pred_nomask_weight, 0 in HuBERT and MERT) adds it times the same two losses over the unmasked frames. `count`
(the trainer's "tokens") is the number of masked frames.

Masks: `mert.time_mask_indices` (HF's `_compute_mask_indices` in JAX): per row int(mask_prob * n /
mask_length + u) spans (u ~ U[0, 1) shared by the batch, at least `mask_min`), distinct starts drawn
uniformly, spans inside the row's valid frames and free to overlap; MERT pretrains with mask_prob 0.8 and
mask_length 5 (about 60 % of frames masked). In training the key comes from the model's 'dropout' stream,
which the train step reseeds from (config.seed, step): a resumed run draws the same masks. In eval mode the
key is fixed (`eval_mask_seed`), so eval losses compare across steps.

The encoder is the MERT module itself (the heads sit beside it), so the pretrained encoder saves, converts
and exports as any MERT (pretrain/experiment.py `save_encoder`).
"""

from __future__ import annotations

import dataclasses
import itertools

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from musilingo_jax.models.layers import param, torch_linear
from musilingo_jax.models.mert import MERT, time_mask_indices


@dataclasses.dataclass(frozen=True)
class PretrainConfig:
  codebook_sizes: tuple[int, ...]   # one codebook per target feature (targets.TargetConfig.features)
  cqt_bins: int
  final_dim: int = 64               # MERT-95M's final_dim
  logit_temp: float = 0.1
  mask_prob: float = 0.8
  mask_length: int = 5
  mask_min: int = 2
  cqt_weight: float = 1.0
  feature_pen_weight: float = 10.0
  feature_grad_mult: float = 0.1    # 1 = the conv stack trains fully, 0 = frozen (no backward through it)
  nomask_weight: float = 0.0        # HuBERT's pred_nomask_weight: the same losses on the unmasked frames
  eval_mask_seed: int = 0


def grad_multiply(x: jax.Array, scale: float) -> jax.Array:
  """Identity forward; the gradient is multiplied by `scale` (0: none flows, and XLA drops that backward)."""
  if scale == 1.0:
    return x
  if scale == 0.0:
    return jax.lax.stop_gradient(x)
  return x * scale + jax.lax.stop_gradient(x) * (1.0 - scale)


def cosine_logits(proj: jax.Array, embs: jax.Array, temp: float, eps: float = 1e-8) -> jax.Array:
  """cos(proj, embs[k]) / temp for every code k: [..., F] x [K, F] -> [..., K] (float32)."""
  proj = proj.astype(jnp.float32)
  embs = embs.astype(jnp.float32)
  p = proj / jnp.maximum(jnp.linalg.norm(proj, axis=-1, keepdims=True), eps)
  e = embs / jnp.maximum(jnp.linalg.norm(embs, axis=-1, keepdims=True), eps)
  return (p @ e.T) / temp


class MERTPretrainHeads(nnx.Module):
  """What pretraining adds beside the encoder (not part of the exported MERT): an untied final projection
  per codebook (one Linear to final_dim * C, split, as MERT's untie_final_proj), the codes' label
  embeddings (uniform [0, 1) init, as HuBERT's label_embs_concat), and the CQT regression Linear."""

  def __init__(self, cfg: PretrainConfig, *, hidden_size: int, rngs: nnx.Rngs):
    self.cfg = cfg
    n = len(cfg.codebook_sizes)
    self.final_proj = torch_linear(hidden_size, cfg.final_dim * n, rngs=rngs, in_axis="embed", out_axis=None)
    self.label_embs = param(rngs, nnx.initializers.uniform(1.0), (sum(cfg.codebook_sizes), cfg.final_dim),
                            (None, None))
    self.cqt_proj = torch_linear(hidden_size, cfg.cqt_bins, rngs=rngs, in_axis="embed", out_axis=None)

  def logits(self, h: jax.Array) -> list[jax.Array]:
    """[B, T, D] -> one [B, T, K_i] array per codebook (float32)."""
    cfg = self.cfg
    proj = self.final_proj(h.astype(jnp.float32))
    projs = jnp.split(proj, len(cfg.codebook_sizes), axis=-1)
    bounds = list(itertools.accumulate(cfg.codebook_sizes))[:-1]
    embs = jnp.split(self.label_embs[...], bounds, axis=0)
    return [cosine_logits(p, e, cfg.logit_temp) for p, e in zip(projs, embs)]

  def cqt(self, h: jax.Array) -> jax.Array:
    return self.cqt_proj(h.astype(jnp.float32))


class MERTPretrainer(nnx.Module):
  """Encoder + heads; `loss(batch)` -> (loss, masked frames) is what the shared train step differentiates.

  batch: audio [B, S] float32, audio_len [B] int32 (optional: all S), codes [B, C, T] int32 (-1 = no
  target), cqt [B, T, bins] float32 (standardised log-CQT)."""

  def __init__(self, encoder: MERT, heads: MERTPretrainHeads, *, rngs: nnx.Rngs):
    if encoder.masked_spec_embed is None:
      raise ValueError("the encoder has no masked_spec_embed (its MERTConfig.mask_time_prob is 0): masked "
                       "prediction needs it")
    self.encoder = encoder
    self.heads = heads
    self.cfg = heads.cfg
    self.rngs = rngs["dropout"].fork()   # the mask draws; the train step reseeds it every step
    self.deterministic = False

  def set_view(self, deterministic: bool | None = None):
    """Used by nnx.view / Module.train / Module.eval (eval mode: the fixed eval masks)."""
    if deterministic is not None:
      self.deterministic = deterministic

  def frame_lengths(self, batch: dict, num_frames: int) -> jax.Array:
    b = batch["audio"].shape[0]
    if batch.get("audio_len") is None:
      return jnp.full((b,), num_frames, jnp.int32)
    return jnp.minimum(self.encoder.feature_lengths(batch["audio_len"].astype(jnp.int32)), num_frames)

  def mask_key(self) -> jax.Array:
    return jax.random.key(self.cfg.eval_mask_seed) if self.deterministic else self.rngs()

  def terms(self, batch: dict, mask: jax.Array | None = None) -> dict[str, jax.Array]:
    """Every loss term and metric of `batch`; `mask` [B, T] bool overrides the drawn span mask (tests)."""
    cfg, enc = self.cfg, self.encoder
    audio = batch["audio"]
    audio_len = batch.get("audio_len")
    attention_mask = pad = None
    if audio_len is not None:
      attention_mask = jnp.arange(audio.shape[1])[None, :] < audio_len[:, None]
      pad = audio_len
    feats = enc.extract_features(audio, pad_samples=pad)            # [B, T, C]
    t = feats.shape[1]
    lengths = self.frame_lengths(batch, t)
    valid = jnp.arange(t)[None, :] < lengths[:, None]               # [B, T]
    f32 = feats.astype(jnp.float32)
    pen = (jnp.square(f32).mean(-1) * valid).sum() / jnp.maximum(valid.sum(), 1)
    feats = grad_multiply(feats, cfg.feature_grad_mult)
    if mask is None:
      mask = time_mask_indices(self.mask_key(), lengths, t, mask_prob=cfg.mask_prob,
                               mask_length=cfg.mask_length, min_masks=cfg.mask_min)
    mask = mask & valid
    h = enc.encode_features(feats, attention_mask, mask_time_indices=mask)[-1]   # [B, T, D]
    codes = batch["codes"].astype(jnp.int32)[:, :, :t]                          # [B, C, T]
    unmasked = valid & ~mask
    out = {"features_pen": pen}
    loss = cfg.feature_pen_weight * pen

    def mean_over(x, sel):
      return jnp.where(sel, x, 0.0).sum() / jnp.maximum(sel.sum(), 1)

    for i, logits in enumerate(self.heads.logits(h)):
      target = codes[:, i]
      ce = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.maximum(target, 0))
      out[f"ce_{i}"] = mean_over(ce, mask & (target >= 0))
      out[f"acc_{i}"] = mean_over(logits.argmax(-1) == target, mask & (target >= 0))
      loss = loss + out[f"ce_{i}"]
      if cfg.nomask_weight:
        out[f"ce_{i}_unmasked"] = mean_over(ce, unmasked & (target >= 0))
        loss = loss + cfg.nomask_weight * out[f"ce_{i}_unmasked"]
    err = jnp.square(self.heads.cqt(h) - batch["cqt"][:, :t].astype(jnp.float32)).mean(-1)   # [B, T]
    out["cqt_mse"] = mean_over(err, mask)
    loss = loss + cfg.cqt_weight * out["cqt_mse"]
    if cfg.nomask_weight:
      out["cqt_mse_unmasked"] = mean_over(err, unmasked)
      loss = loss + cfg.nomask_weight * cfg.cqt_weight * out["cqt_mse_unmasked"]
    out["loss"] = loss
    out["count"] = mask.sum().astype(jnp.int32)
    out["mask_fraction"] = mask.sum() / jnp.maximum(valid.sum(), 1)
    return out

  def loss(self, batch: dict, *, loss_positions: int | None = None) -> tuple[jax.Array, jax.Array]:
    """(loss, masked frames): the interface `train.make_train_step` / `make_eval_step` call."""
    del loss_positions  # a MusiLingo LM-head option; nothing here
    t = self.terms(batch)
    return t["loss"], t["count"]
