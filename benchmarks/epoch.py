"""Epoch throughput on a realistic length mix: answer tokens trained per second by (a) the reference recipe as
the reference runs it and (b) ours as the README tells a user to run it, side by side in one process.

  python -m benchmarks.epoch                        # demo shape and 7B slice (~6 min on 2 quiet cores)
  python -m benchmarks.epoch --quick                # fewer layers / steps: checks the machinery
  python -m benchmarks.epoch --lengths-from music_data/MusicQA/FinetuneMusicQA.json   # the real mix

(a) reference: PyTorch eager (musilingo_jax.testing.torch_reference), the frozen encoder run inside every step
    on the raw clips, each micro-batch of `rows` examples padded to its longest prompt and answer, the LM head
    and softmax at every position;
(b) ours: precomputed pooled features (the encoder ran once per clip, before training), packed rows
    (config.data.layout = "packed": several examples per row, no padding between them), the LM head only at
    the label positions (config.train.head_at_labels), the trainer's jitted step (Experiment.train_step).
Both see the same examples in the same order; the figure is label tokens per second of each (the tokens the
loss is taken over), and their ratio. Ours is also given with the one-off feature precompute charged to a
single epoch (the encoder's forward per clip, measured here too): the worst case, one epoch.

The length mix. Without --lengths-from, answers are drawn (seeded) from a mixture that stands in for the
reference's instruction data: 50 % MusicQA-like (log-normal, median 40 tokens), 25 % MusicInstruct short
(median 18), 25 % MusicInstruct long (median 120), each capped at 160 tokens (the reference's max_txt_len),
questions log-normal with median 14 tokens. These medians are our estimates of the released sets' answer
lengths, not counts taken from them (the released JSON files cannot be read on this machine); pass
--lengths-from with a MusicQA/MusicInstruct annotation file (any JSON holding "question"/"answer" strings,
e.g. FinetuneMusicQA.json or MusicInstruct's) to measure on the real mix, tokenized with the LLaMA tokenizer.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch
from flax import nnx

from benchmarks import step as step_bench
from benchmarks.harness import add_common_args, calibrate, environment, log, parse, finish, rss_mb, run_line, save_json
from musilingo_jax import prompts
from musilingo_jax.data import pipeline
from musilingo_jax.models.musilingo import pooled_features
from musilingo_jax.testing import torch_reference as tr

MIX = (("musicqa", 0.5, 40, 0.6), ("musicinstruct_short", 0.25, 18, 0.5), ("musicinstruct_long", 0.25, 120, 0.35))
QUESTION_MEDIAN, MAX_ANSWER = 14, 160
BEFORE = 7   # "###Human: <Audio>" in LLaMA tokens
AFTER = 9    # "</Audio> " + " ###Assistant: " around the question


def drawn_lengths(n: int, seed: int) -> list[tuple[int, int, str]]:
  """(question tokens, answer tokens, source) for n examples from the stand-in mixture (module docstring)."""
  rng = np.random.default_rng(seed)
  names, weights = [m[0] for m in MIX], np.asarray([m[1] for m in MIX])
  out = []
  for k in rng.choice(len(MIX), size=n, p=weights / weights.sum()):
    _, _, median, sigma = MIX[k]
    answer = int(np.clip(round(rng.lognormal(np.log(median), sigma)), 1, MAX_ANSWER))
    question = int(np.clip(round(rng.lognormal(np.log(QUESTION_MEDIAN), 0.4)), 3, 64))
    out.append((question, answer, names[k]))
  return out


def file_lengths(path: str, n: int, seed: int) -> list[tuple[int, int, str]]:
  """(question tokens, answer tokens, file) of n examples drawn from an annotation file's question/answer pairs,
  tokenized with the LLaMA tokenizer (answers + "###", capped at 160 as the reference does)."""
  from musilingo_jax import assets
  from musilingo_jax.tokenizer import Tokenizer
  tok = Tokenizer.from_dir(assets.llama_tokenizer_dir())
  pairs = []

  def walk(x):
    if isinstance(x, dict):
      q, a = x.get("question") or x.get("Question"), x.get("answer") or x.get("Answer")
      if isinstance(q, str) and isinstance(a, str):
        pairs.append((q, a))
      for v in x.values():
        walk(v)
    elif isinstance(x, list):
      for v in x:
        walk(v)
  with open(path, encoding="utf-8") as f:
    walk(json.load(f))
  if not pairs:
    raise SystemExit(f"--lengths-from {path}: no question/answer pairs found")
  rng = np.random.default_rng(seed)
  picked = [pairs[i] for i in rng.choice(len(pairs), size=n, replace=len(pairs) < n)]
  return [(len(tok.encode(q)), min(len(tok.encode(a + "###")), MAX_ANSWER), os.path.basename(path)) for q, a in picked]


def examples(lengths, shape: step_bench.Shape, d_enc: int, seed: int) -> list[dict]:
  """Token ids of each example's segments (random ids: only the lengths matter) and its pooled features."""
  rng = np.random.default_rng(seed)
  v = shape.llm.vocab_size
  return [{"before": rng.integers(3, v, BEFORE).astype(np.int32),
           "after": rng.integers(3, v, q + AFTER).astype(np.int32),
           "answer": rng.integers(3, v, a).astype(np.int32),
           "features": rng.standard_normal((shape.n_audio, d_enc)).astype(np.float32),
           "audio_tokens": shape.n_audio, "valid": 1} for q, a, _ in lengths]


