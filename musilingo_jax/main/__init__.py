"""The command-line programs. Each module here is one program with a `main(argv=None)` and a `run()` entry
point; `pyproject.toml` installs them as console scripts and `scripts/<name>.py` are thin wrappers:

  musilingo-train            train.py              (absl flags + ml_collections config files)
  musilingo-precompute       precompute.py
  musilingo-convert          convert_hf.py
  musilingo-verify           verify_conversion.py
  musilingo-generate         generate.py
  musilingo-evaluate         evaluate.py
  musilingo-export           export_pytorch.py
  musilingo-aot              aot_compile.py        (absl flags + ml_collections config files)
  musilingo-make-demo-data   make_demo_data.py
  musilingo-serve            serve.py              (Gradio web demo)
  musilingo-pretrain-encoder pretrain_encoder.py   (absl flags + ml_collections config files)

`cli.py` holds the argparse pieces several of them share.

`--help` must stay instant, so these modules import only argparse/absl/ml_collections and light
(standard-library-only) package modules at the top; jax, numpy, torch and the model and data modules are
imported inside the functions that use them. This package is the one place where such function-local imports
are the intended style.
"""
