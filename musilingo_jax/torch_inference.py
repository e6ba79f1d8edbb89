"""MusiLingo in PyTorch, from an export folder (`musilingo-export`, musilingo_jax/export.py).

  from musilingo_jax.torch_inference import MusiLingoTorch
  m = MusiLingoTorch.from_export("exported/")
  print(m.answer("What instrument is playing?", audio=m.load_audio("song.wav"), greedy=True))

The parts are plain transformers / PyTorch modules: `m.encoder` (HubertModel), `m.projection`
(torch.nn.Linear), `m.llm` (LlamaForCausalLM, or a peft.PeftModel over llm_base/ + adapter/). Prompts,
tokenization and the answer's post-processing are the package's own (musilingo_jax.prompts,
musilingo_jax.tokenizer: numpy, no JAX), so ids match ours exactly; greedy answers equal the JAX model's
token for token (tests/test_export.py). torch is imported here and nowhere else in the product code.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import transformers

from musilingo_jax import prompts
from musilingo_jax.tokenizer import Tokenizer


def pooled_features(encoder: transformers.HubertModel, audio, pool: int, attention_mask=None) -> torch.Tensor:
  """Raw 24 kHz audio [B, S] -> pooled features [B, ceil(T / pool), D] (float32): the mean over all hidden
  states, then over windows of `pool` frames (padded frames included; a leftover window is one more token).

  transformers 5 returns the pre-LayerNorm last state in hidden_states on the pre-LN path; MERT's own code
  (and transformers 4) averages the normed one, which is last_hidden_state."""
  mask = None if attention_mask is None else torch.as_tensor(attention_mask)
  out = encoder(torch.as_tensor(audio), attention_mask=mask, output_hidden_states=True)
  states = list(out.hidden_states[:-1]) + [out.last_hidden_state]
  h = torch.stack([s.float() for s in states]).transpose(0, 1).mean(-3)  # [B, T, D]
  B, T, D = h.shape
  avg = h[:, :T // pool * pool].reshape(B, T // pool, pool, D).mean(2)
  if T % pool:
    avg = torch.cat([avg, h[:, T // pool * pool:].reshape(B, 1, T % pool, D).mean(2)], dim=1)
  return avg


class StopOnSequences(transformers.StoppingCriteria):
  """Stops a row once its generated ids end with one of `sequences` (the reference's "###" spellings)."""

  def __init__(self, sequences: Sequence[Sequence[int]], prompt_length: int = 0):
    self.sequences = [torch.as_tensor(list(s)) for s in sequences if len(s)]
    self.prompt_length = prompt_length

  def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
    generated = input_ids[:, self.prompt_length:]
    done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
    for s in self.sequences:
      if generated.shape[1] >= len(s):
        done |= (generated[:, -len(s):] == s.to(input_ids.device)).all(-1)
    return done


class MusiLingoTorch:
  """Encoder + projection + LLM from an export folder; `answer` / `generate_ids` / `Chat`-style history."""

  def __init__(self, encoder, projection: torch.nn.Linear, llm, tokenizer: Tokenizer, config: dict):
    self.encoder, self.projection, self.llm, self.tokenizer, self.config = encoder, projection, llm, tokenizer, config
    p = config["prompt"]
    self.prompt_cfg = prompts.PromptConfig(template=p["template"], end_sym=p["end_sym"], max_txt_len=p["max_txt_len"])
    self.pool = int(config["pool_frames"])
    self.stop_sequences = [list(s) for s in config["tokens"]["stop_sequences"]]

  @classmethod
  def from_export(cls, path: str | os.PathLike, *, dtype: torch.dtype | None = None, llm: str = "auto",
                  base_model: str | os.PathLike | None = None) -> "MusiLingoTorch":
    """Loads an export folder. dtype: the encoder's and LLM's (default: as exported); the projection stays
    float32. llm: "merged" (llm/), "adapter" (a peft.PeftModel of llm_base/ or `base_model` + adapter/), or
    "auto" (merged when exported, else the adapter)."""
    root = Path(path)
    cfg_file = root / "musilingo_config.json"
    if not cfg_file.is_file():
      raise FileNotFoundError(f"{cfg_file}: missing (is {root} a musilingo-export folder?)")
    config = json.loads(cfg_file.read_text())
    parts = config["parts"]
    dtype = dtype or getattr(torch, config.get("dtype", "float32"))
    if not parts.get("encoder"):
      raise ValueError(f"{root}: exported without the encoder (--no-encoder): pass features to answer()")
    encoder = transformers.HubertModel.from_pretrained(root / parts["encoder"], dtype=dtype).eval()
    from safetensors.torch import load_file
    proj_sd = load_file(root / config["projection"]["file"])
    projection = torch.nn.Linear(config["projection"]["in_features"], config["projection"]["out_features"])
    projection.load_state_dict({"weight": proj_sd["llama_proj.weight"], "bias": proj_sd["llama_proj.bias"]})
    mode = llm if llm != "auto" else ("merged" if parts.get("llm") else "adapter")
    if mode == "merged":
      if not parts.get("llm"):
        raise ValueError(f"{root}: exported without the merged LLM (llm/)")
      lm_dir = root / parts["llm"]
      lm = transformers.LlamaForCausalLM.from_pretrained(lm_dir, dtype=dtype)
    elif mode == "adapter":
      if not parts.get("adapter"):
        raise ValueError(f"{root}: no adapter/ (not a LoRA run)")
      base = base_model or (root / parts["llm_base"] if parts.get("llm_base") else None)
      if base is None:
        raise ValueError(f"{root}: no llm_base/ in the export: pass base_model= (the LLM the adapter was trained on)")
      import peft  # optional: only the adapter path needs it
      lm_dir = Path(base)
      lm = peft.PeftModel.from_pretrained(transformers.LlamaForCausalLM.from_pretrained(base, dtype=dtype),
                                          root / parts["adapter"])
    else:
      raise ValueError(f"llm must be 'auto', 'merged' or 'adapter', got {llm!r}")
    tok_dir = lm_dir if (lm_dir / "tokenizer_config.json").is_file() else root / (parts.get("llm") or "")
    return cls(encoder, projection.eval(), lm.eval(), Tokenizer.from_dir(tok_dir), config)

  # ---- audio -----------------------------------------------------------------------------------------

  def load_audio(self, path: str | os.PathLike) -> np.ndarray:
    """A file -> 24 kHz mono float32, its first `audio.max_seconds`, normalised if the run's data was."""
    import librosa
    a = self.config["audio"]
    x, _ = librosa.load(os.fspath(path), sr=a["sampling_rate"], mono=True, duration=a["max_seconds"])
    return self.normalize(x)

  def normalize(self, x: np.ndarray) -> np.ndarray:
    """The feature extractor's per-clip normalisation when the run used it (audio.normalize)."""
    x = np.asarray(x, np.float32)
    if self.config["audio"]["normalize"]:
      x = (x - x.mean()) / np.sqrt(x.var() + 1e-7)
    return x

  @torch.no_grad()
  def encode(self, audio) -> torch.Tensor:
    """24 kHz mono audio [S] -> pooled encoder features [T', D_enc] (float32)."""
    x = torch.as_tensor(np.asarray(audio, np.float32))[None].to(self.encoder.dtype)
    return pooled_features(self.encoder, x, self.pool)[0]

  # ---- prompts and generation --------------------------------------------------------------------------

  def _embed(self, ids: Sequence[int]) -> torch.Tensor:
    table = self.llm.get_input_embeddings()
    return table(torch.as_tensor([list(ids)], dtype=torch.long))[0]

  @torch.no_grad()
  def prompt_embeddings(self, question: str | None, features, history: Sequence[tuple[str, str]] = ()):
    """inputs_embeds [1, L, D_llm]: [BOS] + p_before + projected audio + p_after (musilingo_config.json's prompt)."""
    if self.prompt_cfg.template:
      before, after = prompts.chat_segments(list(history), question, self.prompt_cfg)
    else:
      before, after = "", ""
    tok = self.tokenizer
    head = ([tok.bos_id] if tok.bos_id is not None else []) + list(tok.encode(before) if before else [])
    tail = list(tok.encode(after) if after else [])
    audio = self.projection(torch.as_tensor(np.array(features, np.float32)))
    dtype = self.llm.get_input_embeddings().weight.dtype
    parts = [self._embed(head), audio.to(dtype)] + ([self._embed(tail)] if tail else [])
    return torch.cat(parts)[None]

  @torch.no_grad()
  def generate_ids(self, question: str | None, *, audio=None, features=None, history=(), greedy: bool = False,
                   max_new_tokens: int | None = None, temperature: float | None = None, top_p: float | None = None,
                   top_k: int | None = None, seed: int = 0) -> list[int]:
    """Generated ids up to and including the stop sequence or EOS that ended the answer. Sampling defaults
    are the export's (the reference's: temperature 0.1, top-p 0.5, top-k 50, 300 new tokens)."""
    if (audio is None) == (features is None):
      raise ValueError("give exactly one of audio [S] (24 kHz mono) or features [T', D_enc]")
    if features is None:
      features = self.encode(audio)
    g = self.config["generation"]
    embeds = self.prompt_embeddings(question, features, history)
    kwargs = dict(max_new_tokens=max_new_tokens or g["max_new_tokens"], num_beams=1,
                  eos_token_id=[self.tokenizer.eos_id], pad_token_id=self.tokenizer.eos_id,
                  stopping_criteria=transformers.StoppingCriteriaList([StopOnSequences(self.stop_sequences)]))
    if greedy:
      kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    else:
      torch.manual_seed(seed)
      kwargs.update(do_sample=True, temperature=temperature or g["temperature"], top_p=top_p or g["top_p"],
                    top_k=top_k or g["top_k"])
    out = self.llm.generate(inputs_embeds=embeds, attention_mask=torch.ones(embeds.shape[:2], dtype=torch.long),
                            **kwargs)
    ids = out[0].tolist()
    stops = [list(s) for s in self.stop_sequences] + [[self.tokenizer.eos_id]]
    for n in range(1, len(ids) + 1):  # generate() pads a finished row: cut at the first stop
      if any(n >= len(s) and ids[n - len(s):n] == s for s in stops):
        return ids[:n]
    return ids

  def answer(self, question: str | None, *, history=(), **kwargs) -> str:
    """The answer text, post-processed as the reference (prompts.postprocess)."""
    return prompts.postprocess(self.generate_ids(question, history=history, **kwargs), self.tokenizer)[1]
