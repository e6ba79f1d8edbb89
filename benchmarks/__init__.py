"""Benchmarks of musilingo_jax against the PyTorch reference and transformers, on this machine.

  python -m benchmarks [--quick]       all of them; writes benchmarks/BENCHMARKS.md, .json, .png (__main__.py)
  python -m benchmarks.step            train step: ours vs the PyTorch eager reference (tokens/s, MFU)
  python -m benchmarks.gemm            f32 GEMMs at the 7B slice's shapes: XLA:CPU vs torch
  python -m benchmarks.decode          greedy decode: generate.generate_ids vs transformers' generate
  python -m benchmarks.convert         conversion of a ~1 GB checkpoint: time and peak RSS, in fresh processes
  python -m benchmarks.pipeline        Grain input pipeline examples/s

Run from the repository root (the package is not installed). harness.py holds what they share; report.py
writes the combined report. Importing this package loads nothing heavy.
"""
