"""Stage 1: caption pretraining of the projection on LP-MusicCaps-MSD: configs/pretrain.py. The reference's
stage-1 schedule is config.REFERENCE_SCHEDULES["pretrain"] (the runner it follows: docs/reference.md, "Training").

No instruction template: [BOS] + audio + caption + "\\n"; answers truncated to 32 tokens.
"""

from musilingo_jax import config as cfglib


def get_config(arg: str = ""):
  c = cfglib.base_config()
  cfglib.apply_schedule(c, "pretrain")
  c.model.scan_layers = True  # full-size MERT-330M + Vicuna-7B: scanned layers (compile time, per-chip memory)
  c.stage = 1
  c.data.dataset, c.data.train_split, c.data.eval_split = "lp-musiccaps-msd", "train", "valid"
  c.data.max_len = 64
  c.prompt.template, c.prompt.end_sym, c.prompt.max_txt_len = False, "\n", 32
  return c
