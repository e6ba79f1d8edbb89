"""Convert pretrained PyTorch/GGUF checkpoints into our frozen-weight Orbax checkpoint.

  python scripts/convert_hf.py --mert DIR --llm DIR_OR_GGUF --out DIR [--dtype float32|bfloat16]

Writes OUT/params/{encoder,llm} (Orbax), OUT/encoder_config.json, OUT/llm_config.json, OUT/tokenizer/,
OUT/preprocessor_config.json (MERT's feature extractor settings: do_normalize) and OUT/meta.json; read it back with `musilingo_jax.convert.load_converted(OUT)`. Tensors are read one at a
time, so host memory stays near one copy of the model.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--mert", help="HF MERT/HuBERT directory (config.json + safetensors or .bin)")
  ap.add_argument("--llm", help="HF LLaMA directory, or a llama.cpp .gguf file")
  ap.add_argument("--out", required=True, help="output directory")
  ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
  ap.add_argument("--ignore", action="append", default=[], metavar="REGEX",
                  help="checkpoint keys to skip (repeatable), e.g. a pretraining head")
  ap.add_argument("--no-progress", action="store_true")
  args = ap.parse_args(argv)
  if args.mert is None and args.llm is None:
    ap.error("give --mert and/or --llm")

  from musilingo_jax.convert import ConversionError, convert_checkpoint
  t0 = time.time()
  try:
    meta = convert_checkpoint(args.out, mert=args.mert, llm=args.llm, dtype=args.dtype,
                              ignore=tuple(args.ignore), progress=not args.no_progress)
  except ConversionError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(f"wrote {args.out} ({', '.join(meta['sources'])}; {meta['dtype']}) in {time.time() - t0:.1f} s")
  return 0


if __name__ == "__main__":
  sys.exit(main())
