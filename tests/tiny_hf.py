"""Shared test fixture code: tiny random Hugging Face checkpoints, converted, with a projection file."""

import json
from pathlib import Path

import numpy as np
import torch
import transformers
from tokenizers import Tokenizer, models, pre_tokenizers

from musilingo_jax.main.convert_hf import convert_musilingo
from musilingo_jax.models.llama import LlamaConfig
from musilingo_jax.models.mert import MERTConfig

D_ENC, D_LLM = 32, 64  # MERTConfig.tiny's hidden size, LlamaConfig.tiny's


def converted_tiny_models(root: Path, *, encoder_preprocessor: dict | None = None) -> Path:
  """Under `root`: llm/ (a tiny LlamaForCausalLM with a word-level tokenizer), encoder/ (a tiny HubertModel,
  with `encoder_preprocessor` as its preprocessor_config.json when given), converted/ (their float32
  conversion) and proj.npz (a random projection D_ENC -> D_LLM). Returns root."""
  torch.manual_seed(0)
  hc = transformers.LlamaConfig(**{**LlamaConfig.tiny(num_key_value_heads=2).to_hf_config(),
                                   "initializer_range": 0.1})
  transformers.LlamaForCausalLM(hc).save_pretrained(root / "llm")
  vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, hc.vocab_size)}}
  tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
  tk.pre_tokenizer = pre_tokenizers.Whitespace()
  tk.save(str(root / "llm" / "tokenizer.json"))
  (root / "llm" / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>",
                                                                  "unk_token": "<unk>"}))
  transformers.HubertModel(transformers.HubertConfig(**MERTConfig.tiny().to_hf_config())).save_pretrained(
      root / "encoder")
  if encoder_preprocessor is not None:
    (root / "encoder" / "preprocessor_config.json").write_text(json.dumps(encoder_preprocessor))
  convert_musilingo(root / "converted", mert_path=root / "encoder", llm_path=root / "llm", progress=False)
  rng = np.random.default_rng(0)
  np.savez(root / "proj.npz", kernel=(0.2 * rng.standard_normal((D_ENC, D_LLM))).astype(np.float32),
           bias=(0.1 * rng.standard_normal(D_LLM)).astype(np.float32))
  return root
