"""The config schema (ml_collections), reference presets and validation before any compute.

`configs/*.py` are thin: each `get_config(arg)` starts from `base_config()` and sets a preset. Every field
a run reads is declared here, so `--config.some.typo=1` fails at the command line, and `validate()` checks
values, paths, the mesh against the devices and the batch against the mesh before anything is compiled.
"""

from __future__ import annotations

import math
import os

import ml_collections

from musilingo_jax import sharding
from musilingo_jax.models.layers import REMAT_POLICIES
from musilingo_jax.prompts import LAYOUTS
from musilingo_jax.train import TRAIN_MODES

ConfigDict = ml_collections.ConfigDict

# The reference's train_configs (docs/reference.md, Training): (init lr, min lr, warmup lr, warmup steps,
# iters/epoch, epochs, batch, accum).
REFERENCE_SCHEDULES = {
    "pretrain": (1e-4, 8e-5, 1e-6, 5000, 5000, 4, 8, 1),
    "musicqa": (3e-5, 1e-5, 1e-6, 5000, 5000, 6, 2, 16),
    "musicinstruct": (3e-5, 1e-5, 1e-6, 5000, 5000, 6, 2, 16),
    "musicinstruct_long": (3e-5, 1e-5, 1e-6, 3000, 3000, 6, 2, 16),
    "musicinstruct_short": (3e-5, 1e-5, 1e-6, 2500, 2500, 6, 2, 16),
    "musiccaps": (3e-5, 1e-5, 1e-6, 1000, 1000, 6, 2, 8),
}

ENCODER_PRESETS = ("mert_v1_330m", "mert_v1_95m", "demo", "tiny")
TASKS = ("musilingo", "mert_pretrain")
ENCODER_INITS = ("random", "pretrain_demo")  # or a pretrained encoder's directory
PRETRAIN_FEATURES = ("logmel", "mfcc", "chroma")
LLM_PRESETS = ("vicuna_7b", "tiny")


