"""Export a trained model back to PyTorch / Hugging Face.

  python scripts/export_pytorch.py --workdir runs/musicqa --out exported/
  python scripts/export_pytorch.py --checkpoint converted/ [--projection proj.pth] --out exported/

Writes OUT/musilingo_checkpoint.pth in the reference format ({"model": {"llama_proj.weight": [out, in],
"llama_proj.bias": [out]}}, loads with load_state_dict(strict=False) into the reference model),
OUT/llm/ (a LlamaForCausalLM directory with LoRA merged, plus the tokenizer) and OUT/encoder/ (a HubertModel
directory), through the same key tables as import.

--dtype (default bfloat16) is the dtype the frozen weights load in (split over all local devices) and the
dtype of the tensors in OUT/llm and OUT/encoder (LoRA merged in float32, then cast); float16 loads in
float32 and writes float16. musilingo_checkpoint.pth is always float32, as the reference's is. Pass
--dtype float32 for float32 Hugging Face directories.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from musilingo_jax import cli  # noqa: E402


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  cli.add_model_source(ap, dtypes=cli.DTYPES + ("float16",), dtype_help=(
      "dtype the frozen weights load in and OUT/llm, OUT/encoder are written in (default %(default)s; float16: "
      "loaded in float32, written in float16); musilingo_checkpoint.pth is always float32"))
  ap.add_argument("--step", type=int, default=None, help="with --workdir: checkpoint step (default latest)")
  ap.add_argument("--out", required=True)
  ap.add_argument("--no-llm", action="store_true", help="skip OUT/llm")
  ap.add_argument("--no-encoder", action="store_true", help="skip OUT/encoder")
  args = ap.parse_args(argv)
  cli.check_model_source(ap, args)

  import numpy as np
  from musilingo_jax import build, convert
  load_dtype = "float32" if args.dtype == "float16" else args.dtype
  model, tok, _ = build.load_for_inference(workdir=args.workdir, checkpoint=args.checkpoint,
                                           projection=args.projection, step=args.step, dtype=load_dtype)
  print(build.format_memory_report(build.memory_report(model)), flush=True)
  os.makedirs(args.out, exist_ok=True)
  pth = os.path.join(args.out, "musilingo_checkpoint.pth")
  kernel, bias = model.projection_weights()  # a feature standardisation (demo) folded in: works on raw features
  convert.save_musilingo_pth(pth, np.asarray(kernel), np.asarray(bias))
  print(f"wrote {pth}{' (feature standardisation folded into the projection)' if model.feature_norm else ''}")
  if not args.no_llm:
    path = convert.export_llm_hf(model.llm, os.path.join(args.out, "llm"), args.dtype, tokenizer=tok)
    print(f"wrote {path} (LlamaForCausalLM{', LoRA merged' if model.cfg.lora else ''})")
  if not args.no_encoder:
    path = convert.export_encoder_hf(model.encoder, os.path.join(args.out, "encoder"), args.dtype)
    print(f"wrote {path} (HubertModel)")
  return 0


if __name__ == "__main__":
  sys.exit(main())