def pack(exs: list[dict], *, max_len: int, max_segments: int, max_labels: int) -> list[list[dict]]:
  """The trainer's packing rule (data.pipeline.row_fits), in order."""
  rows, row = [], []
  for ex in exs:
    if row and not pipeline.row_fits(row, ex, max_len=max_len, max_segments=max_segments, max_labels=max_labels):
      rows.append(row)
      row = []
    row.append(ex)
  return rows + ([row] if row else [])


def labels(exs) -> int:
  return sum(len(e["answer"]) for e in exs)


def bench_shape(shape: step_bench.Shape, lengths, *, timed: int, pack_len: int, pack_rows: int, seed: int = 0,
                precision: str = "float32") -> dict:
  """precision "bfloat16": ours with bf16 frozen weights and compute (the full-size presets' setting), the
  reference under torch.autocast(bfloat16) (it trains under fp16 autocast on GPUs), both from the same weights."""
  setup = step_bench.our_setup(shape, seed)
  ref = tr.TorchMusiLingo.from_ours(setup.plain)
  if precision == "bfloat16":
    setup = step_bench.our_setup(step_bench.bf16_shape(shape), seed)
  model = setup.plain
  d_enc = model.cfg.encoder.hidden_size
  exs = examples(lengths, shape, d_enc, seed)
  segments = 16
  budget = pack_len * 3 // 4   # config.data.pack_labels: the LM head's positions per row
  rows = pack(exs, max_len=pack_len, max_segments=segments, max_labels=budget)
  packed_batches = [rows[i:i + pack_rows] for i in range(0, len(rows) - pack_rows + 1, pack_rows)]
  ref_batches = [exs[i:i + shape.rows] for i in range(0, len(exs) - shape.rows + 1, shape.rows)]
  log(f"{shape.name}: {len(exs)} examples, {labels(exs)} label tokens -> reference {len(ref_batches)} batches of "
      f"{shape.rows}; ours {len(rows)} packed rows of {pack_len} ({len(exs) / len(rows):.1f} examples per row)")

  def our_batch(batch_rows):
    b = prompts.collate_packed(batch_rows, max_len=pack_len, bos_id=tr.BOS, pad_id=tr.PAD, max_segments=segments,
                               batch_size=pack_rows)
    return {k: jnp.asarray(v) for k, v in b.items()}

  def configure(c):
    c.data.layout, c.data.pack_segments, c.data.pack_labels, c.data.max_len = "packed", segments, budget, pack_len

  first = our_batch(packed_batches[0])
  compiled = setup.compile_step(model, "projection", first, configure)
  trainable, opt_state = compiled.trainable, compiled.opt_state
  ref.copy_projection_from_ours(model)
  torch_step = tr.TorchTrainStep(ref, lr=1e-4, autocast=torch.bfloat16 if precision == "bfloat16" else None)
  audio = (0.1 * np.random.default_rng(seed + 1).standard_normal((shape.rows, shape.samples))).astype(np.float32)

  # The per-clip precompute cost of ours (the encoder once per clip, jitted, batch of `rows` clips).
  enc_graph, enc_state = nnx.split(model.encoder)
  pool = model.cfg.pool_frames
  encode_fn = jax.jit(lambda st, a: pooled_features(nnx.merge(enc_graph, st), a, pool))

  def encode(_, a):
    return encode_fn(enc_state, a)
  jax.block_until_ready(encode(model, jnp.asarray(audio)))

  # Warm-up both, then alternate: ours one packed step, the reference one micro-batch.
  trainable, opt_state, m = compiled.step(trainable, opt_state, compiled.frozen, first, jnp.int32(0))
  jax.block_until_ready(m["loss"])
  torch_step(ref_batches[0], audio=audio)
  peak = calibrate()
  ours_t, ours_labels, ref_t, ref_labels, enc_t = [], 0, [], 0, []
  threads = sorted({os.cpu_count() or 1, 1}, reverse=True)
  per_thread: dict[int, list[float]] = {}
  for i in range(timed):
    b = packed_batches[(i + 1) % len(packed_batches)]
    batch = our_batch(b)
    t0 = time.perf_counter()
    trainable, opt_state, m = compiled.step(trainable, opt_state, compiled.frozen, batch, jnp.int32(i + 1))
    jax.block_until_ready(m["loss"])
    ours_t.append(time.perf_counter() - t0)
    ours_labels += int(m["tokens"])
    rb = ref_batches[(i + 1) % len(ref_batches)]
    for n in threads:
      torch.set_num_threads(n)
      t0 = time.perf_counter()
      torch_step(rb, audio=audio)
      per_thread.setdefault(n, []).append(time.perf_counter() - t0)
    threads = [min(threads, key=lambda n: statistics.median(per_thread[n]))]
    ref_t.append(per_thread[threads[0]][-1])
    ref_labels += labels(rb)
    t0 = time.perf_counter()
    jax.block_until_ready(encode(model, jnp.asarray(audio)))
    enc_t.append((time.perf_counter() - t0) / shape.rows)
  torch.set_num_threads(os.cpu_count() or 1)
  peak = max(peak, calibrate())
  ours_rate, ref_rate = ours_labels / sum(ours_t), ref_labels / sum(ref_t)
  total = labels(exs)
  epoch_ours = total / ours_rate
  precompute = len(exs) * statistics.median(enc_t)
  out = {
      "shape": shape.name, "note": shape.note, "examples": len(exs), "label_tokens": total,
      "ref_rows": shape.rows, "pack_len": pack_len, "pack_rows": pack_rows, "packed_rows": len(rows),
      "examples_per_row": len(exs) / len(rows),
      "ref_padding": 1 - sum(labels(b) + sum(1 + BEFORE + shape.n_audio + len(e["after"]) for e in b)
                             for b in ref_batches) / sum(len(b) * tr.sequence_length(b, shape.n_audio)
                                                         for b in ref_batches),
      "ours_padding": 1 - sum(prompts.example_positions(e) for r in rows for e in r) / (len(rows) * pack_len),
      "label_tokens_per_s_ours": ours_rate, "label_tokens_per_s_ref": ref_rate, "speedup": ours_rate / ref_rate,
      "epoch_s_ours": epoch_ours, "epoch_s_ref": total / ref_rate, "precompute_s": precompute,
      "speedup_with_precompute": (total / ref_rate) / (epoch_ours + precompute),
      "steps_ours": ours_t, "steps_ref": ref_t, "torch_threads": threads[0], "peak_flops": peak,
      "encoder_s_per_clip": statistics.median(enc_t), "precision": precision,
  }
  del setup, model, ref, compiled, trainable, opt_state
  gc.collect()
  return out


