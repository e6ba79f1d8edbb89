"""Command-line pieces the musilingo-* commands share (no heavy imports: `--help` stays instant).

Input checks: every program checks its inputs before it loads a model or decodes a data set, and a problem is
one line on stderr, `<prog>: error: <flag> <path or URL>: <what is wrong and what was expected>`, with exit
status 2 and no traceback (`checked`). The checks raise `InputError` (or the one-line errors of the layers
below: hub.HubError, storage.StorageError, ConversionError, AnnotationError); Hub ids are resolved to local
snapshot folders first (`resolve_hub_ids`, musilingo_jax/hub.py).
"""

from __future__ import annotations

import argparse


DTYPES = ("bfloat16", "float32", "int8")  # int8: the LLM's weights int8 with group-wise scales (quantize.py)
DTYPE_HELP = ("dtype of the frozen encoder and LLM weights and of their compute (default %(default)s; float32 "
              "takes twice the memory; int8: the LLM's weights int8 with a scale per output channel and block of "
              "64 input rows, computing in "
              "float32, LoRA merged); the projection and LoRA adapters stay float32. The frozen weights are "
              "split over all local devices (FSDP); the memory they take is printed at load")


def add_model_source(p: argparse.ArgumentParser, *, dtypes: tuple[str, ...] = DTYPES,
                     dtype_help: str = DTYPE_HELP) -> None:
  """--workdir | --checkpoint [--projection] [--dtype]: where a trained model comes from and the dtype its
  frozen parts load in (build.load_for_inference)."""
  src = p.add_mutually_exclusive_group(required=True)
  src.add_argument("--workdir", help="a training run's directory (config + latest checkpoint)")
  src.add_argument("--checkpoint", help="a converted checkpoint directory (musilingo-convert)")
  p.add_argument("--projection", help="with --checkpoint: projection weights: our .npz, a MusiLingo .pth, a "
                 ".safetensors file, a Hugging Face-layout release folder (keys <prefix>llama_proj.*), or a Hub "
                 "id owner/name[@revision][/file] of one (resolved through the Hugging Face cache)")
  p.add_argument("--dtype", choices=dtypes, default="bfloat16", help=dtype_help)


def add_audio_normalize(p: argparse.ArgumentParser) -> None:
  """--normalize-audio: standardise new clips as the run's encoder heard them (build.audio_normalize)."""
  p.add_argument("--normalize-audio", choices=("auto", "on", "off"), default="auto",
                 help="standardise each clip (zero mean, unit variance) as MERT's feature extractor does before "
                      "the encoder hears it. auto (default): as the run's training data did (MusicInstruct and "
                      "MusicCaps clips go through the extractor with the MERT checkpoint's do_normalize; MusicQA, "
                      "LP-MusicCaps-MSD and the demo do not); with --checkpoint, off")


def audio_normalize(args: argparse.Namespace, config) -> bool:
  """The --normalize-audio decision: on/off as given; auto: the run's setting (a run config), else off."""
  if args.normalize_audio != "auto":
    return args.normalize_audio == "on"
  if config is None or not getattr(args, "workdir", None):
    return False
  from musilingo_jax import build
  return build.audio_normalize(config)


def add_sampling(p: argparse.ArgumentParser, *, greedy_help: str = "argmax decoding instead of sampling") -> None:
  """The reference's sampling settings as defaults: temperature 0.1, top-p 0.5, up to 300 new tokens
  (docs/reference.md, "Generation and metrics")."""
  p.add_argument("--greedy", action="store_true", help=greedy_help)
  p.add_argument("--max-new-tokens", type=int, default=300)
  p.add_argument("--temperature", type=float, default=0.1)
  p.add_argument("--top-p", type=float, default=0.5)
  p.add_argument("--seed", type=int, default=0)


def check_storage(prog: str, *, read: dict | None = None, write: dict | None = None) -> int:
  """Before anything loads or compiles: each `read` {what: path} exists and each `write` {what: folder} can be
  written, local or gs:// (musilingo_jax/storage.py). A missing object or an unreachable bucket prints one
  line naming the URL ("<prog>: error: --workdir gs://b/run/config.json: not found") to stderr and returns
  2; 0 when all is well (None values are skipped)."""
  return checked(prog, lambda: storage_checks(read=read, write=write))[0]


def storage_checks(*, read: dict | None = None, write: dict | None = None) -> None:
  """check_storage's checks, raising storage.StorageError (one line) instead of printing."""
  from musilingo_jax import storage
  for what, p in (read or {}).items():
    if p:
      storage.check_readable(p, what)
  for what, p in (write or {}).items():
    if p:
      storage.check_writable(p, what)


class InputError(ValueError):
  """An input that is missing or not what the program expects: one line naming the flag, the path (or URL,
  or field) and what was expected."""


