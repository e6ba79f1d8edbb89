"""Projection + LoRA on the frozen LLM, on top of a finetune preset: configs/lora.py:musicqa.

LoRA B starts at zero, so step 0 equals the projection-only model.
"""

from musilingo_jax.configs import finetune


def get_config(arg: str = "musicqa"):
  c = finetune.get_config(arg or "musicqa")
  c.train.trainable = "projection+lora"
  c.train.lora.rank, c.train.lora.alpha, c.train.lora.dropout = 8, 16.0, 0.05
  c.train.lora.target_modules = ("q_proj", "k_proj", "v_proj", "o_proj")
  if arg in ("demo", "smoke"):
    c.train.lora.dropout = 0.0
  return c
