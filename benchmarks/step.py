"""Train step tokens/s: ours (the trainer's jitted step, Experiment.train_step) vs the PyTorch eager
reference of the same step.

  python -m benchmarks.step                       # demo shape and 7B slice, every case (~6 min on 2 quiet cores)
  python -m benchmarks.step --quick               # fewer layers / steps: checks the machinery, not the goals
  python -m benchmarks.step --shapes demo --json /tmp/step.json

The reference is musilingo_jax.testing.torch_reference (transformers HubertModel + Linear + LlamaForCausalLM
holding our weights, AdamW on the projection, or on projection + LoRA). Both are timed alternately step by step
in this process, at the demo shape (SmolLM2-135M-shaped LLaMA + the demo encoder) and at a LLaMA-7B slice
(2 layers at 7B dims, vocab 32001, untied; MERT-330M dims with 2 of 24 layers); float32 on CPU, random weights.
Also reported: the step's FLOP/s over the calibrated f32 matmul peak (MFU, counting only what the step must
do: experiment.step_flops), and the encoder inside the step (raw audio) vs precomputed features.

Our side (model and compiled step) is built in one place, `our_setup`.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import os
import statistics
import sys
import time
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import torch
from flax import nnx

from benchmarks.harness import add_common_args, calibrate, environment, log, parse, rss_mb, save_json
from musilingo_jax import build, experiment, prompts, sharding
from musilingo_jax import config as cfglib
from musilingo_jax.experiment import Experiment
from musilingo_jax.models import layers
from musilingo_jax.models.llama import Llama, LlamaConfig
from musilingo_jax.models.mert import MERT
from musilingo_jax.models.musilingo import MusiLingo
from musilingo_jax.testing import torch_reference as tr

LORA = layers.LoRAConfig(rank=8, alpha=16.0, dropout=0.0, target_modules=("q_proj", "v_proj"))
SMOLLM2 = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
               num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True, rope_theta=100000.0,
               rms_norm_eps=1e-5, max_position_embeddings=2048, bos_token_id=1, eos_token_id=2)


@dataclasses.dataclass
class Shape:
  name: str
  llm: LlamaConfig
  encoder_preset: str
  encoder_overrides: dict
  pool: int
  n_audio: int
  rows: int
  seq: int
  seconds: float
  note: str
  max_answer: int = 160

  @property
  def samples(self) -> int:
    return int(round(self.seconds * 24000))


def shapes(quick: bool, names: str | None = None) -> list[Shape]:
  """The benchmark shapes (demo, 7b_slice), or those of them named in `names` (a --shapes comma list)."""
  if names is not None:
    wanted = names.split(",")
    return [s for s in shapes(quick) if s.name in wanted]
  demo_layers, demo_rows = (4, 4) if quick else (30, 8)
  slice_layers, slice_rows = (1, 1) if quick else (2, 2)
  return [
      Shape("demo", LlamaConfig(**{**SMOLLM2, "num_hidden_layers": demo_layers}), "demo", {}, 125, 6,
            demo_rows, 64, 10.0,
            f"SmolLM2-135M-shaped LLaMA ({demo_layers} of 30 layers, hidden 576, 9/3 heads, FFN 1536, vocab 49152, "
            "tied) + the demo MERT encoder (hidden 256, 4 layers, 128-ch convs); 10 s clips -> 6 audio tokens; "
            f"batch {demo_rows} x 64, answers <= 32 tokens (the demo preset: 8 x 64)", max_answer=32),
      Shape("7b_slice", LlamaConfig.vicuna_7b(num_hidden_layers=slice_layers), "mert_v1_330m",
            {"num_hidden_layers": slice_layers}, 325, 4, slice_rows, 128, 15.5,
            f"LLaMA-7B slice ({slice_layers} of 32 layers at 4096/11008/32 heads, vocab 32001, untied) + "
            f"MERT-330M dims ({slice_layers} of 24 layers, full 512-ch conv stack); 15.5 s clips -> 4 audio "
            f"tokens; batch {slice_rows} x 128 (MusicQA: 2 per GPU)"),
  ]


def bf16_shape(shape: Shape) -> Shape:
  """The same shape with bfloat16 frozen weights and compute (config.model.compute_dtype/frozen_dtype)."""
  llm = dataclasses.replace(shape.llm, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
  return dataclasses.replace(shape, llm=llm, encoder_overrides={**shape.encoder_overrides, "dtype": jnp.bfloat16,
                                                                "param_dtype": jnp.bfloat16})


def shape_named(name: str, quick: bool) -> Shape:
  return next(s for s in shapes(quick) if s.name == name)


# ---- our side: the one place that builds our models and our compiled step -----------------------------

def filled(model_fn, seed: int, share=None):
  """A model built abstractly (nnx.eval_shape) and filled from numpy: matrices N(0, 0.02), norms 1, biases and
  LoRA B 0, rng keys from `seed`; leaves whose path is in `share` (a flat {path: array}) reuse those arrays.
  Random init under jit would compile the whole init graph first (minutes at 30 layers on a busy CPU)."""
  abstract = nnx.eval_shape(model_fn)
  graphdef, state = nnx.split(abstract)
  rng = np.random.default_rng(seed)
  share = share or {}
  for path, var in nnx.to_flat_state(state):
    key = ".".join(map(str, path))
    x = var.get_value()
    if key in share:
      value = share[key]
    elif jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
      value = jax.random.split(jax.random.key(seed), x.shape) if x.shape else jax.random.key(seed)
    elif not jnp.issubdtype(x.dtype, jnp.floating):
      value = jnp.zeros(x.shape, x.dtype)
    elif path[-1] in ("bias", "lora_b"):
      value = jnp.zeros(x.shape, x.dtype)
    elif len(x.shape) <= 1:
      value = jnp.ones(x.shape, x.dtype)
    else:
      value = jnp.asarray((0.02 * rng.standard_normal(x.shape, np.float32)).astype(x.dtype))
    var.set_value(value)
  return nnx.merge(graphdef, state)


def flat_arrays(module) -> dict:
  return {".".join(map(str, p)): v.get_value() for p, v in nnx.to_flat_state(nnx.state(module))}


class OurStep(NamedTuple):
  step: Callable  # (trainable, opt_state, frozen, batch, step_index) -> (trainable, opt_state, metrics); donates 0, 1
  trainable: object
  opt_state: object
  frozen: object
  compile_s: float


class OurSetup(NamedTuple):
  plain: object  # MusiLingo, float32, random weights
  with_lora: object  # the same frozen arrays (no copy) + LoRA adapters
  compile_step: Callable  # (model, mode, batch) -> OurStep


def our_setup(shape: Shape, seed: int = 0) -> OurSetup:
  """Our side of the step benchmark: (plain MusiLingo, LoRA MusiLingo sharing the plain one's frozen arrays,
  compile_step). float32, random weights; compile_step(model, mode, batch) splits `model` by `mode`, makes the
  optimizer (AdamW at a constant 1e-4, the reference's betas / eps / weight decay) and compiles the jitted step
  for `batch`. Everything else in this module only times what this returns."""
  enc_cfg = build.encoder_config(shape.encoder_preset, **shape.encoder_overrides)
  enc = filled(lambda: MERT(enc_cfg, rngs=nnx.Rngs(0)), seed)
  llm = filled(lambda: Llama(shape.llm, rngs=nnx.Rngs(0)), seed + 7)
  def projection():  # torch.nn.Linear's default init, float32 (the reference's llama_proj)
    return layers.torch_linear(enc.cfg.hidden_size, llm.cfg.hidden_size, rngs=nnx.Rngs(params=seed))

  plain = MusiLingo(enc, llm, projection(), pool_frames=shape.pool)
  # The LoRA model: the same frozen arrays (no copy) + adapters (B = 0: it starts as the base model).
  llm_lora = filled(lambda: Llama(shape.llm, rngs=nnx.Rngs(0), lora=LORA), seed + 8, share=flat_arrays(llm))
  with_lora = MusiLingo(enc, llm_lora, projection(), pool_frames=shape.pool)
  nnx.update(with_lora.llama_proj, nnx.state(plain.llama_proj))

  def compile_step(model, mode: str, batch: dict, configure: Callable | None = None) -> OurStep:
    # The trainer's setup (Experiment) on one device: `mode` trains, AdamW with the reference's betas / eps /
    # weight decay at a constant 1e-4 (the torch side's), the LM head only at the (at most max_answer) label
    # positions (config.train.head_at_labels). configure(c): further config changes (benchmarks/epoch.py:
    # packed rows).
    c = cfglib.base_config()
    c.seed, c.train.trainable, c.train.accum_steps = 0, mode, 1
    c.train.init_lr = c.train.min_lr = c.train.warmup_lr = 1e-4
    c.train.warmup_steps = 0
    c.prompt.max_txt_len, c.train.head_at_labels = shape.max_answer, True
    if configure is not None:
      configure(c)
    exp = Experiment.from_config(c, sharding.make_mesh((1, 1, 1), jax.devices()[:1]), model=model, data=False)
    trainable, opt_state = exp.init_state()
    t0 = time.perf_counter()
    step = exp.train_step(exp.batch_shardings(batch)).lower(
        trainable, opt_state, exp.frozen, batch, jnp.int32(0)).compile()
    return OurStep(step, trainable, opt_state, exp.frozen, time.perf_counter() - t0)

  return OurSetup(plain, with_lora, compile_step)


# ---- the batch both sides see ----------------------------------------------------------------------------

def make_examples(shape: Shape, d_enc: int, seed: int = 0) -> list[dict]:
  """Rows with different question / answer lengths; the longest fills exactly `shape.seq` positions, so the
  reference's own padding (to the batch's longest) gives the same [B, L] as our fixed-length batch."""
  rng = np.random.default_rng(seed)
  room = shape.seq - 1 - 7 - shape.n_audio  # BOS, p_before ("###Human: <Audio>" = 7 LLaMA tokens), audio
  lt_max = min(room * 3 // 4, shape.max_answer)
  la_max = room - lt_max
  exs = []
  for i in range(shape.rows):
    la = la_max if i == 0 else int(rng.integers(la_max // 2, la_max + 1))
    lt = lt_max if i == 0 else int(rng.integers(lt_max // 2, lt_max + 1))
    exs.append({"before": rng.integers(3, shape.llm.vocab_size, 7).astype(np.int32),
                "after": rng.integers(3, shape.llm.vocab_size, la).astype(np.int32),
                "answer": rng.integers(3, shape.llm.vocab_size, lt).astype(np.int32),
                "features": rng.standard_normal((shape.n_audio, d_enc)).astype(np.float32)})
  assert tr.sequence_length(exs, shape.n_audio) == shape.seq
  return exs


def our_batch(shape: Shape, exs: list[dict], audio: np.ndarray | None) -> dict:
  b = prompts.collate(exs, n_audio_tokens=shape.n_audio, max_len=shape.seq, bos_id=tr.BOS, pad_id=tr.PAD)
  keys = ("input_ids", "attention_mask", "labels", "positions", "audio_start")
  out = {k: jnp.asarray(b[k]) for k in keys}
  if audio is None:
    out["features"] = jnp.asarray(b["features"])
  else:
    out["audio"] = jnp.asarray(audio)
  return out


# ---- train step: ours vs the eager reference -----------------------------------------------------------

def bench_step(shape: Shape, model, ref: tr.TorchMusiLingo, compile_step: Callable, *, mode: str, use_audio: bool,
               timed: int, lora_params=(), seed: int = 0) -> dict:
  d_enc = model.cfg.encoder.hidden_size
  exs = make_examples(shape, d_enc, seed)
  audio = (0.1 * np.random.default_rng(seed + 1).standard_normal((shape.rows, shape.samples))).astype(np.float32) \
      if use_audio else None
  feats = None if use_audio else np.stack([e["features"] for e in exs])
  batch = our_batch(shape, exs, audio)

  # Both sides start from the same point: our (unchanged) projection and adapters.
  ref.copy_projection_from_ours(model)
  if lora_params:
    tr.copy_lora_from_ours(model, ref.lm)
  step, trainable, opt_state, frozen, compile_s = compile_step(model, mode, batch)
  torch_step = tr.TorchTrainStep(ref, lora_params=lora_params, lr=1e-4)

  # First step of each (warm-up), and the parity check: the same loss from the same weights and batch.
  t0 = time.perf_counter()
  trainable, opt_state, m = step(trainable, opt_state, frozen, batch, jnp.int32(0))
  loss_ours = float(m["loss"])
  first_ours = time.perf_counter() - t0
  t0 = time.perf_counter()
  loss_torch = torch_step(exs, audio=audio, features=feats)
  first_torch = time.perf_counter() - t0

  peak = calibrate()
  ours, theirs = [], {}
  # Torch at its best thread count: on a shared CPU, OpenMP's barriers make 2 threads far slower than 1 when a
  # core is taken (seen 10x in decode). The first timed round tries all cores and 1; later rounds keep the faster.
  candidates = sorted({os.cpu_count() or 1, 1}, reverse=True)
  for i in range(timed):  # alternate, so both see the same machine
    t0 = time.perf_counter()
    trainable, opt_state, m = step(trainable, opt_state, frozen, batch, jnp.int32(i + 1))
    jax.block_until_ready(m["loss"])
    ours.append(time.perf_counter() - t0)
    for threads in candidates:
      torch.set_num_threads(threads)
      t0 = time.perf_counter()
      torch_step(exs, audio=audio, features=feats)
      theirs.setdefault(threads, []).append(time.perf_counter() - t0)
    candidates = [min(candidates, key=lambda n: statistics.median(theirs[n]))]
  torch.set_num_threads(os.cpu_count() or 1)
  peak = max(peak, calibrate())  # the better of before/after: a momentary slow-down lowers a calibration too
  best_threads = candidates[0]
  t_ours, t_torch = statistics.median(ours), statistics.median(theirs[best_threads])
  frames = int(model.cfg.encoder.feature_lengths(shape.samples)) if use_audio else 0
  flops = experiment.step_flops(model, shape.rows, shape.seq, shape.n_audio, trainable_mode=mode,
                                encoder_frames=frames, head_positions=shape.max_answer)
  tokens = shape.rows * shape.seq
  del trainable, opt_state, step
  gc.collect()
  return {
      "shape": shape.name, "mode": mode, "input": "audio" if use_audio else "features",
      "rows": shape.rows, "seq": shape.seq, "tokens_per_step": tokens,
      "step_s_ours": t_ours, "step_s_torch": t_torch, "steps_ours": ours,
      "steps_torch_by_threads": {str(k): v for k, v in theirs.items()}, "torch_threads": best_threads,
      "first_step_s_ours": first_ours, "first_step_s_torch": first_torch, "compile_s_ours": compile_s,
      "tokens_per_s_ours": tokens / t_ours, "tokens_per_s_torch": tokens / t_torch,
      "examples_per_s_ours": shape.rows / t_ours, "examples_per_s_torch": shape.rows / t_torch,
      "speedup": t_torch / t_ours, "loss_ours": loss_ours, "loss_torch": loss_torch,
      "loss_rel_diff": abs(loss_ours - loss_torch) / abs(loss_torch),
      "step_flops": flops, "peak_flops": peak, "mfu_ours": flops / t_ours / peak,
      "mfu_torch": flops / t_torch / peak, "trainable": torch_step.num_trainable(),
  }


def run_steps(shape: Shape, quick: bool, results: dict, timed: int | None = None) -> None:
  """Every case of one shape, appended to results["steps"] (saved after each case); `timed` steps per case
  (default 2, 1 with quick)."""
  log(f"{shape.name}: building models ({shape.note})")
  ours = our_setup(shape)
  ref = tr.TorchMusiLingo.from_ours(ours.plain)
  log(f"{shape.name}: built (RSS {rss_mb():.0f} MB)")
  timed = timed or (1 if quick else 2)
  cases = [("projection", False), ("projection", True), ("projection+lora", False)]
  if quick and shape.name != "demo":
    cases = [("projection", False)]
  lora_params = None
  for mode, use_audio in cases:
    if mode == "projection+lora" and lora_params is None:
      lora_params = tr.add_lora(ref.lm, rank=LORA.rank, alpha=LORA.alpha, dropout=LORA.dropout,
                                target_modules=LORA.target_modules)
    model = ours.with_lora if mode == "projection+lora" else ours.plain
    r = bench_step(shape, model, ref, ours.compile_step, mode=mode, use_audio=use_audio, timed=timed,
                   lora_params=lora_params or ())
    r["note"] = shape.note
    results["steps"].append(r)
    log(f"{shape.name} {mode:16s} {r['input']:8s}: ours {r['step_s_ours']:.3f} s, torch {r['step_s_torch']:.3f} s "
        f"-> {r['speedup']:.2f}x; MFU ours {r['mfu_ours']:.1%} torch {r['mfu_torch']:.1%}; "
        f"loss {r['loss_ours']:.5f} vs {r['loss_torch']:.5f}; compile {r['compile_s_ours']:.1f} s; torch "
        f"threads {r['torch_threads']} ({', '.join(f'{k}: {statistics.median(v):.2f} s' for k, v in r['steps_torch_by_threads'].items())})")
    save_json(results)
  del ours, ref
  gc.collect()


def main(argv=None) -> int:
  p = argparse.ArgumentParser(prog="python -m benchmarks.step", description=__doc__.split("\n\n")[0])
  add_common_args(p)
  p.add_argument("--shapes", default="demo,7b_slice", help="comma list of: demo, 7b_slice")
  p.add_argument("--timed", type=int, default=None, help="timed steps per case and side (default 2; 1 with --quick)")
  args = parse(p, argv)
  torch.set_num_threads(os.cpu_count() or 1)
  results: dict = {"quick": args.quick, "env": environment(), "steps": [], "_json": args.json}
  for shape in shapes(args.quick, args.shapes):
    run_steps(shape, args.quick, results, args.timed)
    gc.collect()
  save_json(results)
  return 0


if __name__ == "__main__":
  sys.exit(main())
