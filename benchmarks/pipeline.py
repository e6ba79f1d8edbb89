"""Examples/s of the Grain input pipeline on a synthetic ArrayRecord set at the demo shape.

  python -m benchmarks.pipeline                       # 10 s clips (240,000 int16 samples), batch 8
  python -m benchmarks.pipeline --threads 4 --json /tmp/bench.json
  python -m benchmarks.pipeline --features            # precomputed features [3, 1024] float16 instead
  python -m benchmarks.pipeline --quick               # 64 records, 10 timed batches

The set (--records records in 4 shards, written once to a temporary folder) holds demo-like questions and
answers; tokenization uses a whitespace stand-in unless --tokenizer names a tokenizer directory or GGUF.
`run_pipeline` is what `python -m benchmarks` runs (beside the examples/s the train step consumes).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import tempfile
import time
import zlib
from pathlib import Path

import numpy as np

from benchmarks.harness import add_common_args, parse
from musilingo_jax import prompts
from musilingo_jax.data import pipeline, records

QUICK = dict(records=64, steps=10)  # what --quick means


class WordTokenizer:
  """Whitespace stand-in with LLaMA's special ids (measures the pipeline, not the tokenizer)."""
  bos_id, eos_id, pad_id = 1, 2, 2

  def encode(self, text):
    return [3 + zlib.crc32(w.encode()) % 32000 for w in text.split()]


def write_set(out: Path, n: int, samples: int, features: bool, shards: int = 4) -> list[str]:
  from array_record.python import array_record_module
  rng = np.random.default_rng(0)
  audio = (rng.normal(0, 0.1, samples) * 32767).astype(np.int16)
  feats = rng.normal(0, 1, (3, 1024)).astype(np.float16)
  files = []
  for s in range(shards):
    path = out / records.shard_name("train", s, shards)
    w = array_record_module.ArrayRecordWriter(str(path), "group_size:1")
    for i in range(s, n, shards):
      rec = {"schema": records.SCHEMA, "id": f"bench-{i}", "dataset": "demo", "split": "train",
             "question": "What is the key of this piece, and is it major or minor?",
             "answer": f"The piece is in G major, number {i}, played on a piano at a moderate tempo.",
             "audio": np.roll(audio, i), "audio_len": samples, "sample_rate": 24000}
      if features:
        rec["features"] = feats
      w.write(records.encode_record(rec))
    w.close()
    files.append(str(path))
  return files


def main(argv=None) -> int:
  p = argparse.ArgumentParser(prog="python -m benchmarks.pipeline", description=__doc__.split("\n\n")[0])
  add_common_args(p, json_help="also write the result here")
  p.add_argument("--records", type=int, default=256)
  p.add_argument("--seconds", type=float, default=10.0, help="clip length (demo: 10 s)")
  p.add_argument("--batch-size", type=int, default=8)
  p.add_argument("--steps", type=int, default=40, help="timed batches (after 3 warm-up batches)")
  p.add_argument("--threads", type=int, default=2)
  p.add_argument("--workers", type=int, default=0, help="Grain worker processes (0: threads only)")
  p.add_argument("--prefetch", type=int, default=4)
  p.add_argument("--layout", default="reference", choices=prompts.LAYOUTS)
  p.add_argument("--features", action="store_true", help="use precomputed features instead of audio")
  p.add_argument("--tokenizer", default=None, help="tokenizer directory or .gguf (default: stand-in)")
  args = parse(p, argv, quick_defaults=QUICK)

  tok = WordTokenizer()
  if args.tokenizer:
    from musilingo_jax.tokenizer import Tokenizer
    tok = (Tokenizer.from_gguf(args.tokenizer) if args.tokenizer.endswith(".gguf")
           else Tokenizer.from_dir(args.tokenizer))
  samples = int(round(args.seconds * 24000))
  with tempfile.TemporaryDirectory() as tmp:
    t0 = time.perf_counter()
    files = write_set(Path(tmp), args.records, samples, args.features)
    write_s = time.perf_counter() - t0
    it = pipeline.make_dataset(
        files, tokenizer=tok, prompt_cfg=prompts.PromptConfig(), batch_size=args.batch_size, seed=0,
        audio_slots=3, max_len=256, tokens_of_samples=lambda n: 3, layout=args.layout, use_features=args.features,
        process_index=0, process_count=1, worker_count=args.workers, num_threads=args.threads,
        prefetch=args.prefetch, audio_samples=samples)
    t0 = time.perf_counter()
    for _ in range(3):
      next(it)
    first_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(args.steps):
      next(it)
    dt = time.perf_counter() - t0
  result = {
      "command": " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv]),
      "examples_per_s": round(args.steps * args.batch_size / dt, 1),
      "batches_per_s": round(args.steps / dt, 2),
      "ms_per_batch": round(1000 * dt / args.steps, 2),
      "warmup_s": round(first_s, 3), "write_set_s": round(write_s, 2),
      "batch_size": args.batch_size, "steps": args.steps, "audio_samples": samples, "threads": args.threads,
      "workers": args.workers, "layout": args.layout, "features": args.features,
      "tokenizer": args.tokenizer or "whitespace stand-in", "cpu_count": os.cpu_count(),
  }
  print(f"$ {result['command']}")
  print(f"{result['examples_per_s']} examples/s ({result['ms_per_batch']} ms per batch of {args.batch_size}, "
        f"{samples} audio samples/row, {args.threads} threads, {args.workers} workers)")
  print(json.dumps(result))
  if args.json:
    Path(args.json).write_text(json.dumps(result, indent=1))
  return 0


def run_pipeline(quick: bool, features: bool, seconds: float, batch: int) -> dict:
  """main() above on 64 records at the step's clip length and batch size; its result dict."""
  with tempfile.TemporaryDirectory() as tmp:
    out = Path(tmp) / "p.json"
    argv = ["--records", "64", "--steps", "10" if quick else "25", "--batch-size", str(batch),
            "--seconds", str(seconds), "--json", str(out)]
    if features:
      argv.append("--features")
    main(argv)
    return json.loads(out.read_text())


if __name__ == "__main__":
  sys.exit(main())
