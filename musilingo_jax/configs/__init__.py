"""The training presets, as importable modules with `get_config(arg)` (arg = the preset name):

  finetune   stage-2 instruction finetuning of the projection (musicqa, musicinstruct*, musiccaps), demo, smoke
  lora       projection + LoRA on top of a finetune preset
  pretrain   stage-1 caption pretraining
  mert_pretrain  MERT-style self-supervised pretraining of the encoder (demo, mert_v1_95m, smoke)

`--config configs/finetune.py:musicqa` (ml_collections config files) reads the one-line files in the
repository's configs/, which import these. Every field and its default is in musilingo_jax/config.py.
"""
