"""Export a trained model back to PyTorch / Hugging Face.

  musilingo-export --workdir runs/musicqa --out exported/
  musilingo-export --checkpoint converted/ [--projection proj.pth] --out exported/
  (python scripts/export_pytorch.py ... is the same program)

Writes OUT/musilingo_checkpoint.pth in the reference format ({"model": {"llama_proj.weight": [out, in],
"llama_proj.bias": [out]}}, loads with load_state_dict(strict=False) into the reference model),
OUT/llm/ (a LlamaForCausalLM directory with LoRA merged, plus the tokenizer) and OUT/encoder/ (a HubertModel
directory), through the same key tables as import.

--dtype (default bfloat16) is the dtype the frozen weights load in (split over all local devices) and the
dtype of the tensors in OUT/llm and OUT/encoder (LoRA merged in float32, then cast); float16 loads in
float32 and writes float16. musilingo_checkpoint.pth is always float32, as the reference's is. Pass
--dtype float32 for float32 Hugging Face directories.

--workdir, --checkpoint, --projection and --out may be gs:// URLs: the files are written into a local
temporary folder, then uploaded (each under a temporary name, renamed into place). A missing object or an
unreachable bucket is one line naming it and exit status 2, before the model loads.
"""

# jax, numpy and the model modules are imported inside main(): --help stays instant.

import argparse
import os
import sys
import tempfile

from musilingo_jax.main import cli


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
  code = cli.check_storage("export", read=cli.model_source_reads(args), write={"--out": args.out})
  if code:
    return code
  from musilingo_jax import storage
  if storage.is_remote(args.out):
    with tempfile.TemporaryDirectory(prefix="musilingo-export-") as tmp:
      code = _export(args, tmp, shown=args.out)
      storage.upload_tree(tmp, args.out)
      print(f"uploaded to {args.out}")
    return code
  return _export(args, args.out, shown=args.out)


def _export(args, out: str, *, shown: str) -> int:
  """Writes the export into the local folder `out` (`shown`: the --out the messages name)."""
  import numpy as np
  from musilingo_jax import build
  from musilingo_jax.convert.hf import export_pretrained
  from musilingo_jax.convert.pth import save_musilingo_pth
  from musilingo_jax.models import llama, mert
  load_dtype = "float32" if args.dtype == "float16" else args.dtype
  shown_path = lambda p: shown.rstrip("/") + os.fspath(p)[len(out):]  # noqa: E731 - what --out names
  model, tok, _ = build.load_for_inference(workdir=args.workdir, checkpoint=args.checkpoint,
                                           projection=args.projection, step=args.step, dtype=load_dtype)
  print(build.format_memory_report(build.memory_report(model)), flush=True)
  os.makedirs(out, exist_ok=True)
  pth = os.path.join(out, "musilingo_checkpoint.pth")
  kernel, bias = model.projection_weights()  # a feature standardisation (demo) folded in: works on raw features
  save_musilingo_pth(pth, np.asarray(kernel), np.asarray(bias))
  folded = " (feature standardisation folded into the projection)" if model.feature_norm else ""
  print(f"wrote {shown_path(pth)}{folded}")
  if not args.no_llm:
    path = export_pretrained(llama.HF_KIND, model.llm, os.path.join(out, "llm"), args.dtype, tokenizer=tok)
    print(f"wrote {shown_path(path)} (LlamaForCausalLM{', LoRA merged' if model.cfg.lora else ''})")
  if not args.no_encoder:
    path = export_pretrained(mert.HF_KIND, model.encoder, os.path.join(out, "encoder"), args.dtype)
    print(f"wrote {shown_path(path)} (HubertModel)")
  return 0


def run() -> None:
  """Console-script entry point (musilingo-export)."""
  sys.exit(main())


if __name__ == "__main__":
  run()
