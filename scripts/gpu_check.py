"""GPU check: the MusiLingo train step at LLaMA-7B layer shapes in bf16 on one GPU; tokens/s, step time, MFU.

  scripts/gpu_check.sh [OUT.json]                  # the wrapper: checks JAX sees a GPU, caps the time at 5 min
  python scripts/gpu_check.py --out gpu.json       # same, without the wrapper
  python scripts/gpu_check.py --cpu-smoke          # tiny shapes on CPU: proves the script runs (no GPU needed)

What runs: random weights (nothing to download), a LLaMA-7B-shaped LLM with --layers decoder layers at 7B
dims (4096 / 11008 / 32 heads, vocab 32001, untied) in bf16, the trainable projection in f32, AdamW; a batch of
--rows x --seq tokens with precomputed features [rows, 4, 1024] (MusicQA: 4 audio tokens); then, unless
--no-audio, the same step with a MERT-v1-330M-shaped encoder (24 layers) inside on 15.5 s clips.
Attention: --attention cudnn (flash attention through jax.nn.dot_product_attention) is tried first; if it
fails to compile or run, the step falls back to "xla" and says so (a kernel that fails on one
GPU/driver combination must not end the check). MFU = the FLOPs the step must
do (experiment.step_flops: no weight gradients for frozen weights) / step time / the card's dense bf16 peak
(H100 / H200 SXM: 989 TFLOP/s; from jax.devices()[0].device_kind), and also over a bf16 matmul measured here.
Writes one JSON (--out, default $OUT/gpu_check.json or ./gpu_check.json); `python -m benchmarks` folds it in
when it is saved as BENCHMARKS_GPU.json beside benchmarks/BENCHMARKS.md (or given with --gpu-result).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
import traceback
from pathlib import Path


# Dense bf16 peaks (FLOP/s) by a substring of device_kind; the first match wins.
PEAKS_BF16 = (("H200", 989e12), ("H100 PCIe", 756e12), ("H100", 989e12), ("H800", 989e12), ("GH200", 989e12),
              ("A100", 312e12), ("L40S", 362e12), ("A10G", 70e12), ("L4", 121e12))


def log(msg: str) -> None:
  print(f"[gpu_check {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def peak_for(kind: str) -> float | None:
  for key, value in PEAKS_BF16:
    if key.lower() in kind.lower():
      return value
  return None


def build(args, dtype):
  """(plain MusiLingo, state) with attention `xla`; the graph is rebuilt per attention implementation."""
  from flax import nnx
  from musilingo_jax import build as buildlib
  from musilingo_jax.models import layers
  from musilingo_jax.models.llama import Llama, LlamaConfig
  from musilingo_jax.models.mert import MERT, MERTConfig
  from musilingo_jax.models.musilingo import MusiLingo
  if args.cpu_smoke:
    llm_cfg = LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512,
                          dtype=dtype, param_dtype=dtype)
    enc_cfg = MERTConfig.tiny(dtype=dtype, param_dtype=dtype)
  else:
    llm_cfg = LlamaConfig.vicuna_7b(num_hidden_layers=args.layers, dtype=dtype, param_dtype=dtype)
    enc_cfg = MERTConfig.mert_v1_330m(num_hidden_layers=args.encoder_layers, dtype=dtype, param_dtype=dtype)
  enc = buildlib.init_random(MERT, enc_cfg, 0)   # built under jit, on the device
  llm = buildlib.init_random(Llama, llm_cfg, 7)
  proj = layers.torch_linear(enc_cfg.hidden_size, llm_cfg.hidden_size, rngs=nnx.Rngs(params=0))
  return MusiLingo(enc, llm, proj, pool_frames=args.pool)


def with_attention(model, impl: str):
  """The same weights under a graph whose LLM (and encoder) use attention implementation `impl`."""
  import dataclasses
  from flax import nnx
  from musilingo_jax.models.musilingo import MusiLingo
  cfg = model.cfg
  new_cfg = dataclasses.replace(cfg, llm=dataclasses.replace(cfg.llm, attention_impl=impl),
                                encoder=dataclasses.replace(cfg.encoder, attention_impl=impl))
  abstract = nnx.eval_shape(lambda: MusiLingo.random(new_cfg, rngs=nnx.Rngs(0)))
  graphdef, _ = nnx.split(abstract)
  return nnx.merge(graphdef, nnx.state(model))


def make_batch(args, d_enc: int, vocab: int, use_audio: bool, samples: int):
  import numpy as np
  from musilingo_jax import prompts
  rng = np.random.default_rng(0)
  exs = []
  room = args.seq - 1 - 7 - args.n_audio
  for i in range(args.rows):
    la = room // 4 if i == 0 else int(rng.integers(room // 8, room // 4 + 1))
    lt = room - room // 4 if i == 0 else int(rng.integers(room // 2, room - room // 4 + 1))
    exs.append({"before": rng.integers(3, vocab, 7), "after": rng.integers(3, vocab, la),
                "answer": rng.integers(3, vocab, lt),
                "features": rng.standard_normal((args.n_audio, d_enc)).astype(np.float32)})
  b = prompts.collate(exs, n_audio_tokens=args.n_audio, max_len=args.seq, bos_id=1, pad_id=2)
  batch = {k: b[k] for k in ("input_ids", "attention_mask", "labels", "positions", "audio_start")}
  if use_audio:
    batch["audio"] = (0.1 * rng.standard_normal((args.rows, samples))).astype(np.float32)
  else:
    batch["features"] = b["features"]
  return batch


def time_step(model, batch, steps: int, warmup: int) -> dict:
  """The trainer's step (Experiment: projection trains, the reference's AdamW and schedule) on one device."""
  import jax
  import jax.numpy as jnp
  from musilingo_jax import config as cfglib
  from musilingo_jax import sharding
  from musilingo_jax.experiment import Experiment
  c = cfglib.base_config()
  c.train.trainable, c.train.accum_steps = "projection", 1
  mesh = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
  exp = Experiment.from_config(c, mesh, model=model, data=False)
  trainable, opt_state = exp.init_state()
  frozen = exp.frozen
  batch = {k: jnp.asarray(v) for k, v in batch.items()}
  t0 = time.perf_counter()
  step = exp.train_step(exp.batch_shardings(batch)).lower(trainable, opt_state, frozen, batch, jnp.int32(0)).compile()
  compile_s = time.perf_counter() - t0
  losses = []
  for i in range(warmup):
    trainable, opt_state, m = step(trainable, opt_state, frozen, batch, jnp.int32(i))
    losses.append(float(m["loss"]))
  jax.block_until_ready(trainable)
  t0 = time.perf_counter()
  for i in range(steps):
    trainable, opt_state, m = step(trainable, opt_state, frozen, batch, jnp.int32(warmup + i))
  loss = float(m["loss"])  # waits for the last step
  dt = (time.perf_counter() - t0) / steps
  return {"compile_s": compile_s, "step_s": dt, "loss_first": losses[0] if losses else None, "loss_last": loss,
          "finite": bool(m["finite"])}


def run_case(model, args, use_audio: bool, peak, calibrated) -> dict:
  from musilingo_jax import experiment
  samples = int(round(args.seconds * 24000))
  batch = make_batch(args, model.cfg.encoder.hidden_size, model.cfg.llm.vocab_size, use_audio, samples)
  impls = [args.attention] if args.attention == "xla" else [args.attention, "xla"]
  out = {"input": "audio" if use_audio else "features", "attention_requested": args.attention}
  for impl in impls:
    try:
      r = time_step(with_attention(model, impl), batch, args.steps, args.warmup)
      out.update(r)
      out["attention_ran"] = impl
      break
    except Exception as e:  # noqa: BLE001 - any failure of a kernel path falls back, and is reported
      msg = f"{type(e).__name__}: {str(e).splitlines()[0][:400] if str(e) else ''}"
      out.setdefault("fallbacks", []).append({"attention": impl, "error": msg})
      log(f"attention implementation {impl!r} failed ({msg}); "
          + ("falling back to 'xla'" if impl != "xla" else "no fallback left"))
      if impl == "xla":
        out["error"] = msg
        out["traceback"] = traceback.format_exc()[-3000:]
        return out
  frames = int(model.cfg.encoder.feature_lengths(samples)) if use_audio else 0
  flops = experiment.step_flops(model, args.rows, args.seq, args.n_audio, trainable_mode="projection",
                             encoder_frames=frames)
  tokens = args.rows * args.seq
  out.update({"rows": args.rows, "seq": args.seq, "tokens_per_step": tokens, "tokens_per_s": tokens / out["step_s"],
              "step_flops": flops, "achieved_flops": flops / out["step_s"],
              "mfu": flops / out["step_s"] / peak if peak else None,
              "mfu_vs_calibrated_matmul": flops / out["step_s"] / calibrated if calibrated else None})
  if use_audio:
    out.update({"audio_seconds": args.seconds, "encoder_frames": frames})
  mfu = "n/a (unknown peak)" if out["mfu"] is None else f"{out['mfu']:.1%}"
  log(f"{out['input']}: attention={out['attention_ran']}, step {out['step_s'] * 1e3:.1f} ms, "
      f"{out['tokens_per_s']:.0f} tokens/s, MFU {mfu}, compile {out['compile_s']:.1f} s, loss {out['loss_last']:.4f}")
  return out


def headline(result: dict) -> dict | None:
  """Copies the features case's numbers to the top level (`python -m benchmarks` reads "mfu")."""
  main_case = next((c for c in result["cases"] if c["input"] == "features" and "step_s" in c), None)
  if main_case:
    for k in ("mfu", "tokens_per_s", "step_s", "attention_ran"):
      result[k] = main_case.get(k)
  return main_case


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--out", default=None)
  p.add_argument("--layers", type=int, default=8, help="LLaMA-7B decoder layers (32 = the whole 7B)")
  p.add_argument("--encoder-layers", type=int, default=24, help="MERT-330M layers for the audio case")
  p.add_argument("--rows", type=int, default=16)
  p.add_argument("--seq", type=int, default=256)
  p.add_argument("--n-audio", type=int, default=4)
  p.add_argument("--pool", type=int, default=325)
  p.add_argument("--seconds", type=float, default=15.5, help="clip length for the audio case")
  p.add_argument("--steps", type=int, default=10)
  p.add_argument("--warmup", type=int, default=2)
  p.add_argument("--attention", default="cudnn", choices=("cudnn", "xla"))
  p.add_argument("--no-audio", action="store_true", help="skip the encoder-inside-the-step case")
  p.add_argument("--peak-tflops", type=float, default=None, help="override the card's dense bf16 peak")
  p.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on CPU: check that the script runs")
  args = p.parse_args(argv)
  if args.cpu_smoke:
    os.environ["JAX_PLATFORMS"] = "cpu"
    args.rows, args.seq, args.steps, args.warmup, args.seconds, args.pool = 2, 48, 2, 1, 0.25, 7
  out_path = Path(args.out or os.path.join(os.environ.get("OUT") or ".", "gpu_check.json"))
  logging.basicConfig(level=logging.WARNING)

  try:
    import jax
    import jax.numpy as jnp
  except ImportError as e:
    print(f"gpu_check: cannot import jax ({e}); install jax[cuda12] on the GPU machine", file=sys.stderr)
    return 2
  dev = jax.devices()[0]
  if dev.platform != "gpu" and not args.cpu_smoke:
    print(f"gpu_check: JAX sees no GPU (default backend: {dev.platform}, devices {jax.devices()}). This check needs "
          "jax with its CUDA plugin (pip package jax[cuda12]: jax-cuda12-plugin + jax-cuda12-pjrt) and an "
          "NVIDIA driver; or run with --cpu-smoke to test the script on CPU.", file=sys.stderr)
    return 2
  kind = dev.device_kind
  peak = args.peak_tflops * 1e12 if args.peak_tflops else (peak_for(kind) if dev.platform == "gpu" else None)
  from musilingo_jax import trainer
  dtype = jnp.bfloat16
  log(f"device: {kind} ({dev.platform}, {jax.device_count()} device(s)); jax {jax.__version__}; "
      f"bf16 dense peak {peak / 1e12 if peak else float('nan'):.0f} TFLOP/s")
  result = {"device_kind": kind, "platform": dev.platform, "jax": jax.__version__, "dtype": "bfloat16",
            "peak_flops": peak, "peak_source": "--peak-tflops" if args.peak_tflops else "table by device_kind",
            "cpu_smoke": args.cpu_smoke, "layers": args.layers, "cases": []}
  t_all = time.perf_counter()
  try:
    n = 1024 if args.cpu_smoke else 8192
    result["calibrated_bf16_matmul_flops"] = trainer.calibrate_matmul_flops(n, repeats=3 if args.cpu_smoke else 20,
                                                                            dtype=dtype)
    log(f"bf16 {n}^3 matmul here: {result['calibrated_bf16_matmul_flops'] / 1e12:.3g} TFLOP/s")
    t0 = time.perf_counter()
    model = build(args, dtype)
    result["build_s"] = time.perf_counter() - t0
    result["llm"] = {k: getattr(model.cfg.llm, k) for k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                                             "num_attention_heads", "vocab_size")}
    result["encoder"] = {k: getattr(model.cfg.encoder, k) for k in ("hidden_size", "num_hidden_layers")}
    for use_audio in ((False,) if args.no_audio else (False, True)):
      result["cases"].append(run_case(model, args, use_audio, peak, result["calibrated_bf16_matmul_flops"]))
      headline(result)
      result["wall_s"] = time.perf_counter() - t_all
      out_path.parent.mkdir(parents=True, exist_ok=True)
      out_path.write_text(json.dumps(result, indent=1))  # after each case: a timeout keeps what was measured
  except Exception as e:  # noqa: BLE001 - write what we have, then fail loudly
    result["error"] = f"{type(e).__name__}: {e}"
    result["traceback"] = traceback.format_exc()[-4000:]
    log(f"FAILED: {result['error']}")
  main_case = headline(result)
  result["wall_s"] = time.perf_counter() - t_all
  out_path.parent.mkdir(parents=True, exist_ok=True)
  out_path.write_text(json.dumps(result, indent=1))
  log(f"wrote {out_path} ({result['wall_s']:.0f} s)")
  return 0 if main_case and "error" not in result else 1


if __name__ == "__main__":
  sys.exit(main())
