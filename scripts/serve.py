"""A web demo of a trained MusiLingo: upload or record a clip, chat about it (same as `musilingo-serve`).

  python scripts/serve.py --workdir RUN [--port 7860] [--host 127.0.0.1]
  python scripts/serve.py --checkpoint DIR --projection FILE

The program is musilingo_jax/main/serve.py; `--help` lists every option. Needs the package installed
(`pip install -e .`).
"""

from musilingo_jax.main.serve import run

if __name__ == "__main__":
  run()
