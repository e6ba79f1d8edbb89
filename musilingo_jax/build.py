"""From a config to live objects: the MusiLingo model (frozen parts loaded or built, the projection and any
LoRA adapters initialised), its tokenizer, and the data (train iterator, eval batches, generation sample).

Frozen weights come from, in order: `config.model.checkpoint` (a scripts/convert_hf.py directory), or
`config.model.llm_gguf` (an LLM straight from a GGUF; the demo's SmolLM2) with the encoder of
`config.model.encoder_init` (`init_encoder`: randomly initialised `config.model.encoder_preset`, the demo's
MERT-style pretrained encoder, or a pretrained encoder's directory), or random presets (tests, AOT
compilation). `frozen_ref` records which, so checkpoints reference the frozen weights instead of copying them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from musilingo_jax import assets, evaluate, prompts, sharding, storage
from musilingo_jax import checkpoint as ckptlib
from musilingo_jax import config as cfglib
from musilingo_jax import train as trainlib
from musilingo_jax.data import audio as audio_lib
from musilingo_jax.data import demo, pipeline, records
from musilingo_jax.tokenizer import Tokenizer
from musilingo_jax.convert.converted import TOKENIZER_DIR, load_converted
from musilingo_jax.convert.hf import import_pretrained
from musilingo_jax.models import layers, llama, mert
from musilingo_jax.models.llama import Llama, LlamaConfig
from musilingo_jax.models.mert import MERT, MERTConfig
from musilingo_jax.models.musilingo import MusiLingo, MusiLingoConfig
from musilingo_jax.pretrain import demo as pretrain_demo


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


def model_overrides(c, activations=None) -> tuple[dict[str, Any], dict[str, Any]]:
  """(encoder, LLM) config fields that `config.model` sets, for every source of the frozen weights.

  The one place the config's model fields become MERTConfig / LlamaConfig fields: random presets
  (preset_encoder_config, preset_llm_config: build_model, AOT), a converted checkpoint
  (convert.converted.load_converted) and a GGUF (convert.hf.import_pretrained) all apply these on top of what the
  preset or checkpoint describes. compute_dtype -> dtype, frozen_dtype -> param_dtype, attention_impl
  ("auto" = None: JAX picks), scan_layers and remat (the per-layer policy) for both, spec_augment for the
  encoder. (pool_frames is MusiLingoConfig's: `build_model` takes it.) activations: the run's activation
  sharding (`sharding.Activations`), or None. A config from before scan_layers / remat existed (a run's
  config.json) reads as unrolled without rematerialisation.
  """
  attn = None if c.model.attention_impl == "auto" else c.model.attention_impl
  common = dict(dtype=jnp.dtype(c.model.compute_dtype), param_dtype=jnp.dtype(c.model.frozen_dtype),
                attention_impl=attn, activations=activations, scan_layers=bool(c.model.get("scan_layers", False)),
                remat=str(c.model.get("remat", "none")))
  return {**common, "spec_augment": bool(c.model.spec_augment)}, dict(common)


def preset_encoder_config(c, **overrides) -> MERTConfig:
  """config.model.encoder_preset with `model_overrides` (random init: demo, tests, AOT), then `overrides`."""
  return encoder_config(c.model.encoder_preset, **{**model_overrides(c)[0], **overrides})


def preset_llm_config(c, **overrides) -> LlamaConfig:
  """config.model.llm_preset with `model_overrides` (random init: smoke runs, tests, AOT), then `overrides`."""
  return llm_config(c.model.llm_preset, **{**model_overrides(c)[1], **overrides})


def lora_config(c) -> layers.LoRAConfig | None:
  if c.train.trainable != "projection+lora":
    return None
  return layers.LoRAConfig(rank=c.train.lora.rank, alpha=c.train.lora.alpha, dropout=c.train.lora.dropout,
                           target_modules=tuple(c.train.lora.target_modules))


def gguf_path(c) -> str:
  return str(assets.smollm2_gguf_path()) if c.model.llm_gguf == "smollm2" else c.model.llm_gguf


def init_random(model_cls, config, seed, mesh=None, rules=None, abstract=False, **kwargs):
  """A randomly initialised model, built under jit straight onto its shardings (abstract: nnx.eval_shape,
  ShapeDtypeStruct leaves, nothing allocated)."""
  def make():
    return model_cls(config, rngs=nnx.Rngs(params=seed, dropout=seed + 1), **kwargs)
  abstract_model = nnx.eval_shape(make)
  if abstract:
    return abstract_model
  gdef, state = nnx.split(abstract_model)
  out_sh = sharding.state_shardings(state, mesh, rules) if mesh is not None else None
  return nnx.merge(gdef, jax.jit(lambda: nnx.split(make())[1], out_shardings=out_sh)())


def build_model(c, *, mesh=None, rules=None, abstract: bool = False, activations=None):
  """-> (MusiLingo, Tokenizer | None, frozen_ref dict). Whatever the source of the frozen weights, the
  encoder and LLM configs get `model_overrides(c, activations)` and the MusiLingo gets
  config.model.pool_frames; the projection is torch's Linear init from config.seed.

  abstract: the presets' shapes only (nnx.eval_shape; AOT compilation), whatever the config's source."""
  enc_overrides, llm_overrides = model_overrides(c, activations)
  lora = lora_config(c)
  if abstract:
    enc = init_random(MERT, preset_encoder_config(c, activations=activations), c.seed, mesh, rules, abstract=True)
    llm = init_random(Llama, preset_llm_config(c, activations=activations), c.seed + 7, mesh, rules, abstract=True,
                  lora=lora)
    tok, frozen_ref = None, {"abstract": f"{c.model.encoder_preset} + {c.model.llm_preset}"}
  elif c.model.checkpoint:
    (enc, llm), meta = load_converted(
        c.model.checkpoint, (mert.HF_KIND, llama.HF_KIND), mesh=mesh, sharding_rules=rules,
        model_kwargs={"llm": {"lora": lora}}, config_overrides={"encoder": enc_overrides, "llm": llm_overrides})
    tok_dir = storage.path(c.model.checkpoint) / TOKENIZER_DIR
    # sentencepiece / tokenizers read local files: a tokenizer in a bucket is staged into the local cache
    tok = Tokenizer.from_dir(storage.stage_tree(tok_dir)) if tok_dir.is_dir() else None
    if enc is None or llm is None:
      raise ValueError(f"config.model.checkpoint = {c.model.checkpoint!r} lacks the "
                       f"{'encoder' if enc is None else 'LLM'}: convert both with scripts/convert_hf.py")
    frozen_ref = {"checkpoint": _absolute(c.model.checkpoint)}
  else:
    enc, enc_ref = init_encoder(c, mesh=mesh, rules=rules, activations=activations)
    tok = None
    frozen_ref = {"encoder": enc_ref}
    if c.model.llm_gguf and not c.model.get("smoke_llm", False):
      path = gguf_path(c)
      llm, _ = import_pretrained(llama.HF_KIND, path, mesh=mesh, sharding_rules=rules, lora=lora,
                                 config_overrides=llm_overrides)
      tok = Tokenizer.from_gguf(path)
      frozen_ref["llm"] = _absolute(path)
    else:
      overrides = {}
      if c.model.llm_gguf:  # smoke: a tiny random LLM that speaks the GGUF's tokenizer
        tok = Tokenizer.from_gguf(gguf_path(c))
        overrides.update(vocab_size=tok.vocab_size, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id)
      llm = init_random(Llama, preset_llm_config(c, activations=activations, **overrides), c.seed + 7, mesh, rules,
                    lora=lora)
      frozen_ref["llm"] = f"random {c.model.llm_preset} (seed {c.seed + 7})"

  def projection():
    return layers.torch_linear(enc.cfg.hidden_size, llm.cfg.hidden_size, rngs=nnx.Rngs(params=c.seed))
  proj = nnx.eval_shape(projection) if abstract else projection()
  return MusiLingo(enc, llm, proj, pool_frames=c.model.pool_frames), tok, frozen_ref


def init_encoder(c, *, mesh=None, rules=None, activations=None) -> tuple[MERT, str]:
  """The encoder of a config without config.model.checkpoint, by config.model.encoder_init -> (encoder, what
  frozen_ref records): "random" initialises encoder_preset from config.seed; "pretrain_demo" loads the demo's
  MERT-style pretrained encoder (pretrain/demo.py: pretrained on first use, then cached, keyed by its
  settings; inference rebuilds the same one); a directory loads the encoder saved there
  (scripts/pretrain_encoder.py's WORKDIR/encoder). The config's model overrides (dtypes, attention, scan,
  remat, spec_augment, activation sharding) apply as for every source."""
  init = c.model.get("encoder_init", "random")
  if init == "random":
    enc = init_random(MERT, preset_encoder_config(c, activations=activations), c.seed, mesh, rules)
    return enc, f"random {c.model.encoder_preset} (seed {c.seed})"
  path = os.fspath(pretrain_demo.demo_encoder_dir(c)) if init == "pretrain_demo" else init
  enc_overrides, _ = model_overrides(c, activations)
  (enc,), _ = load_converted(path, (mert.HF_KIND,), mesh=mesh, sharding_rules=rules,
                             config_overrides={"encoder": enc_overrides})
  if enc is None:
    raise ValueError(f"config.model.encoder_init = {init!r}: {path} holds no encoder (params/encoder)")
  return enc, f"pretrained {_absolute(path)} (config.model.encoder_init = {init!r})"


def encoder_init_key(c) -> str | None:
  """What identifies config.model.encoder_init's encoder in cache keys (demo_dirs); None for "random"."""
  init = c.model.get("encoder_init", "random")
  if init == "random" or c.model.checkpoint:
    return None
  if init == "pretrain_demo":
    return f"pretrain_demo {pretrain_demo.demo_workdir(c).name}"
  meta = storage.path(init) / "meta.json"
  stamp = meta.stat().mtime if meta.exists() else ""
  return f"{_absolute(init)} {stamp}"


def _absolute(p) -> str:
  """An absolute local path, or a gs:// URL as given."""
  return os.fspath(p) if storage.is_remote(p) else os.path.abspath(p)


INFERENCE_DTYPES = ("bfloat16", "float32")
# What a run folder keeps for inference besides config.json and checkpoints/ (trainer.save_run_assets).
RUN_TOKENIZER_DIR, RUN_FEATURE_STATS = "tokenizer", "feature_stats.json"


def inference_mesh(devices=None):
  """A (data=1, fsdp=all, tensor=1) mesh over this process's devices (default `jax.local_devices()`): under
  the "fsdp" rules every large matrix is split along its embed dimension over all of them; on one device
  it is the single-device placement."""
  return sharding.make_mesh((1, -1, 1), list(devices if devices is not None else jax.local_devices()))


def load_for_inference(workdir: str | None = None, checkpoint: str | None = None,
                       projection: str | None = None, step: int | None = None, *,
                       dtype: str | None = "bfloat16", rules="fsdp", mesh=None):
  """A trained model for generation/export -> (MusiLingo in eval mode, Tokenizer, config).

  workdir: a training run (its config.json rebuilds the frozen parts, the latest or given checkpoint step
  gives the trainable ones). checkpoint: a scripts/convert_hf.py directory, with `projection` a MusiLingo
  .pth (a released checkpoint or our export) or an .npz with `kernel` [in, out] and `bias`. Each may be a
  local path or a gs:// URL (musilingo_jax/storage.py).

  dtype: the frozen encoder and LLM weights and their compute dtype ("bfloat16" or "float32"); the
  projection and LoRA adapters stay float32 as in training. "int8": float32, then the LLM's weights
  quantized to int8 with a scale per output channel and block of quantize.INT8_GROUP input rows, LoRA merged
  (musilingo_jax/quantize.py; generation only). None: as the run was trained (workdir) or
  float32 (checkpoint). A run's randomly initialised frozen parts (demo, tests) are built as the run built
  them, then cast, so they are the weights it trained with. Weights are placed straight onto `mesh`
  (default `inference_mesh()`: all local devices) by the logical-axis `rules` (a sharding preset: "fsdp"
  splits the frozen matrices over the devices, "dp" replicates them). The returned config carries the
  dtypes used. `memory_report(model)` says what the placement costs per device.
  """
  if (workdir is None) == (checkpoint is None):
    raise ValueError("give exactly one of workdir or checkpoint")
  if dtype == "int8":  # the LLM's weights int8 (group-wise scales), computing in float32; the encoder float32
    from musilingo_jax import quantize
    model, tok, c = load_for_inference(workdir, checkpoint, projection, step, dtype="float32", rules=rules,
                                       mesh=mesh)
    quantize.quantize_int8(model.llm, group_size=quantize.INT8_GROUP)
    _place(model, mesh or inference_mesh(), rules)
    c.model.frozen_dtype = "int8"
    return model, tok, c
  if dtype is not None:
    dtype = jnp.dtype(dtype).name
    if dtype not in INFERENCE_DTYPES:
      raise ValueError(f"dtype must be one of {INFERENCE_DTYPES} (or None), got {dtype!r}")
  mesh = inference_mesh() if mesh is None else mesh
  if workdir is not None:
    path = storage.path(workdir) / "config.json"
    if not path.is_file():
      raise FileNotFoundError(f"{os.fspath(path)}: missing (is {workdir} a training run directory?)")
    run_c = ml_collections.ConfigDict(json.loads(path.read_text()))
    c = ml_collections.ConfigDict(json.loads(path.read_text()))
    if dtype is not None:
      c.model.compute_dtype = c.model.frozen_dtype = dtype
    if c.model.checkpoint:  # restored straight in the load dtype
      model, tok, _ = build_model(c, mesh=mesh, rules=rules)
      # The encoder config as the run's build had it (load_converted: compute dtype = param dtype), which
      # keys the demo's records directory.
      run_frozen = jnp.dtype(run_c.model.frozen_dtype)
      run_encoder_cfg = dataclasses.replace(model.cfg.encoder, dtype=run_frozen, param_dtype=run_frozen)
    else:  # random frozen parts: initialised in the run's dtypes (the same values), then cast
      model, tok, _ = build_model(run_c, mesh=mesh, rules=rules)
      run_encoder_cfg = model.cfg.encoder
      if (run_c.model.compute_dtype, run_c.model.frozen_dtype) != (c.model.compute_dtype, c.model.frozen_dtype):
        model = _frozen_in_dtype(model, c.model.frozen_dtype)
    run_dir = storage.path(workdir)
    if (run_dir / RUN_TOKENIZER_DIR).is_dir():  # the run's own copy (trainer.save_run_assets)
      tok = Tokenizer.from_dir(storage.stage_tree(run_dir / RUN_TOKENIZER_DIR))
    if c.model.get("feature_norm", ""):
      if (run_dir / RUN_FEATURE_STATS).is_file():  # the run's own copy: no records needed
        stats = json.loads((run_dir / RUN_FEATURE_STATS).read_text())
        model.set_feature_norm(stats["mean"], stats["std"], inv_std=stats.get("inv_std"))
      else:  # a run from before the run folder kept them: the records' statistics
        records_dir = c.data.records_dir
        if c.data.dataset == "demo":
          records_dir = demo_dirs(run_c, _EncoderConfigOnly(run_encoder_cfg))[1]
        attach_feature_norm(c, model, records_dir)
    _place(model, mesh, rules)
    graphdef, trainable, frozen = trainlib.split_model(model, c.train.trainable)
    ckpt = ckptlib.Checkpointer(os.fspath(storage.path(workdir) / "checkpoints"), save_every=1, keep=1 << 30,
                                keep_best=False)
    try:
      trainable, _ = ckpt.restore_trainable(step, trainable)
    finally:
      ckpt.close()
    model = nnx.merge(graphdef, trainable, frozen)
  else:
    c = cfglib.base_config()
    c.model.checkpoint = checkpoint
    c.model.compute_dtype = c.model.frozen_dtype = dtype or "float32"
    model, tok, _ = build_model(c, mesh=mesh, rules=rules)
    _place(model, mesh, rules)
    if projection is not None:
      kernel, bias = load_projection(projection)
      want = tuple(model.llama_proj.kernel.get_value().shape)
      if tuple(kernel.shape) != want:
        raise ValueError(f"{projection}: projection kernel {tuple(kernel.shape)} does not fit the "
                         f"converted models ({want} = encoder dim x LLM dim)")
      for var, value in ((model.llama_proj.kernel, kernel), (model.llama_proj.bias, bias)):
        var.set_value(jax.device_put(np.asarray(value, np.float32), var.get_value().sharding))
  model.eval()
  return model, tok, c


class _EncoderConfigOnly:
  """Stands in for a model where only `model.cfg.encoder` is read (demo_dirs)."""

  def __init__(self, encoder_cfg):
    self.cfg = MusiLingoConfig(encoder=encoder_cfg, llm=None)


def _place(model: MusiLingo, mesh, rules) -> None:
  """Every variable of `model` onto its sharding on `mesh` by the logical-axis rules (the frozen weights
  are already there when built onto the mesh; this moves the projection, LoRA and feature statistics)."""
  state = nnx.state(model)
  nnx.update(model, jax.device_put(state, sharding.state_shardings(state, mesh, rules)))


def _frozen_in_dtype(model: MusiLingo, dtype) -> MusiLingo:
  """`model` with its encoder and LLM rebuilt for `dtype` (config dtype and param dtype): their parameters
  cast on their shardings; float32-only leaves (LoRA adapters) and RNG state kept as they are."""
  dtype = jnp.dtype(dtype)

  def recast(module, cls, **kwargs):
    cfg = dataclasses.replace(module.cfg, dtype=dtype, param_dtype=dtype)
    graphdef, target = nnx.split(nnx.eval_shape(lambda: cls(cfg, rngs=nnx.Rngs(0), **kwargs)))
    source = dict(nnx.to_flat_state(nnx.state(module)))
    values, wants = {}, {}
    for path, var in nnx.to_flat_state(target):
      if path not in source:
        raise ValueError(f"cannot cast {cls.__name__} to {dtype.name}: no {'.'.join(map(str, path))} in the "
                         f"built model")
      values[path], wants[path] = source[path].get_value(), var.get_value().dtype
    cast = [p for p in values if values[p].dtype != wants[p]]
    # One jitted cast for all of them (eager casts compile one op per shape), on the same shardings.
    new = jax.jit(lambda xs: [x.astype(wants[p]) for p, x in zip(cast, xs)],
                  out_shardings=[values[p].sharding for p in cast])([values[p] for p in cast])
    values.update(zip(cast, new))
    flat = [(path, var.replace(values[path])) for path, var in nnx.to_flat_state(target)]
    return nnx.merge(graphdef, nnx.from_flat_state(flat)), cfg

  encoder, enc_cfg = recast(model.encoder, MERT)
  llm, llm_cfg = recast(model.llm, Llama, lora=model.cfg.lora)
  model.encoder, model.llm = encoder, llm
  model.cfg = dataclasses.replace(model.cfg, encoder=enc_cfg, llm=llm_cfg)
  return model


def memory_report(model: MusiLingo, *, trainable: str = "projection+lora") -> dict:
  """What `model`'s parameters (nnx.Param leaves) take, from the arrays and their shardings.

  -> {"frozen_bytes", "trainable_bytes", "total_bytes": over all distinct elements;
      "devices": how many devices hold a shard; "per_device": {device: bytes held there (its shards of
      every array, replicas counted on each device)}; "max_device_bytes": the largest of those;
      "frozen_dtype" / "trainable_dtype": the dtype holding most of those bytes;
      "dtypes": {"frozen"|"trainable": {dtype: bytes}}}.
  `trainable`: which leaves count as trainable (train.trainable_filter's modes; the default covers the
  projection and any LoRA adapters).
  """
  train_filter = trainlib.trainable_filter(trainable)
  parts = dict(zip(("trainable", "frozen"),
                   nnx.state(model, nnx.All(nnx.Param, train_filter), nnx.All(nnx.Param, nnx.Not(train_filter)))))
  totals = {"frozen": 0, "trainable": 0}
  dtypes: dict[str, dict[str, int]] = {"frozen": {}, "trainable": {}}
  per_device: dict[Any, int] = {}
  for kind, state in parts.items():
    for _, var in nnx.to_flat_state(state):
      x = var.get_value()
      n = int(x.size) * x.dtype.itemsize
      totals[kind] += n
      dtypes[kind][x.dtype.name] = dtypes[kind].get(x.dtype.name, 0) + n
      shards = getattr(x, "addressable_shards", None)
      if shards is None:  # a numpy array: host memory, not on a device
        continue
      for s in shards:
        per_device[s.device] = per_device.get(s.device, 0) + int(s.data.size) * x.dtype.itemsize
  main = {k: max(d, key=d.get) if d else None for k, d in dtypes.items()}
  return {"frozen_bytes": totals["frozen"], "trainable_bytes": totals["trainable"],
          "total_bytes": totals["frozen"] + totals["trainable"], "devices": len(per_device),
          "per_device": per_device, "max_device_bytes": max(per_device.values(), default=0),
          "frozen_dtype": main["frozen"], "trainable_dtype": main["trainable"], "dtypes": dtypes}


def _size(n: int) -> str:
  for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
    if n >= scale:
      return f"{n / scale:.2f} {unit}"
  return f"{n} B"


def format_memory_report(report: dict) -> str:
  """One line, in decimal units; Vicuna-7B + MERT-330M on 8 devices: "model memory: 14.12 GB in bfloat16 over
  8 devices, at most 1.79 GB per device (frozen 14.11 GB, trainable 16.79 MB in float32)"."""
  n = report["devices"]
  return (f"model memory: {_size(report['total_bytes'])} in {report['frozen_dtype']} over {n} "
          f"device{'s' if n != 1 else ''}, at most {_size(report['max_device_bytes'])} per device "
          f"(frozen {_size(report['frozen_bytes'])}, trainable {_size(report['trainable_bytes'])}"
          f"{' in ' + report['trainable_dtype'] if report.get('trainable_dtype') else ''})")


def load_projection(path: str):
  """(kernel [in, out], bias [out]) float32 from our .npz (kernel, bias), a MusiLingo .pth, a .safetensors
  file or a Hugging Face-layout release folder (keys `<prefix>llama_proj.weight` / `.bias`; only those two
  tensors are read); local or gs:// (the files read are staged into the local cache); or a Hugging Face Hub
  id of one (owner/name[@revision][/file], resolved through the HF cache: musilingo_jax/hub.py; the programs
  resolve theirs before loading). See convert.pth.read_projection."""
  from musilingo_jax import hub
  from musilingo_jax.convert.pth import read_projection
  return read_projection(hub.resolve_projection(path, what="projection"))


# ----------------------------------------------------------------------------------------------------
# Data


def prompt_config(c) -> prompts.PromptConfig:
  return prompts.PromptConfig(template=c.prompt.template, end_sym=c.prompt.end_sym,
                              max_txt_len=c.prompt.max_txt_len)


def audio_normalize(c) -> bool:
  """Whether the run's encoder heard its clips standardised by MERT's feature extractor (do_normalize): the
  MusicInstruct / MusicCaps loaders pass clips through it, with the MERT checkpoint's setting (a random encoder:
  transformers' default, true). Inference on new audio (generate, serve, export's musilingo_config.json) applies
  the same. A checkpoint without preprocessor_config.json: false (such a run trained on precomputed features
  whose scripts/precompute.py run named its do_normalize)."""
  try:
    return audio_lib.extractor_do_normalize(c.model.get("checkpoint") or None, c.data.get("dataset", ""))
  except ValueError:
    return False


def demo_dirs(c, model: MusiLingo):
  """(demo audio set dir, its precomputed-records dir keyed by everything the features depend on).

  config.data.demo_dir may be a gs:// URL: the records go there (an etils.epath.Path), while the audio set,
  generated and read by local-file libraries, is built in the local cache (assets.cache_dir()/demo)."""
  demo_dir = c.data.get("demo_dir") or ""
  remote = storage.is_remote(demo_dir)
  base = Path(demo_dir) if demo_dir and not remote else assets.cache_dir() / "demo"
  pieces = tuple(c.data.demo_pieces)
  name = demo.set_dir_name(pieces, c.data.demo_clips_per_piece, c.data.demo_clip_seconds)
  data_dir = base / name
  parts = [repr(model.cfg.encoder), c.seed, c.model.pool_frames, c.model.encoder_preset, c.model.checkpoint]
  init = encoder_init_key(c)
  if init is not None:  # a pretrained encoder's features differ from the random one's of the same config
    parts.append(init)
  key = json.dumps(parts, sort_keys=True)
  records_name = "records-" + hashlib.sha1(key.encode()).hexdigest()[:12]
  rec_dir = (storage.path(demo_dir) / name / records_name) if remote else data_dir / records_name
  return data_dir, rec_dir


def prepare_demo(c, model: MusiLingo):
  """Builds (or reuses) the demo audio set, then precomputes its encoder features once per clip."""
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
        dataset="demo", data_dir=str(data_dir), split=split, out_dir=os.fspath(rec_dir), features="also",
        features_dtype="float32", encoder=f"demo encoder {c.model.encoder_preset} seed {c.seed}",
        pool_frames=c.model.pool_frames, workers=2, shard_size=256, crop="start",
        progress=jax.process_index() == 0), encoder_fn)
  return data_dir, rec_dir


