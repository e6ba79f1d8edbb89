"""From a config to live objects: the MusiLingo model (frozen parts loaded or built, the projection and any
LoRA adapters initialised), its tokenizer, and the data (train iterator, eval batches, generation sample).

Frozen weights come from, in order: `config.model.checkpoint` (a scripts/convert_hf.py directory), or
`config.model.llm_gguf` (an LLM straight from a GGUF; the demo's SmolLM2) with a randomly initialised encoder
of `config.model.encoder_preset`, or random presets (tests, AOT compilation). `frozen_ref` records which,
so checkpoints reference the frozen weights instead of copying them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from musilingo_jax import assets, convert, prompts
from musilingo_jax.models import layers
from musilingo_jax.models.llama import Llama, LlamaConfig
from musilingo_jax.models.mert import MERT, MERTConfig
from musilingo_jax.models.musilingo import MusiLingo, MusiLingoConfig


def encoder_config(preset: str, **overrides) -> MERTConfig:
  if preset == "mert_v1_330m":
    return MERTConfig.mert_v1_330m(**overrides)
  if preset == "mert_v1_95m":
    return MERTConfig.mert_v1_95m(**overrides)
  if preset == "demo":
    # A small MERT-architecture encoder for the CPU demo (random weights: no pretrained MERT offline).
    return MERTConfig(**{**dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
                                intermediate_size=1024, conv_dim=(128,) * 7, do_stable_layer_norm=True,
                                mask_time_prob=0.075, mask_time_length=10), **overrides})
  if preset == "tiny":
    return MERTConfig.tiny(**overrides)
  raise ValueError(f"config.model.encoder_preset: unknown {preset!r}")


def llm_config(preset: str, **overrides) -> LlamaConfig:
  if preset == "vicuna_7b":
    return LlamaConfig.vicuna_7b(**overrides)
  if preset == "tiny":
    return LlamaConfig.tiny(**overrides)
  raise ValueError(f"config.model.llm_preset: unknown {preset!r}")


def preset_encoder_config(c) -> MERTConfig:
  """config.model.encoder_preset with the config's dtypes and SpecAugment (random init: demo, tests, AOT)."""
  return encoder_config(c.model.encoder_preset, dtype=jnp.dtype(c.model.compute_dtype),
                        param_dtype=jnp.dtype(c.model.frozen_dtype), spec_augment=c.model.spec_augment)


def preset_llm_config(c, **overrides) -> LlamaConfig:
  """config.model.llm_preset with the config's dtypes and attention implementation ("auto" = None)."""
  cfg = llm_config(c.model.llm_preset, dtype=jnp.dtype(c.model.compute_dtype),
                   param_dtype=jnp.dtype(c.model.frozen_dtype), **overrides)
  attn = None if c.model.attention_impl == "auto" else c.model.attention_impl
  return dataclasses.replace(cfg, attention_impl=attn)


def lora_config(c) -> layers.LoRAConfig | None:
  if c.train.trainable != "projection+lora":
    return None
  return layers.LoRAConfig(rank=c.train.lora.rank, alpha=c.train.lora.alpha, dropout=c.train.lora.dropout,
                           target_modules=tuple(c.train.lora.target_modules))


def gguf_path(c) -> str:
  return str(assets.smollm2_gguf_path()) if c.model.llm_gguf == "smollm2" else c.model.llm_gguf


def _projection(d_enc: int, d_llm: int, seed: int) -> layers.Linear:
  """torch.nn.Linear's default init (uniform +-1/sqrt(in) for kernel and bias), float32."""
  bound = 1.0 / math.sqrt(d_enc)
  init = lambda key, shape, dtype: jax.random.uniform(key, shape, dtype, -bound, bound)  # noqa: E731
  rngs = nnx.Rngs(params=seed)
  proj = layers.Linear(d_enc, d_llm, use_bias=True, in_axis=None, out_axis="embed", rngs=rngs,
                       dtype=jnp.float32, kernel_init=init)
  proj.bias.set_value(init(rngs.params(), (d_llm,), jnp.float32))
  return proj


