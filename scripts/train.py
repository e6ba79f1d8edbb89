"""Train MusiLingo (same as the `musilingo-train` command).

  python scripts/train.py --config configs/finetune.py:demo [--workdir DIR] [--config.x=y]

The program is musilingo_jax/main/train.py; `--help` lists every option. Needs the package installed
(`pip install -e .`).
"""

from musilingo_jax.main.train import run

if __name__ == "__main__":
  run()
