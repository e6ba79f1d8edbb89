"""Examples/s of the Grain input pipeline on a synthetic ArrayRecord set at the demo shape.

  python scripts/bench_pipeline.py                       # 10 s clips (240,000 int16 samples), batch 8
  python scripts/bench_pipeline.py --threads 4 --json /tmp/bench.json
  python scripts/bench_pipeline.py --features            # precomputed features [3, 1024] float16 instead

The set (--records records in 4 shards, written once to a temporary folder) holds demo-like questions and
answers; tokenization uses a whitespace stand-in unless --tokenizer names a tokenizer directory or GGUF.
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

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from musilingo_jax import prompts  # noqa: E402
from musilingo_jax.data import pipeline, records  # noqa: E402


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
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
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
  p.add_argument("--json", default=None, help="also write the result here")
  args = p.parse_args(argv)

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


if __name__ == "__main__":
  sys.exit(main())