def compose(encoder: MERT, llm: Llama, *, pool_frames: int, lora, seed: int) -> MusiLingo:
  """A MusiLingo around existing encoder and LLM modules (nothing large is allocated here)."""
  cfg = MusiLingoConfig(encoder=encoder.cfg, llm=llm.cfg, pool_frames=pool_frames, lora=lora)
  model = nnx.eval_shape(lambda: MusiLingo(cfg, rngs=nnx.Rngs(seed)))
  model.encoder, model.llm = encoder, llm
  model.llama_proj = _projection(cfg.encoder.hidden_size, cfg.llm.hidden_size, seed)
  return model


def _random(model_cls, config, seed, mesh, rules, **kwargs):
  """A randomly initialised model, built under jit straight onto its shardings."""
  from musilingo_jax import sharding
  abstract = nnx.eval_shape(lambda: model_cls(config, rngs=nnx.Rngs(params=seed, dropout=seed + 1), **kwargs))
  gdef, state = nnx.split(abstract)
  out_sh = sharding.state_shardings(state, mesh, rules) if mesh is not None else None

  def init():
    return nnx.split(model_cls(config, rngs=nnx.Rngs(params=seed, dropout=seed + 1), **kwargs))[1]
  return nnx.merge(gdef, jax.jit(init, out_shardings=out_sh)())


def build_model(c, *, mesh=None, rules=None):
  """-> (MusiLingo, Tokenizer | None, frozen_ref dict)."""
  from musilingo_jax.tokenizer import Tokenizer
  frozen_dtype = jnp.dtype(c.model.frozen_dtype)
  lora = lora_config(c)
  if c.model.checkpoint:
    enc, llm, tok, meta = convert.load_converted(c.model.checkpoint, dtype=frozen_dtype, mesh=mesh,
                                                 sharding_rules=rules, lora=lora)
    if enc is None or llm is None:
      raise ValueError(f"config.model.checkpoint = {c.model.checkpoint!r} lacks the "
                       f"{'encoder' if enc is None else 'LLM'}: convert both with scripts/convert_hf.py")
    frozen_ref = {"checkpoint": os.path.abspath(c.model.checkpoint)}
  else:
    enc = _random(MERT, preset_encoder_config(c), c.seed, mesh, rules)
    tok = None
    frozen_ref = {"encoder": f"random {c.model.encoder_preset} (seed {c.seed})"}
    if c.model.llm_gguf and not c.model.get("smoke_llm", False):
      path = gguf_path(c)
      llm, _ = convert.import_pretrained("llm", path, dtype=frozen_dtype, mesh=mesh, sharding_rules=rules,
                                         lora=lora)
      tok = Tokenizer.from_gguf(path)
      frozen_ref["llm"] = os.path.abspath(path)
    else:
      overrides = {}
      if c.model.llm_gguf:  # smoke: a tiny random LLM that speaks the GGUF's tokenizer
        tok = Tokenizer.from_gguf(gguf_path(c))
        overrides.update(vocab_size=tok.vocab_size, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id)
      llm = _random(Llama, preset_llm_config(c, **overrides), c.seed + 7, mesh, rules, lora=lora)
      frozen_ref["llm"] = f"random {c.model.llm_preset} (seed {c.seed + 7})"
  model = compose(enc, llm, pool_frames=c.model.pool_frames, lora=lora, seed=c.seed)
  return model, tok, frozen_ref


