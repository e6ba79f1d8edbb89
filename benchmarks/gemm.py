"""f32 GEMM GFLOP/s, XLA:CPU vs torch, at the 7B slice's matmul shapes: where the 7B-slice step spends its time.

  python -m benchmarks.gemm                 # M = the 7B slice's batch x sequence (2 x 128 = 256 rows)
  python -m benchmarks.gemm --quick         # M = the quick 7B slice's (1 x 128)
  python -m benchmarks.gemm --rows 512 --json /tmp/gemm.json

Each GEMM runs jitted in JAX and eagerly in torch, alternating, best of 3 after a warm-up, plus the square
1024^3 matmul that calibrates MFU.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import torch

from benchmarks.harness import add_common_args, log, parse


def bench_gemm(rows: int) -> list[dict]:
  """f32 GEMM GFLOP/s, XLA:CPU vs torch, at the 7B slice's matmul shapes ([rows, 4096] activations)."""
  cases = [("x @ W_up  [M,4096]x[4096,11008]", (rows, 4096), (4096, 11008), False),
           ("dy @ W_up^T  [M,11008]x[11008,4096]", (rows, 11008), (4096, 11008), True),
           ("x @ W_vocab  [M,4096]x[4096,32001]", (rows, 4096), (4096, 32001), False),
           ("square 1024^3 (the MFU calibration)", (1024, 1024), (1024, 1024), False)]
  out = []
  for name, a, b, transposed in cases:
    rng = np.random.default_rng(0)
    x, w = rng.standard_normal(a, np.float32), rng.standard_normal(b, np.float32)
    f = jax.jit((lambda x, w: x @ w.T) if transposed else (lambda x, w: x @ w))
    xj, wj, xt, wt = jnp.asarray(x), jnp.asarray(w), torch.from_numpy(x), torch.from_numpy(w)
    tf = (lambda: xt @ wt.T) if transposed else (lambda: xt @ wt)
    f(xj, wj).block_until_ready()
    tf()
    tj, tt = [], []
    for _ in range(3):  # alternate
      t0 = time.perf_counter()
      f(xj, wj).block_until_ready()
      tj.append(time.perf_counter() - t0)
      t0 = time.perf_counter()
      tf()
      tt.append(time.perf_counter() - t0)
    flops = 2 * a[0] * a[1] * (b[0] if transposed else b[1])
    out.append({"gemm": name, "gflops_jax": flops / min(tj) / 1e9, "gflops_torch": flops / min(tt) / 1e9,
                "jax_over_torch": min(tt) / min(tj)})
  return out


def slice_rows(quick: bool) -> int:
  """M of the 7B slice's GEMMs: its batch rows x sequence length (benchmarks.step's shape)."""
  from benchmarks.step import shape_named
  s = shape_named("7b_slice", quick)
  return s.rows * s.seq


def log_rows(rows: list[dict]) -> None:
  for g in rows:
    log(f"gemm {g['gemm']}: jax {g['gflops_jax']:.0f} GFLOP/s, torch {g['gflops_torch']:.0f} GFLOP/s")


def main(argv=None) -> int:
  p = argparse.ArgumentParser(prog="python -m benchmarks.gemm", description=__doc__.split("\n\n")[0])
  add_common_args(p)
  p.add_argument("--rows", type=int, default=None, help="M (default: the 7B slice's batch x sequence)")
  args = parse(p, argv)
  rows = bench_gemm(args.rows or slice_rows(args.quick))
  log_rows(rows)
  if args.json:
    Path(args.json).write_text(json.dumps({"gemm": rows}, indent=1))
  return 0


if __name__ == "__main__":
  sys.exit(main())
