"""The PyTorch reference of the MusiLingo step (docs/reference.md): parity tests and benchmarks use it.

  * `TorchMusiLingo.from_ours(model)`: a `transformers.HubertModel` + `torch.nn.Linear` + `LlamaForCausalLM`
    holding the same weights as our MusiLingo, copied one tensor at a time through the key tables
    (`mert.HF_KEY_RULES`, `llama.HF_KEY_RULES`); `load_into_ours` goes the other way.
  * `reference_loss`: the reference's encode_audio / instruction_prompt_wrap / forward, one micro-batch:
    mean over all hidden states, mean pooling over windows of `pool` frames (leftover window = one more token),
    the projection, right padding of each segment to the batch's longest (pad = eos), BOS inserted as an
    embedding, labels only on the answer, shifted cross-entropy averaged over the batch's label tokens.
  * `add_lora` / `LoRALinear`: the same adapter as ours (y = x W + dropout(x) A B * alpha / rank, B = 0 at
    start) on chosen linear layers of the torch LLaMA.
  * `TorchTrainStep`: the eager train step the reference runs: AdamW (b1 0.9, b2 0.999, eps 1e-8), weight
    decay 0.05 on matrices only, over the projection (and the LoRA adapters, if any), everything else frozen;
    the frozen encoder runs without a backward graph (its parameters do not require grad in the reference).

float32 throughout (the reference trains under fp16 autocast on GPU; on CPU we compare in float32).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import warnings
from typing import Sequence

import jax.numpy as jnp
import numpy as np
import torch
import transformers

from musilingo_jax.convert.hf import load_hf_tensors
from musilingo_jax.convert.rules import rule_for_ours
from musilingo_jax.convert.state import flat_params
from musilingo_jax.models import llama, mert
from musilingo_jax.torch_inference import pooled_features

BOS, PAD = 1, 2  # LLaMA's ids (pad = eos, as the reference's tokenizer)


# ---- weights: ours <-> torch through the key tables ----------------------------------------------------

def _copy_ours_to_torch(ours_module, rules, torch_module: torch.nn.Module) -> set[str]:
  """Streams our base parameters (HF names, torch layouts; LoRA adapters NOT merged) into `torch_module`'s
  matching state_dict entries, one tensor at a time. Raises if a torch parameter is left unset."""
  sd = torch_module.state_dict()
  seen = set()
  with torch.no_grad(), warnings.catch_warnings():
    warnings.simplefilter("ignore", UserWarning)  # read-only numpy views of our arrays: we only read them
    for path, var in flat_params(ours_module).items():
      rule, groups = rule_for_ours(rules, path)
      names = rule.hf_names(groups)
      name = next((n for n in names if n in sd), names[0])
      if name not in sd:
        raise KeyError(f"torch module has no {name!r} (for our {path})")
      value = rule.transform.to_hf(np.asarray(var[...]))
      target = sd[name]
      if tuple(target.shape) != tuple(value.shape):
        raise ValueError(f"{name}: torch shape {tuple(target.shape)} != ours {tuple(value.shape)}")
      target.copy_(torch.from_numpy(np.ascontiguousarray(value, dtype=np.float32)))
      seen.add(name)
  head = getattr(torch_module, "lm_head", None)
  tied = ({"lm_head.weight"} if head is not None and "model.embed_tokens.weight" in seen
          and head.weight is torch_module.model.embed_tokens.weight else set())
  left = sorted(set(sd) - seen - tied)
  if left:
    raise KeyError(f"torch parameters not set from ours: {left[:10]}")
  return seen


def _no_init(init: bool):
  """A context that skips transformers' weight init when every weight is overwritten next (fast at 7B dims)."""
  if init:
    return contextlib.nullcontext()
  from transformers.initialization import no_init_weights
  return no_init_weights()


