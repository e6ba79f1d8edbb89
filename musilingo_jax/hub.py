"""Hugging Face Hub ids where a path is taken: `resolve("owner/name")` -> the local snapshot folder.

A model argument (`--mert`, `--llm`, `--projection`, `--bertscore-model`) may name a Hub repository instead
of a local path:

  owner/name                  the repository's default branch (main)
  owner/name@revision         a branch, a tag or a commit hash
  owner/name[@revision]/sub   a file or folder inside the repository (e.g. m-a-p/MusiLingo-musicqa-v1/x.pth)
  hf://owner/name...          the same, explicitly (never taken for a local path)

An argument is an id only when it is not an existing local path and not a URL (gs://...), and its first two
parts are a valid repository id. It is resolved with `huggingface_hub.snapshot_download` into the client's
own cache, the cache every Hugging Face library shares: HF_HUB_CACHE (or HF_HOME/hub, default
~/.cache/huggingface/hub) chooses it, and with HF_HUB_OFFLINE=1 only that cache is read (nothing is
downloaded). Both variables are read when `resolve` runs, not when huggingface_hub was imported. The
programs resolve their ids while checking their arguments, before any model loads; an id that cannot be
resolved is one `HubError` line naming the flag, the id, the cache and the reason.
"""

from __future__ import annotations

import os
import re

_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(?:@(?P<rev>[\w.-]+))?(?:/(?P<sub>.+))?$")
_TRUE = ("1", "ON", "YES", "TRUE")
SCHEME = "hf://"


class HubError(ValueError):
  """One line: the flag and id, what was looked for (the cache folder, offline or not) and why it failed."""


def offline() -> bool:
  """HF_HUB_OFFLINE as set now (huggingface_hub reads it once, at import)."""
  value = os.environ.get("HF_HUB_OFFLINE")
  if value is None:
    from huggingface_hub import constants
    return bool(constants.HF_HUB_OFFLINE)
  return value.strip().upper() in _TRUE


def cache_dir() -> str:
  """The Hub cache folder as set now: HF_HUB_CACHE, HUGGINGFACE_HUB_CACHE, HF_HOME/hub, else the client's
  default (~/.cache/huggingface/hub)."""
  env = os.environ
  if env.get("HF_HUB_CACHE") or env.get("HUGGINGFACE_HUB_CACHE"):
    return os.path.expanduser(env.get("HF_HUB_CACHE") or env["HUGGINGFACE_HUB_CACHE"])
  if env.get("HF_HOME"):
    return os.path.join(os.path.expanduser(env["HF_HOME"]), "hub")
  from huggingface_hub import constants
  return constants.HF_HUB_CACHE


def parse_id(value: str) -> tuple[str, str | None, str | None] | None:
  """`[hf://]owner/name[@revision][/sub/path]` -> (repo id, revision or None, sub path or None); None when
  `value` does not read as a Hub id (a local-looking path: absolute, ./, ../, ~, a URL with another
  scheme, or a repository id the Hub would refuse)."""
  s = os.fspath(value)
  explicit = s.startswith(SCHEME)
  if explicit:
    s = s[len(SCHEME):]
  elif "://" in s or s.startswith(("/", ".", "~")):
    return None
  m = _ID.match(s)
  if not m:
    return None
  repo = m.group("repo")
  from huggingface_hub.utils import HFValidationError, validate_repo_id
  try:
    validate_repo_id(repo)
  except HFValidationError:
    return None
  if not explicit and repo.split("/")[1].endswith((".pth", ".npz", ".npy", ".safetensors", ".gguf", ".json")):
    return None  # dir/file.ext: a local file that is missing, not a repository
  return repo, m.group("rev"), m.group("sub")


def is_hub_id(value) -> bool:
  """True when `value` would be resolved through the Hub (see the module docstring)."""
  if value is None:
    return False
  s = os.fspath(value)
  if not s.startswith(SCHEME) and ("://" in s or os.path.exists(s)):
    return False
  return parse_id(s) is not None


