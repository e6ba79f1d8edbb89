"""Peak host memory and wall time of converting a ~1 GB LLaMA checkpoint (LESSONS 3).

  python scripts/bench_convert.py [--gb 1.0] [--dtype float32|bfloat16] [--hidden 2048] [--keep DIR]

Writes a random safetensors LLaMA (hidden 2048, vocab 32000, as many layers as fit the size) to a temporary
directory, then runs in fresh subprocesses, each polled for its RSS (/proc/PID/status VmRSS every 10 ms) and
checked with getrusage(RUSAGE_CHILDREN).ru_maxrss:
  baseline  python importing the conversion stack (jax, flax, orbax, transformers-free) and nothing else
  import    convert.import_pretrained("llm", DIR): the streaming import alone
  convert   scripts/convert_hf.py --llm DIR --out OUT: import + Orbax save + config/tokenizer
  load      convert.load_converted(OUT): the Orbax restore
Prints peak RSS / checkpoint bytes (goal <= 1.3) for each, and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

IMPORTS = ("import jax, jax.numpy, flax.nnx, orbax.checkpoint, numpy, ml_dtypes; "
           "import musilingo_jax.convert, musilingo_jax.models.llama")


def make_checkpoint(d: Path, *, gb: float, dtype: str, hidden: int, vocab: int = 32000) -> dict:
  """A random LLaMA safetensors checkpoint of about `gb` GB, written one tensor at a time."""
  import ml_dtypes
  from musilingo_jax.convert import SafetensorsWriter
  np_dtype = np.dtype(ml_dtypes.bfloat16) if dtype == "bfloat16" else np.dtype(np.float32)
  inter = int(hidden * 2.75) // 256 * 256
  heads = hidden // 128
  per_layer = 4 * hidden * hidden + 3 * hidden * inter + 2 * hidden
  fixed = 2 * vocab * hidden + hidden
  layers = max(1, round((gb * 1e9 / np_dtype.itemsize - fixed) / per_layer))
  config = dict(model_type="llama", architectures=["LlamaForCausalLM"], vocab_size=vocab, hidden_size=hidden,
                intermediate_size=inter, num_hidden_layers=layers, num_attention_heads=heads,
                num_key_value_heads=heads, rms_norm_eps=1e-6, rope_theta=10000.0, max_position_embeddings=2048,
                tie_word_embeddings=False, hidden_act="silu", torch_dtype=dtype)
  d.mkdir(parents=True, exist_ok=True)
  (d / "config.json").write_text(json.dumps(config))
  rng = np.random.default_rng(0)

  def rand(*shape):
    return (rng.standard_normal(shape, dtype=np.float32) * 0.02).astype(np_dtype)

  with SafetensorsWriter(d / "model.safetensors") as w:
    w.add("model.embed_tokens.weight", rand(vocab, hidden))
    for i in range(layers):
      p = f"model.layers.{i}."
      for n in ("q_proj", "k_proj", "v_proj", "o_proj"):
        w.add(p + f"self_attn.{n}.weight", rand(hidden, hidden))
      w.add(p + "mlp.gate_proj.weight", rand(inter, hidden))
      w.add(p + "mlp.up_proj.weight", rand(inter, hidden))
      w.add(p + "mlp.down_proj.weight", rand(hidden, inter))
      w.add(p + "input_layernorm.weight", np.ones(hidden, np_dtype))
      w.add(p + "post_attention_layernorm.weight", np.ones(hidden, np_dtype))
    w.add("model.norm.weight", np.ones(hidden, np_dtype))
    w.add("lm_head.weight", rand(vocab, hidden))
  return config


def _rss_kb(pid: int) -> int:
  try:
    with open(f"/proc/{pid}/status") as f:
      for line in f:
        if line.startswith("VmRSS:"):
          return int(line.split()[1])
  except OSError:
    pass
  return 0


def measure(cmd: list[str], env: dict) -> dict:
  """Runs cmd in a fresh process; its peak RSS from /proc polling and from getrusage (children)."""
  before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
  t0 = time.perf_counter()
  proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  polled = 0
  while proc.poll() is None:
    polled = max(polled, _rss_kb(proc.pid))
    time.sleep(0.01)
  wall = time.perf_counter() - t0
  out = proc.stdout.read()
  if proc.returncode:
    raise RuntimeError(f"{cmd} failed ({proc.returncode}):\n{out[-3000:]}")
  maxrss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
  # ru_maxrss of children is the max over all children so far: only trust it when it grew.
  peak_kb = max(polled, maxrss if maxrss > before else 0)
  return {"peak_rss_bytes": peak_kb * 1024, "polled_rss_bytes": polled * 1024, "wall_s": round(wall, 2)}


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--gb", type=float, default=1.0)
  ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
  ap.add_argument("--hidden", type=int, default=2048)
  ap.add_argument("--keep", help="write the checkpoint and output here instead of a temporary directory")
  ap.add_argument("--make-only", help=argparse.SUPPRESS)  # internal: write the checkpoint to this dir, exit
  args = ap.parse_args(argv)
  if args.make_only:
    make_checkpoint(Path(args.make_only), gb=args.gb, dtype=args.dtype, hidden=args.hidden)
    return 0

  tmp = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="bench_convert_"))
  ckpt, out = tmp / "hf", tmp / "out"
  t0 = time.perf_counter()
  # In a child process, so this (measuring) process stays small: a fork briefly counts the parent's pages.
  subprocess.run([sys.executable, __file__, "--make-only", str(ckpt), "--gb", str(args.gb), "--dtype", args.dtype,
                  "--hidden", str(args.hidden)], check=True)
  config = json.loads((ckpt / "config.json").read_text())
  size = (ckpt / "model.safetensors").stat().st_size
  print(f"checkpoint: {size / 1e9:.3f} GB {args.dtype}, {config['num_hidden_layers']} layers of hidden "
        f"{args.hidden} ({time.perf_counter() - t0:.1f} s to write)")

  env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
  env.pop("XLA_FLAGS", None)  # one CPU device, as a user converting would have
  py = sys.executable
  runs = {
      "baseline": [py, "-c", IMPORTS],
      "import": [py, "-c", IMPORTS + f"; m, c = musilingo_jax.convert.import_pretrained('llm', {str(ckpt)!r}, "
                 f"dtype={args.dtype!r}); jax.block_until_ready(jax.tree.leaves(flax.nnx.state(m)))"],
      "convert": [py, str(ROOT / "scripts" / "convert_hf.py"), "--llm", str(ckpt), "--out", str(out),
                  "--dtype", args.dtype, "--no-progress"],
      "load": [py, "-c", IMPORTS + f"; e, m, t, meta = musilingo_jax.convert.load_converted({str(out)!r}); "
               f"jax.block_until_ready(jax.tree.leaves(flax.nnx.state(m)))"],
  }
  results = {"checkpoint_bytes": size, "dtype": args.dtype, "layers": config["num_hidden_layers"],
             "hidden": args.hidden}
  for name, cmd in runs.items():
    r = measure(cmd, env)
    r["peak_over_checkpoint"] = round(r["peak_rss_bytes"] / size, 3)
    results[name] = r
    print(f"{name:9s} peak RSS {r['peak_rss_bytes'] / 1e9:.3f} GB = {r['peak_over_checkpoint']:.2f} x checkpoint, "
          f"wall {r['wall_s']:.1f} s")
  base = results["baseline"]["peak_rss_bytes"]
  for name in ("import", "convert", "load"):
    results[name]["net_over_checkpoint"] = round((results[name]["peak_rss_bytes"] - base) / size, 3)
  print(f"net of the baseline (imports alone): import {results['import']['net_over_checkpoint']:.2f} x, "
        f"convert {results['convert']['net_over_checkpoint']:.2f} x, load_converted "
        f"{results['load']['net_over_checkpoint']:.2f} x (goal <= 1.3 x)")
  print(json.dumps(results))
  if not args.keep:
    import shutil
    shutil.rmtree(tmp, ignore_errors=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
