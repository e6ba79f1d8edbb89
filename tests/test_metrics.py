"""Metrics: hand-computed values on tiny pairs, agreement with nltk / rouge_score / bert_score called directly,
METEOR with and without WordNet, factual accuracy rules, the table."""

import json
import math
import warnings

import numpy as np
import pytest

from musilingo_jax import assets, metrics

PREDS = [
    "The music is a slow piano piece in C minor.",
    "An upbeat rock song with electric guitars and drums.",
    "Jazz.",
    "It is played by a string quartet, around 90 beats per minute.",
]
REFS = [
    "A gentle solo piano piece in a minor key.",
    "Energetic rock with distorted guitars, bass and drums at 120 BPM.",
    "Jazz.",
    "A string quartet plays a slow movement at about 88 BPM.",
]


@pytest.fixture(scope="module")
def both():
  return metrics.text_metrics(PREDS, REFS)


def test_hand_computed_values():
  assert metrics.bleu_char_4gram("a piano piece", "a piano piece") == 1.0
  assert metrics.bleu1_word("a piano piece", "a piano piece") == 1.0
  # characters: p1 = 4/5, p2 = 3/4, p3 = 2/3, p4 = 1/2, equal lengths (no brevity penalty)
  assert metrics.bleu_char_4gram("abcde", "abcdf") == pytest.approx((4 / 5 * 3 / 4 * 2 / 3 * 1 / 2) ** 0.25, abs=1e-12)
  assert metrics.bleu1_word("abcde", "abcdf") == 0.0                      # no shared word, no smoothing
  # the quirk: two sentences sharing no word still get a large "BLEU" from shared characters
  assert metrics.bleu1_word("the guitarist plays", "a guitar player is playing") == 0.0
  assert metrics.bleu_char_4gram("the guitarist plays", "a guitar player is playing") > 0.3
  # words: unigram precision 3/3, brevity penalty exp(1 - 6/3)
  assert metrics.bleu1_word("the cat sat", "the cat sat on the mat") == pytest.approx(math.exp(-1), abs=1e-12)
  # ROUGE-L: LCS("a cat on the big mat today", "the cat sat on the mat") = "cat on the mat" = 4 tokens
  (s,) = metrics.rouge_l(["a cat on the big mat today"], ["the cat sat on the mat"])
  assert (s.recall, s.precision) == (pytest.approx(4 / 6), pytest.approx(4 / 7))
  assert s.fmeasure == pytest.approx(2 * (4 / 6) * (4 / 7) / (4 / 6 + 4 / 7))


def test_reference_and_corrected_agree_with_the_libraries(both):
  from nltk.tokenize import wordpunct_tokenize as wp
  from nltk.translate.bleu_score import sentence_bleu
  from rouge_score import rouge_scorer
  scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
  pairs = list(zip(PREDS, REFS))
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # NLTK warns on zero n-gram counts
    bleu = np.mean([sentence_bleu([r], p) for p, r in pairs])
    bleu1 = np.mean([sentence_bleu([wp(r)], wp(p), weights=(1.0,)) for p, r in pairs])
  assert both["bleu_char_4gram (reference)"].value == pytest.approx(bleu, abs=1e-12)
  assert both["bleu_char_4gram (reference)"].column == "B-U"
  assert both["bleu1_word (corrected)"].value == pytest.approx(bleu1, abs=1e-12)
  assert both["rougeL_recall (reference)"].value == pytest.approx(
      np.mean([scorer.score(r, p)["rougeL"].recall for p, r in pairs]), abs=1e-12)
  assert both["rougeL_f1 (corrected)"].value == pytest.approx(
      np.mean([scorer.score(r, p)["rougeL"].fmeasure for p, r in pairs]), abs=1e-12)
  assert {m.n for m in both.values()} == {4}
  table = metrics.format_table(both)
  for label in both:
    assert label in table
  assert "bertscore_recall[all-MiniLM-L6-v2 L6] (reference)" in both


def test_reference_metrics_score_the_reference_answer_strings(both):
  """The reference's own answers (e.g. "</s>" kept after an EOS) feed the reference table only."""
  ref_preds = [p + "</s>" for p in PREDS]
  mixed = metrics.text_metrics(PREDS, REFS, reference_preds=ref_preds)
  as_reference = metrics.text_metrics(ref_preds, REFS, which=("reference",))
  assert set(mixed) == set(both)
  for label, m in mixed.items():
    want = as_reference[label] if label.endswith("(reference)") else both[label]
    assert m.value == pytest.approx(want.value, abs=1e-6), label
    assert m.column == want.column
  assert mixed["bleu_char_4gram (reference)"].value != both["bleu_char_4gram (reference)"].value
  with pytest.raises(ValueError, match="1 predictions but 4 references"):
    metrics.text_metrics(PREDS, REFS, reference_preds=ref_preds[:1])


