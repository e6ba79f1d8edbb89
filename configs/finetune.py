"""Stage-2 instruction finetuning of the projection (SPEC.md section 3), plus the demo and smoke runs.

  python scripts/train.py --config configs/finetune.py:musicqa --workdir runs/musicqa \
      --config.model.checkpoint=converted/ --config.data.records_dir=records/musicqa

Presets: musicqa, musicinstruct (all), musicinstruct_short, musicinstruct_long, musiccaps (reference
hyperparameters); demo (the README's main job: real SmolLM2 + the embedded music21 set, 13-18 min on 2 CPU
cores); smoke (the same path in seconds, for tests).
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
    return cfglib.demo_config(c, smoke=(arg == "smoke"))
  cfglib.apply_schedule(c, arg)
  if arg == "musicqa":
    c.data.dataset, c.data.train_split, c.data.eval_split = "musicqa", "Finetune", "Eval"
    c.data.n_audio_tokens = 4  # 372,000 native samples (15.5 s at 24 kHz) -> 1162 frames -> 4 tokens
  elif arg.startswith("musicinstruct"):
    c.data.dataset, c.data.train_split, c.data.eval_split = "musicinstruct", "train", "test"
    c.data.n_audio_tokens = 3  # ~10 s clips -> 749 frames -> 3 tokens
  else:
    c.data.dataset, c.data.train_split, c.data.eval_split = "musiccaps", "train", "test"
    c.data.n_audio_tokens = 3
  return c
