"""The demo's held-out report: factual accuracy per question type, with the audio and with it zeroed.

The demo set's answers are known by construction (instrument, tempo, BPM, key, time signature, composer),
so accuracy is measured directly (metrics.answer_correct). The same trained model is run again with every
audio feature replaced by zeros: the gap between the two columns is what the audio contributes. The
majority column is the accuracy of always giving the most common training answer of that type.
"""

from __future__ import annotations

import collections
import json
import os

import numpy as np

from musilingo_jax import generate, metrics, prompts

# Which label is the known answer of each question type (captions are judged by text metrics only).
ANSWER_LABEL = {"instrument": "instrument", "tempo": "tempo_class", "bpm": "bpm", "key": "key",
                "time_signature": "time_signature", "composer": "composer"}


def known_answer(kind: str, labels: dict):
  field = ANSWER_LABEL.get(kind)
  return None if field is None else str(labels[field])


def _labels(ex: dict) -> dict:
  lab = ex.get("labels") or {}
  return json.loads(lab) if isinstance(lab, str) else lab


def answer_all(model, tokenizer, examples, *, n_audio_tokens: int, prompt_cfg, max_new_tokens: int,
               batch_size: int = 16, zero_audio: bool = False) -> list[str]:
  """Greedy answers for examples carrying precomputed `features` [T', D]."""
  out = []
  for i in range(0, len(examples), batch_size):
    chunk = examples[i:i + batch_size]
    pad = batch_size - len(chunk)  # keep one compiled shape
    rows = chunk + [chunk[-1]] * pad
    batch = generate.prompt_batch(tokenizer, [e["question"] for e in rows], n_audio_tokens=n_audio_tokens,
                                  prompt_cfg=prompt_cfg, max_len=None)
    feats = np.stack([np.asarray(e["features"], np.float32)[:n_audio_tokens] for e in rows])
    batch["features"] = np.zeros_like(feats) if zero_audio else feats
    res = generate.generate(model, batch, tokenizer=tokenizer, max_new_tokens=max_new_tokens, greedy=True)
    out.extend(r.text for r in res[:len(chunk)])
  return out


def majority_accuracy(train_examples, test_examples) -> dict[str, float]:
  by_kind = collections.defaultdict(collections.Counter)
  for e in train_examples:
    a = known_answer(e.get("kind"), _labels(e))
    if a is not None:
      by_kind[e["kind"]][a] += 1
  acc = collections.defaultdict(list)
  for e in test_examples:
    a = known_answer(e.get("kind"), _labels(e))
    if a is not None and by_kind[e["kind"]]:
      acc[e["kind"]].append(by_kind[e["kind"]].most_common(1)[0][0] == a)
  return {k: float(np.mean(v)) for k, v in acc.items()}


def report(c, workdir: str, summary: dict, *, limit: int | None = None) -> dict:
  from musilingo_jax.build import prompt_config
  model, tokenizer, data = summary["model"], summary["tokenizer"], summary["data"]
  test = data.eval_examples(limit)
  train = []
  for path in data.train_files:
    import grain
    from musilingo_jax.data import records
    src = grain.sources.ArrayRecordDataSource([path])
    train.extend(records.decode_record(src[i]) for i in range(len(src)))
  pcfg = prompt_config(c)
  kw = dict(n_audio_tokens=c.data.n_audio_tokens, prompt_cfg=pcfg, max_new_tokens=c.eval.max_new_tokens)
  print(f"\ndemo: answering {len(test)} held-out questions (greedy), with the audio and with it zeroed ...",
        flush=True)
  with_audio = answer_all(model, tokenizer, test, **kw)
  zeroed = answer_all(model, tokenizer, test, zero_audio=True, **kw)

  factual = [(i, e) for i, e in enumerate(test) if known_answer(e.get("kind"), _labels(e)) is not None]
  kinds = [e["kind"] for _, e in factual]
  answers = []
  for _, e in factual:
    lab = _labels(e)
    a = known_answer(e["kind"], lab)
    answers.append([a, lab.get("composer_display", a)] if e["kind"] == "composer" else a)
  acc_audio = metrics.factual_accuracy([with_audio[i] for i, _ in factual], answers, kinds)
  acc_zero = metrics.factual_accuracy([zeroed[i] for i, _ in factual], answers, kinds)
  majority = majority_accuracy(train, test)

  rows = []
  for name in sorted(acc_audio, key=lambda k: (k.endswith("[all]"), k)):
    kind = name[len("factual_accuracy["):-1]
    rows.append({"type": kind, "n": acc_audio[name].count, "with_audio": acc_audio[name].value,
                 "audio_zeroed": acc_zero[name].value, "majority": majority.get(kind)})
  captions = [(e, with_audio[i]) for i, e in enumerate(test) if e.get("kind") == "caption"]
  text = {}
  if captions:
    text = {k: m.value for k, m in metrics.text_metrics([p for _, p in captions], [e["answer"] for e, _ in captions],
).items()}
  lines = ["", "Held-out demo results (test pieces never seen in training; greedy decoding)",
           f"{'question type':<16}{'n':>5}{'with audio':>12}{'audio zeroed':>14}{'majority':>10}"]
  for r in rows:
    maj = "" if r["majority"] is None else f"{r['majority']:.2f}"
    lines.append(f"{r['type']:<16}{r['n']:>5}{r['with_audio']:>12.2f}{r['audio_zeroed']:>14.2f}{maj:>10}")
  if text:
    lines.append("caption text metrics (with audio): " + ", ".join(
        f"{k}={v:.3f}" for k, v in text.items() if v is not None))
  lines.append("")
  lines.append("Sample answers:")
  shown = collections.OrderedDict()
  for i, e in enumerate(test):
    shown.setdefault(e.get("kind"), (e, with_audio[i], zeroed[i]))
  for kind, (e, p, z) in shown.items():
    lines.append(f"  [{kind}] Q: {e['question']}")
    lines.append(f"      truth: {e['answer']}")
    lines.append(f"      model: {p}")
    lines.append(f"      zeroed audio: {z}")
  lines.append("Encoder: a small randomly initialised MERT-architecture encoder (no pretrained MERT can be had "
               "offline); LLM: SmolLM2-135M-Instruct (real weights, 4-bit GGUF dequantised), frozen.")
  text_out = "\n".join(lines)
  print(text_out, flush=True)
  result = {"rows": rows, "caption_text_metrics": text, "num_test": len(test),
            "samples": [{"id": e.get("id"), "kind": e.get("kind"), "question": e["question"], "answer": e["answer"],
                         "prediction": with_audio[i], "prediction_audio_zeroed": zeroed[i]}
                        for i, e in enumerate(test)]}
  with open(os.path.join(workdir, "demo_report.json"), "w") as f:
    json.dump(result, f, indent=1)
  with open(os.path.join(workdir, "demo_report.txt"), "w") as f:
    f.write(text_out + "\n")
  return result


__all__ = ["report", "answer_all", "known_answer", "prompts"]