def base_config() -> ConfigDict:
  c = ConfigDict()
  c.seed = 42
  c.stage = 2  # 1 = captions with no template (LP-MusicCaps-MSD), 2 = instruction data
  # What trainer.run trains: "musilingo" (the projection, LoRA...) or "mert_pretrain" (MERT-style
  # self-supervised pretraining of the encoder alone: configs/mert_pretrain.py, the `pretrain` section).
  c.task = "musilingo"

  c.model = ConfigDict()
  c.model.checkpoint = ""         # a directory written by scripts/convert_hf.py (frozen MERT + LLM + tokenizer)
  c.model.llm_gguf = ""           # or an LLM straight from a GGUF file ("smollm2" = the pip-installed demo LLM)
  c.model.encoder_preset = "mert_v1_330m"  # used when no converted encoder is given (random init)
  c.model.llm_preset = "vicuna_7b"         # used when no converted LLM is given (random init: AOT, tests)
  c.model.pool_frames = 325
  c.model.compute_dtype = "bfloat16"   # activations and frozen matmuls
  c.model.frozen_dtype = "bfloat16"    # frozen weights as stored on device; trainables are always float32
  c.model.attention_impl = "xla"       # "xla", "cudnn" (flash attention on GPU) or "auto"
  c.model.spec_augment = False         # MERT time masking in training (encoder inside the step only)
  # Encoder and LLM layers stacked and run by nnx.scan (one layer compiled instead of L, one layer's gathered
  # weights alive at a time; same numbers). On in the full-size presets (configs/); converted checkpoints load
  # either way. A run's trainable checkpoints (LoRA adapters) keep the layout they were trained with.
  c.model.scan_layers = False
  # Rematerialisation of each encoder and LLM layer in the backward pass: "none" | "full" | "dots_saveable" |
  # "dots_with_no_batch_dims_saveable" | "nothing_saveable" (models.layers.REMAT_POLICIES).
  c.model.remat = "none"
  # "" (the reference) or "train_stats": standardise the projection's input per dimension with the training
  # split's feature statistics (records.feature_stats; needs precomputed features). Export folds it in.
  c.model.feature_norm = ""
  # The encoder when config.model.checkpoint is empty: "random" (encoder_preset initialised from the seed),
  # "pretrain_demo" (the demo's MERT-style pretrained encoder: configs/mert_pretrain.py:demo, pretrained on
  # first use and cached under $MUSILINGO_CACHE/mert_pretrain, keyed by its settings), or the directory of a
  # pretrained encoder (scripts/pretrain_encoder.py writes WORKDIR/encoder).
  c.model.encoder_init = "random"

  c.data = ConfigDict()
  c.data.dataset = "musicqa"      # lp-musiccaps-msd | musicqa | musicinstruct | musiccaps | demo
  c.data.records_dir = ""         # ArrayRecord shards written by scripts/precompute.py
  c.data.train_split = "Finetune"
  c.data.eval_split = "Eval"
  c.data.use_features = True      # precomputed pooled features (True) or raw audio windows (False)
  # Audio-token slots per row (a static bound). Each micro-batch attends ceil(frames of its longest clip /
  # pool_frames) tokens, as the reference: 0 = the bound from the records' precompute reports (the longest
  # clip); a positive value below that is refused, above it only widens the static shape.
  c.data.n_audio_tokens = 0
  # Pad token of training batches: "eos" (the reference, whatever the tokenizer files name) or "tokenizer".
  c.data.pad = "eos"
  c.data.max_len = 256            # fixed sequence length of a batch
  c.data.layout = "reference"     # reference (middle padding, exact loss) | packed
  # layout = "packed", training rows: up to this many examples per row (segment ids, block-diagonal causal
  # attention, positions from 0 per example: each example's loss terms are its single-example ones); 1 = one
  # example per row. Eval rows always hold one example.
  c.data.pack_segments = 8
  # Packed rows: at most this many answer tokens per row = the positions the LM head runs at with
  # train.head_at_labels (0 = max_len // 2).
  c.data.pack_labels = 0
  c.data.worker_count = 0         # Grain workers (0 = in-process; on few cores prefer 0)

  c.prompt = ConfigDict()
  c.prompt.template = True
  c.prompt.end_sym = "###"
  c.prompt.max_txt_len = 160

  c.train = ConfigDict()
  c.train.trainable = "projection"   # projection | projection+lora | all (tiny models only)
  c.train.lora = ConfigDict()
  c.train.lora.rank = 8
  c.train.lora.alpha = 16.0
  c.train.lora.dropout = 0.05
  c.train.lora.target_modules = ("q_proj", "v_proj")
  c.train.batch_size = 2          # global micro-batch (rows per micro-step, over all devices)
  c.train.accum_steps = 16
  c.train.accum_reduce = "sum"    # sum (the reference) | mean
  c.train.init_lr = 3e-5
  c.train.min_lr = 1e-5
  c.train.warmup_lr = 1e-6
  c.train.warmup_steps = 5000
  c.train.iters_per_epoch = 5000
  c.train.epochs = 6
  c.train.num_steps = -1          # optimizer steps; -1 = epochs * iters_per_epoch / accum_steps
  # The reference's epochs: iters_per_epoch // accum_steps updates per epoch, the epoch's last
  # iters_per_epoch % accum_steps micro-batches' gradients summed into the next epoch's first update, each
  # update at the LR of the iteration where the reference steps (train.EpochCarry). False: one continuous
  # run of epochs * iters_per_epoch / accum_steps updates, nothing carried.
  c.train.epoch_carry = False
  c.train.weight_decay = 0.05
  c.train.b1 = 0.9
  c.train.b2 = 0.999
  c.train.eps = 1e-8
  c.train.clip_norm = 0.0         # 0 = no clipping (the reference)
  # The LM head and softmax only at the (at most prompt.max_txt_len) label positions of each row: the
  # same loss, less compute (MusiLingo.loss). False computes logits at every position.
  c.train.head_at_labels = True

  c.mesh = ConfigDict()
  c.mesh.shape = (-1, 1, 1)       # (data, fsdp, tensor); one -1 fills the remaining devices
  c.mesh.rules = "dp"             # dp | fsdp | fsdp_tp (sharding.PRESETS)
  # Pin hidden states to the batch split (sharding.constrain). Off, XLA under fsdp may instead keep every
  # chip's weights split and the whole micro-batch's activations on each chip (docs/aot_table.md).
  c.mesh.constrain_activations = True

  c.log_every = 10
  c.eval_every = 1000
  c.eval_batches = 20
  c.save_every = 1000
  c.keep = 3
  c.keep_best = True
  c.compilation_cache = ""        # a directory for JAX's persistent compilation cache ("" = off)
  c.eval_at_start = False         # also evaluate before the first step (a baseline: the step-0 eval row)

  # Where metrics go besides WORKDIR/tb (TensorBoard) and WORKDIR/metrics.jsonl (process 0 writes all).
  c.log = ConfigDict()
  c.log.wandb_project = ""        # Weights & Biases project ("" = off; `pip install -e ".[wandb]"`)
  c.log.wandb_entity = ""         # W&B team or user ("" = your default)
  c.log.wandb_mode = ""           # "" (wandb's default: $WANDB_MODE, else online) | online | offline | disabled
  c.log.wandb_name = ""           # the run's display name ("" = W&B's)

  c.eval = ConfigDict()
  c.eval.generate_samples = 32    # generation metrics on this many eval examples at each eval
  c.eval.max_new_tokens = 64
  c.eval.greedy = True
  return c


