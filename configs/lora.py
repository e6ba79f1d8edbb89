"""Projection + LoRA on the frozen LLM, on top of a finetune preset: configs/lora.py:musicqa.

LoRA B starts at zero, so step 0 equals the projection-only model.
"""

import importlib.util
import os

_spec = importlib.util.spec_from_file_location(
    "_finetune", os.path.join(os.path.dirname(os.path.abspath(__file__)), "finetune.py"))
_finetune = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_finetune)


def get_config(arg: str = "musicqa"):
  c = _finetune.get_config(arg or "musicqa")
  c.train.trainable = "projection+lora"
  c.train.lora.rank, c.train.lora.alpha, c.train.lora.dropout = 8, 16.0, 0.05
  c.train.lora.target_modules = ("q_proj", "k_proj", "v_proj", "o_proj")
  if arg in ("demo", "smoke"):
    c.train.lora.dropout = 0.0
  return c