def load_for_inference(workdir: str | None = None, checkpoint: str | None = None,
                       projection: str | None = None, step: int | None = None):
  """A trained model for generation/export -> (MusiLingo in eval mode, Tokenizer, config).

  workdir: a training run (its config.json rebuilds the frozen parts, the latest or given checkpoint step
  gives the trainable ones). checkpoint: a scripts/convert_hf.py directory, with `projection` a MusiLingo
  .pth (a released checkpoint or our export) or an .npz with `kernel` [in, out] and `bias`.
  """
  import ml_collections
  from musilingo_jax import checkpoint as ckptlib
  from musilingo_jax import config as cfglib
  from musilingo_jax import train as trainlib
  if (workdir is None) == (checkpoint is None):
    raise ValueError("give exactly one of workdir or checkpoint")
  if workdir is not None:
    path = Path(workdir) / "config.json"
    if not path.is_file():
      raise FileNotFoundError(f"{path}: missing (is {workdir} a training run directory?)")
    c = ml_collections.ConfigDict(json.loads(path.read_text()))
    model, tok, _ = build_model(c)
    if c.model.get("feature_norm", ""):
      attach_feature_norm(c, model, demo_dirs(c, model)[1] if c.data.dataset == "demo" else c.data.records_dir)
    graphdef, trainable, frozen = trainlib.split_model(model, c.train.trainable)
    ckpt = ckptlib.Checkpointer(os.path.join(workdir, "checkpoints"), save_every=1, keep=1 << 30,
                                keep_best=False)
    try:
      trainable, _ = ckpt.restore_trainable(step, trainable)
    finally:
      ckpt.close()
    model = nnx.merge(graphdef, trainable, frozen)
  else:
    c = cfglib.base_config()
    c.model.checkpoint = checkpoint
    c.model.compute_dtype = c.model.frozen_dtype = "float32"
    model, tok, _ = build_model(c)
    if projection is not None:
      kernel, bias = load_projection(projection)
      want = tuple(model.llama_proj.kernel.get_value().shape)
      if tuple(kernel.shape) != want:
        raise ValueError(f"{projection}: projection kernel {tuple(kernel.shape)} does not fit the "
                         f"converted models ({want} = encoder dim x LLM dim)")
      model.llama_proj.kernel.set_value(jnp.asarray(kernel, jnp.float32))
      model.llama_proj.bias.set_value(jnp.asarray(bias, jnp.float32))
  model.eval()
  return model, tok, c


def load_projection(path: str):
  """(kernel [in, out], bias [out]) from a MusiLingo .pth or an .npz (kernel, bias)."""
  if str(path).endswith(".npz"):
    with np.load(path) as z:
      return z["kernel"], z["bias"]
  return convert.load_musilingo_pth(path)


# ----------------------------------------------------------------------------------------------------
# Data


def prompt_config(c) -> prompts.PromptConfig:
  return prompts.PromptConfig(template=c.prompt.template, end_sym=c.prompt.end_sym,
                              max_txt_len=c.prompt.max_txt_len)


def demo_dirs(c, model: MusiLingo) -> tuple[Path, Path]:
  """(demo audio set dir, its precomputed-records dir keyed by everything the features depend on)."""
  base = Path(c.data.demo_dir) if c.data.get("demo_dir") else assets.cache_dir() / "demo"
  pieces = tuple(c.data.demo_pieces)
  data_dir = base / f"set-{pieces[0]}x{pieces[1]}-{c.data.demo_clips_per_piece}-{c.data.demo_clip_seconds:g}s"
  key = json.dumps([repr(model.cfg.encoder), c.seed, c.model.pool_frames, c.model.encoder_preset,
                    c.model.checkpoint], sort_keys=True)
  rec_dir = data_dir / ("records-" + hashlib.sha1(key.encode()).hexdigest()[:12])
  return data_dir, rec_dir


def prepare_demo(c, model: MusiLingo) -> tuple[Path, Path]:
  """Builds (or reuses) the demo audio set, then precomputes its encoder features once per clip."""
  from musilingo_jax.data import demo, records
  data_dir, rec_dir = demo_dirs(c, model)
  pieces = tuple(c.data.demo_pieces)
  demo.build_demo_dataset(data_dir, num_train_pieces=pieces[0], num_test_pieces=pieces[1],
                          clips_per_piece=c.data.demo_clips_per_piece, clip_seconds=c.data.demo_clip_seconds,
                          seed=0, workers=2)
  encoder_fn = records.make_encoder_fn(model.encoder, c.model.pool_frames)
  for split in (c.data.train_split, c.data.eval_split):
    if records.read_report(rec_dir, split) is None:
      print(f"demo: precomputing {split} encoder features into {rec_dir}", flush=True)
    records.precompute(records.PrecomputeConfig(
        dataset="demo", data_dir=str(data_dir), split=split, out_dir=str(rec_dir), features="also",
        features_dtype="float32", encoder=f"demo encoder {c.model.encoder_preset} seed {c.seed}",
        pool_frames=c.model.pool_frames, workers=2, shard_size=256, crop="start",
        progress=jax.process_index() == 0), encoder_fn)
  return data_dir, rec_dir


