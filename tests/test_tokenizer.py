"""Tokenizer: the real LLaMA ids (llama.cpp's reference tokenizations), SmolLM2 from its GGUF against
transformers, save/from_dir round trips, and special ids taken from the files."""

import json
import shutil

import numpy as np
import pytest

from musilingo_jax import assets
from musilingo_jax.tokenizer import Tokenizer, TokenizerError, read_gguf_metadata


def _asset(fn):
  try:
    return fn()
  except assets.AssetUnavailable as e:
    pytest.skip(str(e))


@pytest.fixture(scope="module")
def llama_dir():
  return _asset(assets.llama_tokenizer_dir)


@pytest.fixture(scope="module")
def llama(llama_dir):
  return Tokenizer.from_dir(llama_dir)


@pytest.fixture(scope="module")
def smol_gguf():
  return _asset(assets.smollm2_gguf_path)


SENTENCES = [
    "Describe the sound of a piano in one sentence.",
    "###Human: <Audio></Audio> What is the tempo? ###Assistant: About 120 BPM, in 3/4 time.",
    "  two leading spaces, tabs\tand\nnewlines, naïve café, C♯ minor, 😀 and <|im_end|> inline",
    "",
]


def test_llama_matches_all_reference_tokenizations(llama):
  refs = assets.llama_reference_tokenizations()
  assert len(refs) == 46
  bad = [(text, ids, llama.encode(text)) for text, ids in refs if llama.encode(text) != ids]
  assert not bad


def test_llama_musilingo_ids(llama):
  assert llama.encode("###") == [835]
  assert llama.encode("###Human: <Audio>") == [835, 29950, 7889, 29901, 529, 17111, 29958]
  assert llama.encode("text###")[-2:] == [2277, 29937]  # the end marker glued to the answer (docs/reference.md)
  assert (llama.bos_id, llama.eos_id, llama.pad_id, llama.unk_id) == (1, 2, 2, 0)
  assert not llama.explicit_pad and llama.vocab_size == 32000
  assert llama.id_to_piece(835) == "▁###" and llama.piece_to_id("▁###") == 835
  ids = llama.encode("The answer is C minor.")
  assert llama.decode([1] + ids + [2]) == "The answer is C minor."
  assert llama.decode([1] + ids + [2], skip_special_tokens=False) == "<s>The answer is C minor.</s>"


def test_llama_save_round_trip(llama, llama_dir, tmp_path):
  llama.save(tmp_path)
  again = Tokenizer.from_dir(tmp_path)
  assert (tmp_path / "tokenizer.model").read_bytes() == (llama_dir / "tokenizer.model").read_bytes()
  assert (again.bos_id, again.eos_id, again.pad_id, again.unk_id) == (1, 2, 2, 0)
  assert not again.explicit_pad
  for s in SENTENCES:
    assert again.encode(s) == llama.encode(s)


def test_smollm2_gguf_matches_transformers(smol_gguf, tmp_path):
  transformers = pytest.importorskip("transformers")
  ours = Tokenizer.from_gguf(smol_gguf)
  ref = transformers.AutoTokenizer.from_pretrained(str(smol_gguf.parent), gguf_file=smol_gguf.name)
  assert (ours.bos_id, ours.eos_id, ours.pad_id, ours.unk_id) == (
      ref.bos_token_id, ref.eos_token_id, ref.pad_token_id, ref.unk_token_id) == (1, 2, 2, 0)
  assert ours.vocab_size == len(ref) == 49152
  for s in SENTENCES:
    ids = ours.encode(s)
    assert ids == ref.encode(s, add_special_tokens=False), s
    assert ours.decode(ids) == ref.decode(ids, skip_special_tokens=True) == s.replace("<|im_end|>", "")
    assert ours.decode(ids, skip_special_tokens=False) == ref.decode(ids, skip_special_tokens=False) == s

  ours.save(tmp_path)
  again = Tokenizer.from_dir(tmp_path)
  assert (again.bos_id, again.eos_id, again.pad_id, again.unk_id) == (1, 2, 2, 0) and again.explicit_pad
  for s in SENTENCES:
    assert again.encode(s) == ours.encode(s)
  assert transformers.AutoTokenizer.from_pretrained(str(tmp_path)).encode(SENTENCES[1], add_special_tokens=False) \
      == ours.encode(SENTENCES[1])


