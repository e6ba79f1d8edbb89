"""Ask MusiLingo about one audio file (same as `musilingo-generate`).

  python scripts/generate.py --workdir RUN --audio song.wav --question "What is the tempo?" [--chat]

The program is musilingo_jax/main/generate.py; `--help` lists every option. Needs the package installed
(`pip install -e .`).
"""

from musilingo_jax.main.generate import run

if __name__ == "__main__":
  run()