def write_markdown(results: dict, path) -> None:
  """The epoch table (benchmarks/EPOCH.md), from this module's results."""
  from pathlib import Path
  env, mix = results["env"], results["mix"]
  L = ["# Epoch throughput: the reference recipe vs ours (benchmarks/epoch.py)", "",
       run_line(f"python -m benchmarks.epoch{' --quick' if results['quick'] else ''}"
                f"{' --precision bfloat16' if results.get('precision') == 'bfloat16' else ''}", env) + " Length mix: "
       f"{mix['source']}, {mix['examples']} examples, answer tokens median {mix['answer_tokens_median']:.0f}, mean "
       f"{mix['answer_tokens_mean']:.1f}, p90 {mix['answer_tokens_p90']:.0f}.", "",
       "Reference: PyTorch eager, encoder in every step on the raw clips, each micro-batch padded to its longest, "
       "LM head at every position. Ours: precomputed features, packed rows, LM head at label positions only, "
       "the trainer's jitted step. Same examples, same order; label tokens = the tokens the loss is taken over." +
       (" Precision: ours bf16 weights and compute (f32 accumulation), the reference under "
        "torch.autocast(bfloat16)." if results.get("precision") == "bfloat16" else " Precision: float32 on both "
        "sides."), "",
       "| shape | reference rows | ours rows x L | examples / packed row | padding ref / ours | label tok/s ref | "
       "label tok/s ours | speedup | with one epoch's precompute | encoder s / clip | torch threads |",
       "|---|---|---|---|---|---|---|---|---|---|---|"]
  for r in results["epoch"]:
    L.append(f"| {r['shape']} | {r['ref_rows']} | {r['pack_rows']} x {r['pack_len']} | {r['examples_per_row']:.1f} | "
             f"{r['ref_padding']:.0%} / {r['ours_padding']:.0%} | {r['label_tokens_per_s_ref']:.1f} | "
             f"{r['label_tokens_per_s_ours']:.1f} | {r['speedup']:.2f}x | {r['speedup_with_precompute']:.2f}x | "
             f"{r['encoder_s_per_clip']:.3f} | {r['torch_threads']} |")
  L += [""] + [f"- **{r['shape']}**: {r['note'].split('; batch')[0]}; reference micro-batches of {r['ref_rows']} "
               f"examples, answers up to {MAX_ANSWER} tokens." for r in results["epoch"]]
  Path(path).write_text("\n".join(L) + "\n")