def _hubert(encoder_cfg, init: bool = True) -> transformers.HubertModel:
  with _no_init(init):
    return transformers.HubertModel(transformers.HubertConfig(**encoder_cfg.to_hf_config())).eval()


def _llama(llm_cfg, init: bool = True) -> transformers.LlamaForCausalLM:
  cfg = transformers.LlamaConfig(**llm_cfg.to_hf_config())
  cfg._attn_implementation = "sdpa"  # transformers' default on CPU; the eager reference's fastest path
  with _no_init(init):
    lm = transformers.LlamaForCausalLM(cfg).eval()
  if llm_cfg.tie_word_embeddings and lm.lm_head.weight is not lm.model.embed_tokens.weight:
    lm.lm_head.weight = lm.model.embed_tokens.weight  # no_init_weights skips the tying too
  return lm


@dataclasses.dataclass
class TorchMusiLingo:
  """The reference composition in PyTorch (encoder may be None: features precomputed)."""
  hub: transformers.HubertModel | None
  lm: transformers.LlamaForCausalLM
  proj: torch.nn.Linear
  pool: int

  @classmethod
  def from_ours(cls, model, *, with_encoder: bool = True) -> "TorchMusiLingo":
    """Torch modules holding `model`'s weights (a MusiLingo). LoRA adapters, if any, are not merged: the
    torch LLaMA gets the base kernels; add the adapters with `add_lora` + `copy_lora_from_ours`."""
    cfg = model.cfg
    hub = None
    if with_encoder:
      hub = _hubert(cfg.encoder, init=False)  # every parameter is set from ours (checked)
      _copy_ours_to_torch(model.encoder, mert.HF_KEY_RULES, hub)
    lm = _llama(cfg.llm, init=False)
    _copy_ours_to_torch(model.llm, llama.HF_KEY_RULES, lm)
    ref = cls(hub=hub, lm=lm, proj=torch.nn.Linear(cfg.encoder.hidden_size, cfg.llm.hidden_size),
              pool=cfg.pool_frames)
    ref.copy_projection_from_ours(model)
    return ref

  def copy_projection_from_ours(self, model) -> None:
    """Sets the torch projection to `model.llama_proj` (e.g. to restart from the same point)."""
    with torch.no_grad():
      kernel, bias = model.projection_weights()
      self.proj.weight.copy_(torch.from_numpy(np.asarray(kernel, np.float32).T.copy()))
      self.proj.bias.copy_(torch.from_numpy(np.asarray(bias, np.float32)))

  @classmethod
  def random(cls, cfg, *, with_encoder: bool = True) -> "TorchMusiLingo":
    """transformers' own random init (for tests that go torch -> ours with `load_into_ours`)."""
    hub = _hubert(cfg.encoder) if with_encoder else None
    return cls(hub=hub, lm=_llama(cfg.llm), proj=torch.nn.Linear(cfg.encoder.hidden_size, cfg.llm.hidden_size),
               pool=cfg.pool_frames)

  def load_into_ours(self, model) -> None:
    """Sets `model`'s encoder, LLM and projection from these torch modules (the key tables, in memory)."""
    if self.hub is not None:
      load_hf_tensors(model.encoder, mert.HF_KEY_RULES, {k: v.numpy() for k, v in self.hub.state_dict().items()})
    load_hf_tensors(model.llm, llama.HF_KEY_RULES, {k: v.numpy() for k, v in self.lm.state_dict().items()},
                    ignore=llama.hf_ignore_keys(model.cfg.llm))
    model.llama_proj.kernel.set_value(jnp.asarray(self.proj.weight.detach().numpy().T))
    model.llama_proj.bias.set_value(jnp.asarray(self.proj.bias.detach().numpy()))
    model.set_feature_norm(None, None)  # torch's projection works on raw features


# ---- LoRA ----------------------------------------------------------------------------------------------

