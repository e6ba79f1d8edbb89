"""evaluate(): answers, labelled metrics, factual accuracy per kind, zeroed audio, the written report."""

import json

import numpy as np
import pytest

from musilingo_jax import evaluate, metrics
from test_generate import D_ENC, N_AUDIO, models


class CharTokenizer:
  """Printable ASCII <-> ids 10..100; 0 <unk>, 1 <s>, 2 </s>; 3..9 decode to nothing."""
  bos_id, eos_id, pad_id, unk_id = 1, 2, 2, 0

  def encode(self, text):
    return [ord(c) - 22 for c in text]

  def decode(self, ids, skip_special_tokens=True):
    special = {0: "<unk>", 1: "<s>", 2: "</s>"}
    out = [("" if skip_special_tokens else special[i]) if i in special else (chr(i + 22) if i >= 10 else "")
           for i in ids]
    return "".join(out)


def examples():
  rng = np.random.default_rng(0)
  feats = lambda: rng.normal(size=(N_AUDIO, D_ENC)).astype(np.float32)  # noqa: E731
  return [
      {"id": "a-key", "question": "What key?", "answer": "The key is C minor.", "kind": "key",
       "labels": json.dumps({"key": "C minor"}), "features": feats()},
      {"id": "a-bpm", "question": "How fast?", "answer": "About 120 BPM.", "kind": "bpm",
       "labels": {"bpm": 120}, "features": feats()},
      {"id": "b-cap", "question": "Describe it.", "answer": "A calm piano piece.", "kind": "caption",
       "features": feats()},
  ]


def test_evaluate_reports_labelled_metrics_and_predictions(tmp_path):
  ours, _ = models()
  exs = examples()
  kw = dict(batch_size=2, greedy=True, max_new_tokens=12, bertscore=False)
  res = evaluate.evaluate(ours, CharTokenizer(), exs, **kw)
  assert res["n"] == 3 and len(res["predictions"]) == 3
  assert [p["id"] for p in res["predictions"]] == ["a-key", "a-bpm", "b-cap"]
  assert res["predictions"][0]["reference"] == "The key is C minor."
  assert all(k.endswith("(reference)") for k in res["reference"]) and len(res["reference"]) == 3
  assert {m.column for m in res["reference"].values()} == {"B-U", "M-R", "R-L"}
  assert all(k.endswith("(corrected)") for k in res["corrected"]) and len(res["corrected"]) == 3
  # Captions have no known fact: accuracy covers the key and bpm questions only.
  assert set(res["factual"]) == {"factual_accuracy[key]", "factual_accuracy[bpm]", "factual_accuracy[all]"}
  assert res["factual"]["factual_accuracy[all]"].n == 2
  assert res["predictions"][1]["fact"] == "120" and "fact" not in res["predictions"][2]
  assert res["settings"]["n_audio_tokens"] == N_AUDIO and res["settings"]["greedy"] is True
  # The reference table scores the answers as the reference post-processes them, the corrected one the clean
  # answers (CharTokenizer has no SentencePiece model: its decode with special tokens kept stands in).
  ref_preds = [p["reference_prediction"] for p in res["predictions"]]
  preds = [p["prediction"] for p in res["predictions"]]
  refs = [p["reference"] for p in res["predictions"]]
  assert res["reference"]["bleu_char_4gram (reference)"].value == pytest.approx(
      np.mean([metrics.bleu_char_4gram(p, r) for p, r in zip(ref_preds, refs)]))
  assert res["corrected"]["bleu1_word (corrected)"].value == pytest.approx(
      np.mean([metrics.bleu1_word(p, r) for p, r in zip(preds, refs)]))

  zero = evaluate.evaluate(ours, CharTokenizer(), exs, zero_audio=True, **kw)
  assert [p["prediction"] for p in zero["predictions"]] != [p["prediction"] for p in res["predictions"]]

  paths = evaluate.write_report(res, tmp_path)
  data = json.loads(paths["json"].read_text())
  assert data["predictions"][0]["prediction"] == res["predictions"][0]["prediction"]
  assert data["reference"]["rougeL_recall (reference)"]["column"] == "R-L"
  table = paths["table"].read_text()
  assert "Reference metrics" in table and "factual_accuracy[key]" in table


def test_known_fact():
  assert evaluate.known_fact({"kind": "key", "labels": '{"key": "D major"}'}) == "D major"
  assert evaluate.known_fact({"kind": "caption", "labels": {"key": "D major"}}) is None
  assert evaluate.known_fact({"fact": "piano"}) == "piano"
  assert evaluate.known_fact({"question": "q"}) is None
