"""Export a trained model to PyTorch / Hugging Face (same as `musilingo-export`).

  python scripts/export_pytorch.py --workdir RUN --out DIR

The program is musilingo_jax/main/export_pytorch.py; `--help` lists every option. Needs the package installed
(`pip install -e .`).
"""

from musilingo_jax.main.export_pytorch import run

if __name__ == "__main__":
  run()
