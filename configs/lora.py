"""`--config configs/lora.py:<preset>`: projection + LoRA on top of a finetune preset, defined in
musilingo_jax/configs/lora.py."""

from musilingo_jax.configs.lora import get_config  # noqa: F401