def resolve(path_or_id, *, what: str, allow_patterns: list[str] | None = None) -> str | None:
  """A local path for a path or Hub id: an existing local path, a URL (gs://) or None comes back as given;
  `owner/name[@rev][/sub]` is the snapshot folder in the Hub cache (or `sub` inside it), downloaded only
  when online. `allow_patterns`: the files a download fetches (default everything; a `sub` fetches just
  it). `what` names the argument in the one-line HubError (e.g. "--llm")."""
  if path_or_id is None:
    return None
  s = os.fspath(path_or_id)
  if not is_hub_id(s):
    return s
  repo, rev, sub = parse_id(s)
  if sub:
    allow_patterns = [sub, sub.rstrip("/") + "/*"]
  from huggingface_hub import snapshot_download
  from huggingface_hub import errors as hf_errors
  cache, off = cache_dir(), offline()
  mode = "HF_HUB_OFFLINE=1" if off else "online"
  try:
    folder = snapshot_download(repo, revision=rev, cache_dir=cache, allow_patterns=allow_patterns,
                               local_files_only=off)
  except hf_errors.LocalEntryNotFoundError:
    if off:
      raise HubError(f"{what} {s}: no such local path, and not in the Hugging Face cache ({cache}) with "
                     f"HF_HUB_OFFLINE=1 (download it once online: `hf download {repo}"
                     f"{' --revision ' + rev if rev else ''}`; or set HF_HUB_CACHE to the cache that holds it)"
                     ) from None
    raise HubError(f"{what} {s}: no such local path, and the Hub cannot be reached and the Hugging Face cache "
                   f"({cache}) does not hold it") from None
  except hf_errors.RepositoryNotFoundError:
    raise HubError(f"{what} {s}: no such local path, and no such Hugging Face repository {repo!r} "
                   f"(or it is private: log in with `hf auth login`)") from None
  except hf_errors.RevisionNotFoundError:
    raise HubError(f"{what} {s}: repository {repo!r} has no revision {rev!r}") from None
  except hf_errors.GatedRepoError:
    raise HubError(f"{what} {s}: {repo!r} is gated: accept its terms on huggingface.co and log in "
                   f"(`hf auth login`)") from None
  except Exception as e:  # noqa: BLE001 - any other client failure is one line too
    first = (str(e).strip().splitlines() or [""])[0]
    raise HubError(f"{what} {s}: cannot fetch from the Hugging Face Hub ({mode}, cache {cache}): "
                   f"{type(e).__name__}: {first}") from None
  if not sub:
    return folder
  out = os.path.join(folder, sub)
  if not os.path.exists(out):
    raise HubError(f"{what} {s}: the {repo} snapshot in {folder} has no {sub!r}")
  return out


# What a model argument fetches: configs and tokenizer files first, then the weights in safetensors, or in
# torch .bin only when the repository has no safetensors (many carry both; one copy is enough).
MODEL_FILES = ["*.json", "*.txt", "*.model", "*.tiktoken", "*.safetensors"]
TORCH_FILES = ["*.bin"]


def resolve_model(path_or_id, *, what: str) -> str | None:
  """`resolve` for a Hugging Face model (an HF directory: config.json, tokenizer, weights): fetches
  MODEL_FILES, and the .bin weights only when no .safetensors came; a `/sub` path (e.g. one .gguf of a
  GGUF repository) fetches just that. Offline, the cached snapshot as it is."""
  if not is_hub_id(path_or_id) or parse_id(os.fspath(path_or_id))[2]:
    return resolve(path_or_id, what=what)
  folder = resolve(path_or_id, what=what, allow_patterns=MODEL_FILES)
  if not offline() and not any(n.endswith(".safetensors") for n in os.listdir(folder)):
    folder = resolve(path_or_id, what=what, allow_patterns=MODEL_FILES + TORCH_FILES)
  return folder


def resolve_projection(path_or_id, *, what: str = "--projection") -> str | None:
  """`resolve` for a MusiLingo release: the repository's .json files first; when its
  model.safetensors.index.json names the shard holding `<prefix>llama_proj.*`, only that shard is fetched
  (a release that saves the whole model need not be downloaded whole), else its .safetensors / .pth / .npz
  files. Offline, the cached snapshot as it is (convert.pth.read_projection says what it lacks)."""
  if not is_hub_id(path_or_id) or parse_id(os.fspath(path_or_id))[2]:
    return resolve(path_or_id, what=what)
  folder = resolve(path_or_id, what=what, allow_patterns=["*.json"])
  if offline():
    return folder
  index = os.path.join(folder, "model.safetensors.index.json")
  patterns = ["*.safetensors", "*.pth", "*.npz"]
  if os.path.isfile(index):
    import json

    from musilingo_jax.convert.pth import projection_keys
    from musilingo_jax.convert.rules import ConversionError
    try:
      weight_map = json.loads(open(index, encoding="utf-8").read())["weight_map"]
      patterns = sorted({weight_map[k] for k in projection_keys(weight_map, index)})
    except (ValueError, KeyError, TypeError, ConversionError):
      pass  # read_projection names what is wrong with the index
  return resolve(path_or_id, what=what, allow_patterns=patterns)