def fail(prog: str, message) -> int:
  """Prints `<prog>: error: <message>` (one line: newlines folded) to stderr; returns exit status 2."""
  import sys
  line = " ".join(str(message).split())
  print(f"{prog}: error: {line}", file=sys.stderr, flush=True)
  return 2


def checked(prog: str, check):
  """Runs the input check `check()` -> (0, its result), or, when it raises an input error (ValueError:
  InputError, HubError, ConversionError, AnnotationError; OSError: StorageError, a file that cannot be read),
  prints the one line (`fail`) and gives (2, None). Call before any model loads."""
  try:
    return 0, check()
  except (ValueError, OSError) as e:
    return fail(prog, e), None


def flagged(flag: str, value, err) -> str:
  """`<flag> <value>: <reason>` from an error whose message may already start with the path."""
  msg, value = str(err), str(value)
  return f"{flag} {msg}" if msg.startswith(value) else f"{flag} {value}: {msg}"


# Hub ids (musilingo_jax/hub.py) per kind of argument: how each is fetched.
HUB_MODEL, HUB_PROJECTION = "model", "projection"


def resolve_hub_ids(args: argparse.Namespace, flags: dict[str, str]) -> None:
  """Replaces each Hugging Face Hub id among `args`' `flags` ({"--llm": HUB_MODEL, "--projection":
  HUB_PROJECTION}) with its local snapshot path (hub.resolve_model / hub.resolve_projection); local paths
  and gs:// URLs stay as given. hub.HubError (one line) when an id cannot be resolved, e.g. offline and not
  in the cache. The id is kept in `args.hub_ids` ({flag: id}) for messages."""
  from musilingo_jax import hub
  ids = getattr(args, "hub_ids", None) or {}
  for flag, kind in flags.items():
    attr = flag.lstrip("-").replace("-", "_")
    value = getattr(args, attr, None)
    if value is None or not hub.is_hub_id(value):
      continue
    fetch = hub.resolve_projection if kind == HUB_PROJECTION else hub.resolve_model
    setattr(args, attr, fetch(value, what=flag))
    ids[flag] = value
  args.hub_ids = ids


def _name(args: argparse.Namespace, flag: str, value) -> str:
  """How a message names an argument's value: the Hub id as given (and its snapshot path), or the path."""
  given = (getattr(args, "hub_ids", None) or {}).get(flag)
  return f"{given} ({value})" if given else str(value)


def _is_local(p) -> bool:
  import os
  return "://" not in os.fspath(p)


def check_converted(path, flag: str, parts: tuple[str, ...] = ("encoder", "llm")) -> dict:
  """`path` (local or gs://) is a musilingo-convert directory holding `parts` (params/<part> and
  <part>_config.json) -> {part: its HF config dict}; InputError naming the folder otherwise: missing, a
  file, no meta.json (not a converted checkpoint), or a part missing."""
  import json

  from musilingo_jax import storage
  root = storage.path(path)
  how = "musilingo-convert --mert DIR --llm DIR --out OUT writes one"
  if _is_local(path):
    if not root.exists():
      raise InputError(f"{flag} {path}: no such folder (expected a converted checkpoint: {how})")
    if not root.is_dir():
      raise InputError(f"{flag} {path}: a file, not a converted checkpoint folder ({how})")
  if not (root / "meta.json").is_file():
    raise InputError(f"{flag} {path}: not a converted checkpoint: no meta.json ({how})")
  configs = {}
  for part in parts:
    cfg = root / f"{part}_config.json"
    if not (root / "params" / part).is_dir() or not cfg.is_file():
      raise InputError(f"{flag} {path}: the converted checkpoint holds no {part} (params/{part} or "
                       f"{part}_config.json missing): convert it with musilingo-convert "
                       f"{'--mert' if part == 'encoder' else '--llm'} ...")
    try:
      configs[part] = json.loads(cfg.read_text())
    except ValueError as e:
      raise InputError(f"{flag} {path}: {part}_config.json is not valid JSON ({e})") from None
  return configs


def check_workdir(path, flag: str = "--workdir") -> dict:
  """`path` (local or gs://) is a training run with a saved step -> its config.json as a dict; InputError
  naming the folder otherwise."""
  import json

  from musilingo_jax import storage
  root = storage.path(path)
  if _is_local(path) and not root.is_dir():
    raise InputError(f"{flag} {path}: no such folder (expected a training run directory: musilingo-train "
                     f"--workdir)")
  if not (root / "config.json").is_file():
    raise InputError(f"{flag} {path}: not a training run directory: no config.json")
  ckpts = root / "checkpoints"
  if not ckpts.is_dir() or not any(p.name.isdigit() for p in ckpts.iterdir()):
    raise InputError(f"{flag} {path}: the run has saved no checkpoint yet ({flag} {path}/checkpoints holds "
                     f"no step)")
  try:
    return json.loads((root / "config.json").read_text())
  except ValueError as e:
    raise InputError(f"{flag} {path}: config.json is not valid JSON ({e})") from None


