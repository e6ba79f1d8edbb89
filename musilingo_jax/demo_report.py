"""The demo's held-out report: factual accuracy per question type, with the audio and with it zeroed.

With a pretrained encoder (config.model.encoder_init), a second table shows the linear-probe accuracy of the
random encoder pretraining started from and of the pretrained one (their pretraining's probe.json).

The demo set's answers are known by construction (instrument, tempo, BPM, key, time signature, composer),
so accuracy is measured directly (evaluate.known_fact + metrics.answer_correct). The same trained model is
run again with every audio feature replaced by zeros: the gap between the two columns is what the audio
contributes. The majority column is the accuracy of always giving the most common training answer of
that type (what a model that ignores the audio can reach at best by guessing well).
"""

from __future__ import annotations

import collections
import json

import jax
import numpy as np

from musilingo_jax import evaluate, storage
from musilingo_jax.build import prompt_config


def majority_accuracy(train_examples, test_examples) -> dict[str, float]:
  counts = collections.defaultdict(collections.Counter)
  for e in train_examples:
    fact = evaluate.known_fact(e)
    if fact is not None:
      counts[e["kind"]][fact] += 1
  hits = collections.defaultdict(list)
  for e in test_examples:
    fact = evaluate.known_fact(e)
    if fact is not None and counts[e["kind"]]:
      hits[e["kind"]].append(counts[e["kind"]].most_common(1)[0][0] == fact)
  out = {k: float(np.mean(v)) for k, v in hits.items()}
  everything = [h for v in hits.values() for h in v]
  if everything:
    out["all"] = float(np.mean(everything))
  return out


PROBE_TASKS = (("instrument", "instrument"), ("key", "key"), ("tempo_class", "tempo"))


def encoder_probe_lines(c) -> tuple[list[str], dict | None]:
  """The linear-probe table of a pretrained encoder (its pretraining's probe.json: the random encoder at step 0,
  the pretrained one at the last step), or nothing for a random encoder."""
  init = c.model.get("encoder_init", "random")
  if init == "random" or c.model.checkpoint:
    return [], None
  from musilingo_jax.pretrain import demo as pretrain_demo
  path = pretrain_demo.demo_encoder_dir(c, pretrain=False) if init == "pretrain_demo" else init
  probe = pretrain_demo.read_probe(path)
  curve = (probe or {}).get("curve") or []
  if not curve or not any(k.startswith("probe_") for k in curve[-1]):
    return [], probe
  first, last = curve[0], curve[-1]
  majority = probe.get("majority", {})
  lines = ["", "Linear probe of the encoder's pooled features (ridge classifier fitted on the training clips, "
           f"scored on the test clips; first {probe.get('probe_seconds', 0):g} s of each; pretrain/probe.py)",
           f"{'encoder':<34}" + "".join(f"{name:>12}" for _, name in PROBE_TASKS)]

  def row(label, values):
    return f"{label:<34}" + "".join(f"{values.get(k, float('nan')):>12.2f}" for k, _ in PROBE_TASKS)
  lines.append(row(f"random (step {first['step']})",
                   {k: first.get(f"probe_{k}", float("nan")) for k, _ in PROBE_TASKS}))
  lines.append(row(f"pretrained ({last['step']} steps, {last.get('train_minutes', 0):.1f} min)",
                   {k: last.get(f"probe_{k}", float("nan")) for k, _ in PROBE_TASKS}))
  if majority:
    lines.append(row("majority", majority))
  return lines, probe


def report(c, workdir: str, summary: dict, *, limit: int | None = None) -> dict:
  model, tokenizer, data = summary["model"], summary["tokenizer"], summary["data"]
  test = data.eval_examples(limit)
  train = data.train_examples()
  # Decoding on CPU reads every weight once per token whatever the batch, so batches are wide (up to 64
  # rows) and evenly filled (little padding work in the prefill).
  n_batches = -(-len(test) // 64)
  kw = dict(batch_size=-(-len(test) // n_batches), prompt_cfg=prompt_config(c), greedy=True,
            max_new_tokens=c.eval.max_new_tokens, bertscore=False)
  print(f"\ndemo: answering {len(test)} held-out questions (greedy), with the audio and with it zeroed ...",
        flush=True)
  with_audio = evaluate.evaluate(model, tokenizer, test, **kw)
  zeroed = evaluate.evaluate(model, tokenizer, test, zero_audio=True, **kw)
  majority = majority_accuracy(train, test)

  rows = []
  for name, m in sorted(with_audio["factual"].items(), key=lambda kv: (kv[0].endswith("[all]"), kv[0])):
    kind = name[len("factual_accuracy["):-1]
    rows.append({"type": kind, "n": m.n, "with_audio": m.value,
                 "audio_zeroed": zeroed["factual"][name].value, "majority": majority.get(kind)})
  lines = ["", "Held-out demo results (test pieces never seen in training; greedy decoding)",
           f"{'question type':<16}{'n':>5}{'with audio':>12}{'audio zeroed':>14}{'majority':>10}"]
  for r in rows:
    maj = "" if r["majority"] is None else f"{r['majority']:.2f}"
    lines.append(f"{r['type']:<16}{r['n']:>5}{r['with_audio']:>12.2f}{r['audio_zeroed']:>14.2f}{maj:>10}")
  probe_lines, probe = encoder_probe_lines(c)
  lines += probe_lines
  lines.append("")
  lines.append("Text metrics over all answers, with audio (reference-compatible and corrected; no BERTScore):")
  lines.append("  " + ", ".join(f"{k}={v:.3f}" for k, v in with_audio["summary"].items()
                                if not k.startswith("factual")))
  lines.append("")
  lines.append("Sample answers (one per question type):")
  seen = set()
  for p, z in zip(with_audio["predictions"], zeroed["predictions"]):
    if p.get("kind") in seen:
      continue
    seen.add(p.get("kind"))
    lines += [f"  [{p.get('kind')}] Q: {p['question']}", f"      truth: {p['reference']}",
              f"      model: {p['prediction']}", f"      audio zeroed: {z['prediction']}"]
  lines.append("")
  llm = ("a tiny random LLaMA with SmolLM2's tokenizer (the smoke preset: the path, not the quality)"
         if c.model.get("smoke_llm", False) else
         "SmolLM2-135M-Instruct (real weights from the 4-bit GGUF), frozen")
  init = c.model.get("encoder_init", "random")
  if init == "random" or c.model.checkpoint:
    encoder = "a small randomly initialised MERT-architecture encoder (no pretrained MERT can be had offline)"
  else:
    encoder = ("a small MERT-architecture encoder, MERT-style pretrained here ("
               + ("configs/mert_pretrain.py:demo" if init == "pretrain_demo" else init)
               + ": k-means codes of log-mel and chroma frames + CQT reconstruction, docs/pretraining.md)")
  lines.append(f"Encoder: {encoder}; LLM: {llm}; trained: {c.train.trainable}.")
  text = "\n".join(lines)
  print(text, flush=True)
  result = {"rows": rows, "encoder_probe": probe, "with_audio": with_audio["summary"],
            "audio_zeroed": zeroed["summary"],
            "num_test": len(test), "predictions": with_audio["predictions"],
            "predictions_audio_zeroed": zeroed["predictions"]}
  if jax.process_index() == 0:  # local or gs:// workdir
    out = storage.path(workdir)
    (out / "demo_report.json").write_text(json.dumps(result, indent=1, default=str))
    (out / "demo_report.txt").write_text(text + "\n")
  return result
