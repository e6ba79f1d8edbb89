"""The train step with bfloat16 compute (opt-in, `config.model.compute_dtype = "bfloat16"` with bf16 frozen
weights) beside our float32 step and the PyTorch eager float32 reference, timed alternately in one process.

  python -m benchmarks.step_bf16                        # 7B slice and demo shape, features, projection + LoRA
  python -m benchmarks.step_bf16 --shapes 7b_slice --timed 5 --markdown benchmarks/STEP_BF16.md

Our dots take bf16 inputs and accumulate in float32 (`layers.dot`); on a CPU with AMX, XLA:CPU runs that GEMM
about 2.5x faster than its float32 GEMM, where a bf16-output dot runs slower than float32. The loss of the bf16
step is reported beside the float32 one (same weights, rounded to bf16; same batch).
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch

from benchmarks import step as step_lib
from benchmarks.harness import add_common_args, environment, finish, log, parse, run_line, save_json
from musilingo_jax.testing import torch_reference as tr


def run_shape(shape: step_lib.Shape, mode: str, timed: int) -> dict:
  f32 = step_lib.our_setup(shape)
  b16 = step_lib.our_setup(step_lib.bf16_shape(shape))
  ref = tr.TorchMusiLingo.from_ours(f32.plain)
  lora_params = ()
  if mode == "projection+lora":
    lora_params = tr.add_lora(ref.lm, rank=step_lib.LORA.rank, alpha=step_lib.LORA.alpha,
                              dropout=step_lib.LORA.dropout, target_modules=step_lib.LORA.target_modules)
    tr.copy_lora_from_ours(f32.with_lora, ref.lm)
  pick = (lambda s: s.with_lora) if mode == "projection+lora" else (lambda s: s.plain)
  exs = step_lib.make_examples(shape, f32.plain.cfg.encoder.hidden_size)
  batch = step_lib.our_batch(shape, exs, None)
  torch_feats = np.stack([e["features"] for e in exs])
  ours = {name: setup.compile_step(pick(setup), mode, batch) for name, setup in (("float32", f32), ("bfloat16", b16))}
  state = {k: [s.trainable, s.opt_state] for k, s in ours.items()}
  torch_step = tr.TorchTrainStep(ref, lora_params=lora_params, lr=1e-4)
  torch.set_num_threads(os.cpu_count() or 1)
  times = {"float32": [], "bfloat16": [], "torch float32": []}
  losses = {}
  for i in range(timed + 1):  # step 0: warm-up (and the losses), not timed
    for name, s in ours.items():
      t0 = time.perf_counter()
      state[name][0], state[name][1], m = s.step(state[name][0], state[name][1], s.frozen, batch, jnp.int32(i))
      jax.block_until_ready(m["loss"])
      if i:
        times[name].append(time.perf_counter() - t0)
      else:
        losses[name] = float(m["loss"])
    t0 = time.perf_counter()
    loss = torch_step(exs, features=torch_feats)
    if i:
      times["torch float32"].append(time.perf_counter() - t0)
    else:
      losses["torch float32"] = loss
  med = {k: statistics.median(v) for k, v in times.items()}
  row = {"shape": shape.name, "mode": mode, "input": "features", "timed": timed, "step_s": med, "steps": times,
         "losses": losses, "note": shape.note,
         "bf16_vs_torch_f32": med["torch float32"] / med["bfloat16"],
         "f32_vs_torch_f32": med["torch float32"] / med["float32"],
         "bf16_vs_f32": med["float32"] / med["bfloat16"]}
  del ours, state, f32, b16, ref
  gc.collect()
  return row


def write_markdown(results: dict, path) -> None:
  from pathlib import Path
  env = results["env"]
  L = ["# The train step in bfloat16 (benchmarks/step_bf16.py)", "",
       run_line("python -m benchmarks.step_bf16", env) + " Median of the timed steps after one warm-up step, each side "
       "timed alternately; precomputed features; the LM head at label positions (as the trainer runs).", "",
       "| shape | mode | ours float32 s | ours bfloat16 s | torch float32 s | bf16 / torch f32 | f32 / torch f32 | "
       "bf16 / f32 | loss f32 | loss bf16 |", "|---|---|---|---|---|---|---|---|---|---|"]
  for r in results["rows"]:
    s, lo = r["step_s"], r["losses"]
    L.append(f"| {r['shape']} | {r['mode']} | {s['float32']:.3f} | {s['bfloat16']:.3f} | {s['torch float32']:.3f} | "
             f"{r['bf16_vs_torch_f32']:.2f}x | {r['f32_vs_torch_f32']:.2f}x | {r['bf16_vs_f32']:.2f}x | "
             f"{lo['float32']:.5f} | {lo['bfloat16']:.5f} |")
  Path(path).write_text("\n".join(L) + "\n")


def main(argv=None) -> int:
  p = argparse.ArgumentParser(prog="python -m benchmarks.step_bf16", description=__doc__.split("\n\n")[0])
  add_common_args(p)
  p.add_argument("--shapes", default="7b_slice,demo", help="comma list of: demo, 7b_slice")
  p.add_argument("--modes", default="projection+lora", help="comma list of: projection, projection+lora")
  p.add_argument("--timed", type=int, default=3)
  p.add_argument("--markdown", default=None, metavar="MD", help="also write the table here")
  args = parse(p, argv, quick_defaults=dict(timed=1))
  results: dict = {"env": environment(), "rows": [], "_json": args.json}
  for shape in step_lib.shapes(args.quick, args.shapes):
    for mode in args.modes.split(","):
      r = run_shape(shape, mode, args.timed)
      results["rows"].append(r)
      s = r["step_s"]
      log(f"{shape.name} {mode}: ours f32 {s['float32']:.3f} s, ours bf16 {s['bfloat16']:.3f} s, torch f32 "
          f"{s['torch float32']:.3f} s -> bf16 {r['bf16_vs_torch_f32']:.2f}x, f32 {r['f32_vs_torch_f32']:.2f}x of "
          f"torch; losses {r['losses']}")
      save_json(results)
  return finish(results, args.markdown, write_markdown)


if __name__ == "__main__":
  sys.exit(main())
