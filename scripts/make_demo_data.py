"""Build the embedded demo data set (same as `musilingo-make-demo-data`).

  python scripts/make_demo_data.py --out data/demo

The program is musilingo_jax/main/make_demo_data.py; `--help` lists every option. Needs the package installed
(`pip install -e .`).
"""

from musilingo_jax.main.make_demo_data import run

if __name__ == "__main__":
  run()
