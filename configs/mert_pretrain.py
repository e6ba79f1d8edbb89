"""`--config configs/mert_pretrain.py:<preset>`: MERT-style pretraining of the encoder (demo, mert_v1_95m,
smoke), defined in musilingo_jax/configs/mert_pretrain.py."""

from musilingo_jax.configs.mert_pretrain import PRESETS, get_config  # noqa: F401
