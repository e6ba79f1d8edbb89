"""Compile the train step for a Cloud TPU topology, no TPU needed (same as `musilingo-aot`).

  python scripts/aot_compile.py --config configs/finetune.py:musicqa --topology v5e:4x4

The program is musilingo_jax/main/aot_compile.py; `--help` lists every option. Needs the package installed
(`pip install -e .`).
"""

from musilingo_jax.main.aot_compile import run

if __name__ == "__main__":
  run()