def main(argv=None) -> int:
  p = argparse.ArgumentParser(prog="python -m benchmarks.epoch", description=__doc__.split("\n\n")[0])
  add_common_args(p)
  p.add_argument("--shapes", default="demo,7b_slice", help="comma list of: demo, 7b_slice")
  p.add_argument("--examples", type=int, default=256, help="examples in the mix (default 256)")
  p.add_argument("--lengths-from", default=None, metavar="JSON",
                 help="an annotation file with question/answer strings: its real length mix (LLaMA tokens)")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--markdown", default=None, metavar="MD", help="also write the table here (benchmarks/EPOCH.md)")
  p.add_argument("--precision", choices=("float32", "bfloat16"), default="float32",
                 help="bfloat16: ours with bf16 weights and compute (f32 accumulation), the reference under "
                      "torch.autocast(bfloat16)")
  args = parse(p, argv)
  torch.set_num_threads(os.cpu_count() or 1)
  lengths = (file_lengths(args.lengths_from, args.examples, args.seed) if args.lengths_from
             else drawn_lengths(args.examples, args.seed))
  answers = np.asarray([a for _, a, _ in lengths])
  results: dict = {"quick": args.quick, "env": environment(), "epoch": [], "_json": args.json, "precision": args.precision,
                   "mix": {"source": args.lengths_from or "stand-in mixture (benchmarks/epoch.py docstring)",
                           "examples": len(lengths), "answer_tokens_median": float(np.median(answers)),
                           "answer_tokens_p90": float(np.percentile(answers, 90)),
                           "answer_tokens_mean": float(answers.mean())}}
  log(f"length mix: {results['mix']}")
  timed = 2 if args.quick else 4
  for shape in step_bench.shapes(args.quick, args.shapes):
    pack_len = {"demo": 256, "7b_slice": 512}[shape.name] if not args.quick else 256
    r = bench_shape(shape, lengths, timed=timed, pack_len=pack_len, pack_rows=2, precision=args.precision)
    results["epoch"].append(r)
    log(f"{shape.name}: label tokens/s ours {r['label_tokens_per_s_ours']:.1f} vs reference "
        f"{r['label_tokens_per_s_ref']:.1f} -> {r['speedup']:.2f}x ({r['speedup_with_precompute']:.2f}x with one "
        f"epoch's feature precompute); padding ours {r['ours_padding']:.0%} vs reference {r['ref_padding']:.0%}; "
        f"{r['examples_per_row']:.1f} examples per packed row; RSS {rss_mb():.0f} MB")
    save_json(results)
  return finish(results, args.markdown, write_markdown)


if __name__ == "__main__":
  sys.exit(main())
