"""Check a conversion against the transformers PyTorch model on the same random inputs.

  musilingo-verify --mert DIR --llm DIR_OR_GGUF [--tol 1e-4]     (or python scripts/verify_conversion.py ...)

MERT: transformers.HubertModel (built from our to_hf_config(), so a MERT `mert_model` directory loads too)
vs our MERT: max |diff| for every hidden state; the last one is compared with `last_hidden_state` (transformers
5 returns the state before the final LayerNorm as hidden_states[-1] on the pre-LN path; docs/reference.md,
"Model").
LLM: LlamaForCausalLM (or, for a GGUF, AutoModelForCausalLM.from_pretrained(dir, gguf_file=name)) vs our
Llama: max |diff| of the logits. Everything in float32, matmuls at "highest" precision.

A row passes when max |diff| <= tol * max(1, max |reference|): float32 sums in another order differ by a
few 1e-6 of the values' scale, and MERT's residual stream or a 30-layer LLM's logits reach tens or hundreds
(SmolLM2 on random ids: max |diff| ~1e-4 at logits ~25). Exits 1 when a row fails.

--mert / --llm take what musilingo-convert takes, Hub ids included (read from the Hugging Face cache: this
program sets HF_HUB_OFFLINE=1 unless it is set); they are checked before anything loads (one line `verify:
error: ...`, exit status 2).
"""

# jax, torch, transformers and the converter are imported inside the functions: --help stays instant.

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def _jit_call(model, *args):
  """model(*args) under jax.jit (op-by-op eager execution is slow)."""
  import jax
  from flax import nnx
  graphdef, state = nnx.split(model)
  return jax.jit(lambda s, *a: nnx.merge(graphdef, s)(*a))(state, *args)


def verify_mert(path, *, seconds: float = 1.0, batch: int = 1, seed: int = 0) -> list[tuple[str, float]]:
  import jax.numpy as jnp
  import numpy as np
  import torch
  import transformers
  from musilingo_jax.convert.hf import import_pretrained
  from musilingo_jax.models import mert

  model, cfg = import_pretrained(mert.HF_KIND, path, dtype="float32")
  hf_cfg = transformers.HubertConfig(**cfg.to_hf_config())
  ref = transformers.HubertModel.from_pretrained(str(path), config=hf_cfg, dtype=torch.float32).eval()
  wav = np.random.RandomState(seed).randn(batch, int(seconds * 24000)).astype(np.float32)
  ours = _jit_call(model, jnp.asarray(wav))
  with torch.no_grad():
    out = ref(torch.from_numpy(wav), output_hidden_states=True)
  rows = []
  for i, h in enumerate(ours):
    theirs = out.last_hidden_state if i == len(ours) - 1 else out.hidden_states[i]
    name = f"mert hidden_states[{i}]" + (" vs last_hidden_state" if i == len(ours) - 1 else "")
    theirs = theirs.numpy()
    rows.append((name, float(np.abs(np.asarray(h, np.float32) - theirs).max()), float(np.abs(theirs).max())))
  return rows


def verify_llm(path, *, seq: int = 16, batch: int = 2, seed: int = 0) -> list[tuple[str, float]]:
  import jax.numpy as jnp
  import numpy as np
  import torch
  import transformers
  from musilingo_jax.convert.hf import import_pretrained
  from musilingo_jax.models import llama

  model, cfg = import_pretrained(llama.HF_KIND, path, dtype="float32")
  p = Path(path)
  if p.suffix == ".gguf":
    ref = transformers.AutoModelForCausalLM.from_pretrained(str(p.parent), gguf_file=p.name, dtype=torch.float32)
  else:
    ref = transformers.LlamaForCausalLM.from_pretrained(str(p), dtype=torch.float32)
  ref.eval()
  ids = np.random.RandomState(seed).randint(0, cfg.vocab_size, (batch, seq))
  ours = np.asarray(_jit_call(model, jnp.asarray(ids, jnp.int32))[0])
  with torch.no_grad():
    theirs = ref(torch.from_numpy(ids)).logits.float().numpy()
  return [("llm logits", float(np.abs(ours - theirs).max()), float(np.abs(theirs).max()))]


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--mert", help="HF MERT/HuBERT directory, or its Hub id")
  ap.add_argument("--llm", help="HF LLaMA directory or .gguf file, or a Hub id")
  ap.add_argument("--tol", type=float, default=1e-4, help="relative to max(1, max|reference|)")
  ap.add_argument("--seconds", type=float, default=1.0, help="length of the random waveform for MERT")
  ap.add_argument("--seq", type=int, default=16, help="length of the random token sequence for the LLM")
  args = ap.parse_args(argv)
  if args.mert is None and args.llm is None:
    ap.error("give --mert and/or --llm")
  os.environ.setdefault("HF_HUB_OFFLINE", "1")
  from musilingo_jax.main import cli, convert_hf
  args.out = None  # convert_hf.check_inputs' OUT: nothing is written here
  code, _ = cli.checked("verify", lambda: convert_hf.check_inputs(args))
  if code:
    return code
  import jax
  jax.config.update("jax_default_matmul_precision", "highest")
  rows = []
  if args.mert:
    rows += verify_mert(args.mert, seconds=args.seconds)
  if args.llm:
    rows += verify_llm(args.llm, seq=args.seq)
  bad = 0
  for name, diff, scale in rows:
    ok = diff <= args.tol * max(1.0, scale)
    bad += not ok
    print(f"{'ok ' if ok else 'BAD'} max|diff| {diff:.3e}  (max|ref| {scale:.3g})  {name}")
  print(f"{len(rows) - bad}/{len(rows)} within tol {args.tol:g} x max(1, max|ref|)")
  return 1 if bad else 0


def run() -> None:
  """Console-script entry point (musilingo-verify)."""
  sys.exit(main())


if __name__ == "__main__":
  run()
