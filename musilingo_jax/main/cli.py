"""Command-line pieces the musilingo-* commands share (no heavy imports: `--help` stays instant)."""

from __future__ import annotations

import argparse


DTYPES = ("bfloat16", "float32")
DTYPE_HELP = ("dtype of the frozen encoder and LLM weights and of their compute (default %(default)s; float32 "
              "takes twice the memory); the projection and LoRA adapters stay float32. The frozen weights are "
              "split over all local devices (FSDP); the memory they take is printed at load")


def add_model_source(p: argparse.ArgumentParser, *, dtypes: tuple[str, ...] = DTYPES,
                     dtype_help: str = DTYPE_HELP) -> None:
  """--workdir | --checkpoint [--projection] [--dtype]: where a trained model comes from and the dtype its
  frozen parts load in (build.load_for_inference)."""
  src = p.add_mutually_exclusive_group(required=True)
  src.add_argument("--workdir", help="a training run's directory (config + latest checkpoint)")
  src.add_argument("--checkpoint", help="a converted checkpoint directory (musilingo-convert)")
  p.add_argument("--projection", help="with --checkpoint: projection weights (ours, or a released MusiLingo .pth)")
  p.add_argument("--dtype", choices=dtypes, default="bfloat16", help=dtype_help)


def add_sampling(p: argparse.ArgumentParser, *, greedy_help: str = "argmax decoding instead of sampling") -> None:
  """The reference's sampling settings as defaults: temperature 0.1, top-p 0.5, up to 300 new tokens
  (docs/reference.md, "Generation and metrics")."""
  p.add_argument("--greedy", action="store_true", help=greedy_help)
  p.add_argument("--max-new-tokens", type=int, default=300)
  p.add_argument("--temperature", type=float, default=0.1)
  p.add_argument("--top-p", type=float, default=0.5)
  p.add_argument("--seed", type=int, default=0)


def check_model_source(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
  if args.projection and not args.checkpoint:
    p.error("--projection goes with --checkpoint")


def check_storage(prog: str, *, read: dict | None = None, write: dict | None = None) -> int:
  """Before anything loads or compiles: each `read` {what: path} exists and each `write` {what: folder} can be
  written, local or gs:// (musilingo_jax/storage.py). A missing object or an unreachable bucket prints one
  line naming the URL ("<prog>: error: --workdir gs://b/run/config.json: not found") to stderr and returns
  2; 0 when all is well (None values are skipped)."""
  import sys

  from musilingo_jax import storage
  try:
    for what, p in (read or {}).items():
      if p:
        storage.check_readable(p, what)
    for what, p in (write or {}).items():
      if p:
        storage.check_writable(p, what)
  except storage.StorageError as e:
    print(f"{prog}: error: {e}", file=sys.stderr, flush=True)
    return 2
  return 0


def model_source_reads(args: argparse.Namespace) -> dict:
  """What --workdir | --checkpoint [--projection] must hold, for check_storage: a run's config.json, a
  converted checkpoint's meta.json, the projection file."""
  import os
  join = lambda d, name: None if not d else os.fspath(d).rstrip("/") + "/" + name  # noqa: E731
  return {"--workdir": join(args.workdir, "config.json"), "--checkpoint": join(args.checkpoint, "meta.json"),
          "--projection": getattr(args, "projection", None)}


def absl_help_from(module_name: str, doc: str | None) -> None:
  """For the absl programs (train, aot_compile): `--help` prints __main__'s docstring and the flags __main__
  defines, but under a console script or a scripts/ wrapper __main__ is the launcher. Call before app.run:
  makes `module_name`'s flags and docstring the ones --help shows."""
  import sys

  from absl import flags
  fv, main_name = flags.FLAGS, sys.argv[0]  # absl names the main module's flags after sys.argv[0]
  for flag in fv.flags_by_module_dict().get(module_name, []):
    fv.register_key_flag_for_module(main_name, flag)
  sys.modules["__main__"].__doc__ = doc


def load_model(args: argparse.Namespace, prog: str, *, stream=None):
  """build.load_for_inference from --workdir | --checkpoint [--projection] [--dtype] -> (model, tokenizer,
  config); prints the memory the weights take ("<prog>: model memory: ...") to `stream` (stdout)."""
  import sys

  from musilingo_jax import build
  model, tokenizer, config = build.load_for_inference(workdir=args.workdir, checkpoint=args.checkpoint,
                                                      projection=args.projection, dtype=args.dtype)
  print(f"{prog}: {build.format_memory_report(build.memory_report(model))}", file=stream or sys.stdout, flush=True)
  return model, tokenizer, config


def absl_run(module_name: str, doc: str | None, main) -> None:
  """Console-script entry point of an absl program (musilingo-train, musilingo-aot): absl parses sys.argv,
  then calls main(argv). (ml_collections reads the --config.x=y overrides from sys.argv itself.) A config
  file that cannot be read or an override of a key the config lacks is one line on stderr and exit 2
  (`config_error`), not a traceback."""
  import sys

  from absl import app, flags
  absl_help_from(module_name, doc)
  flags.mark_flag_as_required("config")
  if not {"--help", "-h", "--helpfull", "--helpshort"} & set(sys.argv[1:]):
    problem = config_error(sys.argv[1:])
    if problem:
      print(f"error: {problem}", file=sys.stderr, flush=True)
      sys.exit(2)
  started = []

  def run_main(argv):
    started.append(True)
    return main(argv)
  try:
    app.run(run_main)
  except Exception as e:  # noqa: BLE001 - only failures while parsing the flags are ours to explain
    if started:
      raise
    print(f"error: {config_error(sys.argv[1:]) or f'{type(e).__name__}: {e}'}", file=sys.stderr, flush=True)
    sys.exit(2)


def _flat_keys(c, prefix: str = "") -> list[str]:
  out = []
  for k, v in c.items():
    out.append(prefix + k)
    if hasattr(v, "items") and not isinstance(v, dict):
      out += _flat_keys(v, prefix + k + ".")
  return out


def config_error(argv: list[str]) -> str | None:
  """One line for a --config that cannot be built (None when it can): the file that is missing or fails to
  load (an unknown preset), or a --config.KEY override the config does not have, with the closest keys it
  does have."""
  import difflib
  import importlib.util
  import os

  spec = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
  if spec is None and "--config" in argv and argv.index("--config") + 1 < len(argv):
    spec = argv[argv.index("--config") + 1]
  if not spec:
    return None  # absl says --config is required
  path, _, preset = spec.partition(":")
  if not os.path.isfile(path):
    return f"--config {spec}: no such config file {path!r} (e.g. configs/finetune.py:demo)"
  try:
    mod_spec = importlib.util.spec_from_file_location("_musilingo_config", path)
    mod = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(mod)
    c = mod.get_config(preset) if preset else mod.get_config()
  except Exception as e:  # noqa: BLE001 - the config file itself fails: say so, in one line
    return f"--config {spec}: {type(e).__name__}: {e}"
  known = _flat_keys(c)
  for a in argv:
    if a.startswith("--config.") and "=" in a:
      key = a[len("--config."):].split("=", 1)[0]
      if key not in known:
        close = difflib.get_close_matches(key, known, n=3, cutoff=0.5)
        hint = f"; closest known: {', '.join('config.' + k for k in close)}" if close else ""
        return f"--config.{key}: {spec} has no key {key!r}{hint}"
  return None
