"""One tokenizer over SentencePiece (exact LLaMA ids) or Hugging Face `tokenizers` (tokenizer.json).

MusiLingo tokenizes each prompt segment on its own with `add_special_tokens=False`, so `encode` never adds
BOS/EOS; with SentencePiece every segment keeps its leading-space marker ("dummy prefix"), exactly like the
reference's `LlamaTokenizer` (legacy) does. BOS is inserted by the caller (`prompts`), as in the reference.

Special ids come from the files, never from constants: an old Vicuna-v0 `special_tokens_map.json` names
`</s>` as BOS, and the reference then starts every sequence with id 2. We follow the files.

Sources:
  Tokenizer.from_dir(d)     d/tokenizer.model (SentencePiece, preferred) or d/tokenizer.json, plus the
                            special tokens named in d/{special_tokens_map,tokenizer_config,generation_config,
                            config}.json
  Tokenizer.from_gguf(p)    the tokenizer a llama.cpp GGUF carries in `tokenizer.ggml.*`: "llama" (SentencePiece,
                            rebuilt as a tokenizer.model) or "gpt2" (byte-level BPE, built with `tokenizers`)
  tok.save(d)               files that `from_dir` reads back to the same tokenizer (and transformers can load)

Known limits: special-token strings inside the text ("</s>") are encoded as plain text by the SentencePiece
backend (HF would match them); MusiLingo prompts never contain them.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2 as sp_pb
from tokenizers import AddedToken, Tokenizer as HFTokenizer, decoders, models as hf_models, pre_tokenizers

from musilingo_jax.convert.readers import read_gguf_layout
from musilingo_jax.convert.rules import ConversionError


class TokenizerError(ValueError):
  """A tokenizer file is missing or does not say what we need: the message names the file and the field."""


_SPECIALS = ("bos", "eos", "pad", "unk")


# --- GGUF metadata ---

def read_gguf_metadata(path: str | os.PathLike) -> dict[str, Any]:
  """The key/value metadata of a GGUF file (v2/v3), without touching the tensor data (convert.readers' header
  reader: `gguf.GGUFReader` maps every array element to its own numpy view, about 5 s for a 49k-token
  vocabulary). Arrays of numbers come back as numpy arrays, arrays of strings as lists of str."""
  try:
    return read_gguf_layout(str(path))[0]
  except ConversionError as e:
    raise TokenizerError(str(e)) from None


def _need(meta: dict, key: str, path) -> Any:
  if key not in meta:
    raise TokenizerError(f"{path}: GGUF metadata field {key!r} is missing")
  return meta[key]


def sentencepiece_model_from_gguf(meta: dict, path: str = "<gguf>") -> bytes:
  """A serialized SentencePiece `tokenizer.model` rebuilt from a "llama"-type GGUF vocabulary.

  BPE with byte fallback, identity normalizer with the dummy prefix and escaped whitespace (as LLaMA's own
  tokenizer.model); piece type = GGUF token_type (same numbering as SentencePiece), scores as stored."""
  if meta.get("tokenizer.ggml.model") != "llama":
    raise TokenizerError(f"{path}: tokenizer.ggml.model is {meta.get('tokenizer.ggml.model')!r}; "
                         "a SentencePiece model can only be rebuilt from 'llama'")
  tokens = _need(meta, "tokenizer.ggml.tokens", path)
  scores = meta.get("tokenizer.ggml.scores", np.zeros(len(tokens), np.float32))
  types = meta.get("tokenizer.ggml.token_type", np.ones(len(tokens), np.int32))
  if not len(tokens) == len(scores) == len(types):
    raise TokenizerError(f"{path}: tokenizer.ggml.tokens/scores/token_type lengths differ "
                         f"({len(tokens)}/{len(scores)}/{len(types)})")
  m = sp_pb.ModelProto()
  for tok, score, ttype in zip(tokens, scores, types):
    p = m.pieces.add()
    p.piece, p.score = tok, float(score)
    if int(ttype) != 1:
      p.type = int(ttype)

  def special(key, default):
    v = meta.get(f"tokenizer.ggml.{key}")
    return int(v) if v is not None else default

  t = m.trainer_spec
  t.model_type = sp_pb.TrainerSpec.BPE
  t.vocab_size = len(tokens)
  t.byte_fallback = True
  t.split_digits = True
  t.split_by_unicode_script = t.split_by_number = t.split_by_whitespace = True
  t.allow_whitespace_only_pieces = True
  t.max_sentencepiece_length = 16
  t.unk_id = special("unknown_token_id", 0)
  t.bos_id = special("bos_token_id", 1)
  t.eos_id = special("eos_token_id", 2)
  t.pad_id = special("padding_token_id", -1)
  n = m.normalizer_spec
  n.name = "identity"
  n.add_dummy_prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", True))
  n.remove_extra_whitespaces = False
  n.escape_whitespaces = True
  return m.SerializeToString()


def _bytes_to_unicode() -> dict[int, str]:
  """GPT-2's byte -> printable character table (the byte-level BPE alphabet)."""
  bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
  cs = bs[:]
  n = 0
  for b in range(256):
    if b not in bs:
      bs.append(b)
      cs.append(256 + n)
      n += 1
  return dict(zip(bs, map(chr, cs)))