def apply_schedule(c: ConfigDict, name: str) -> None:
  init, lo, warm, wsteps, ipe, epochs, batch, accum = REFERENCE_SCHEDULES[name]
  c.train.init_lr, c.train.min_lr, c.train.warmup_lr = init, lo, warm
  c.train.warmup_steps, c.train.iters_per_epoch, c.train.epochs = wsteps, ipe, epochs
  c.train.batch_size, c.train.accum_steps = batch, accum


def add_pretrain_section(c: ConfigDict) -> ConfigDict:
  """The `pretrain` section of config.task = "mert_pretrain" (configs/mert_pretrain.py; docs/pretraining.md):
  where the clips come from, the acoustic targets, the masking and the loss, the linear probe."""
  p = c.pretrain = ConfigDict()
  # Clips: "demo" (unlabeled music21 renderings of the demo's training pieces, built in the cache; the demo
  # set's test pieces are never rendered), a folder of .wav files, or "records:<dir>" (the audio of
  # scripts/precompute.py records of split source_split).
  p.source = "demo"
  p.source_split = "train"
  p.targets_dir = ""              # the prepared targets; "" = $MUSILINGO_CACHE/mert_pretrain/targets-<settings>
  p.features = ("logmel", "chroma")  # one k-means codebook per feature: logmel | mfcc | chroma
  p.codebook_size = 100           # codes per codebook
  p.kmeans_frames = 50_000        # frames per codebook the k-means is fitted on
  p.kmeans_iters = 25
  p.kmeans_clips = 200            # clips sampled for the k-means fit and the feature statistics
  p.n_mels = 64
  p.cqt_bins = 84                 # MERT: 336 (48 per octave)
  p.cqt_bins_per_octave = 12
  p.valid_fraction = 0.05         # clips held out for the eval loss
  p.crop_seconds = 5.0            # training crop (MERT: 5 s)
  p.mask_prob = 0.8               # span masking (MERT: 0.8 and 5 frames)
  p.mask_length = 5
  p.mask_min = 2
  p.final_dim = 64
  p.logit_temp = 0.1
  p.cqt_weight = 1.0              # MERT's loss_weights: [10 (feature penalty), 1 (CQT)]
  p.feature_pen_weight = 10.0
  p.feature_grad_mult = 0.1       # gradient scale into the conv feature extractor (0 = frozen)
  p.nomask_weight = 0.0           # HuBERT's pred_nomask_weight: the losses on the unmasked frames too, times this
  # The QA demo set this pretraining serves ("demo" or "smoke": the set of configs/finetune.py's preset, built
  # in the cache): source "demo" renders its training pieces only (its test pieces never), and the probe
  # scores on it.
  p.demo_set = "demo"
  # source = "demo": training pieces, renderings per piece, seconds per rendering.
  p.demo_pieces = 48
  p.demo_clips_per_piece = 8
  p.demo_clip_seconds = 6.0
  # Linear probe (instrument, key, tempo class; pretrain/probe.py) on demo_set at every eval, on each clip's
  # first probe_seconds.
  p.probe = True
  p.probe_seconds = 4.0
  p.export_hf = True              # also write WORKDIR/encoder_hf, a transformers HubertModel directory
  return c