class Data:
  """The run's data: a resumable train iterator, eval batches and a generation sample."""

  def __init__(self, c, tokenizer, records_dir: str):
    from musilingo_jax.data import records
    self.c, self.tokenizer = c, tokenizer
    self.train_files = records.shard_files(records_dir, c.data.train_split)
    self.eval_files = records.shard_files(records_dir, c.data.eval_split)
    if not self.train_files:
      raise ValueError(f"config.data.records_dir = {records_dir!r}: no {c.data.train_split} shards")
    rows = c.train.batch_size * c.train.accum_steps
    if rows % jax.process_count():
      raise ValueError(f"config.train.batch_size * accum_steps = {rows} does not split over "
                       f"{jax.process_count()} processes")
    self.rows_per_process = rows // jax.process_count()

  def _make(self, files, *, train: bool, batch_size: int):
    from musilingo_jax.data import pipeline
    c = self.c
    return pipeline.make_dataset(
        files, tokenizer=self.tokenizer, prompt_cfg=prompt_config(c), batch_size=batch_size, seed=c.seed,
        shuffle=train, num_epochs=None if train else 1, n_audio_tokens=c.data.n_audio_tokens,
        max_len=c.data.max_len, layout=c.data.layout, use_features=c.data.use_features,
        drop_remainder=train, worker_count=c.data.worker_count)

  def train_iterator(self):
    return self._make(self.train_files, train=True, batch_size=self.rows_per_process)

  def get_train_state(self, it) -> dict:
    from musilingo_jax.data import pipeline
    return pipeline.get_state(it)

  def set_train_state(self, it, state: dict) -> None:
    from musilingo_jax.data import pipeline
    pipeline.set_state(it, state)

  def eval_batches(self, n: int):
    if not self.eval_files:
      return []
    it = self._make(self.eval_files, train=False,
                    batch_size=max(1, self.c.train.batch_size // jax.process_count()))
    out = []
    for batch in it:
      out.append(batch)
      if len(out) >= n:
        break
    return out

  def eval_examples(self, limit: int | None = None) -> list[dict]:
    """Decoded eval records (question, answer, kind, labels, features/audio) for generation."""
    return read_records(self.eval_files, limit)

  def train_examples(self, limit: int | None = None) -> list[dict]:
    return read_records(self.train_files, limit)


  def generation_metrics(self, model, n: int) -> dict[str, float]:
    from musilingo_jax import evaluate
    res = evaluate.evaluate(model, self.tokenizer, self.eval_examples(n),
                            batch_size=min(8, n), n_audio_tokens=self.c.data.n_audio_tokens,
                            prompt_cfg=prompt_config(self.c), greedy=self.c.eval.greedy,
                            max_new_tokens=self.c.eval.max_new_tokens, bertscore=False)
    return {k: float(v) for k, v in res.get("summary", {}).items() if isinstance(v, (int, float))}


def read_records(files, limit: int | None = None) -> list[dict]:
  """Decoded records of ArrayRecord shards, in order, at most `limit` of them."""
  import grain
  from musilingo_jax.data import records
  out = []
  for path in files:
    src = grain.sources.ArrayRecordDataSource([path])
    for i in range(len(src)):
      out.append(records.decode_record(src[i]))
      if limit and len(out) >= limit:
        return out
  return out


def build_data(c, tokenizer, model) -> Data:
  """The run's data; also attaches the feature standardisation (config.model.feature_norm) to `model`,
  so call it before splitting the model into trainable and frozen parts."""
  if tokenizer is None:
    raise ValueError("no tokenizer: give config.model.checkpoint (converted with its tokenizer) or "
                     "config.model.llm_gguf")
  if c.data.dataset == "demo":
    _, rec_dir = prepare_demo(c, model)
  else:
    rec_dir = c.data.records_dir
  attach_feature_norm(c, model, rec_dir)
  return Data(c, tokenizer, str(rec_dir))


def attach_feature_norm(c, model: MusiLingo, records_dir) -> dict | None:
  """config.model.feature_norm = "train_stats": the training split's per-dimension feature mean and std
  (data.records.feature_stats, cached next to the shards) standardise the projection's input."""
  if not c.model.get("feature_norm", ""):
    return None
  from musilingo_jax.data import records
  try:
    stats = records.feature_stats(records_dir, c.data.train_split)
  except FileNotFoundError as e:
    raise ValueError(f"config.model.feature_norm = {c.model.feature_norm!r}: {e}") from None
  model.set_feature_norm(np.asarray(stats["mean"], np.float32), np.asarray(stats["std"], np.float32))
  return stats
