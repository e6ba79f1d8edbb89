"""Prompt segments, the reference batch layout and generation prompts (docs/reference.md, Sequence and loss)."""

import numpy as np
import pytest

from musilingo_jax import prompts


class CharTokenizer:
  """One id per character (+10), enough to check layouts by hand."""
  bos_id, eos_id, pad_id = 1, 2, 2

  def encode(self, text):
    return [ord(c) + 10 for c in text]


TOK = CharTokenizer()


def test_segments_match_reference_template():
  before, after = prompts.prompt_segments("What key?", prompts.PromptConfig())
  assert before == "###Human: <Audio>"
  assert after == "</Audio> What key? ###Assistant: "
  assert prompts.prompt_segments(None, prompts.PromptConfig(template=False)) == ("", "")
  with pytest.raises(ValueError, match="question"):
    prompts.prompt_segments(None, prompts.PromptConfig())


def test_answer_gets_end_symbol_and_truncation():
  ex = prompts.encode_example(TOK, "q", "abcdef", prompts.PromptConfig(end_sym="###", max_txt_len=8))
  assert ex["answer"].tolist() == TOK.encode("abcdef##")
  stage1 = prompts.encode_example(TOK, None, "cap", prompts.PromptConfig(template=False, end_sym="\n"))
  assert stage1["before"].size == 0 and stage1["after"].size == 0
  assert stage1["answer"].tolist() == TOK.encode("cap\n")


def _two_examples():
  cfg = prompts.PromptConfig()
  return [prompts.encode_example(TOK, "ab", "xyz", cfg), prompts.encode_example(TOK, "abcd", "w", cfg)]


def test_reference_layout_pads_in_the_middle():
  exs = _two_examples()
  n_audio, L = 3, 64
  b = prompts.collate(exs, n_audio_tokens=n_audio, max_len=L, bos_id=1, pad_id=2, layout="reference")
  lb, la0, la1 = len(exs[0]["before"]), len(exs[0]["after"]), len(exs[1]["after"])
  assert la1 == la0 + 2
  # Both rows: BOS, before, audio at the same start; row 0's p_after padded to row 1's length.
  assert (b["audio_start"] == 1 + lb).all()
  ans0 = 1 + lb + n_audio + la1
  assert b["input_ids"][0, 0] == 1
  assert b["attention_mask"][0, 1 + lb + n_audio + la0: ans0].tolist() == [0, 0]
  assert b["input_ids"][0, ans0: ans0 + 4].tolist() == TOK.encode("xyz###")[:4]
  labels0 = b["labels"][0]
  assert (labels0[:ans0] == -100).all()
  assert labels0[ans0: ans0 + 6].tolist() == TOK.encode("xyz###")
  assert (labels0[ans0 + 6:] == -100).all()
  assert (b["positions"] == np.arange(L)).all()
  assert b["valid"].tolist() == [1, 1]


def test_packed_layout_has_no_middle_pads():
  exs = _two_examples()
  b = prompts.collate(exs, n_audio_tokens=3, max_len=64, bos_id=1, pad_id=2, layout="packed")
  for row in range(2):
    n_real = b["attention_mask"][row].sum()
    assert b["attention_mask"][row, :n_real].all() and not b["attention_mask"][row, n_real:].any()
    assert (b["labels"][row] != -100).sum() == len(exs[row]["answer"])


def test_fill_rows_and_extra_keys():
  exs = _two_examples()
  for i, e in enumerate(exs):
    e["features"] = np.full((3, 4), i, np.float32)
    e["id"] = f"ex{i}"
  b = prompts.collate(exs, n_audio_tokens=3, max_len=64, bos_id=1, pad_id=2, batch_size=4)
  assert b["valid"].tolist() == [1, 1, 0, 0]
  assert (b["labels"][2:] == -100).all()
  assert b["features"].shape == (4, 3, 4) and "id" not in b
  with pytest.raises(ValueError, match="max_len"):
    prompts.collate(exs, n_audio_tokens=3, max_len=20, bos_id=1, pad_id=2)


def test_generation_prompts_left_padded():
  cfg = prompts.PromptConfig()
  ps = [prompts.encode_prompt(TOK, q, cfg) for q in ("a", "abc")]
  g = prompts.collate_prompts(ps, n_audio_tokens=2, bos_id=1, pad_id=2)
  assert g["input_ids"].shape[1] == 1 + len(ps[1]["before"]) + 2 + len(ps[1]["after"])
  assert g["attention_mask"][0, :2].tolist() == [0, 0] and g["attention_mask"][1].all()
  assert g["positions"][0, 2] == 0 and g["positions"][1, 0] == 0
  assert g["positions"][0, -1] == g["positions"][1, -1] - 2
  assert g["input_ids"][0, 2] == 1 and g["audio_start"][0] == 2 + 1 + len(ps[0]["before"])