def check_model_source(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
  if args.projection and not args.checkpoint:
    p.error("--projection goes with --checkpoint")


def check_model_inputs(args: argparse.Namespace, *, read: dict | None = None, write: dict | None = None) -> dict:
  """Every input of --workdir | --checkpoint [--projection] (plus the `read` / `write` paths, as
  check_storage takes them), checked before the model loads; raises the one-line errors `checked` prints.
  A Hub id as --projection is resolved first (into args.projection). Returns what later checks use:
  {"dims": (encoder dim, LLM dim) or None, "template": whether prompts use the instruction template,
  "run_config": the run's config.json dict or None}."""
  resolve_hub_ids(args, {"--projection": HUB_PROJECTION})
  if args.workdir and _is_local(args.workdir):
    check_workdir(args.workdir)
  if args.checkpoint and _is_local(args.checkpoint):
    check_converted(args.checkpoint, "--checkpoint")
  storage_checks(read={**model_source_reads(args), **(read or {})}, write=write)
  info = {"dims": None, "template": True, "run_config": None}
  if args.workdir:
    info["run_config"] = run = check_workdir(args.workdir)
    info["template"] = bool(run.get("prompt", {}).get("template", True))
  else:
    configs = check_converted(args.checkpoint, "--checkpoint")
    try:
      info["dims"] = (int(configs["encoder"]["hidden_size"]), int(configs["llm"]["hidden_size"]))
    except (KeyError, TypeError, ValueError):
      pass  # the load says what is wrong with the configs
  if args.projection:
    from musilingo_jax.convert.pth import read_projection
    from musilingo_jax.convert.rules import ConversionError
    try:
      read_projection(args.projection, dims=info["dims"])
    except ConversionError as e:
      raise InputError(flagged("--projection", _name(args, "--projection", args.projection), e)) from None
  return info


def check_release(dataset: str, data_dir: str, split: str, *, flag: str = "--data-dir", **kwargs) -> None:
  """`data_dir` holds `dataset`'s release for `split`: its annotation file reads (the first sample);
  InputError naming the folder or file and the reader's reason otherwise."""
  from pathlib import Path

  from musilingo_jax.data import readers
  if not Path(data_dir).is_dir():
    raise InputError(f"{flag} {data_dir}: no such folder (expected the {dataset} release)")
  try:
    next(iter(readers.read_samples(dataset, data_dir, split, **kwargs)), None)
  except ValueError as e:  # AnnotationError names the file; a bad split names the splits
    raise InputError(flagged(flag, data_dir, e)) from None


def check_hf_model(path, flag: str, part: str) -> None:
  """`path` (--mert / --llm) is a Hugging Face checkpoint of the `part` ("encoder": MERT/HuBERT, "llm":
  LLaMA) that the converter reads: a folder with config.json and weights (model.safetensors, shards with
  their index, pytorch_model.bin), a weights file beside a config.json, or (LLM) a llama.cpp .gguf. Reads
  the config and the weight headers only; InputError naming the path and what is missing otherwise."""
  import os

  what = "an HF MERT/HuBERT folder" if part == "encoder" else "an HF LLaMA folder or a .gguf file"
  path = os.fspath(path)
  if not os.path.exists(path):
    raise InputError(f"{flag} {path}: no such file or folder (expected {what})")
  if os.path.isdir(path) and not os.path.isfile(os.path.join(path, "config.json")) and not (
      part == "llm" and any(n.endswith(".gguf") for n in os.listdir(path))):
    names = sorted(os.listdir(path))
    found = ", ".join(names[:6]) + (", ..." if len(names) > 6 else "") if names else "an empty folder"
    raise InputError(f"{flag} {path}: not a Hugging Face model folder: no config.json (expected {what}; found: "
                     f"{found})")
  from musilingo_jax.convert.readers import open_source
  from musilingo_jax.convert.rules import ConversionError
  from musilingo_jax.models import llama, mert  # (jax: only once the paths are there)
  kind = mert.HF_KIND if part == "encoder" else llama.HF_KIND
  try:
    with open_source(path, kind=kind) as src:
      if src.config is None:
        raise ConversionError(f"{path}: no config.json beside the weights")
      kind.config_cls.from_hf_config(src.config)
  except ConversionError as e:
    raise InputError(flagged(flag, path, e)) from None
  except (KeyError, TypeError) as e:
    raise InputError(f"{flag} {path}: config.json does not describe {what} ({type(e).__name__}: {e})") from None


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