class LoRALinear(torch.nn.Module):
  """base(x) + dropout(x) @ A @ B * alpha / rank; A [in, r], B [r, out] (our layout), B starts at zero."""

  def __init__(self, base: torch.nn.Linear, rank: int, alpha: float, dropout: float = 0.0):
    super().__init__()
    self.base = base
    self.base.weight.requires_grad_(False)
    self.lora_a = torch.nn.Parameter(torch.empty(base.in_features, rank))
    torch.nn.init.kaiming_uniform_(self.lora_a.T, a=math.sqrt(5))
    self.lora_b = torch.nn.Parameter(torch.zeros(rank, base.out_features))
    self.scale = alpha / rank
    self.dropout = torch.nn.Dropout(dropout) if dropout > 0 else torch.nn.Identity()

  def forward(self, x):
    return self.base(x) + (self.dropout(x) @ self.lora_a @ self.lora_b) * self.scale


def add_lora(lm: transformers.LlamaForCausalLM, *, rank: int, alpha: float, dropout: float = 0.0,
             target_modules: Sequence[str] = ("q_proj", "v_proj")) -> list[torch.nn.Parameter]:
  """Wraps the named linear layers of every decoder layer; returns the adapter parameters."""
  params = []
  for layer in lm.model.layers:
    for parent in (layer.self_attn, layer.mlp):
      for name in target_modules:
        base = getattr(parent, name, None)
        if isinstance(base, torch.nn.Linear):
          wrapped = LoRALinear(base, rank, alpha, dropout)
          setattr(parent, name, wrapped)
          params += [wrapped.lora_a, wrapped.lora_b]
  if not params:
    raise ValueError(f"no linear layer named {list(target_modules)} in the LLaMA decoder layers")
  return params


def copy_lora_from_ours(model, lm: transformers.LlamaForCausalLM) -> int:
  """Copies our adapters (`model.llm.model.layers.{i}.{self_attn|mlp}.{name}.lora_a/lora_b`) into `add_lora`'s."""
  n = 0
  with torch.no_grad():
    for ours_layer, layer in zip(model.llm.model.layers, lm.model.layers):
      for ours_parent, parent in ((ours_layer.self_attn, layer.self_attn), (ours_layer.mlp, layer.mlp)):
        for name, mod in parent.named_children():
          if isinstance(mod, LoRALinear):
            src = getattr(ours_parent, name)
            mod.lora_a.copy_(torch.from_numpy(np.asarray(src.lora_a[...], np.float32)))
            mod.lora_b.copy_(torch.from_numpy(np.asarray(src.lora_b[...], np.float32)))
            n += 1
  return n


# ---- the reference loss --------------------------------------------------------------------------------

def pad_clips(clips) -> tuple[np.ndarray, np.ndarray]:
  """The reference collater's audio: clips zero-padded to the micro-batch's longest, and the attention mask."""
  L = max(len(a) for a in clips)
  audio = np.zeros((len(clips), L), np.float32)
  mask = np.zeros((len(clips), L), np.int64)
  for i, a in enumerate(clips):
    audio[i, :len(a)] = a
    mask[i, :len(a)] = 1
  return audio, mask


def encode_audio(hub, audio, pool: int, attention_mask=None) -> torch.Tensor:
  """Raw audio [B, S] -> pooled features [B, ceil(T / pool), D]: mean over all hidden states, then over
  windows of `pool` frames (padded frames included; a leftover window is one more token). The product's
  PyTorch path (torch_inference.pooled_features) is the reference's encode_audio: one implementation."""
  return pooled_features(hub, audio, pool, attention_mask)


def _pad(seqs, pad):
  """Right padding with pad = eos, as the tokenizer does with padding="longest"."""
  L = max(len(s) for s in seqs)
  ids = torch.full((len(seqs), L), pad, dtype=torch.long)
  att = torch.zeros((len(seqs), L), dtype=torch.long)
  for i, s in enumerate(seqs):
    ids[i, :len(s)] = torch.as_tensor(np.asarray(s), dtype=torch.long)
    att[i, :len(s)] = 1
  return ids, att


