"""`--config configs/finetune.py:<preset>`: stage-2 finetuning presets (musicqa, musicinstruct,
musicinstruct_short, musicinstruct_long, musiccaps, demo, smoke), defined in musilingo_jax/configs/finetune.py."""

from musilingo_jax.configs.finetune import PRESETS, get_config  # noqa: F401
