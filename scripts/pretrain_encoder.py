"""MERT-style pretraining of the encoder (same as the `musilingo-pretrain-encoder` command).

  python scripts/pretrain_encoder.py --config configs/mert_pretrain.py:demo [--workdir DIR] [--config.x=y]

The program is musilingo_jax/main/pretrain_encoder.py; `--help` lists every option. Needs the package installed
(`pip install -e .`).
"""

from musilingo_jax.main.pretrain_encoder import run

if __name__ == "__main__":
  run()
