"""Evaluate a MusiLingo model: generate answers, then the reference metrics (as computed and corrected) and
factual accuracy per question kind (demo set); writes OUT/eval.json (with every prediction) and OUT/eval.txt.

  musilingo-evaluate --workdir /runs/musicqa --records /data/rec/musicqa --split eval --out /runs/musicqa/eval
  musilingo-evaluate --checkpoint /ckpt/converted --projection checkpoint_5.pth \
      --dataset demo --data-dir ~/.cache/musilingo_jax/demo/set-... --split test --limit 50 --out /tmp/eval
  musilingo-evaluate ... --zero-audio     # the same questions with every clip's features zeroed
  (python scripts/evaluate.py ... is the same program)

--records reads precomputed ArrayRecord shards (musilingo-precompute; features used when stored, else the
audio through the encoder). --dataset reads a release directly (audio decoded and cropped as precompute does,
deterministic "start" crops). Sampling defaults are the reference's; --greedy for argmax decoding.
BERTScore uses --bertscore-model (a local roberta-large directory for numbers comparable with published
ones, or its Hub id FacebookAI/roberta-large, resolved through the Hugging Face cache) or all-MiniLM-L6-v2
(labelled); --no-bertscore skips it. The frozen weights load in --dtype (default bfloat16), split over all
local devices. --projection takes what musilingo-generate takes (a Hub id too).
The inputs are checked and the examples read before the model loads: a missing or wrong folder (no shards of
the split in --records, a release layout --dataset does not read), a checkpoint or projection that does not
fit, an unwritable --out is one line `evaluate: error: ...` and exit status 2.
"""

# jax, the metrics and the model modules are imported inside the functions: --help stays instant
# (data.readers is standard-library only).

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from musilingo_jax.data import readers
from musilingo_jax.main import cli


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  cli.add_model_source(p)
  data = p.add_mutually_exclusive_group(required=True)
  data.add_argument("--records", help="a directory of precomputed ArrayRecord shards")
  data.add_argument("--dataset", choices=readers.DATASETS, help="read a release directly (with --data-dir)")
  p.add_argument("--data-dir", help="with --dataset: the release's directory")
  p.add_argument("--split", default="test")
  p.add_argument("--limit", type=int, default=None, help="the first N examples only")
  p.add_argument("--out", required=True, help="output directory (or gs:// URL) for eval.json and eval.txt")
  p.add_argument("--batch-size", type=int, default=8)
  p.add_argument("--zero-audio", action="store_true", help="replace every clip's features by zeros (baseline)")
  p.add_argument("--bertscore-model", default=None, help="a local BERTScore encoder directory (roberta-large)")
  p.add_argument("--no-bertscore", action="store_true")
  cli.add_sampling(p)
  args = p.parse_args(argv)
  cli.check_model_source(p, args)
  if args.dataset and not args.data_dir:
    p.error("--dataset needs --data-dir")
  return args


def records_examples(directory: str, split: str, limit: int | None) -> list[dict]:
  """The examples of `split`'s shards in `directory`; cli.InputError naming the folder, the shard names
  expected and the splits it does hold when it holds no `split` shards."""
  from musilingo_jax import storage
  from musilingo_jax.build import read_records
  from musilingo_jax.data import records
  files = records.shard_files(directory, split)
  if not files:
    d = storage.path(directory)
    held = sorted({p.name.rsplit("-", 3)[0] for p in d.glob("*-?????-of-?????.array_record")}) if d.is_dir() else []
    found = f"it holds shards of {', '.join(held)}" if held else "it holds no shards"
    raise cli.InputError(f"--records {directory}: no {split!r} shards (expected {records.shard_name(split, 0, 1)}, "
                         f"{split}-00000-of-NNNNN.array_record ...; {found}; musilingo-precompute writes them)")
  return read_records(files, limit)


def release_examples(dataset: str, data_dir: str, split: str, limit: int | None) -> list[dict]:
  from musilingo_jax.data import audio as audio_lib
  out, skipped = [], []
  for sample in readers.read_samples(dataset, data_dir, split):
    try:
      window = audio_lib.load_window(sample.audio_source.path, sample_rate=sample.audio_source.sample_rate,
                                     native_window=audio_lib.NATIVE_WINDOW[dataset], crop="start")
    except audio_lib.BadAudio as e:
      skipped.append(str(e))
      continue
    out.append({"id": sample.id, "question": sample.question, "answer": sample.answer, "audio": window.audio,
                **{k: sample.extra[k] for k in ("kind", "labels") if k in sample.extra}})
    if limit and len(out) >= limit:
      break
  if skipped:
    print(f"evaluate: skipped {len(skipped)} clips: {skipped[:5]}", file=sys.stderr)
  return out


def check_inputs(args: argparse.Namespace) -> None:
  """Before the model loads: the model source, --records / --data-dir, --out, and --bertscore-model (a Hub id
  resolved into the Hugging Face cache); raises the one-line errors cli.checked prints."""
  from musilingo_jax import hub
  cli.check_model_inputs(args, read={"--records": args.records, "--data-dir": args.data_dir},
                         write={"--out": args.out})
  if args.bertscore_model and not args.no_bertscore:
    args.bertscore_model = hub.resolve_model(args.bertscore_model, what="--bertscore-model")
    if "://" not in args.bertscore_model and not (Path(args.bertscore_model) / "config.json").is_file():
      raise cli.InputError(f"--bertscore-model {args.bertscore_model}: not a Hugging Face model folder (no "
                           f"config.json); expected a local roberta-large directory or a Hub id")
  if args.dataset:
    cli.check_release(args.dataset, args.data_dir, args.split)


def main(argv=None) -> int:
  args = parse_args(argv)
  code, _ = cli.checked("evaluate", lambda: check_inputs(args))
  if code:
    return code
  if args.records:
    code, examples = cli.checked("evaluate", lambda: records_examples(args.records, args.split, args.limit))
    if code:
      return code
  else:
    examples = release_examples(args.dataset, args.data_dir, args.split, args.limit)
  print(f"evaluate: {len(examples)} examples", flush=True)
  from musilingo_jax import evaluate as ev, prompts
  from musilingo_jax.build import prompt_config
  model, tokenizer, config = cli.load_model(args, "evaluate")
  prompt_cfg = prompt_config(config) if config is not None else prompts.PromptConfig()
  results = ev.evaluate(model, tokenizer, examples, batch_size=args.batch_size, prompt_cfg=prompt_cfg,
                        bertscore=not args.no_bertscore, bertscore_model=args.bertscore_model,
                        zero_audio=args.zero_audio, seed=args.seed, progress=True, greedy=args.greedy,
                        max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p)
  paths = ev.write_report(results, args.out)
  print(ev.format_report(results))
  print(f"evaluate: wrote {paths['json']} and {paths['table']}")
  return 0


def run() -> None:
  """Console-script entry point (musilingo-evaluate)."""
  sys.exit(main())


if __name__ == "__main__":
  run()