def packs_rows(c: ConfigDict) -> bool:
  """Whether training rows hold several examples (layout "packed" with data.pack_segments > 1)."""
  return c.data.layout == "packed" and int(c.data.get("pack_segments", 1)) > 1


def pack_labels(c: ConfigDict) -> int:
  """Packed rows' answer-token budget per row (data.pack_labels; 0 = max_len // 2)."""
  return int(c.data.get("pack_labels", 0)) or int(c.data.max_len) // 2


def loss_positions(c: ConfigDict) -> int | None:
  """The K of MusiLingo.loss: every row has at most prompt.max_txt_len label tokens, or with packed rows at
  most the packer's per-row budget (`pack_labels`)."""
  if not c.train.get("head_at_labels", True):
    return None
  return pack_labels(c) if packs_rows(c) else int(c.prompt.max_txt_len)


def num_train_steps(c: ConfigDict) -> int:
  if c.train.num_steps > 0:
    return c.train.num_steps
  if not isinstance(c.data.get("pack_segments", 1), int) or c.data.get("pack_segments", 1) < 1:
    raise ConfigError(f"config.data.pack_segments = {c.data.pack_segments!r}; expected a positive integer")
  if packs_rows(c):
    if pack_labels(c) < int(c.prompt.max_txt_len):
      raise ConfigError(f"config.data.pack_labels = {pack_labels(c)} is below config.prompt.max_txt_len = "
                        f"{c.prompt.max_txt_len}: a single answer would not fit a row")
    if c.train.get("epoch_carry", False):
      raise ConfigError("config.train.epoch_carry = True counts the reference's micro-batches of records; packed "
                        "rows (config.data.layout = 'packed', pack_segments > 1) do not: set pack_segments = 1")
  if c.train.get("epoch_carry", False):  # whole updates per epoch, as the reference
    return max(1, c.train.epochs * (c.train.iters_per_epoch // c.train.accum_steps))
  return max(1, c.train.epochs * c.train.iters_per_epoch // c.train.accum_steps)


class ConfigError(ValueError):
  """A config value that cannot work; the message names the field."""


def _choice(value, field, choices):
  if value not in choices:
    raise ConfigError(f"config.{field} = {value!r}; expected one of {list(choices)}")


# Config fields that name local files or directories (gs:// URLs, "" and the name "smollm2" stay as they are).
PATH_FIELDS = ("model.checkpoint", "model.llm_gguf", "data.records_dir", "data.demo_dir", "compilation_cache",
               "model.encoder_init", "pretrain.targets_dir")
# Values of those fields that are names, not paths.
_NAMED_VALUES = {"model.llm_gguf": ("smollm2",), "model.encoder_init": ENCODER_INITS}


def absolute_paths(c: ConfigDict) -> ConfigDict:
  """A copy of `c` whose local path fields (PATH_FIELDS) are absolute, so the config.json a run stores means
  the same from any directory (inference with --workdir, a resume from elsewhere)."""
  c = c.copy_and_resolve_references()
  for field in PATH_FIELDS:
    *parents, name = field.split(".")
    node = c
    for p in parents:
      node = node.get(p) if node is not None else None
    value = node.get(name) if node is not None else None
    if isinstance(value, str) and value and "://" not in value and value not in _NAMED_VALUES.get(field, ()):
      node[name] = os.path.abspath(value)
  return c


def validate(c: ConfigDict, *, num_devices: int | None = None, num_processes: int | None = None,
             need_data: bool = True) -> None:
  """Raises ConfigError naming the field for values that cannot work, before any compute. `num_devices`
  (all hosts' devices) checks the mesh and the batch against it; `num_processes` (hosts) checks that each
  micro-batch splits evenly over the hosts, which each read their own rows. Makes no network calls."""

  _choice(c.stage, "stage", (1, 2))
  _choice(c.get("task", "musilingo"), "task", TASKS)
  init = c.model.get("encoder_init", "random")
  if init not in ENCODER_INITS and not (isinstance(init, str) and init and ("://" in init or os.path.isdir(init))):
    raise ConfigError(f"config.model.encoder_init = {init!r}; expected one of {list(ENCODER_INITS)} or the "
                      "directory of a pretrained encoder (scripts/pretrain_encoder.py: WORKDIR/encoder)")
  if c.get("task", "musilingo") == "mert_pretrain":
    _validate_pretrain(c)
  _choice(c.model.compute_dtype, "model.compute_dtype", ("float32", "bfloat16"))
  _choice(c.model.frozen_dtype, "model.frozen_dtype", ("float32", "bfloat16"))
  _choice(c.model.attention_impl, "model.attention_impl", ("xla", "cudnn", "auto"))
  if not isinstance(c.model.get("scan_layers", False), bool):
    raise ConfigError(f"config.model.scan_layers = {c.model.scan_layers!r}; expected True or False")
  _choice(c.model.get("remat", "none"), "model.remat", REMAT_POLICIES)
  _choice(c.model.encoder_preset, "model.encoder_preset", ENCODER_PRESETS)
  _choice(c.model.llm_preset, "model.llm_preset", LLM_PRESETS)
  _choice(c.data.layout, "data.layout", LAYOUTS)
  _choice(c.model.get("feature_norm", ""), "model.feature_norm", ("", "train_stats"))
  if c.model.get("feature_norm", "") and not c.data.use_features:
    raise ConfigError("config.model.feature_norm = 'train_stats' needs precomputed features "
                      "(config.data.use_features = True): the statistics come from them")
  _choice(c.data.dataset, "data.dataset", ("lp-musiccaps-msd", "musicqa", "musicinstruct", "musiccaps", "demo"))
  _choice(c.train.trainable, "train.trainable", TRAIN_MODES)
  _choice(c.train.accum_reduce, "train.accum_reduce", ("sum", "mean"))
  _choice(c.mesh.rules, "mesh.rules", tuple(sharding.PRESETS))
  if c.train.trainable == "all" and c.model.checkpoint:
    raise ConfigError("config.train.trainable = 'all' is for tiny demo models only; a converted "
                      "checkpoint (config.model.checkpoint) trains 'projection' or 'projection+lora'")
  _choice(c.data.get("pad", "eos"), "data.pad", ("eos", "tokenizer"))
  if not isinstance(c.data.n_audio_tokens, int) or c.data.n_audio_tokens < 0:
    raise ConfigError(f"config.data.n_audio_tokens = {c.data.n_audio_tokens!r}; expected 0 (from the records) "
                      "or a positive slot bound")
  for field in ("model.pool_frames", "data.max_len", "train.batch_size",
                "train.accum_steps", "train.iters_per_epoch", "train.epochs", "log_every", "eval_every",
                "save_every", "keep"):
    node = c
    for part in field.split("."):
      node = node[part]
    if not isinstance(node, int) or node <= 0:
      raise ConfigError(f"config.{field} = {node!r}; expected a positive integer")
  if c.train.get("epoch_carry", False):
    if c.train.accum_reduce != "sum":
      raise ConfigError("config.train.epoch_carry = True carries summed gradients (the reference): it needs "
                        f"config.train.accum_reduce = 'sum', not {c.train.accum_reduce!r}")
    if c.train.iters_per_epoch < c.train.accum_steps:
      raise ConfigError(f"config.train.epoch_carry = True with config.train.iters_per_epoch = "
                        f"{c.train.iters_per_epoch} < accum_steps = {c.train.accum_steps}: no epoch would step")
  if c.train.trainable == "projection+lora":
    if c.train.lora.rank <= 0:
      raise ConfigError(f"config.train.lora.rank = {c.train.lora.rank}; expected a positive integer")
    if not 0.0 <= c.train.lora.dropout < 1.0:
      raise ConfigError(f"config.train.lora.dropout = {c.train.lora.dropout}; expected 0 <= p < 1")
    bad = set(c.train.lora.target_modules) - {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                               "up_proj", "down_proj"}
    if bad:
      raise ConfigError(f"config.train.lora.target_modules has unknown layers {sorted(bad)}")
  if c.get("log") is not None:
    _choice(c.log.get("wandb_mode", ""), "log.wandb_mode", ("", "online", "offline", "disabled"))
    if c.log.get("wandb_project", ""):
      import importlib.util
      if importlib.util.find_spec("wandb") is None:
        raise ConfigError(f"config.log.wandb_project = {c.log.wandb_project!r} needs wandb: "
                          "pip install -e \".[wandb]\"")
  # Local paths are checked here; remote ones (gs://...) when a run starts (trainer.check_run_paths,
  # storage.check_readable): validate() stays offline.
  for field in ("model.checkpoint", "model.llm_gguf"):
    path = c.model[field.split(".")[1]]
    if path and path != "smollm2" and "://" not in path and not os.path.exists(path):
      raise ConfigError(f"config.{field} = {path!r}: no such file or directory")
  if need_data and c.data.dataset != "demo":
    if not c.data.records_dir:
      raise ConfigError("config.data.records_dir is empty: point it at the shards written by "
                        "scripts/precompute.py")
    if "://" not in c.data.records_dir and not os.path.isdir(c.data.records_dir):
      raise ConfigError(f"config.data.records_dir = {c.data.records_dir!r}: no such directory")
  shape = tuple(c.mesh.shape)
  if len(shape) != 3 or shape.count(-1) > 1 or any(s == 0 or s < -1 for s in shape):
    raise ConfigError(f"config.mesh.shape = {shape}; expected (data, fsdp, tensor) with at most one -1")
  if num_devices is not None:
    known = math.prod(s for s in shape if s != -1)
    if (-1 in shape and num_devices % known) or (-1 not in shape and known != num_devices):
      raise ConfigError(f"config.mesh.shape = {shape} does not fit the {num_devices} available devices")
    full = [s if s != -1 else num_devices // known for s in shape]
    batch_ways = full[0] * full[1]
    if c.train.batch_size % batch_ways:
      raise ConfigError(f"config.train.batch_size = {c.train.batch_size} does not divide over the "
                        f"{batch_ways} data x fsdp shards of config.mesh.shape = {shape}")
  if num_processes is not None and c.train.batch_size % num_processes:
    raise ConfigError(f"config.train.batch_size = {c.train.batch_size} (global rows per micro-batch) does not "
                      f"split over the {num_processes} hosts (each reads its own rows)")


def _validate_pretrain(c: ConfigDict) -> None:
  if c.get("pretrain") is None:
    raise ConfigError("config.task = 'mert_pretrain' needs the pretrain section (configs/mert_pretrain.py)")
  p = c.pretrain
  if c.train.trainable != "all":
    raise ConfigError(f"config.train.trainable = {c.train.trainable!r}: pretraining trains the whole encoder "
                      "and its heads ('all')")
  bad = [f for f in p.features if f not in PRETRAIN_FEATURES]
  if bad or not p.features:
    raise ConfigError(f"config.pretrain.features = {tuple(p.features)!r}; expected some of {PRETRAIN_FEATURES}")
  for field, ok, want in (
      ("codebook_size", isinstance(p.codebook_size, int) and p.codebook_size >= 2, "an integer >= 2"),
      ("crop_seconds", p.crop_seconds > 0, "> 0"),
      ("mask_prob", 0 < p.mask_prob <= 1, "in (0, 1]"),
      ("mask_length", isinstance(p.mask_length, int) and p.mask_length >= 1, "a positive integer"),
      ("feature_grad_mult", 0 <= p.feature_grad_mult <= 1, "in [0, 1]"),
      ("valid_fraction", 0 <= p.valid_fraction < 1, "in [0, 1)"),
      ("cqt_bins", p.cqt_bins % p.cqt_bins_per_octave == 0 and p.cqt_bins_per_octave % 12 == 0,
       "whole octaves of cqt_bins_per_octave, itself a multiple of 12")):
    if not ok:
      raise ConfigError(f"config.pretrain.{field} = {p[field]!r}; expected {want}")
  _choice(p.demo_set, "pretrain.demo_set", ("demo", "smoke"))
  source = p.source
  if source != "demo" and not source.startswith("records:") and not os.path.isdir(source):
    raise ConfigError(f"config.pretrain.source = {source!r}: expected 'demo', a folder of .wav files or "
                      "'records:<dir>'")


def demo_config(c: ConfigDict, *, smoke: bool = False) -> ConfigDict:
  """The embedded demo: the real SmolLM2-135M-Instruct (pip-installed GGUF) as the frozen LLM, a small
  randomly initialized MERT-architecture encoder (no pretrained MERT can be had offline), and the
  music21 demo set. `smoke` runs the same path in seconds: a tiny random LLM with SmolLM2's tokenizer
  and a handful of clips."""
  c.data.dataset = "demo"
  c.data.train_split, c.data.eval_split = "train", "test"
  c.data.demo_dir = ""             # "" = $MUSILINGO_CACHE/demo (built on first use, then reused)
  c.data.demo_pieces = (10, 4) if smoke else (48, 12)   # (train pieces, test pieces)
  c.data.demo_clips_per_piece = 2 if smoke else 5
  c.data.demo_clip_seconds = 4.0 if smoke else 10.0
  c.data.use_features = True
  c.data.layout = "reference"
  c.model.llm_gguf = "smollm2"
  c.model.encoder_preset = "demo"
  c.model.llm_preset = "tiny" if smoke else "vicuna_7b"
  c.model.smoke_llm = smoke         # tiny random LLM (SmolLM2's tokenizer) instead of SmolLM2's weights
  c.model.compute_dtype = "float32"  # portable: bf16 (f32 accumulation) steps ~1.9x faster only on AMX CPUs (STEP_BF16.md)
  c.model.frozen_dtype = "float32"
  # A demo choice, not the reference's t = 325: pooling over ~1.7 s keeps more of a 10 s clip.
  c.model.pool_frames = 125
  # The random encoder's features are ~97 % one shared direction: standardised, the projection trains.
  c.model.feature_norm = "train_stats"
  c.data.max_len = 64
  c.prompt.max_txt_len = 32
  # The projection plus rank-8 LoRA on q/v: in 150 CPU steps a projection alone learns the answer format
  # only slowly (held-out factual accuracy stayed below the majority baseline in our runs).
  c.train.trainable = "projection+lora"
  c.train.lora.rank, c.train.lora.alpha, c.train.lora.dropout = 8, 16.0, 0.0
  c.train.lora.target_modules = ("q_proj", "v_proj")
  c.train.batch_size = 4 if smoke else 8
  c.train.accum_steps = 1
  c.train.init_lr, c.train.min_lr, c.train.warmup_lr = 5e-3, 5e-4, 1e-5
  c.train.warmup_steps = 2 if smoke else 15
  # 200 steps (~3 s each on 2 cores): held-out instrument accuracy 0.50-0.57 with the audio vs 0.10 zeroed
  # in our runs; 150 steps gave 0.30 vs 0.08 (both with feature_norm; without it the audio did not matter).
  c.train.iters_per_epoch = 4 if smoke else 200
  c.train.epochs = 1
  c.train.weight_decay = 0.05
  c.log_every = 1 if smoke else 10
  c.eval_every = 4 if smoke else 50
  c.eval_batches = 2 if smoke else 4
  c.save_every = 2 if smoke else 50
  c.keep = 2
  c.eval.generate_samples = 8 if smoke else 0   # the demo's full held-out report runs at the end
  c.eval.max_new_tokens = 8 if smoke else 40   # captions run to ~30 tokens
  c.eval.demo_questions = 28 if smoke else 210   # held-out questions in the final report (all types)
  return c