_BYTE_LEVEL_PRE = (None, "default", "gpt2", "smollm")


def _byte_level_bpe_from_gguf(meta: dict, path: str):
  """A `tokenizers` byte-level BPE from a "gpt2"-type GGUF vocabulary, built as transformers builds it
  (ByteLevel pre-tokenizer without prefix space, ByteLevel decoder; control tokens special, user-defined
  tokens added as plain tokens). 'smollm' files ask llama.cpp to split digits one by one first: the
  vocabulary has no token holding a digit next to anything else, so plain ByteLevel gives the same ids."""
  pre = meta.get("tokenizer.ggml.pre")
  if pre not in _BYTE_LEVEL_PRE:
    raise TokenizerError(f"{path}: tokenizer.ggml.pre={pre!r} is not supported (supported: "
                         f"{[p for p in _BYTE_LEVEL_PRE if p]}); save the model's tokenizer.json beside it instead")
  tokens = _need(meta, "tokenizer.ggml.tokens", path)
  merges = _need(meta, "tokenizer.ggml.merges", path)
  types = meta.get("tokenizer.ggml.token_type", np.ones(len(tokens), np.int32))
  alphabet = _bytes_to_unicode()
  spelled = set(alphabet.values())
  vocab = {}
  for i, tok in enumerate(tokens):
    vocab[tok if set(tok) <= spelled else "".join(alphabet[b] for b in tok.encode("utf-8"))] = i
  tk = HFTokenizer(hf_models.BPE(vocab=vocab, merges=[tuple(m.split(" ")) for m in merges], fuse_unk=False))
  tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
  tk.decoder = decoders.ByteLevel()
  control = [AddedToken(t, special=True, normalized=False) for t, ty in zip(tokens, types)
             if int(ty) == 3 and set(t) <= spelled]
  user = [AddedToken(t, special=False, normalized=False) for t, ty in zip(tokens, types) if int(ty) == 4]
  if control:
    tk.add_special_tokens(control)
  if user:
    tk.add_tokens(user)
  return tk


# --- tokenizer files in a directory ---

def _read_json(path: Path) -> dict | None:
  if not path.is_file():
    return None
  try:
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    raise TokenizerError(f"{path}: unreadable JSON ({e})") from None


def _token_string(v) -> str | None:
  """A special token as tokenizer files spell it: "</s>", or {"content": "</s>", ...} (AddedToken)."""
  if isinstance(v, dict):
    v = v.get("content")
  return v if isinstance(v, str) and v else None


def _first_id(v) -> int | None:
  if isinstance(v, list):
    v = v[0] if v else None
  return int(v) if isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v >= 0 else None


