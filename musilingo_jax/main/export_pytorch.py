"""Export a trained model to PyTorch / Hugging Face: one folder a PyTorch user can use as it is.

  musilingo-export --workdir runs/musicqa --out exported/
  musilingo-export --checkpoint converted/ [--projection proj.pth] --out exported/
  (python scripts/export_pytorch.py ... is the same program)

OUT/ holds (docs/export.md):
  musilingo_config.json     how the parts fit (pool frames, audio-token rule, prompt template, end symbol,
                            stop ids, sampling, dtypes, audio preprocessing, LoRA, feature statistics)
  README.md                 a model card
  projection.safetensors    llama_proj.weight [out, in] / llama_proj.bias, float32
  musilingo_checkpoint.pth  the same, in the reference's format ({"model": {"llama_proj.weight", ...}})
  llm/                      LlamaForCausalLM as save_pretrained writes it (sharded above --max-shard-size), with
                            generation_config.json (the reference's sampling and stop ids) and the tokenizer;
                            LoRA merged
  adapter/                  LoRA runs: a PEFT adapter (adapter_config.json + adapter_model.safetensors)
  llm_base/                 with --base-llm (LoRA runs): the LLM without the adapters, the adapter's base
  encoder/                  HubertModel directory + preprocessor_config.json
musilingo_jax.torch_inference.MusiLingoTorch.from_export(OUT) answers in PyTorch as we do.

--dtype (default bfloat16) is the dtype the frozen weights load in (split over all local devices) and the
dtype of the tensors in llm/, llm_base/ and encoder/ (LoRA merged in float32, then cast); float16 loads in
float32 and writes float16. The projection and the adapter are always float32. Pass --dtype float32 for
float32 Hugging Face directories.

--workdir, --checkpoint, --projection and --out may be gs:// URLs: the files are written into a local
temporary folder, then uploaded (each under a temporary name, renamed into place). A missing object or an
unreachable bucket is one line naming it and exit status 2, before the model loads.
"""

# jax, numpy and the model modules are imported inside main(): --help stays instant.

import argparse
import sys
import tempfile

from musilingo_jax.main import cli


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  cli.add_model_source(ap, dtypes=("bfloat16", "float32", "float16"), dtype_help=(
      "dtype the frozen weights load in and OUT/llm, OUT/encoder are written in (default %(default)s; float16: "
      "loaded in float32, written in float16); musilingo_checkpoint.pth is always float32"))
  ap.add_argument("--step", type=int, default=None, help="with --workdir: checkpoint step (default latest)")
  ap.add_argument("--out", required=True)
  ap.add_argument("--no-llm", action="store_true", help="skip OUT/llm (the merged LLM)")
  ap.add_argument("--base-llm", action="store_true",
                  help="LoRA runs: also write OUT/llm_base, the LLM without the adapters (the PEFT adapter's base)")
  ap.add_argument("--base-model", default=None,
                  help="LoRA runs: the adapter's base model as adapter_config.json names it (a Hub id or a path; "
                       "default: the LLM the converted checkpoint was made from)")
  ap.add_argument("--no-encoder", action="store_true", help="skip OUT/encoder")
  ap.add_argument("--max-shard-size", type=float, default=5.0, metavar="GB",
                  help="largest safetensors shard in GB (decimal) before llm/ is split with an index (default 5)")
  args = ap.parse_args(argv)
  cli.check_model_source(ap, args)
  if args.max_shard_size <= 0:
    ap.error(f"--max-shard-size {args.max_shard_size:g}: must be positive (GB)")
  # Every input (run folder, converted checkpoint, projection file / release / Hub id, --out) before the load.
  code, _ = cli.checked("export", lambda: cli.check_model_inputs(args, write={"--out": args.out}))
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
  from musilingo_jax import build
  from musilingo_jax import export as export_lib
  load_dtype = "float32" if args.dtype == "float16" else args.dtype
  model, tok, c = build.load_for_inference(workdir=args.workdir, checkpoint=args.checkpoint,
                                           projection=args.projection, step=args.step, dtype=load_dtype)
  print(build.format_memory_report(build.memory_report(model)), flush=True)
  source = _sources(args, c)
  base_model = args.base_model or source.get("llm")
  normalize = build.audio_normalize(c)
  prefix = shown.rstrip("/") + "/"
  export_lib.export_model(model, tok, out, prompt_cfg=build.prompt_config(c), dtype=args.dtype,
                          normalize_audio=normalize, llm=not args.no_llm, base_llm=args.base_llm,
                          encoder=not args.no_encoder, max_shard_bytes=int(args.max_shard_size * 1e9),
                          base_model=base_model, source=source,
                          log=lambda name, note: print(f"wrote {prefix}{name}{note}", flush=True))
  return 0


def _sources(args, c) -> dict:
  """Where the exported weights came from (the model card's provenance, adapter_config's base model)."""
  import json

  from musilingo_jax import storage
  out = {}
  if args.workdir:
    out["run"] = args.workdir
  ckpt = c.model.get("checkpoint", "") or ""
  if ckpt:
    out["converted_checkpoint"] = ckpt
    meta = storage.path(ckpt) / "meta.json"
    if meta.is_file():
      for part, src in json.loads(meta.read_text()).get("sources", {}).items():
        out[part] = src
  if args.projection:
    out["projection"] = args.projection
  if c.model.get("llm_gguf", ""):
    out["llm"] = c.model.llm_gguf
  return out


def run() -> None:
  """Console-script entry point (musilingo-export)."""
  sys.exit(main())


if __name__ == "__main__":
  run()
