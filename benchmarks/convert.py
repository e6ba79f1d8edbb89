"""Peak host memory and wall time of converting a ~1 GB LLaMA checkpoint (the goal: peak RSS above a process that
only imports <= 1.3x the checkpoint's bytes, i.e. about one copy of the model plus the tensor in flight).

  python -m benchmarks.convert [--gb 1.0] [--dtype float32|bfloat16] [--hidden 2048] [--keep DIR]
  python -m benchmarks.convert --quick           # a 0.7 GB checkpoint

Writes a random safetensors LLaMA (hidden 2048, vocab 32000, as many layers as fit the size) to a temporary
directory, then runs in fresh subprocesses, each polled for its RSS (/proc/PID/status VmRSS every 10 ms) and
checked with getrusage(RUSAGE_CHILDREN).ru_maxrss:
  baseline  python importing the conversion stack (jax, flax, orbax, transformers-free) and nothing else
  import    convert.hf.import_pretrained(llama.HF_KIND, DIR): the streaming import alone
  convert   scripts/convert_hf.py --llm DIR --out OUT: import + Orbax save + config/tokenizer
  load      convert.converted.load_converted(OUT, (llama.HF_KIND,)): the Orbax restore
Prints peak RSS / checkpoint bytes (goal <= 1.3) for each, and one JSON line. The subprocesses other than
`convert` are this module with --child (baseline, import, load; ours / transformers for `bench_fresh`), so this
module imports only the standard library and numpy at the top.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.harness import (ROOT, add_common_args, child_env, log, measure_process, module_command,
                                own_peak_rss, parse)

MODULE = "benchmarks.convert"
CHILD_MODES = ("baseline", "import", "load", "ours", "transformers")


def make_checkpoint(d: Path, *, gb: float, dtype: str, hidden: int, vocab: int = 32000) -> dict:
  """A random LLaMA safetensors checkpoint of about `gb` GB, written one tensor at a time."""
  import ml_dtypes
  from musilingo_jax.convert.hf import SafetensorsWriter
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


# ---- the measured child processes ----------------------------------------------------------------------

def child(mode: str, path: str | None, dtype: str) -> int:
  """One measured process. baseline / import / load: the conversion stack's imports, then nothing / the streaming
  import of `path` / the Orbax restore of `path`. ours / transformers (bench_fresh): convert.hf.import_pretrained or
  transformers' from_pretrained of `path` after the imports and JAX's start-up, printing `RESULT {json}` with
  the time, the RSS before, and this process's peak RSS."""
  if mode in ("baseline", "import", "load"):
    import flax.nnx  # noqa: F401 - the conversion stack, as a user converting would import it
    import jax
    import jax.numpy  # noqa: F401
    import ml_dtypes  # noqa: F401
    import orbax.checkpoint  # noqa: F401

    from musilingo_jax.convert.converted import load_converted
    from musilingo_jax.convert.hf import import_pretrained
    from musilingo_jax.models import llama
    if mode == "import":
      m, _ = import_pretrained(llama.HF_KIND, path, dtype=dtype)
      jax.block_until_ready(jax.tree.leaves(flax.nnx.state(m)))
    elif mode == "load":
      (m,), _ = load_converted(path, (llama.HF_KIND,))
      jax.block_until_ready(jax.tree.leaves(flax.nnx.state(m)))
    return 0
  import psutil
  import jax
  import jax.numpy as jnp
  jnp.zeros(1).block_until_ready()
  if mode == "ours":
    from flax import nnx
    from musilingo_jax.convert.hf import import_pretrained
    from musilingo_jax.models import llama
  else:
    import torch
    import transformers
  before = psutil.Process().memory_info().rss
  t0 = time.perf_counter()
  if mode == "ours":
    model, _ = import_pretrained(llama.HF_KIND, path, dtype="float32")
    jax.block_until_ready(jax.tree.leaves(nnx.state(model)))
  else:
    model = transformers.LlamaForCausalLM.from_pretrained(path, dtype=torch.float32)
  dt = time.perf_counter() - t0
  print("RESULT " + json.dumps({"s": dt, "rss_before": before, "peak_rss": own_peak_rss(),
                                "rss_after": psutil.Process().memory_info().rss}))
  return 0


# ---- the standalone measurement ------------------------------------------------------------------------

def main(argv=None) -> int:
  ap = argparse.ArgumentParser(prog="python -m benchmarks.convert", description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  add_common_args(ap, json_help="also write the result (the printed JSON line) to this file")
  ap.add_argument("--gb", type=float, default=1.0)
  ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
  ap.add_argument("--hidden", type=int, default=2048)
  ap.add_argument("--keep", help="write the checkpoint and output here instead of a temporary directory")
  ap.add_argument("--make-only", help=argparse.SUPPRESS)  # internal: write the checkpoint to this dir, exit
  ap.add_argument("--child", choices=CHILD_MODES, help=argparse.SUPPRESS)  # internal: one measured process
  ap.add_argument("path", nargs="?", help=argparse.SUPPRESS)  # --child's checkpoint / converted directory
  args = parse(ap, argv, quick_defaults={"gb": 0.7})
  if args.child:
    return child(args.child, args.path, args.dtype)
  if args.make_only:
    make_checkpoint(Path(args.make_only), gb=args.gb, dtype=args.dtype, hidden=args.hidden)
    return 0

  tmp = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="bench_convert_"))
  ckpt, out = tmp / "hf", tmp / "out"
  t0 = time.perf_counter()
  # In a child process, so this (measuring) process stays small: a fork briefly counts the parent's pages.
  subprocess.run(module_command(MODULE, "--make-only", str(ckpt), "--gb", str(args.gb), "--dtype", args.dtype,
                                "--hidden", str(args.hidden)), check=True, cwd=ROOT, env=child_env())
  config = json.loads((ckpt / "config.json").read_text())
  size = (ckpt / "model.safetensors").stat().st_size
  print(f"checkpoint: {size / 1e9:.3f} GB {args.dtype}, {config['num_hidden_layers']} layers of hidden "
        f"{args.hidden} ({time.perf_counter() - t0:.1f} s to write)")

  env = child_env(JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)  # one CPU device, as a user converting would have
  runs = {
      "baseline": module_command(MODULE, "--child", "baseline"),
      "import": module_command(MODULE, "--child", "import", str(ckpt), "--dtype", args.dtype),
      "convert": [sys.executable, str(ROOT / "scripts" / "convert_hf.py"), "--llm", str(ckpt), "--out", str(out),
                  "--dtype", args.dtype, "--no-progress"],
      "load": module_command(MODULE, "--child", "load", str(out)),
  }
  results = {"checkpoint_bytes": size, "dtype": args.dtype, "layers": config["num_hidden_layers"],
             "hidden": args.hidden}
  for name, cmd in runs.items():
    r = measure_process(cmd, env, cwd=ROOT)
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
  if args.json:
    Path(args.json).write_text(json.dumps(results, indent=1))
  if not args.keep:
    import shutil
    shutil.rmtree(tmp, ignore_errors=True)
  return 0