def test_bertscore_matches_bert_score(both):
  bert_score = pytest.importorskip("bert_score")
  enc = metrics.resolve_bertscore_encoder()
  assert (enc.name, enc.layer) == ("all-MiniLM-L6-v2", 6)
  P, R, F = metrics.bertscore(PREDS, REFS, enc)
  bp, br, bf = bert_score.score(PREDS, REFS, model_type=enc.path, num_layers=6)
  np.testing.assert_allclose(P, bp.numpy(), atol=1e-6)
  np.testing.assert_allclose(R, br.numpy(), atol=1e-6)
  np.testing.assert_allclose(F, bf.numpy(), atol=1e-6)
  assert R[2] == pytest.approx(1.0, abs=1e-6)                                   # identical strings
  assert both["bertscore_recall[all-MiniLM-L6-v2 L6] (reference)"].value == pytest.approx(R.mean(), abs=1e-6)
  assert both["bertscore_f1[all-MiniLM-L6-v2 L6] (corrected)"].value == pytest.approx(F.mean(), abs=1e-6)
  # an empty side scores 0 (bert_score itself cannot encode "" under transformers 5)
  P0, R0, F0 = metrics.bertscore(["", "Jazz."], ["Jazz.", ""], enc)
  assert P0.tolist() == R0.tolist() == F0.tolist() == [0.0, 0.0]


def test_bertscore_encoder_resolution(tmp_path, monkeypatch):
  large = tmp_path / "roberta-large"
  large.mkdir()
  (large / "config.json").write_text(json.dumps({"model_type": "roberta", "num_hidden_layers": 24}))
  assert metrics.resolve_bertscore_encoder(large).tag == "roberta-large L17"
  monkeypatch.setenv("MUSILINGO_BERTSCORE_MODEL", str(large))
  assert metrics.resolve_bertscore_encoder().layer == 17
  renamed = tmp_path / "my-encoder"
  renamed.mkdir()
  (renamed / "config.json").write_text(json.dumps({"model_type": "roberta", "num_hidden_layers": 24,
                                                   "hidden_size": 1024}))
  assert metrics.resolve_bertscore_encoder(renamed).layer == 17
  (renamed / "config.json").write_text(json.dumps({"model_type": "bert", "num_hidden_layers": 3}))
  with pytest.raises(ValueError, match="pass bertscore_layer="):
    metrics.resolve_bertscore_encoder(renamed)
  assert metrics.resolve_bertscore_encoder(renamed, layer=2).layer == 2
  with pytest.raises(ValueError, match="expected a local directory"):
    metrics.resolve_bertscore_encoder("roberta-large")


def test_meteor_equals_nltk(both):
  wn_dir, reason = assets.wordnet_status()
  if wn_dir is None:
    pytest.skip(reason)
  from nltk.tokenize import wordpunct_tokenize as wp
  from nltk.translate.meteor_score import meteor_score
  per_pair, why = metrics.meteor_wordpunct(PREDS, REFS)
  assert why == ""
  assert per_pair == [meteor_score([wp(r)], wp(p)) for p, r in zip(PREDS, REFS)]
  # "Jazz." vs itself: 2 matches in 1 chunk, F-mean 1, penalty 0.5 * (1/2)**3 -> 1 - 0.0625
  assert per_pair[2] == pytest.approx(0.9375, abs=1e-12)
  assert both["meteor_wordpunct (reference)"].value == pytest.approx(np.mean(per_pair), abs=1e-12)
  assert both["meteor_wordpunct (reference)"].column == "M-R"


def test_meteor_without_wordnet_is_none_with_reason(monkeypatch):
  monkeypatch.setattr(assets, "wordnet_status", lambda: (None, "WordNet 3.0 not available: run `apt-get ...`"))
  assert metrics.meteor_wordpunct(PREDS, REFS) == (None, "WordNet 3.0 not available: run `apt-get ...`")
  m = metrics.Metric("meteor_wordpunct (reference)", None, 4, "WordNet 3.0 not available", "M-R")
  assert "n/a" in metrics.format_table([m]) and "WordNet 3.0 not available" in metrics.format_table([m])


def test_factual_accuracy_rules():
  ok = metrics.answer_correct
  assert ok("It is in C# minor.", "C sharp minor") and ok("in C♯ minor", "c# minor")
  assert ok("The key is Bb major", "B♭ major") and ok("B flat major", "Bb major")
  assert not ok("It is in C minor", "C sharp minor")
  assert not ok("a c minority report", "C minor")                    # whole words only
  assert ok("about 124 bpm", "120") and ok("Tempo: 115.5", "120 BPM")  # +-4%: 115.2 .. 124.8
  assert not ok("about 126 bpm", "120") and not ok("no tempo given", "120")
  assert ok("a solo acoustic guitar", ["guitar", "acoustic guitar"]) and not ok("a piano", ["guitar", "violin"])
  assert ok("Time signature: 3/4.", "3/4") and not ok("in 4/4", "3/4")
  assert ok("Composed by Dvořák", "Dvorak")
  res = metrics.factual_accuracy(["C# minor", "piano", "90 bpm", "violin"], ["C sharp minor", "guitar", "88", "violin"],
                                 ["key", "instrument", "tempo", "instrument"])
  assert {k: (m.value, m.n) for k, m in res.items()} == {
      "factual_accuracy[key]": (1.0, 1), "factual_accuracy[instrument]": (0.5, 2),
      "factual_accuracy[tempo]": (1.0, 1), "factual_accuracy[all]": (0.75, 4)}
  with pytest.raises(ValueError, match="lengths differ"):
    metrics.factual_accuracy(["a"], ["a", "b"], ["key"])


def test_empty_and_mismatched_inputs():
  with pytest.raises(ValueError, match="2 predictions but 1 references"):
    metrics.text_metrics(["a", "b"], ["a"])
  empty = metrics.text_metrics([], [])
  assert all(m.value is None and m.note == "no pairs" for m in empty.values())
