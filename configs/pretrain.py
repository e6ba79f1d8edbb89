"""`--config configs/pretrain.py`: stage-1 caption pretraining, defined in musilingo_jax/configs/pretrain.py."""

from musilingo_jax.configs.pretrain import get_config  # noqa: F401