def test_gguf_metadata_reader_reads_what_gguf_writes(tmp_path):
  gguf = pytest.importorskip("gguf")
  path = tmp_path / "meta.gguf"
  w = gguf.GGUFWriter(str(path), "llama")
  w.add_string("general.name", "tiny ü")
  w.add_uint32("u32", 7)
  w.add_int64("i64", -3)
  w.add_float32("f32", 1e-5)
  w.add_bool("flag", True)
  w.add_array("tokens", ["<unk>", "▁###", "😀"])
  w.add_array("scores", [0.0, -1.5, 2.25])
  w.add_array("types", [2, 1, 6])
  w.add_tensor("x", np.zeros((2, 3), np.float32))
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  m = read_gguf_metadata(path)
  assert m["general.architecture"] == "llama" and m["general.name"] == "tiny ü"
  assert (m["u32"], m["i64"], m["flag"], m["tokens"]) == (7, -3, True, ["<unk>", "▁###", "😀"])
  assert m["f32"] == np.float32(1e-5)
  np.testing.assert_array_equal(m["scores"], np.float32([0.0, -1.5, 2.25]))
  np.testing.assert_array_equal(m["types"], [2, 1, 6])
  (tmp_path / "bad.gguf").write_bytes(b"NOPE" + bytes(20))
  with pytest.raises(TokenizerError, match="not a GGUF file"):
    read_gguf_metadata(tmp_path / "bad.gguf")


def _llama_copy(llama_dir, d, **files):
  d.mkdir()
  shutil.copy(llama_dir / "tokenizer.model", d / "tokenizer.model")
  for name, content in files.items():
    (d / f"{name}.json").write_text(json.dumps(content))
  return d


def test_special_ids_follow_the_files(llama_dir, tmp_path):
  # Vicuna-v0 style: empty strings in tokenizer_config.json, "</s>" for everything in special_tokens_map.json.
  v0 = _llama_copy(llama_dir, tmp_path / "v0",
                   tokenizer_config={"bos_token": "", "eos_token": "", "unk_token": ""},
                   special_tokens_map={"bos_token": "</s>", "eos_token": "</s>", "unk_token": "</s>"},
                   config={"bos_token_id": 0, "eos_token_id": 1, "pad_token_id": -1})
  t = Tokenizer.from_dir(v0)
  assert (t.bos_id, t.eos_id, t.pad_id, t.unk_id) == (2, 2, 2, 2)

  # AddedToken dicts, an explicit pad, and ids from config.json for what the tokenizer files leave out.
  d = _llama_copy(llama_dir, tmp_path / "dicts",
                  tokenizer_config={"eos_token": {"__type": "AddedToken", "content": "</s>"},
                                    "pad_token": {"content": "<unk>"}},
                  config={"bos_token_id": 1, "eos_token_id": 1})
  t = Tokenizer.from_dir(d)
  assert (t.bos_id, t.eos_id, t.pad_id) == (1, 2, 0) and t.explicit_pad

  bad = _llama_copy(llama_dir, tmp_path / "bad", special_tokens_map={"bos_token": "<|begin|>"})
  with pytest.raises(TokenizerError, match=r"special_tokens_map\.json: bos_token '<\|begin\|>' is not in"):
    Tokenizer.from_dir(bad)
  (tmp_path / "empty").mkdir()
  with pytest.raises(TokenizerError, match="no tokenizer.model .* or tokenizer.json"):
    Tokenizer.from_dir(tmp_path / "empty")


def test_tokenizer_json_dir_takes_ids_from_configs(tmp_path):
  from tokenizers import Tokenizer as HFTokenizer, models, pre_tokenizers
  hf = HFTokenizer(models.WordLevel({"<unk>": 0, "<bos>": 1, "<eos>": 2, "piano": 3, "music": 4}, unk_token="<unk>"))
  hf.pre_tokenizer = pre_tokenizers.Whitespace()
  hf.save(str(tmp_path / "tokenizer.json"))
  with pytest.raises(TokenizerError, match="no EOS token"):
    Tokenizer.from_dir(tmp_path)
  (tmp_path / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": [2, 4]}))
  t = Tokenizer.from_dir(tmp_path)
  assert (t.bos_id, t.eos_id, t.pad_id, t.unk_id) == (1, 2, 2, None)
  assert t.encode("piano music") == [3, 4] and t.decode([3, 4]) == "piano music"
