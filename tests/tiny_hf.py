"""Shared test fixture code: tiny random Hugging Face checkpoints, converted, with a projection file."""

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import torch
import transformers
from flax import nnx
from tokenizers import Tokenizer, models, pre_tokenizers

from musilingo_jax import build, checkpoint as ckptlib, config as cfglib
from musilingo_jax import train as trainlib
from musilingo_jax.data import records
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


def params_of(module) -> dict[str, jax.Array]:
  return {".".join(map(str, p)): v.get_value() for p, v in nnx.to_flat_state(nnx.state(module, nnx.Param))}


def run_config(demo_dir, checkpoint: str = "") -> cfglib.ConfigDict:
  c = cfglib.base_config()
  c.model.checkpoint = checkpoint
  c.model.encoder_preset = c.model.llm_preset = "tiny"
  c.model.compute_dtype = c.model.frozen_dtype = "float32"
  c.model.pool_frames = 4
  c.model.feature_norm = "train_stats"
  c.data.dataset = "demo"
  c.data.demo_dir = str(demo_dir)
  c.data.demo_pieces, c.data.demo_clips_per_piece, c.data.demo_clip_seconds = (2, 1), 2, 4.0
  c.train.trainable = "projection+lora"
  c.train.lora.rank, c.train.lora.dropout = 4, 0.0
  return c


def fake_run(workdir: Path, c, *, scale: float = 1.0) -> tuple[dict, dict]:
  """A training run's directory as the trainer leaves it (config.json, an Orbax step with trained-looking
  projection and LoRA values: normal with std `scale`, the demo records' feature statistics) -> (frozen
  params, trainable params)."""
  model, _, _ = build.build_model(c)
  rec_dir = build.demo_dirs(c, model)[1]
  rec_dir.mkdir(parents=True)
  shard = rec_dir / records.shard_name(c.data.train_split, 0, 1)
  shard.write_bytes(b"")
  rng = np.random.default_rng(3)
  (rec_dir / f"{c.data.train_split}-feature-stats.json").write_text(json.dumps({
      "mean": rng.standard_normal(D_ENC).tolist(), "std": (1 + rng.random(D_ENC)).tolist(), "tokens": 10,
      "shards": [[shard.name, 0]]}))
  _, trainable, _ = trainlib.split_model(model, c.train.trainable)
  trainable = jax.tree.map(lambda x: jnp.asarray((scale * rng.standard_normal(x.shape)).astype(np.float32)),
                           trainable)
  nnx.update(model, trainable)
  (workdir / "config.json").write_text(c.to_json_best_effort(indent=2))
  ckpt = ckptlib.Checkpointer(str(workdir / "checkpoints"), save_every=1, keep=1, keep_best=False)
  ckpt.save(1, trainable=trainable, opt_state={"count": np.zeros((), np.int32)}, data_state=None,
            config_json=c.to_json_best_effort(), frozen_ref={}, force=True)
  ckpt.close()
  frozen = {**{"encoder." + k: np.asarray(v) for k, v in params_of(model.encoder).items()},
            **{"llm." + k: np.asarray(v) for k, v in params_of(model.llm).items() if ".lora_" not in k}}
  trained = {k: np.asarray(v) for k, v in params_of(model).items() if k.startswith("llama_proj.") or ".lora_" in k}
  return frozen, trained
