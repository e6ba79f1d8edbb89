"""Evaluate a MusiLingo model with the reference metrics (same as `musilingo-evaluate`).

  python scripts/evaluate.py --workdir RUN --records DIR --split Eval --out DIR

The program is musilingo_jax/main/evaluate.py; `--help` lists every option. Needs the package installed
(`pip install -e .`).
"""

from musilingo_jax.main.evaluate import run

if __name__ == "__main__":
  run()
