"""Test and benchmark helpers: never imported by the product code (training, inference, conversion).

  torch_reference   the PyTorch re-implementation of the reference MusiLingo step (imports torch and
                    transformers); the parity tests and the step benchmark (benchmarks/step.py) use it.
"""