class Tokenizer:
  """`encode(text)` (no special tokens), `decode(ids)`, and the special ids the files name."""

  def __init__(self, *, sp=None, hf=None, bos_id: int | None, eos_id: int, pad_id: int | None = None,
               unk_id: int | None = None, added: dict[str, int] | None = None, source: str = "<memory>"):
    if (sp is None) == (hf is None):
      raise ValueError("give exactly one of sp (SentencePieceProcessor) or hf (tokenizers.Tokenizer)")
    self._sp, self._hf = sp, hf
    self.source = source
    self._added = dict(added or {})                  # SentencePiece only: tokens past the .model (id -> str)
    self._added_by_id = {i: s for s, i in self._added.items()}
    self.bos_id = bos_id
    self.eos_id = eos_id
    self.explicit_pad = pad_id is not None             # False: no pad in the files, pad = eos (the reference)
    self.pad_id = pad_id if pad_id is not None else eos_id
    self.unk_id = unk_id
    if hf is not None:
      hf.no_padding()
      hf.no_truncation()

  # --- constructors ---

  @classmethod
  def from_dir(cls, path: str | os.PathLike) -> "Tokenizer":
    d = Path(path)
    if not d.is_dir():
      raise TokenizerError(f"{d}: not a directory (expected one holding tokenizer.model or tokenizer.json)")
    sp = hf = None
    added: dict[str, int] = {}
    cfg = _read_json(d / "tokenizer_config.json") or {}
    if (d / "tokenizer.model").is_file():
      sp = spm.SentencePieceProcessor()
      try:
        sp.LoadFromSerializedProto((d / "tokenizer.model").read_bytes())
      except Exception as e:  # noqa: BLE001 - sentencepiece raises RuntimeError/OSError on a bad proto
        raise TokenizerError(f"{d / 'tokenizer.model'}: not a SentencePiece model ({e})") from None
      added = {str(k): int(v) for k, v in (_read_json(d / "added_tokens.json") or {}).items()}
      for k, v in (cfg.get("added_tokens_decoder") or {}).items():
        s = _token_string(v)
        if s is not None and int(k) >= sp.get_piece_size():
          added[s] = int(k)
      source = str(d / "tokenizer.model")
    elif (d / "tokenizer.json").is_file():
      try:
        hf = HFTokenizer.from_file(str(d / "tokenizer.json"))
      except Exception as e:  # noqa: BLE001 - tokenizers raises a generic Exception on a bad file
        raise TokenizerError(f"{d / 'tokenizer.json'}: not a tokenizers file ({e})") from None
      source = str(d / "tokenizer.json")
    else:
      raise TokenizerError(f"{d}: no tokenizer.model (SentencePiece) or tokenizer.json (tokenizers) found")

    def lookup(s: str) -> int | None:
      if s in added:
        return added[s]
      if sp is not None:
        i = sp.piece_to_id(s)
        return i if sp.id_to_piece(i) == s else None
      return hf.token_to_id(s)

    # Token strings: tokenizer_config.json, overridden by special_tokens_map.json (as transformers does).
    names: dict[str, tuple[str, Path]] = {}
    for fname in ("tokenizer_config.json", "special_tokens_map.json"):
      data = cfg if fname == "tokenizer_config.json" else (_read_json(d / fname) or {})
      for name in _SPECIALS:
        s = _token_string(data.get(f"{name}_token"))
        if s is not None:
          names[name] = (s, d / fname)
    ids: dict[str, int | None] = {}
    for name in _SPECIALS:
      if name in names:
        s, where = names[name]
        i = lookup(s)
        if i is None:
          raise TokenizerError(f"{where}: {name}_token {s!r} is not in the vocabulary of {source}")
        ids[name] = i
    # Ids from the model's configs, for what the tokenizer files leave out (not pad: pad falls back to eos).
    for fname in ("generation_config.json", "config.json"):
      data = _read_json(d / fname) or {}
      for name in ("bos", "eos", "unk"):
        if ids.get(name) is None:
          ids[name] = _first_id(data.get(f"{name}_token_id"))
    if sp is not None:  # last resort: the ids the SentencePiece model itself declares
      for name, v in (("bos", sp.bos_id()), ("eos", sp.eos_id()), ("unk", sp.unk_id())):
        if ids.get(name) is None and v >= 0:
          ids[name] = v
    if ids.get("eos") is None:
      raise TokenizerError(f"{d}: no EOS token: expected eos_token in tokenizer_config.json or "
                           "special_tokens_map.json, or eos_token_id in generation_config.json or config.json")
    return cls(sp=sp, hf=hf, bos_id=ids.get("bos"), eos_id=ids["eos"], pad_id=ids.get("pad"),
               unk_id=ids.get("unk"), added=added, source=source)

  @classmethod
  def from_gguf(cls, path: str | os.PathLike) -> "Tokenizer":
    path = str(path)
    meta = read_gguf_metadata(path)
    kind = meta.get("tokenizer.ggml.model")
    if kind == "llama":
      sp = spm.SentencePieceProcessor()
      sp.LoadFromSerializedProto(sentencepiece_model_from_gguf(meta, path))
      backend = {"sp": sp}
    elif kind == "gpt2":
      backend = {"hf": _byte_level_bpe_from_gguf(meta, path)}
    else:
      raise TokenizerError(f"{path}: tokenizer.ggml.model={kind!r} unsupported (expected 'llama' or 'gpt2')")
    get = lambda key: _first_id(meta.get(f"tokenizer.ggml.{key}"))  # noqa: E731
    eos = get("eos_token_id")
    if eos is None:
      raise TokenizerError(f"{path}: GGUF metadata field 'tokenizer.ggml.eos_token_id' is missing")
    return cls(**backend, bos_id=get("bos_token_id"), eos_id=eos, pad_id=get("padding_token_id"),
               unk_id=get("unknown_token_id"), source=path)

  # --- the interface ---

  @property
  def vocab_size(self) -> int:
    if self._sp is not None:
      return max([self._sp.get_piece_size()] + [i + 1 for i in self._added_by_id])
    return self._hf.get_vocab_size(with_added_tokens=True)

  def id_to_piece(self, i: int) -> str:
    i = int(i)
    if i in self._added_by_id:
      return self._added_by_id[i]
    if self._sp is not None:
      if not 0 <= i < self._sp.get_piece_size():
        raise IndexError(f"token id {i} out of range [0, {self.vocab_size})")
      return self._sp.id_to_piece(i)
    s = self._hf.id_to_token(i)
    if s is None:
      raise IndexError(f"token id {i} out of range [0, {self.vocab_size})")
    return s

  def piece_to_id(self, piece: str) -> int | None:
    if piece in self._added:
      return self._added[piece]
    if self._sp is not None:
      i = self._sp.piece_to_id(piece)
      return i if self._sp.id_to_piece(i) == piece else None
    return self._hf.token_to_id(piece)

  @functools.cached_property
  def special_ids(self) -> frozenset[int]:
    """bos/eos/pad/unk plus every control (SentencePiece) or special added (tokenizers) token."""
    out = {i for i in (self.bos_id, self.eos_id, self.pad_id, self.unk_id) if i is not None}
    out |= set(self._added_by_id)
    if self._sp is not None:
      out |= {i for i in range(self._sp.get_piece_size()) if self._sp.is_control(i)}
    else:
      out |= {i for i, t in self._hf.get_added_tokens_decoder().items() if t.special}
    return frozenset(out)

  def encode(self, text: str) -> list[int]:
    """Token ids of `text`, no BOS/EOS; SentencePiece adds its dummy-prefix space (HF legacy behaviour)."""
    if self._sp is not None:
      return list(self._sp.encode(text, out_type=int))
    return list(self._hf.encode(text, add_special_tokens=False).ids)

  def decode(self, ids, skip_special_tokens: bool = True) -> str:
    """Text of `ids`. skip_special_tokens drops `special_ids` (transformers' rule); otherwise special tokens
    are written out verbatim ("<s>", "</s>"), with no space added around them."""
    ids = [int(i) for i in ids]
    special = self.special_ids
    if self._hf is not None:
      if skip_special_tokens:  # also bos/eos/pad/unk the tokenizer.json does not mark special (as transformers)
        ids = [i for i in ids if i not in special]
      return self._hf.decode(ids, skip_special_tokens=skip_special_tokens)
    if skip_special_tokens:
      return self._sp.decode([i for i in ids if i not in special])
    # Special pieces verbatim ("</s>"), the text between them decoded by SentencePiece.
    out, run = [], []
    for i in ids:
      if i in special:
        if run:
          out.append(self._sp.decode(run))
          run = []
        out.append(self.id_to_piece(i))
      else:
        run.append(i)
    if run:
      out.append(self._sp.decode(run))
    return "".join(out)

  # --- saving ---

  def save(self, path: str | os.PathLike) -> Path:
    """Write tokenizer.model or tokenizer.json plus tokenizer_config.json / special_tokens_map.json, which
    `from_dir` reads back to the same ids (and transformers' AutoTokenizer can load)."""
    d = Path(path)
    d.mkdir(parents=True, exist_ok=True)
    tokens = {}
    for name in _SPECIALS:
      i = getattr(self, f"{name}_id")
      if i is not None and (name != "pad" or self.explicit_pad):
        tokens[f"{name}_token"] = self.id_to_piece(i)
    if self._sp is not None:
      (d / "tokenizer.model").write_bytes(self._sp.serialized_model_proto())
      if self._added:
        (d / "added_tokens.json").write_text(json.dumps(self._added, indent=2), encoding="utf-8")
      cfg = dict(tokens, add_bos_token=False, add_eos_token=False)
    else:
      self._hf.save(str(d / "tokenizer.json"))
      cfg = dict(tokens, tokenizer_class="PreTrainedTokenizerFast", add_bos_token=False, add_eos_token=False)
    (d / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2, ensure_ascii=False), encoding="utf-8")
    (d / "special_tokens_map.json").write_text(json.dumps(tokens, indent=2, ensure_ascii=False), encoding="utf-8")
    return d

  def __repr__(self) -> str:
    kind = "sentencepiece" if self._sp is not None else "tokenizers"
    return (f"Tokenizer({kind}, vocab={self.vocab_size}, bos={self.bos_id}, eos={self.eos_id}, "
            f"pad={self.pad_id}{'' if self.explicit_pad else ' (=eos)'}, unk={self.unk_id}, source={self.source!r})")


# --- carrying a tokenizer along (scripts/convert_hf.py: OUT/tokenizer) ---

TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json")


def copy_tokenizer(llm_path: str | os.PathLike, out_dir: str | os.PathLike) -> Path | None:
  """Carries the LLM's tokenizer into out_dir: the HF tokenizer files of a directory, or a GGUF's own
  tokenizer (Tokenizer.from_gguf(...).save(...)). Returns out_dir, or None when there is none."""
  p, out = Path(llm_path), Path(out_dir)
  directory = p if p.is_dir() else p.parent
  found = [directory / f for f in TOKENIZER_FILES if (directory / f).exists()]
  gguf_file = p if p.suffix == ".gguf" else None
  if gguf_file is None and p.is_dir() and not found and len(list(p.glob("*.gguf"))) == 1:
    gguf_file = next(p.glob("*.gguf"))
  if gguf_file is not None and "tokenizer.ggml.model" in read_gguf_layout(str(gguf_file))[0]:
    out.mkdir(parents=True, exist_ok=True)
    Tokenizer.from_gguf(gguf_file).save(out)
    return out
  if not found:
    return None
  out.mkdir(parents=True, exist_ok=True)
  for f in found:
    shutil.copy2(f, out / f.name)
  return out
