"""Convert PyTorch/GGUF checkpoints into our Orbax checkpoint (same as `musilingo-convert`).

  python scripts/convert_hf.py --mert DIR --llm DIR_OR_GGUF --out DIR [--dtype bfloat16]

The program is musilingo_jax/main/convert_hf.py; `--help` lists every option. Needs the package installed
(`pip install -e .`).
"""

from musilingo_jax.main.convert_hf import run

if __name__ == "__main__":
  run()
