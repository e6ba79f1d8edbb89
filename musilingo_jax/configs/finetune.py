"""Stage-2 instruction finetuning of the projection with the reference's schedules (config.REFERENCE_SCHEDULES;
docs/reference.md, "Training"), plus the demo and smoke runs.

  musilingo-train --config configs/finetune.py:musicqa --workdir runs/musicqa \
      --config.model.checkpoint=converted/ --config.data.records_dir=records/musicqa

Presets: musicqa, musicinstruct (all), musicinstruct_short, musicinstruct_long, musiccaps (reference
hyperparameters); demo (the README's main job: real SmolLM2 + the embedded music21 set + an encoder
MERT-style pretrained on first use; see README "The demo"); smoke (the same path in seconds with a random
encoder, for tests).
"""

from musilingo_jax import config as cfglib

PRESETS = ("musicqa", "musicinstruct", "musicinstruct_short", "musicinstruct_long", "musiccaps",
           "demo", "smoke")


def get_config(arg: str = "musicqa"):
  arg = arg or "musicqa"
  if arg not in PRESETS:
    raise ValueError(f"configs/finetune.py: unknown preset {arg!r}; choose from {PRESETS}")
  c = cfglib.base_config()
  if arg in ("demo", "smoke"):
    c = cfglib.demo_config(c, smoke=(arg == "smoke"))
    if arg == "demo":
      # The encoder: MERT-style pretrained on unlabeled renderings of the training pieces
      # (configs/mert_pretrain.py:demo; built on the first run, 3 to 5 min on 2 CPU cores, then cached).
      c.model.encoder_init = "pretrain_demo"
    return c
  cfglib.apply_schedule(c, arg)
  c.model.scan_layers = True  # full-size MERT-330M + Vicuna-7B: scanned layers (compile time, per-chip memory)
  # Audio tokens per micro-batch come from the clips (config.data.n_audio_tokens = 0: the records' bound).
  # MusicQA crops 372,000 samples at the file's own rate: 6 tokens at 16 kHz, 4 at 24 kHz, 2 at 44.1/48 kHz.
  if arg == "musicqa":
    c.data.dataset, c.data.train_split, c.data.eval_split = "musicqa", "Finetune", "Eval"
  elif arg.startswith("musicinstruct"):
    c.data.dataset, c.data.train_split, c.data.eval_split = "musicinstruct", "train", "test"
  else:
    c.data.dataset, c.data.train_split, c.data.eval_split = "musiccaps", "train", "test"
  return c
