"""Precompute a data set into ArrayRecord shards (same as `musilingo-precompute`).

  python scripts/precompute.py --dataset musicqa --data-dir DIR --split Finetune --out DIR

The program is musilingo_jax/main/precompute.py; `--help` lists every option. Needs the package installed
(`pip install -e .`).
"""

from musilingo_jax.main.precompute import run

if __name__ == "__main__":
  run()
