"""Convert pretrained PyTorch/GGUF checkpoints into our frozen-weight Orbax checkpoint.

  musilingo-convert --mert DIR --llm DIR_OR_GGUF --out DIR [--dtype float32|bfloat16]
  (or python scripts/convert_hf.py ...)

Writes OUT/params/{encoder,llm} (Orbax), OUT/encoder_config.json, OUT/llm_config.json, OUT/tokenizer/,
OUT/preprocessor_config.json (MERT's feature extractor settings: do_normalize) and OUT/meta.json; read it
back with `musilingo_jax.convert.converted.load_converted(OUT, (mert.HF_KIND, llama.HF_KIND))`. Tensors are
read one at a time, so host memory stays near one copy of the model. OUT may be a gs:// URL (Orbax writes the
arrays through tensorstore; the JSON and tokenizer files are uploaded whole, meta.json last).

--mert and --llm may be Hugging Face Hub ids (owner/name[@revision], or owner/name/file.gguf for one file of a
GGUF repository), resolved through the Hugging Face cache (HF_HUB_CACHE / HF_HOME; HF_HUB_OFFLINE=1 reads
the cache only, musilingo_jax/hub.py): configs, tokenizer and safetensors weights are fetched (.bin weights
only when there are no safetensors). Inputs are checked before any weights load: an id that is not cached
offline, a missing path, a folder without config.json or weights, an unsupported model_type, an unreachable
bucket for OUT are one line `convert: error: ...` and exit status 2.
"""

# The converter (jax, torch) is imported inside the functions: --help stays instant.

from __future__ import annotations

import argparse
import sys
import time


def convert_musilingo(out_dir, *, mert_path=None, llm_path=None, dtype="float32", ignore: tuple[str, ...] = (),
                      progress: bool = True) -> dict:
  """MusiLingo's frozen parts -> out_dir: the MERT encoder (params/encoder, with its preprocessor_config.json)
  and/or the LLM (params/llm) with its tokenizer (tokenizer/), as convert.converted.convert_checkpoint
  writes them. Returns meta.json's content."""
  from musilingo_jax import tokenizer
  from musilingo_jax.convert.converted import convert_checkpoint
  from musilingo_jax.models import llama, mert
  parts = [(kind, p) for kind, p in ((mert.HF_KIND, mert_path), (llama.HF_KIND, llm_path)) if p is not None]
  save_tokenizer = None if llm_path is None else (lambda d: tokenizer.copy_tokenizer(llm_path, d))
  return convert_checkpoint(out_dir, parts, dtype=dtype, ignore=ignore, progress=progress,
                            save_tokenizer=save_tokenizer)


def check_inputs(args: argparse.Namespace) -> None:
  """Before any weights load: Hub ids resolved (into args.mert / args.llm), OUT writable, each model a
  checkpoint the converter reads (cli.check_hf_model); raises the one-line errors cli.checked prints."""
  from musilingo_jax.main import cli
  cli.resolve_hub_ids(args, {"--mert": cli.HUB_MODEL, "--llm": cli.HUB_MODEL})
  remote = {flag: v for flag, v in (("--mert", args.mert), ("--llm", args.llm)) if v and "://" in v}
  cli.storage_checks(read=remote, write={"--out": args.out})  # (a local path: check_hf_model says more)
  if args.mert:
    cli.check_hf_model(args.mert, "--mert", "encoder")
  if args.llm:
    cli.check_hf_model(args.llm, "--llm", "llm")


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--mert", help="HF MERT/HuBERT directory (config.json + safetensors or .bin), or its Hub id")
  ap.add_argument("--llm", help="HF LLaMA directory, a llama.cpp .gguf file, or a Hub id (owner/name[@rev][/file])")
  ap.add_argument("--out", required=True, help="output directory")
  ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
  ap.add_argument("--ignore", action="append", default=[], metavar="REGEX",
                  help="checkpoint keys to skip (repeatable), e.g. a pretraining head")
  ap.add_argument("--no-progress", action="store_true")
  args = ap.parse_args(argv)
  if args.mert is None and args.llm is None:
    ap.error("give --mert and/or --llm")

  from musilingo_jax.main import cli
  code, _ = cli.checked("convert", lambda: check_inputs(args))
  if code:
    return code
  from musilingo_jax.convert.rules import ConversionError
  t0 = time.time()
  try:
    meta = convert_musilingo(args.out, mert_path=args.mert, llm_path=args.llm, dtype=args.dtype,
                             ignore=tuple(args.ignore), progress=not args.no_progress)
  except ConversionError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(f"wrote {args.out} ({', '.join(meta['sources'])}; {meta['dtype']}) in {time.time() - t0:.1f} s")
  return 0


def run() -> None:
  """Console-script entry point (musilingo-convert)."""
  sys.exit(main())


if __name__ == "__main__":
  run()
