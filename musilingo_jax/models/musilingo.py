"""MusiLingo: frozen MERT -> mean over all hidden states -> temporal mean pooling -> llama_proj -> frozen LLM.

The reference's composition (docs/reference.md), exactly:
  * all encoder hidden states (25 for MERT-330M) are averaged -> [B, T, D_enc] at 75 frames/s;
  * non-overlapping mean over windows of `pool_frames` (t = 325) frames; a shorter leftover window is
    one more token, so T' = ceil(T / t); padded frames are included in the mean (no mask-aware pooling);
  * `llama_proj = Linear(D_enc, D_llm, bias=True)`: the only trainable parameters in the reference;
  * the projected audio tokens fill the audio positions of the token sequence built by `prompts.collate`
    (`audio_tokens` per row; a static array may hold more slots than a row uses, never spliced).

Optional, off in the reference presets: a fixed per-dimension standardisation of the projection's input
(`set_feature_norm`, statistics of the training set's pooled features). A random encoder's features share
one large common component (cosine similarity ~0.97 between demo clips), which conditions the projection's
training badly; standardised, the differences between clips carry the signal. `projection_weights` folds it
into an equivalent plain Linear for export, so the exported projection works on raw features.

Two ways in, giving the same loss: raw audio windows (`batch["audio"]`, the encoder runs inside the step
under stop_gradient) or features precomputed by `pooled_features` (`batch["features"]`). Pooling commutes
with the affine projection, so precomputing the pooled features loses nothing.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from musilingo_jax.models import layers
from musilingo_jax.models.llama import Llama, LlamaConfig
from musilingo_jax.models.mert import MERT, MERTConfig


@dataclasses.dataclass(frozen=True)
class MusiLingoConfig:
  encoder: MERTConfig
  llm: LlamaConfig
  pool_frames: int = 325
  lora: layers.LoRAConfig | None = None


def pool_time(h: jax.Array, pool_frames: int, num_frames: jax.Array | None = None) -> jax.Array:
  """[B, T, D] -> [B, ceil(T / t), D]: mean over full windows of t frames, then the leftover window.

  num_frames [B]: pool only each row's first frames (a batch padded to a static T pools as if it had
  T = num_frames: windows past it come out zero, the leftover window averages only frames before it).
  """
  B, T, D = h.shape
  if num_frames is None:
    n_full = T // pool_frames
    parts = []
    if n_full:
      parts.append(h[:, :n_full * pool_frames].reshape(B, n_full, pool_frames, D).mean(axis=2))
    if T % pool_frames:
      parts.append(h[:, n_full * pool_frames:].mean(axis=1, keepdims=True))
    return jnp.concatenate(parts, axis=1) if len(parts) > 1 else parts[0]
  n_win = -(-T // pool_frames)
  h = jnp.pad(h, ((0, 0), (0, n_win * pool_frames - T), (0, 0)))
  w = (jnp.arange(n_win * pool_frames)[None, :] < num_frames[:, None]).astype(h.dtype)  # [B, T_pad]
  sums = (h * w[..., None]).reshape(B, n_win, pool_frames, D).sum(axis=2)
  counts = w.reshape(B, n_win, pool_frames).sum(axis=2)[..., None]
  return sums / jnp.maximum(counts, 1.0)


def pooled_features(encoder: MERT, audio: jax.Array, pool_frames: int, audio_len: jax.Array | None = None,
                    pad_len: jax.Array | None = None) -> jax.Array:
  """Raw 24 kHz audio [B, S] -> pooled encoder features [B, ceil(T / t), D_enc] in float32.

  The same function serves the step (encoder inside) and precompute (once per clip), so both give the
  same numbers. Mean over hidden states is taken in float32.

  audio_len [B] (true samples) and pad_len [B] (the length the row's batch was zero-padded to: its longest
  clip) reproduce the reference's padded batch inside a static S >= pad_len: an attention mask from
  audio_len, GroupNorm statistics and pooling over pad_len's frames (padded frames included in the mean,
  as the reference does). Token k of a row is then exactly the reference's; tokens past
  ceil(frames(pad_len) / t) are zero and never spliced (see `splice`).
  """
  if audio_len is None:
    states = encoder(audio)
    num_frames = None
  else:
    pad_len = audio_len if pad_len is None else pad_len
    mask = jnp.arange(audio.shape[1])[None, :] < audio_len[:, None]
    states = encoder(audio, attention_mask=mask, pad_samples=pad_len)
    num_frames = encoder.feature_lengths(pad_len.astype(jnp.int32))
  mean = sum(s.astype(jnp.float32) for s in states) / len(states)  # [B, T, D_enc]
  return pool_time(mean, pool_frames, num_frames)


def splice(embeds: jax.Array, audio: jax.Array, audio_start: jax.Array,
           audio_tokens: jax.Array | None = None) -> jax.Array:
  """Puts audio tokens [B, T', D] into token embeddings [B, L, D]: row b's first `audio_tokens[b]` tokens
  (all T' if None) at positions audio_start[b], audio_start[b] + 1, ...; every other position keeps its
  token embedding (unused slots never overwrite a prompt position)."""
  B, L, _ = embeds.shape
  n = jnp.full((B,), audio.shape[1], jnp.int32) if audio_tokens is None else audio_tokens.astype(jnp.int32)
  idx = jnp.arange(L)[None, :] - audio_start[:, None].astype(jnp.int32)          # [B, L]
  inside = (idx >= 0) & (idx < n[:, None])
  picked = jnp.take_along_axis(audio, jnp.clip(idx, 0, audio.shape[1] - 1)[..., None], axis=1)  # [B, L, D]
  return jnp.where(inside[..., None], picked.astype(embeds.dtype), embeds)


class FeatureStat(nnx.Variable):
  """A fixed (never trained) statistic of the data: not an nnx.Param, so no filter makes it trainable."""


class FeatureNorm(nnx.Module):
  """x -> (x - mean) * inv_std, per feature dimension."""

  def __init__(self, mean, std, eps: float = 1e-6, *, inv_std=None):
    mean = jnp.asarray(mean, jnp.float32)
    # inv_std: the reciprocals as stored by a run (exact), instead of recomputing them from std.
    inv = jnp.asarray(inv_std, jnp.float32) if inv_std is not None else 1.0 / jnp.maximum(
        jnp.asarray(std, jnp.float32), eps)
    if mean.ndim != 1 or mean.shape != inv.shape:
      raise ValueError(f"feature statistics must be two vectors of the same length, got {mean.shape} and "
                       f"{inv.shape}")
    self.mean = FeatureStat(mean)
    self.inv_std = FeatureStat(inv)

  def __call__(self, x: jax.Array) -> jax.Array:
    return (x - self.mean[...]) * self.inv_std[...]


class MusiLingo(nnx.Module):
  """The composition: `MusiLingo(encoder, llm, projection, pool_frames=..., feature_norm=None)` takes built
  modules (random, converted or abstract: see `musilingo_jax.build`); `MusiLingo.random(cfg, rngs=...)`
  builds all three from configs (tests)."""

  def __init__(self, encoder: MERT, llm: Llama, projection: layers.Linear, *, pool_frames: int = 325,
               feature_norm: FeatureNorm | None = None):
    d_enc, d_llm = encoder.cfg.hidden_size, llm.cfg.hidden_size
    kshape = tuple(projection.kernel.get_value().shape)
    if kshape != (d_enc, d_llm):
      raise ValueError(f"projection kernel {kshape} does not map the encoder's {d_enc} to the LLM's {d_llm}")
    self.cfg = MusiLingoConfig(encoder=encoder.cfg, llm=llm.cfg, pool_frames=pool_frames, lora=llm.lora)
    self.encoder = encoder
    self.llm = llm
    self.llama_proj = projection
    if feature_norm is not None and feature_norm.mean.get_value().shape != (d_enc,):
      raise ValueError(f"feature statistics have shape {feature_norm.mean.get_value().shape}, the encoder "
                       f"{(d_enc,)}")
    self.feature_norm: FeatureNorm | None = nnx.data(feature_norm)

  @classmethod
  def random(cls, cfg: MusiLingoConfig, *, rngs: nnx.Rngs) -> "MusiLingo":
    """Encoder, LLM and projection (torch's Linear init) initialised from `rngs`, in that order."""
    encoder = MERT(cfg.encoder, rngs=rngs)
    llm = Llama(cfg.llm, rngs=rngs, lora=cfg.lora)
    projection = layers.torch_linear(cfg.encoder.hidden_size, cfg.llm.hidden_size, rngs=rngs)
    return cls(encoder, llm, projection, pool_frames=cfg.pool_frames)

  def set_feature_norm(self, mean, std, *, inv_std=None) -> None:
    """Standardise the projection's input with these per-dimension statistics (None, None: off); inv_std: the
    exact reciprocals (a run folder's feature_stats.json) instead of 1 / std."""
    if mean is None:
      self.feature_norm = nnx.data(None)
      return
    if len(mean) != self.cfg.encoder.hidden_size:
      raise ValueError(f"feature statistics have {len(mean)} dimensions, the encoder {self.cfg.encoder.hidden_size}")
    self.feature_norm = nnx.data(FeatureNorm(mean, std, inv_std=inv_std))

  def projection_weights(self) -> tuple[jax.Array, jax.Array]:
    """(kernel [D_enc, D_llm], bias [D_llm]) of the plain Linear on raw features that equals
    feature_norm + llama_proj: kernel * inv_std[:, None], bias - (mean * inv_std) @ kernel."""
    kernel, bias = self.llama_proj.kernel[...], self.llama_proj.bias[...]
    if self.feature_norm is None:
      return kernel, bias
    inv, mean = self.feature_norm.inv_std[...], self.feature_norm.mean[...]
    return kernel * inv[:, None], bias - (mean * inv) @ kernel

  def audio_features(self, batch: dict) -> jax.Array:
    """Pooled encoder features [B, T', D_enc]: precomputed, or computed here with no backward pass."""
    if "features" in batch:
      return batch["features"].astype(jnp.float32)
    audio, audio_len, pad_len = batch["audio"], batch.get("audio_len"), batch.get("audio_pad_len")
    if audio.ndim == 3:  # packed rows: [B, K, S] clips, one per example slot; encoded as B * K clips
      b, k = audio.shape[:2]
      flat = lambda x: None if x is None else x.reshape((b * k,) + x.shape[2:])  # noqa: E731
      feats = pooled_features(self.encoder, flat(audio), self.cfg.pool_frames, flat(audio_len), flat(pad_len))
      return jax.lax.stop_gradient(feats.reshape((b, k) + feats.shape[1:]))
    feats = pooled_features(self.encoder, audio, self.cfg.pool_frames, audio_len, pad_len)
    return jax.lax.stop_gradient(feats)

  def audio_embeddings(self, batch: dict) -> jax.Array:
    feats = self.audio_features(batch)
    if self.feature_norm is not None:
      feats = self.feature_norm(feats)
    return self.llama_proj(feats)  # [B, T', D_llm] ([B, K, T', D_llm] for packed rows), float32

  def input_embeddings(self, batch: dict) -> jax.Array:
    """Token embeddings [B, L, D_llm] with the audio tokens spliced in. Packed rows (audio_start [B, K]) splice
    each example slot's clip at its own offset; a slot with audio_tokens 0 changes nothing."""
    embeds = self.llm.embed(batch["input_ids"])  # [B, L, D_llm]
    audio, start, n = self.audio_embeddings(batch), batch["audio_start"], batch.get("audio_tokens")
    if start.ndim == 1:
      return splice(embeds, audio, start, n)
    for k in range(start.shape[1]):
      embeds = splice(embeds, audio[:, k], start[:, k], None if n is None else n[:, k])
    return embeds

  def _llm_kwargs(self, batch: dict) -> dict:
    return dict(attention_mask=batch["attention_mask"], positions=batch["positions"],
                segment_ids=batch.get("segment_ids"))

  def __call__(self, batch: dict) -> jax.Array:
    """Logits [B, L, vocab] (float32) of the spliced sequence."""
    logits, _ = self.llm(inputs_embeds=self.input_embeddings(batch), **self._llm_kwargs(batch))
    return logits

  def loss(self, batch: dict, *, loss_positions: int | None = None) -> tuple[jax.Array, jax.Array]:
    """The reference loss of `causal_lm_loss` -> (loss, label count).

    loss_positions = K: the LM head and softmax run only at each row's first K label positions (after
    the shift) instead of all L; the same loss whenever no row has more than K labels (answers are cut
    to prompt.max_txt_len tokens, so K = max_txt_len is exact). The head is ~20 % of SmolLM2-135M's
    FLOPs and its [B, L, vocab] logits dominate memory traffic on CPU.
    """
    if loss_positions is None or loss_positions >= batch["labels"].shape[1] - 1:
      return causal_lm_loss(self(batch), batch["labels"])
    h, _ = self.llm.final_hidden(inputs_embeds=self.input_embeddings(batch), **self._llm_kwargs(batch))
    targets = batch["labels"][:, 1:]
    valid = targets != -100
    # Label positions first, in order (a stable sort of the "not a label" flag), then the first K.
    order = jnp.argsort(~valid, axis=1, stable=True)[:, :loss_positions]
    h = jnp.take_along_axis(h[:, :-1], order[..., None], axis=1)          # [B, K, hidden]
    targets = jnp.take_along_axis(targets, order, axis=1)
    picked = jnp.take_along_axis(valid, order, axis=1)
    ce = optax.softmax_cross_entropy_with_integer_labels(self.llm.lm_logits(h), jnp.where(picked, targets, 0))
    count = picked.sum()
    # A row with more than K labels would lose tokens: make that loud (NaN) rather than silently wrong.
    overflow = valid.sum() != count
    loss = jnp.where(picked, ce, 0.0).sum() / jnp.maximum(count, 1)
    return jnp.where(overflow, jnp.nan, loss), count


def causal_lm_loss(logits: jax.Array, labels: jax.Array) -> tuple[jax.Array, jax.Array]:
  """The reference loss: shifted cross-entropy, mean over every non-ignored token of the batch.

  Returns (loss, number of label tokens).
  """
  logits, labels = logits[:, :-1].astype(jnp.float32), labels[:, 1:]
  valid = labels != -100
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.where(valid, labels, 0))
  count = valid.sum()
  loss = jnp.where(valid, ce, 0.0).sum() / jnp.maximum(count, 1)
  return loss, count
