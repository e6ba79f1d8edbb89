"""All benchmarks in one command: writes benchmarks/BENCHMARKS.md, BENCHMARKS.json and BENCHMARKS.png.

  python -m benchmarks            # full run (~8 min on 2 quiet CPU cores; ~21 min at load average 7)
  python -m benchmarks --quick    # fewer layers / steps (~2.5 min quiet): checks the machinery, not the goals
  python -m benchmarks --render benchmarks/BENCHMARKS.json   # re-write the report from an earlier run's JSON
  python -m benchmarks --multihost   # also runs the 2-process proof (tests/test_multihost.py, slow)
  python -m benchmarks --gpu-result gpu_check.json   # fold in a scripts/gpu_check.sh result

Every figure is a ratio measured side by side in this process (the CPU is shared and its speed varies; a
float32 matmul is calibrated here with trainer.calibrate_matmul_flops right before each timed section):
  * train step tokens/s (benchmarks/step.py): ours (the trainer's jitted step, Experiment.train_step) vs the
    PyTorch eager reference of the same MusiLingo step (musilingo_jax.testing.torch_reference: transformers HubertModel +
    Linear + LlamaForCausalLM with our weights, AdamW on the projection, or on projection + LoRA), timed
    alternately step by step, at the demo shape (SmolLM2-135M-shaped LLaMA + the demo encoder) and at a
    LLaMA-7B slice (2 layers at 7B dims, vocab 32001, untied; MERT-330M dims with 2 of 24 layers); float32 on
    CPU, random weights;
  * the step's FLOP/s over the calibrated matmul peak, counting only what the step must do (experiment.step_flops);
  * the encoder inside the step (raw audio) vs precomputed features;
  * f32 GEMMs at the 7B slice's shapes, XLA:CPU vs torch (benchmarks/gemm.py);
  * decode tokens/s: generate.generate_ids (greedy, KV cache, one jit) vs transformers' generate
    (benchmarks/decode.py);
  * conversion (convert.hf.import_pretrained of a safetensors checkpoint) time and peak RSS vs checkpoint bytes
    (benchmarks/convert.py, in fresh processes);
  * Grain pipeline examples/s (benchmarks/pipeline.py) vs the examples/s our step consumes.
Each module also runs alone: python -m benchmarks.<step|gemm|decode|convert|pipeline> --help.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from benchmarks import harness, report
from benchmarks.harness import HERE, ROOT, log, save_json


def main(argv=None) -> int:
  p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n\n")[0])
  p.add_argument("--quick", action="store_true")
  p.add_argument("--out", default=str(HERE / "BENCHMARKS.md"))
  p.add_argument("--json", default=None, help="default: --out with .json")
  p.add_argument("--plot", default=None, help="default: --out with .png")
  p.add_argument("--only", default="steps,decode,convert,pipeline",
                 help="comma list of sections: steps, decode, convert, pipeline")
  p.add_argument("--shapes", default="demo,7b_slice")
  p.add_argument("--multihost", action="store_true", help="also run tests/test_multihost.py (a few minutes)")
  p.add_argument("--render", default=None, metavar="JSON",
                 help="only re-write the report (md, png) from a BENCHMARKS.json of an earlier run")
  p.add_argument("--gpu-result", default=None, help="JSON written by scripts/gpu_check.sh (default: "
                 "BENCHMARKS_GPU.json beside --out, if present)")
  args = p.parse_args(argv)
  out = Path(args.out)
  json_path = args.json or str(out.with_suffix(".json"))
  if args.render:
    results = json.loads(Path(args.render).read_text())
    gpu = Path(args.gpu_result) if args.gpu_result else out.with_name("BENCHMARKS_GPU.json")
    if gpu.is_file():
      results["gpu"] = json.loads(gpu.read_text())
    results["findings"] = report.findings(results)
    results["plot"] = report.plot(results, Path(args.plot) if args.plot else out.with_suffix(".png"))
    save_json(results, json_path)
    report.write_markdown(results, out)
    log(f"re-wrote {out} from {args.render}")
    return 0

  import torch

  from benchmarks import convert, decode, gemm, pipeline, step
  from musilingo_jax.testing import torch_reference as tr

  sections = set(args.only.split(","))
  torch.set_num_threads(os.cpu_count() or 1)
  t_start = time.perf_counter()
  results: dict = {
      "command": " ".join([Path(sys.executable).name, "-m", "benchmarks", *sys.argv[1:]]) if argv is None
      else "benchmarks.main",
      "quick": args.quick, "steps": [], "findings": [], "env": harness.environment(), "_json": json_path,
  }
  results["env"]["peak_f32_jax_start"] = harness.calibrate()
  results["env"]["peak_f32_torch_start"] = harness.torch_calibrate()
  log(f"calibrated f32 matmul: jax {results['env']['peak_f32_jax_start'] / 1e9:.0f} GFLOP/s, torch "
      f"{results['env']['peak_f32_torch_start'] / 1e9:.0f} GFLOP/s")

  for shape in step.shapes(args.quick, args.shapes) if "steps" in sections else ():
    step.run_steps(shape, args.quick, results)
    gc.collect()

  if "steps" in sections and "7b_slice" in args.shapes.split(","):
    results["gemm"] = gemm.bench_gemm(gemm.slice_rows(args.quick))
    gemm.log_rows(results["gemm"])
  cache = {}

  def demo_models():  # only for the fallbacks: the demo-shape model and its torch twin
    if "m" not in cache:
      plain = step.our_setup(step.shape_named("demo", args.quick)).plain
      cache["m"] = (plain, tr.TorchMusiLingo.from_ours(plain, with_encoder=False))
    return cache["m"]

  if "decode" in sections:
    results["decode"] = decode.run_decode(args.quick, demo_models)
    decode.log_rows(results["decode"])
    save_json(results)
  if "convert" in sections:
    results["convert"] = convert.run_convert(args.quick, demo_models)
    convert.log_result(results["convert"])
    save_json(results)
  cache.clear()
  gc.collect()
  if "pipeline" in sections:
    results["pipeline"] = []
    shape = step.shape_named("demo", args.quick)
    for feats in (True, False):
      row = report.find_step(results, "demo", inp="features" if feats else "audio")
      pr = pipeline.run_pipeline(args.quick, feats, shape.seconds, shape.rows)
      consume = row["examples_per_s_ours"] if row else float("nan")
      results["pipeline"].append({"input": "features" if feats else "audio (10 s int16)",
                                  "examples_per_s": pr["examples_per_s"], "step_examples_per_s": consume,
                                  "ratio": pr["examples_per_s"] / consume, "raw": pr})
      log(f"pipeline {'features' if feats else 'audio'}: {pr['examples_per_s']:.1f} ex/s vs step {consume:.2f} ex/s")
      save_json(results)
  if args.multihost:
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "slow", str(ROOT / "tests" / "test_multihost.py")]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    results["multihost"] = {"command": "python -m pytest -m slow tests/test_multihost.py",
                            "passed": proc.returncode == 0, "s": time.perf_counter() - t0,
                            "tail": proc.stdout[-1500:]}
    log(f"multihost: {'passed' if proc.returncode == 0 else 'FAILED'}")
  gpu = Path(args.gpu_result) if args.gpu_result else out.with_name("BENCHMARKS_GPU.json")
  if gpu.is_file():
    results["gpu"] = json.loads(gpu.read_text())
  results["env"]["peak_f32_jax_end"] = harness.calibrate()
  results["env"]["load_end"] = harness.load_average()
  results["wall_s"] = time.perf_counter() - t_start
  results["findings"] = report.findings(results)
  results["plot"] = report.plot(results, Path(args.plot) if args.plot else out.with_suffix(".png"))
  save_json(results)
  report.write_markdown(results, out)
  log(f"wrote {out}, {json_path}" + (f", {results['plot']}" if results["plot"] else ""))
  for row in report.summarize(results):
    log(f"  {report.GOALS[row['key']][1]}: {report.fmt_ratio(row['key'], row['value'])} "
        f"({'met' if row['met'] else 'not met' if row['met'] is not None else 'not measured'})")
  return 0


if __name__ == "__main__":
  sys.exit(main())
