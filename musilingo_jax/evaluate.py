"""Evaluation: generate answers for examples, then the reference metrics (as computed and corrected, each
labelled) and factual accuracy per question kind where the examples have one (the demo set).

An example is a dict with `question` (None for stage-1 captions), `answer` (the reference text), optionally
`id`, `kind` and `labels` (dict or JSON text; the demo set), or `fact` (the short known answer checked by
`metrics.answer_correct`), and either `features` [T', D_enc] (precomputed) or `audio` [S] (24 kHz; int16 as
stored in records is dequantized). `zero_audio=True` replaces every clip's features by zeros: the
"does the audio matter" baseline.

Batches keep one compiled shape for the whole run: every prompt is left-padded to the longest prompt of
all examples (rounded up to a multiple of 8) and the last batch is filled with copies of its last row.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from musilingo_jax import generate as gen, metrics, prompts, storage

# Demo set: which label is the known answer of each question kind (captions: text metrics only).
FACT_LABEL = {"instrument": "instrument", "tempo": "tempo_class", "bpm": "bpm", "key": "key",
              "time_signature": "time_signature", "composer": "composer"}


def known_fact(example: dict) -> str | None:
  """The short answer that factual accuracy checks: `fact`, else the demo label for `kind`, else None."""
  if example.get("fact") is not None:
    return str(example["fact"])
  labels = example.get("labels") or {}
  if isinstance(labels, str):
    labels = json.loads(labels)
  field = FACT_LABEL.get(example.get("kind"))
  return None if field is None or field not in labels else str(labels[field])


def _audio_array(a) -> np.ndarray:
  a = np.asarray(a)
  return a.astype(np.float32) * np.float32(1 / 32767) if a.dtype == np.int16 else a.astype(np.float32)


def _n_audio_tokens(model, example: dict) -> int:
  """The clip's own audio tokens: its precomputed feature rows, or ceil(encoder frames / pool_frames)."""
  if example.get("features") is not None:
    return int(np.asarray(example["features"]).shape[0])
  cfg = model.cfg
  frames = cfg.encoder.feature_lengths(len(example["audio"]))
  return -(-int(frames) // cfg.pool_frames)


def _audio_batch(model, rows: Sequence[dict], slots: int, zero_audio: bool, samples: int) -> dict:
  """Each clip as if alone (the reference generates one clip at a time): features zero-padded to `slots`
  rows, or audio zero-padded to `samples` with its own length as `audio_len` and `audio_pad_len`."""
  if zero_audio:
    return {"features": np.zeros((len(rows), slots, model.cfg.encoder.hidden_size), np.float32)}
  if all(r.get("features") is not None for r in rows):
    feats = [np.asarray(r["features"], np.float32) for r in rows]
    return {"features": np.stack([np.pad(f, ((0, slots - len(f)), (0, 0))) for f in feats])}
  audio = [_audio_array(r["audio"]) for r in rows]
  lengths = np.asarray([len(a) for a in audio], np.int32)
  return {"audio": np.stack([np.pad(a, (0, samples - len(a))) for a in audio]), "audio_len": lengths,
          "audio_pad_len": lengths}


def _text_metrics(preds, refs, *, bertscore: bool, bertscore_model, reference_preds=None
                  ) -> dict[str, metrics.Metric]:
  """Reference metrics on `reference_preds` (the reference's own answer strings; default `preds`),
  corrected metrics on `preds` (clean answers)."""
  ref_preds = preds if reference_preds is None else reference_preds
  if bertscore:
    return metrics.text_metrics(preds, refs, bertscore_model=bertscore_model, reference_preds=ref_preds)
  # Without BERTScore (periodic evaluation during training): the same labels, BERT-S left out.
  rouge = metrics.rouge_l(preds, refs)
  meteor, why = metrics.meteor_wordpunct(preds, refs)
  rouge_ref = metrics.rouge_l(ref_preds, refs)
  meteor_ref, why_ref = metrics.meteor_wordpunct(ref_preds, refs)
  n = len(preds)
  mean = lambda xs: None if xs is None or not n else float(np.mean(xs))  # noqa: E731
  rows = [
      ("bleu_char_4gram (reference)", [metrics.bleu_char_4gram(p, r) for p, r in zip(ref_preds, refs)], "", "B-U"),
      ("meteor_wordpunct (reference)", meteor_ref, why_ref, "M-R"),
      ("rougeL_recall (reference)", [s.recall for s in rouge_ref], "", "R-L"),
      ("bleu1_word (corrected)", [metrics.bleu1_word(p, r) for p, r in zip(preds, refs)], "", ""),
      ("meteor_wordpunct (corrected)", meteor, why, ""),
      ("rougeL_f1 (corrected)", [s.fmeasure for s in rouge], "", ""),
  ]
  return {label: metrics.Metric(label, mean(v), n, note, col) for label, v, note, col in rows}


def evaluate(model, tokenizer, examples: Sequence[dict], *, batch_size: int = 8, n_audio_tokens: int | None = None,
             prompt_cfg: prompts.PromptConfig = prompts.PromptConfig(), bertscore: bool = True,
             bertscore_model=None, zero_audio: bool = False, seed: int = 0, progress: bool = False,
             **gen_kwargs) -> dict:
  """Generates an answer per example, then scores them. `gen_kwargs` go to `generate.generate` (greedy,
  temperature, top_p, max_new_tokens, stop_sequences, ...); batch i samples with seed + i.

  Returns {"n", "settings", "reference", "corrected", "factual" (label -> metrics.Metric), "summary"
  (label -> float, every computed number), "predictions" (per example: id, question, reference, prediction,
  reference_prediction, raw_text, n_tokens, kind, fact, correct), "timing"}. The reference metrics score
  `reference_prediction` (the answer string exactly as the reference post-processes it, e.g. ending in
  "</s>"); the corrected metrics and factual accuracy score `prediction` (the clean answer).
  """
  examples = list(examples)
  if not examples:
    raise ValueError("evaluate needs at least one example")
  # Every clip attends its own audio tokens; `n_audio_tokens` (optional) is only a wider static bound.
  counts = [_n_audio_tokens(model, e) for e in examples]
  slots = max(counts + [n_audio_tokens or 0])
  samples = max((len(e["audio"]) for e in examples if e.get("features") is None and e.get("audio") is not None),
                default=0)
  encoded = [prompts.encode_prompt(tokenizer, e.get("question"), prompt_cfg) for e in examples]
  longest = max(1 + len(p["before"]) + n + len(p["after"]) for p, n in zip(encoded, counts))
  max_len = -(-longest // 8) * 8
  results: list[gen.GenerationResult] = []
  t0, n_tokens = time.perf_counter(), 0
  for i, start in enumerate(range(0, len(examples), batch_size)):
    idx = list(range(start, min(start + batch_size, len(examples))))
    idx += [idx[-1]] * (batch_size - len(idx))  # one compiled shape
    batch = prompts.collate_prompts([encoded[j] for j in idx], n_audio_tokens=[counts[j] for j in idx],
                                    bos_id=tokenizer.bos_id, pad_id=tokenizer.pad_id, max_len=max_len)
    batch.update(_audio_batch(model, [examples[j] for j in idx], slots, zero_audio, samples))
    out = gen.generate(model, batch, tokenizer=tokenizer, seed=seed + i, **gen_kwargs)
    n_real = min(batch_size, len(examples) - start)
    results.extend(out[:n_real])
    n_tokens += sum(len(r.token_ids) for r in out[:n_real])
    if progress:
      print(f"evaluate: {len(results)}/{len(examples)} answered", flush=True)
  gen_s = time.perf_counter() - t0

  preds = [r.text for r in results]
  ref_preds = [r.reference_text for r in results]  # as the reference post-processes them (generate.py)
  refs = [str(e["answer"]) for e in examples]
  text = _text_metrics(preds, refs, bertscore=bertscore, bertscore_model=bertscore_model,
                       reference_preds=ref_preds)
  reference = {k: m for k, m in text.items() if k.endswith("(reference)")}
  corrected = {k: m for k, m in text.items() if k.endswith("(corrected)")}
  facts = [known_fact(e) for e in examples]
  scored = [i for i, f in enumerate(facts) if f is not None and examples[i].get("kind") is not None]
  factual = {}
  if scored:
    factual = metrics.factual_accuracy([preds[i] for i in scored], [facts[i] for i in scored],
                                       [str(examples[i]["kind"]) for i in scored])
  predictions = []
  for i, (e, r) in enumerate(zip(examples, results)):
    row = {"id": e.get("id", i), "question": e.get("question"), "reference": refs[i], "prediction": r.text,
           "reference_prediction": r.reference_text, "raw_text": r.raw_text, "n_tokens": len(r.token_ids)}
    if e.get("kind") is not None:
      row["kind"] = e["kind"]
    if facts[i] is not None:
      row["fact"] = facts[i]
      row["correct"] = metrics.answer_correct(r.text, facts[i])
    predictions.append(row)
  summary = {k: m.value for d in (reference, corrected, factual) for k, m in d.items() if m.value is not None}
  settings = {"batch_size": batch_size, "n_audio_tokens": slots, "zero_audio": zero_audio, "seed": seed,
              "prompt": dataclasses.asdict(prompt_cfg), "bertscore": bertscore,
              **{k: (list(map(list, v)) if k == "stop_sequences" and v is not None else v)
                 for k, v in gen_kwargs.items()}}
  return {"n": len(examples), "settings": settings, "reference": reference, "corrected": corrected,
          "factual": factual, "summary": summary, "predictions": predictions,
          "timing": {"generate_s": gen_s, "generated_tokens": n_tokens,
                     "tokens_per_s": n_tokens / gen_s if gen_s > 0 else None}}


def _metric_json(m: metrics.Metric) -> dict:
  return dataclasses.asdict(m)


def format_report(results: dict) -> str:
  """The readable tables: reference metrics, corrected metrics, factual accuracy."""
  parts = []
  for title, key in (("Reference metrics (as ML qa.py computes them)", "reference"),
                     ("Corrected metrics", "corrected"), ("Factual accuracy", "factual")):
    if results.get(key):
      parts.append(f"{title}\n{metrics.format_table(results[key])}")
  s = results.get("settings", {})
  head = (f"{results['n']} examples; zero_audio={s.get('zero_audio')}; "
          f"{results['timing']['generated_tokens']} tokens generated in {results['timing']['generate_s']:.1f} s")
  return "\n\n".join([head] + parts) + "\n"


def write_report(results: dict, out_dir) -> dict[str, Path]:
  """out_dir/eval.json (everything, predictions beside references) and out_dir/eval.txt (the tables);
  out_dir may be a gs:// URL (each file written under a temporary name, then renamed into place)."""
  data = {k: ({label: _metric_json(m) for label, m in v.items()} if k in ("reference", "corrected", "factual")
              else v) for k, v in results.items()}
  out = storage.makedirs(out_dir)
  paths = {"json": out / "eval.json", "table": out / "eval.txt"}
  storage.write_atomic(paths["json"], json.dumps(data, indent=2, ensure_ascii=False, default=str))
  storage.write_atomic(paths["table"], format_report(results))
  return paths