# ---- for the runner (python -m benchmarks) -------------------------------------------------------------

def run_convert(quick: bool, demo_models) -> dict:
  """main() above in a fresh process (so its children fork from a small parent); if that fails, `bench_fresh` on
  the demo-shape LLaMA that `demo_models()` returns ((our MusiLingo, its TorchMusiLingo twin))."""
  gb = "0.7" if quick else "1.0"
  proc = subprocess.run(module_command(MODULE, "--gb", gb), capture_output=True, text=True, timeout=900, cwd=ROOT,
                        env=child_env())
  lines = [x for x in proc.stdout.splitlines() if x.startswith("{")]
  if proc.returncode == 0 and lines:
    r = json.loads(lines[-1])
    ckpt = r["checkpoint_bytes"]
    rows = []
    for name, label in (("import", "convert.import_pretrained (streaming import)"),
                        ("convert", "scripts/convert_hf.py (import + Orbax save)"),
                        ("load", "convert.load_converted (Orbax restore)")):
      x = r[name]
      rows.append({"what": label, "s": x["wall_s"], "peak_rss": x["peak_rss_bytes"],
                   "rss_before": r["baseline"]["peak_rss_bytes"], "net_over_ckpt": x["net_over_checkpoint"],
                   "peak_over_ckpt": x["peak_over_checkpoint"]})
    return {"source": f"python -m benchmarks.convert --gb {gb}", "checkpoint_bytes": ckpt,
            "checkpoint": f"random LLaMA, hidden {r['hidden']}, {r['layers']} layers, {r['dtype']} safetensors",
            "rows": rows, "goal_value": rows[0]["net_over_ckpt"],
            "note": "wall s includes the process start-up and imports; RSS before = a process doing only the "
                    "imports; net = (peak - that) / checkpoint bytes"}
  log(f"python -m benchmarks.convert failed ({proc.returncode}): {proc.stderr[-500:]}; measuring conversion on the "
      "demo-shape LLaMA")
  plain, ref = demo_models()
  with tempfile.TemporaryDirectory() as tmp:
    c = bench_fresh(ref.lm, Path(tmp))
  rows = [{"what": label, "s": c[who]["s"], "peak_rss": c[who]["peak_rss"], "rss_before": c[who]["rss_before"],
           "net_over_ckpt": c[who]["increase_over_ckpt"], "peak_over_ckpt": c[who]["peak_over_ckpt"]}
          for who, label in (("ours", "convert.import_pretrained"),
                             ("transformers", "LlamaForCausalLM.from_pretrained"))]
  return {"source": "benchmarks/convert.py (fallback: bench_fresh)", "checkpoint_bytes": c["checkpoint_bytes"],
          "checkpoint": "the demo-shape LLaMA, float32 safetensors (save_pretrained)", "rows": rows,
          "goal_value": rows[0]["net_over_ckpt"],
          "note": "s excludes start-up; RSS before = after imports and JAX start-up in that process; peak = VmHWM"}


def bench_fresh(lm, workdir: Path) -> dict:
  """Saves the torch LLaMA `lm` as safetensors, then imports it with ours and with transformers, each in a fresh
  process (`--child ours|transformers`)."""
  import os
  out = workdir / "hf_llm"
  lm.save_pretrained(out, safe_serialization=True)
  ckpt = sum(f.stat().st_size for f in out.glob("*.safetensors"))
  res = {"checkpoint_bytes": ckpt, "files": sorted(f.name for f in out.iterdir())}
  for who in ("ours", "transformers"):
    proc = subprocess.run(module_command(MODULE, "--child", who, str(out)), capture_output=True, text=True,
                          timeout=600, cwd=ROOT, env=child_env(XLA_FLAGS=os.environ.get("XLA_FLAGS", "")))
    line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    if not line:
      raise RuntimeError(f"conversion child ({who}) failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    r = json.loads(line[0][7:])
    r["increase"] = r["peak_rss"] - r["rss_before"]
    r["increase_over_ckpt"] = r["increase"] / ckpt
    r["peak_over_ckpt"] = r["peak_rss"] / ckpt
    res[who] = r
  return res


def log_result(c: dict) -> None:
  for r in c["rows"]:
    log(f"convert {c['checkpoint_bytes'] / 2 ** 20:.0f} MB, {r['what']}: {r['s']:.1f} s, peak RSS net "
        f"{r['net_over_ckpt']:.2f}x checkpoint")


if __name__ == "__main__":
  sys.exit(main())
