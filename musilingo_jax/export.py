"""A trained MusiLingo -> one folder a PyTorch user can use without reading our code (docs/export.md).

  OUT/
    musilingo_config.json    how the parts fit: pool frames, the audio-token rule, the prompt template and end
                             symbol, stop sequences, sampling defaults, dtypes, audio preprocessing, LoRA,
                             feature statistics (folded into the projection), where each part is
    README.md                a model card: what this is, the layout, how to load and ask it
    projection.safetensors   llama_proj.weight [D_llm, D_enc], llama_proj.bias [D_llm] (float32, torch layout)
    musilingo_checkpoint.pth the same projection in the reference's .pth format
    llm/                     LlamaForCausalLM as save_pretrained writes it (sharded above --max-shard-size, with
                             model.safetensors.index.json), generation_config.json with the reference's
                             sampling, the tokenizer files; LoRA merged
    llm_base/                (optional, LoRA runs) the LLM without the adapters: the PEFT adapter's base
    adapter/                 (LoRA runs) a PEFT LoRA adapter: adapter_config.json + adapter_model.safetensors
    encoder/                 HubertModel directory (MERT's architecture) + preprocessor_config.json

`musilingo_jax.torch_inference` loads such a folder in PyTorch and answers token for token as we do.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from musilingo_jax import prompts
from musilingo_jax.convert.hf import DEFAULT_MAX_SHARD_BYTES, SafetensorsWriter, export_pretrained, iter_lora_adapters
from musilingo_jax.convert.pth import save_musilingo_pth
from musilingo_jax.models import llama, mert

CONFIG_FILE = "musilingo_config.json"
PROJECTION_FILE = "projection.safetensors"
PTH_FILE = "musilingo_checkpoint.pth"
FORMAT = "musilingo-export/1"
# The reference's sampling (docs/reference.md, "Generation and metrics").
SAMPLING = {"do_sample": True, "temperature": 0.1, "top_p": 0.5, "top_k": 50, "num_beams": 1,
            "max_new_tokens": 300, "repetition_penalty": 1.0}


def _stop_sequences(tokenizer) -> list[list[int]]:
  from musilingo_jax.generate import stop_sequences_for  # jax: only when exporting
  return [list(s) for s in stop_sequences_for(tokenizer)]


def generation_config(tokenizer) -> dict[str, Any]:
  """generation_config.json for OUT/llm: the reference's sampling; eos_token_id lists EOS and every
  single-token spelling of the stop text "###" (multi-token spellings are in musilingo_config.json's
  stop_sequences: transformers' generation config has no place for id sequences)."""
  stops = [s[0] for s in _stop_sequences(tokenizer) if len(s) == 1]
  eos = [tokenizer.eos_id] + [i for i in stops if i != tokenizer.eos_id]
  out = dict(SAMPLING, eos_token_id=eos, pad_token_id=tokenizer.eos_id)
  if tokenizer.bos_id is not None:
    out["bos_token_id"] = tokenizer.bos_id
  return out


def adapter_tensors(llm) -> dict[str, np.ndarray]:
  """Our LoRA adapters as PEFT names them in adapter_model.safetensors: for the layer whose HF weight is
  `model.layers.0.self_attn.q_proj.weight`, `base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`
  = A^T [r, in] and `...lora_B.weight` = B^T [out, r] (ours: y = x W + x A B * alpha / r, A [in, r]); layers
  unrolled or scanned (stacked) alike (convert.hf.iter_lora_adapters)."""
  out = {}
  for weight, a, b in iter_lora_adapters(llm, llama.HF_KEY_RULES):
    if not weight.endswith(".weight"):
      raise ValueError(f"LoRA on {weight!r}: not a Linear weight")
    stem = "base_model.model." + weight[:-len(".weight")]
    out[f"{stem}.lora_A.weight"] = np.ascontiguousarray(a.T)
    out[f"{stem}.lora_B.weight"] = np.ascontiguousarray(b.T)
  return out


def write_adapter(llm, out_dir: str | os.PathLike, *, base_model: str | None) -> Path:
  """A PEFT LoRA adapter directory (adapter_config.json + adapter_model.safetensors) for `llm`'s adapters;
  `peft.PeftModel.from_pretrained(base, out_dir)` then computes what our adapted LLM computes."""
  lora = _lora_of(llm)
  if lora is None:
    raise ValueError("the LLM has no LoRA adapters to write")
  out = Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  tensors = adapter_tensors(llm)
  modules = sorted({k.split(".")[-3] for k in tensors})
  config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
            "r": lora.rank, "lora_alpha": lora.alpha, "lora_dropout": lora.dropout, "target_modules": modules,
            "bias": "none", "fan_in_fan_out": False, "use_rslora": False, "use_dora": False,
            "inference_mode": True, "modules_to_save": None, "init_lora_weights": True,
            "layers_to_transform": None, "layers_pattern": None, "rank_pattern": {}, "alpha_pattern": {}}
  (out / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
  with SafetensorsWriter(out / "adapter_model.safetensors") as w:
    for k in sorted(tensors):
      w.add(k, tensors[k])
  return out


def _lora_of(llm):
  from flax import nnx
  for _, node in nnx.iter_graph(llm):
    if getattr(node, "lora", None) is not None:
      return node.lora
  return None


def _encoder_preprocessor(normalize: bool) -> dict[str, Any]:
  """MERT's feature extractor settings (transformers' Wav2Vec2FeatureExtractor) for OUT/encoder."""
  return {"feature_extractor_type": "Wav2Vec2FeatureExtractor", "feature_size": 1, "sampling_rate": 24000,
          "padding_side": "right", "padding_value": 0.0, "return_attention_mask": True,
          "do_normalize": bool(normalize)}


def musilingo_config(model, tokenizer, *, prompt_cfg: prompts.PromptConfig, dtype: str, normalize_audio: bool,
                     parts: dict[str, str | None], lora=None, source: dict | None = None) -> dict[str, Any]:
  """Everything needed to put the parts back together (written as OUT/musilingo_config.json)."""
  cfg = model.cfg
  norm = None
  if model.feature_norm is not None:
    norm = {"folded_into_projection": True,
            "mean": np.asarray(model.feature_norm.mean[...], np.float64).round(8).tolist(),
            "std": (1.0 / np.asarray(model.feature_norm.inv_std[...], np.float64)).round(8).tolist()}
  before, after = prompts.TEMPLATE.format(prompts.INSTRUCTION.format("{question}")).split(prompts.AUDIO_HERE)
  return {
      "format": FORMAT,
      "parts": parts,
      "encoder": {"architecture": "HubertModel (MERT without its CQT branch)", "hidden_size": cfg.encoder.hidden_size,
                  "num_hidden_layers": cfg.encoder.num_hidden_layers,
                  "features": "mean over all hidden states (embedding output + every layer; the last one after "
                              "the final LayerNorm = last_hidden_state)",
                  "frame_rate_hz": 75},
      "audio": {"sampling_rate": 24000, "mono": True, "max_seconds": 30.0, "normalize": bool(normalize_audio),
                "normalize_rule": "zero mean, unit variance per clip (Wav2Vec2FeatureExtractor do_normalize)"},
      "pool_frames": int(cfg.pool_frames),
      "audio_token_rule": "ceil(encoder frames / pool_frames): mean over consecutive windows of pool_frames "
                          "frames, a leftover window is one more token",
      "projection": {"in_features": cfg.encoder.hidden_size, "out_features": cfg.llm.hidden_size,
                     "file": PROJECTION_FILE, "feature_norm": norm},
      "prompt": {"template": bool(prompt_cfg.template), "end_sym": prompt_cfg.end_sym,
                 "max_txt_len": int(prompt_cfg.max_txt_len),
                 "before_audio": before if prompt_cfg.template else "",
                 "after_audio": after if prompt_cfg.template else "",
                 "layout": "[BOS] + before_audio tokens + audio embeddings + after_audio tokens; each text "
                           "segment tokenized on its own without special tokens",
                 "chat": "turn k appends: previous answer + '###Human: {question} ###Assistant: '"},
      "tokens": {"bos_id": tokenizer.bos_id, "eos_id": tokenizer.eos_id, "pad_id": tokenizer.eos_id,
                 "stop_sequences": _stop_sequences(tokenizer) if prompt_cfg.template else []},
      "generation": dict(SAMPLING),
      "dtype": dtype,
      "lora": None if lora is None else {"rank": lora.rank, "alpha": lora.alpha, "dropout": lora.dropout,
                                         "target_modules": list(lora.target_modules)},
      "source": source or {},
  }


MODEL_CARD = """---
library_name: transformers
tags:
- musilingo
- music
- audio-question-answering
- music-captioning
{base_line}---

# MusiLingo ({name})

A MusiLingo music language model exported by musilingo-jax: a frozen music encoder (MERT architecture,
`encoder/`, a `transformers.HubertModel`), one linear projection (`projection.safetensors`), and a LLaMA-family
LLM (`llm/`, a `transformers.LlamaForCausalLM`{lora_note}). The encoder's hidden states, averaged over layers and
pooled over {pool} frames at a time, become {d_llm}-dimensional embeddings placed in the LLM's prompt.

| part | what |
|---|---|
{table}

## Use it in PyTorch

```python
from musilingo_jax.torch_inference import MusiLingoTorch
m = MusiLingoTorch.from_export("{folder}")
audio = m.load_audio("song.wav")                      # 24 kHz mono, first 30 s
print(m.answer("What is the tempo of this music?", audio=audio))
```

Without the package: encode 24 kHz mono audio with `encoder/` (`output_hidden_states=True`; average
`hidden_states[:-1]` and `last_hidden_state`), mean-pool every {pool} frames (a leftover window is one more
token), apply `llama_proj` from `projection.safetensors`, and build the LLM input as `musilingo_config.json`'s
`prompt` says: `[BOS] + "{before}" + audio embeddings + "{after}"`. Stop when the output ends with one of
`tokens.stop_sequences` or EOS. Sampling defaults (`llm/generation_config.json`): temperature 0.1, top-p 0.5.

## Provenance

{provenance}
"""


def _model_card(name: str, config: dict, parts: dict[str, str | None], base_model: str | None) -> str:
  what = {"llm": "LlamaForCausalLM" + (" (LoRA merged)" if config["lora"] else "") + ", tokenizer, generation config",
          "llm_base": "the LLM without the LoRA adapters (the adapter's base)",
          "adapter": "PEFT LoRA adapter: `PeftModel.from_pretrained(base, 'adapter')`",
          "encoder": "HubertModel + preprocessor_config.json",
          "projection": "llama_proj.weight / llama_proj.bias (float32)",
          "pth": "the projection as the original MusiLingo code saves it"}
  rows = "\n".join(f"| `{p}` | {what[k]} |" for k, p in parts.items() if p)
  prov = "\n".join(f"- {k}: {v}" for k, v in sorted(config["source"].items())) or "- (not recorded)"
  return MODEL_CARD.format(
      name=name, base_line=f"base_model: {base_model}\n" if base_model and "/" in base_model
      and not os.path.isabs(base_model) else "",
      lora_note=", with a PEFT LoRA adapter in `adapter/`" if config["lora"] else "",
      pool=config["pool_frames"], d_llm=config["projection"]["out_features"], table=rows, folder=name,
      before=config["prompt"]["before_audio"].replace('"', '\\"'),
      after=config["prompt"]["after_audio"].replace('"', '\\"'), provenance=prov)


def export_model(model, tokenizer, out: str | os.PathLike, *, prompt_cfg: prompts.PromptConfig, dtype: str,
                 normalize_audio: bool = False, llm: bool = True, base_llm: bool = False, encoder: bool = True,
                 max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, base_model: str | None = None,
                 source: dict | None = None, log=None) -> dict[str, Path]:
  """Writes the export folder (module docstring) for a MusiLingo `model` -> {part: path written}.

  dtype: the tensors of llm/, llm_base/ and encoder/ ("float32", "bfloat16", "float16"); the projection and
  the adapter are float32. base_model: the LLM the adapter applies to, as adapter_config.json's
  base_model_name_or_path (a Hub id or a path; None: not recorded, llm_base/ is the base when written). A feature standardisation
  (the demo's) is folded into the projection, which then works on raw features. log(name, note): called for each
  file or folder written (default: prints "wrote OUT/name note")."""
  out = Path(out)
  out.mkdir(parents=True, exist_ok=True)
  log = log or (lambda name, note: print(f"wrote {out / name}{note}", flush=True))
  lora = _lora_of(model.llm)
  written: dict[str, Path] = {}
  kernel, bias = (np.asarray(x, np.float32) for x in model.projection_weights())
  with SafetensorsWriter(out / PROJECTION_FILE) as w:
    w.add("llama_proj.weight", np.ascontiguousarray(kernel.T))
    w.add("llama_proj.bias", bias)
  written["projection"] = out / PROJECTION_FILE
  save_musilingo_pth(out / PTH_FILE, kernel, bias)
  written["pth"] = out / PTH_FILE
  folded = " (feature standardisation folded into the projection)" if model.feature_norm is not None else ""
  log(PROJECTION_FILE, folded)
  log(PTH_FILE, folded)
  gen_cfg = generation_config(tokenizer) if tokenizer is not None else None
  for name, wanted, merge in (("llm", llm, True), ("llm_base", base_llm and lora is not None, False)):
    if not wanted:
      continue
    path = export_pretrained(llama.HF_KIND, model.llm, out / name, dtype, tokenizer=tokenizer, merge_lora=merge,
                             max_shard_bytes=max_shard_bytes)
    if gen_cfg is not None:
      (path / "generation_config.json").write_text(json.dumps(gen_cfg, indent=2, sort_keys=True) + "\n")
    written[name] = path
    log(name, f" (LlamaForCausalLM{', LoRA merged' if merge and lora else ''})")
  if lora is not None:
    written["adapter"] = write_adapter(model.llm, out / "adapter", base_model=base_model)
    base = base_model or ("llm_base/" if "llm_base" in written else "not recorded: pass --base-model")
    log("adapter", f" (PEFT LoRA r={lora.rank}, alpha={lora.alpha:g}, base {base})")
  if encoder:
    path = export_pretrained(mert.HF_KIND, model.encoder, out / "encoder", dtype, max_shard_bytes=max_shard_bytes)
    (path / "preprocessor_config.json").write_text(
        json.dumps(_encoder_preprocessor(normalize_audio), indent=2, sort_keys=True) + "\n")
    written["encoder"] = path
    log("encoder", " (HubertModel)")
  parts = {k: (written[k].name if k in written else None)
           for k in ("llm", "llm_base", "adapter", "encoder", "projection", "pth")}
  config = musilingo_config(model, tokenizer, prompt_cfg=prompt_cfg, dtype=dtype, normalize_audio=normalize_audio,
                            parts=parts, lora=lora, source=source)
  if lora is not None:
    config["lora"]["base_model"] = base_model
  (out / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
  (out / "README.md").write_text(_model_card(out.name, config, parts, base_model))
  written["config"] = out / CONFIG_FILE
  log(CONFIG_FILE, "")
  log("README.md", " (model card)")
  return written