def reference_loss(hub, lm, proj, audio, exs, pool, *, features=None, bos: int = BOS, pad: int = PAD,
                   audio_mask=None):
  """The reference's encode_audio / instruction_prompt_wrap / forward, for ONE micro-batch.

  exs: per example {"before", "after", "answer"} token ids (each segment tokenized on its own). `audio`
  [B, S] runs the encoder (no backward graph through it: frozen), with `audio_mask` [B, S] when the clips
  were padded to the longest (`pad_clips`); or pass pooled `features` [B, T', D].
  """
  if features is None:
    with torch.no_grad():
      avg = encode_audio(hub, audio, pool, audio_mask)
  else:
    avg = torch.as_tensor(features)
  audio_embeds = proj(avg)
  B = audio_embeds.shape[0]

  emb = lm.model.embed_tokens
  before, atts_b = _pad([e["before"] for e in exs], pad)
  after, atts_a = _pad([e["after"] for e in exs], pad)
  answer, atts_t = _pad([e["answer"] for e in exs], pad)
  wrapped = torch.cat([emb(before), audio_embeds, emb(after)], dim=1)
  atts = torch.cat([atts_b, torch.ones(audio_embeds.shape[:2], dtype=torch.long), atts_a], dim=1)
  targets = answer.masked_fill(answer == pad, -100)
  targets = torch.cat([torch.full((B, atts.shape[1] + 1), -100), targets], dim=1)
  bos_emb = emb(torch.full((B, 1), bos))
  inputs = torch.cat([bos_emb, wrapped, emb(answer)], dim=1)
  mask = torch.cat([atts[:, :1], atts, atts_t], dim=1)
  return lm(inputs_embeds=inputs, attention_mask=mask, labels=targets).loss


def sequence_length(exs, n_audio_tokens: int) -> int:
  """The reference's padded length for `exs`: BOS + longest p_before + audio + longest p_after + longest answer
  (give this as `max_len` to `prompts.collate` and both sides process the same [B, L])."""
  return (1 + max(len(e["before"]) for e in exs) + n_audio_tokens + max(len(e["after"]) for e in exs)
          + max(len(e["answer"]) for e in exs))


# ---- the eager train step ------------------------------------------------------------------------------

class TorchTrainStep:
  """One reference optimizer step: zero_grad, loss, backward, AdamW on the trainable tensors only."""

  def __init__(self, ref: TorchMusiLingo, *, lora_params: Sequence[torch.nn.Parameter] = (), lr: float = 1e-4,
               weight_decay: float = 0.05, betas=(0.9, 0.999), eps: float = 1e-8, autocast=None):
    """autocast: a torch dtype to run the loss under torch.autocast (the reference trains under fp16 autocast
    on GPUs; on CPU bfloat16 is the supported one), None for float32."""
    self.ref, self.autocast = ref, autocast
    for module in (ref.hub, ref.lm):
      if module is not None:
        module.requires_grad_(False)
    for p in lora_params:
      p.requires_grad_(True)
    ref.proj.requires_grad_(True)
    self.trainable = list(ref.proj.parameters()) + list(lora_params)
    decay = [p for p in self.trainable if p.ndim >= 2]
    no_decay = [p for p in self.trainable if p.ndim < 2]
    self.opt = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                                  {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=betas, eps=eps)

  def num_trainable(self) -> int:
    return sum(p.numel() for p in self.trainable)

  def __call__(self, exs, *, audio=None, features=None, bos: int = BOS, pad: int = PAD) -> float:
    r = self.ref
    self.opt.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=self.autocast, enabled=self.autocast is not None):
      loss = reference_loss(r.hub, r.lm, r.proj, audio, exs, r.pool, features=features, bos=bos, pad=pad)
    loss.backward()
    self.opt.step()
    return float(loss.detach())