@dataclasses.dataclass(frozen=True)
class AudioSlots:
  """The static audio shapes of a run, derived from the records: `tokens` audio-token slots per row (the
  longest clip's ceil(frames / pool_frames)) and, for raw audio, `samples` per row (the longest window)."""
  tokens: int
  samples: int | None
  longest: str   # what set the bound, for messages


def audio_token_count(encoder_cfg, pool_frames: int, samples: int) -> int:
  """A clip's audio tokens as the reference counts them: ceil(encoder frames / pool_frames)."""
  return -(-int(encoder_cfg.feature_lengths(int(samples))) // int(pool_frames))


def audio_slots(c, encoder_cfg, records_dir, splits=None) -> AudioSlots:
  """The slot bound from the precompute reports of `splits` (default: train and eval), checked against the
  config: `config.data.n_audio_tokens` = 0 takes the records' bound; a positive value below it is refused
  (clips would be cut), naming the field and the longest clip. A positive value above it is kept (a larger
  static shape; the extra slots are never attended)."""
  splits = splits or (c.data.train_split, c.data.eval_split)
  reports = [(split, records.read_report(records_dir, split)) for split in splits]
  reports = [(split, r) for split, r in reports if r is not None]
  if not reports:
    raise cfglib.ConfigError(
        f"config.data.records_dir = {str(records_dir)!r}: no precompute report ({'/'.join(splits)}-report.json): "
        "the number of audio tokens per clip is read from it; re-run scripts/precompute.py")
  pool = int(c.model.pool_frames)
  samples_split, samples_report = max(reports, key=lambda sr: sr[1].get("max_audio_samples", 0))
  samples = int(samples_report.get("max_audio_samples", 0))
  where = f"{records.report_path(records_dir, samples_split)}"
  if c.data.use_features:
    for split, r in reports:
      if r.get("pool_frames") not in (None, pool):
        raise cfglib.ConfigError(
            f"config.model.pool_frames = {pool}, but the features in {records.report_path(records_dir, split)} "
            f"were pooled over {r['pool_frames']} frames: precompute again or set the same pool_frames")
      if not r.get("feature_frames"):
        raise cfglib.ConfigError(f"config.data.use_features = True, but {records.report_path(records_dir, split)} "
                                 "reports no features: precompute with --encoder ... --features also")
    split, r = max(reports, key=lambda sr: sr[1]["feature_frames"])
    need = int(r["feature_frames"])
    longest = (f"{need} tokens (the longest clip's pooled features in "
               f"{records.report_path(records_dir, split)}: {samples} samples = {samples / 24000:.2f} s at 24 kHz)")
    samples = None
  else:
    if not samples:
      raise cfglib.ConfigError(f"{where} reports no audio (features only): set config.data.use_features = True")
    need = audio_token_count(encoder_cfg, pool, samples)
    longest = (f"{need} tokens (the longest clip in {where}: {samples} samples = {samples / 24000:.2f} s at "
               f"24 kHz -> {int(encoder_cfg.feature_lengths(samples))} frames / pool {pool})")
  given = int(c.data.n_audio_tokens)
  if given and given < need:
    raise cfglib.ConfigError(
        f"config.data.n_audio_tokens = {given} is below the records' {longest}: audio would be cut. "
        "Set it to 0 (derive it from the records) or at least the records' count")
  return AudioSlots(tokens=max(given, need), samples=samples, longest=longest)


class Data:
  """The run's data: a resumable train iterator, eval batches and a generation sample.

  Audio tokens come from the clips (each micro-batch attends ceil(frames of its longest clip / pool)
  tokens); `slots` is the static bound, from the records' precompute reports (`audio_slots`)."""

  def __init__(self, c, tokenizer, records_dir: str, encoder_cfg=None):
    self.c, self.tokenizer = c, tokenizer
    self.train_files = records.shard_files(records_dir, c.data.train_split)
    self.eval_files = records.shard_files(records_dir, c.data.eval_split)
    if not self.train_files:
      raise ValueError(f"config.data.records_dir = {records_dir!r}: no {c.data.train_split} shards")
    self.rows_per_process = pipeline.rows_per_process(c.train.batch_size, c.train.accum_steps, jax.process_count())
    self.encoder_cfg = encoder_cfg
    self.slots = audio_slots(c, encoder_cfg, records_dir)
    self.pad_id = pad_id(c, tokenizer)
    # MERT's feature extractor (MusicInstruct / MusicCaps raw audio): the checkpoint's do_normalize.
    self.normalize_audio = (not c.data.use_features) and audio_lib.extractor_do_normalize(
        c.model.checkpoint or None, c.data.dataset)
    self._check_prompt_fits()

  def _check_prompt_fits(self) -> None:
    """BOS + the template + the slot bound's audio tokens must leave room for an answer in max_len."""
    c = self.c
    before, after = prompts.prompt_segments("?", prompt_config(c)) if c.prompt.template else ("", "")
    fixed = 1 + len(self.tokenizer.encode(before)) + self.slots.tokens + len(self.tokenizer.encode(after))
    if fixed >= c.data.max_len:
      raise ValueError(f"config.data.max_len = {c.data.max_len} leaves no room for an answer: the prompt "
                       f"template and {self.slots.longest} already take {fixed} positions")

  def tokens_of_samples(self, samples: int) -> int:
    return audio_token_count(self.encoder_cfg, self.c.model.pool_frames, samples)

  def _make(self, files, *, train: bool, batch_size: int, accum_steps: int = 1):
    c = self.c
    return pipeline.make_dataset(
        files, tokenizer=self.tokenizer, prompt_cfg=prompt_config(c), batch_size=batch_size, seed=c.seed,
        shuffle=train, num_epochs=None if train else 1, audio_slots=self.slots.tokens,
        audio_samples=self.slots.samples, max_len=c.data.max_len, layout=c.data.layout,
        use_features=c.data.use_features, drop_remainder=train, worker_count=c.data.worker_count,
        accum_steps=accum_steps, pad_id=self.pad_id,
        tokens_of_samples=None if c.data.use_features else self.tokens_of_samples,
        normalize_audio=self.normalize_audio,
        pack_segments=int(c.data.pack_segments) if train and cfglib.packs_rows(c) else 1,
        pack_labels=cfglib.pack_labels(c))

  def train_iterator(self):
    return self._make(self.train_files, train=True, batch_size=self.rows_per_process,
                      accum_steps=self.c.train.accum_steps)

  def get_train_state(self, it) -> dict:
    return pipeline.get_state(it)

  def set_train_state(self, it, state: dict) -> None:
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
    res = evaluate.evaluate(model, self.tokenizer, self.eval_examples(n),
                            batch_size=min(8, n), prompt_cfg=prompt_config(self.c), greedy=self.c.eval.greedy,
                            max_new_tokens=self.c.eval.max_new_tokens, bertscore=False)
    return {k: float(v) for k, v in res.get("summary", {}).items() if isinstance(v, (int, float))}


def read_records(files, limit: int | None = None) -> list[dict]:
  """Decoded records of ArrayRecord shards (local or gs://, staged), in order, at most `limit` of them."""
  out = []
  for path in files:
    src = grain.sources.ArrayRecordDataSource([storage.stage(path)])
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
  return Data(c, tokenizer, os.fspath(rec_dir), encoder_cfg=model.cfg.encoder)


def pad_id(c, tokenizer) -> int:
  """The pad token of training batches: `config.data.pad` = "eos" (the reference: pad = eos whatever the
  tokenizer files name) or "tokenizer" (the files' pad token, eos when they name none)."""
  return tokenizer.eos_id if c.data.get("pad", "eos") == "eos" else tokenizer.pad_id


def attach_feature_norm(c, model: MusiLingo, records_dir) -> dict | None:
  """config.model.feature_norm = "train_stats": the training split's per-dimension feature mean and std
  (data.records.feature_stats, cached next to the shards) standardise the projection's input."""
  if not c.model.get("feature_norm", ""):
    return None
  try:
    stats = records.feature_stats(records_dir, c.data.train_split)
  except FileNotFoundError as e:
    raise ValueError(f"config.model.feature_norm = {c.model.feature_norm!r}: {e}") from None
  model.set_feature_norm(np.asarray(stats["mean"], np.float32), np.asarray(stats["std"], np.float32))
  return stats
