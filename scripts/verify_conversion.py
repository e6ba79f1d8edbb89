"""Check a conversion against the transformers PyTorch models (same as `musilingo-verify`).

  python scripts/verify_conversion.py --mert DIR --llm DIR_OR_GGUF [--tol 1e-4]

The program is musilingo_jax/main/verify_conversion.py; `--help` lists every option. Needs the package installed
(`pip install -e .`).
"""

from musilingo_jax.main.verify_conversion import run

if __name__ == "__main__":
  run()
