"""MERT-style self-supervised pretraining of the encoder (config.task = "mert_pretrain"; docs/pretraining.md):

  musilingo-pretrain-encoder --config configs/mert_pretrain.py:demo --workdir runs/mert-demo
  (python scripts/pretrain_encoder.py ... is the same program)

Presets:
  demo         the demo encoder's shapes (hidden 256, 4 layers, 128-channel convs) on unlabeled music21
               renderings of the demo's training pieces, sized for a few CPU minutes; what
               configs/finetune.py:demo builds (config.model.encoder_init = "pretrain_demo") on first use
  mert_v1_95m  MERT-v1-95M's shapes and MERT's recipe (5 s crops, masks 0.8 x 5 frames, 336 CQT bins, Adam
               0.9/0.98 at 5e-4, clip 10, 400k updates) for real data: set config.pretrain.source
               (a folder of clips, or "records:<dir>" with config.pretrain.source_split)
  smoke        a tiny encoder on a few clips, in seconds (tests)

Every field and its default is in musilingo_jax/config.py (`add_pretrain_section`).
"""

from musilingo_jax import config as cfglib

PRESETS = ("demo", "mert_v1_95m", "smoke")


def get_config(arg: str = "demo"):
  arg = arg or "demo"
  if arg not in PRESETS:
    raise ValueError(f"configs/mert_pretrain.py: unknown preset {arg!r}; choose from {PRESETS}")
  c = cfglib.add_pretrain_section(cfglib.base_config())
  c.task = "mert_pretrain"
  c.train.trainable = "all"        # the whole encoder and the heads
  c.train.head_at_labels = False   # a MusiLingo LM-head option
  c.model.frozen_dtype = "float32"  # the encoder's parameters train: float32 (compute_dtype may be bf16)
  c.eval.generate_samples = 0
  c.eval_at_start = True           # the step-0 eval: the random encoder's probe
  c.train.accum_steps, c.train.accum_reduce = 1, "mean"
  c.train.b1, c.train.b2, c.train.eps = 0.9, 0.98, 1e-6   # MERT's Adam
  c.train.weight_decay = 0.01
  c.train.clip_norm = 10.0
  c.train.epochs = 1
  c.keep, c.keep_best = 2, False
  p = c.pretrain
  if arg == "mert_v1_95m":
    c.model.encoder_preset = "mert_v1_95m"
    c.model.scan_layers = True
    c.model.compute_dtype = "bfloat16"
    p.source = ""                  # required: real music (see the module docstring)
    p.features, p.codebook_size = ("logmel", "chroma"), 500
    p.kmeans_frames, p.kmeans_clips = 500_000, 5_000
    p.n_mels = 128
    p.cqt_bins, p.cqt_bins_per_octave = 336, 48
    p.crop_seconds = 5.0
    p.probe = False
    c.train.batch_size = 64
    c.train.init_lr, c.train.min_lr, c.train.warmup_lr = 5e-4, 0.0, 0.0
    c.train.warmup_steps, c.train.iters_per_epoch = 32_000, 400_000
    c.mesh.rules = "fsdp"
    c.log_every, c.eval_every, c.eval_batches, c.save_every = 100, 10_000, 20, 5_000
    return c
  c.model.encoder_preset = "demo" if arg == "demo" else "tiny"
  c.model.compute_dtype = "float32"  # portable: bf16 (f32 accumulation) steps ~1.9x faster only on AMX CPUs (STEP_BF16.md)
  c.mesh.rules = "dp"
  if arg == "demo":
    p.demo_set = "demo"
    # Sized for the demo's time budget (README "The demo"): about 2 minutes of steps on 2 CPU cores. The
    # probe curve of longer runs is in docs/pretraining.md.
    p.demo_pieces, p.demo_clips_per_piece, p.demo_clip_seconds = 48, 4, 6.0
    p.features, p.codebook_size = ("logmel", "chroma"), 64
    p.kmeans_frames, p.kmeans_clips, p.kmeans_iters = 40_000, 80, 20
    p.crop_seconds = 2.0
    p.feature_grad_mult = 0.1
    c.train.batch_size = 8
    c.train.init_lr, c.train.min_lr, c.train.warmup_lr = 1e-3, 1e-4, 1e-5
    c.train.warmup_steps, c.train.iters_per_epoch = 10, 60
    c.log_every, c.eval_every, c.eval_batches, c.save_every = 10, 60, 4, 20
  else:  # smoke
    p.demo_set = "smoke"
    p.demo_pieces, p.demo_clips_per_piece, p.demo_clip_seconds = 4, 2, 3.0
    p.features, p.codebook_size = ("logmel", "chroma"), 8
    p.kmeans_frames, p.kmeans_clips, p.kmeans_iters = 2_000, 8, 5
    p.cqt_bins = 36
    p.crop_seconds = 1.0
    p.probe_seconds = 1.0
    c.train.batch_size = 4
    c.train.init_lr, c.train.min_lr, c.train.warmup_lr = 1e-3, 1e-4, 1e-5
    c.train.warmup_steps, c.train.iters_per_epoch = 2, 4
    c.log_every, c.eval_every, c.eval_batches, c.save_every = 1, 4, 1, 2
  return c
