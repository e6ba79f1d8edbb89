"""Decode, crop and resample a released data set once, into ArrayRecord shards (+ optional encoder features).

  musilingo-precompute --dataset musicqa --data-dir /data/music_data --split finetune --out /data/rec/musicqa
  musilingo-precompute --dataset demo --data-dir /tmp/demo --split train --out /tmp/demo_rec \
      --encoder /ckpt/mert-v1-330m-converted --features also

Resumable: rerun the same command and finished shards are kept. The report (written, skipped by reason with
the skipped ids, hours of audio) is printed and written to OUT/{split}-report.json. OUT (and --encoder) may
be a gs:// URL: shards are written locally, then uploaded whole (data/records.py). --encoder is a converted
checkpoint (musilingo-convert), an HF MERT folder or its Hub id (resolved through the Hugging Face cache).
Inputs are checked before anything loads: an unreachable bucket, a missing --data-dir or one without the
release's annotation file for the split, an --encoder that is neither layout are one line `precompute: error:
...` and exit status 2.
`python scripts/precompute.py ...` is the same program.
"""

# The data modules are imported inside the functions (see musilingo_jax/main/__init__.py): jax and the
# encoder load only with --encoder.

from __future__ import annotations

import argparse
import sys


def parse_args(argv=None) -> argparse.Namespace:
  from musilingo_jax.data import readers, records
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--dataset", required=True, choices=readers.DATASETS)
  p.add_argument("--data-dir", required=True, help="the folder holding the release (e.g. music_data)")
  p.add_argument("--split", required=True)
  p.add_argument("--out", required=True, help="output folder for shards and report")
  p.add_argument("--musicinstruct-file", default="all", choices=sorted(readers.MUSICINSTRUCT_FILES))
  p.add_argument("--audio-dtype", default="int16", choices=sorted(records.AUDIO_DTYPES))
  p.add_argument("--shard-size", type=int, default=1024, help="examples per shard")
  p.add_argument("--workers", type=int, default=4, help="decode threads")
  p.add_argument("--seed", type=int, default=0, help="seeds the random training crops (per example)")
  p.add_argument("--crop", default=None, choices=("random", "start", "center"),
                 help="default: random for train/pretrain/finetune splits, start otherwise")
  p.add_argument("--min-seconds", type=float, default=1.0, help="shorter clips are skipped (too_short)")
  p.add_argument("--max-text-chars", type=int, default=8192, help="longer questions/answers are skipped")
  p.add_argument("--encoder", default=None, help="converted MERT checkpoint directory")
  p.add_argument("--features", default=None, choices=("also", "only"),
                 help="store pooled encoder features beside the audio (also) or instead of it (only)")
  p.add_argument("--features-dtype", default="float16", choices=("float16", "float32"))
  p.add_argument("--pool-frames", type=int, default=325, help="frames per audio token (reference: 325)")
  p.add_argument("--encoder-dtype", default="float32", help="compute dtype for the encoder")
  p.add_argument("--do-normalize", default=None, action=argparse.BooleanOptionalAction,
                 help="musicinstruct/musiccaps features: whether MERT's feature extractor standardises each clip "
                      "(default: do_normalize of the encoder directory's preprocessor_config.json)")
  p.add_argument("--no-progress", action="store_true")
  args = p.parse_args(argv)
  if bool(args.encoder) != bool(args.features):
    p.error("--encoder and --features go together")
  return args


def check_encoder(path: str, *, dataset: str, do_normalize: bool | None) -> None:
  """--encoder (local or gs://) is a converted checkpoint holding the encoder, or an HF MERT folder
  (config.json); for data sets whose clips go through MERT's feature extractor, it says do_normalize
  (preprocessor_config.json) unless --do-normalize does. cli.InputError (one line) otherwise."""
  from musilingo_jax import storage
  from musilingo_jax.data import audio as audio_lib
  from musilingo_jax.main import cli
  root = storage.path(path)
  if not root.is_dir():
    what = "not a folder" if root.exists() else "no such folder"
    raise cli.InputError(f"--encoder {path}: {what} (expected a converted checkpoint or an HF MERT folder)")
  if (root / "meta.json").is_file():
    cli.check_converted(path, "--encoder", parts=("encoder",))
  elif not (root / "config.json").is_file():
    raise cli.InputError(f"--encoder {path}: neither a converted checkpoint (meta.json, params/encoder) nor an "
                         f"HF MERT folder (config.json)")
  if do_normalize is None and dataset in audio_lib.EXTRACTOR_DATASETS:
    try:
      audio_lib.extractor_do_normalize(path, dataset)
    except ValueError as e:
      raise cli.InputError(f"--encoder {path}: {e} (or pass --do-normalize / --no-do-normalize)") from None


def check_inputs(args: argparse.Namespace) -> None:
  """Before any decoding or encoder load: --encoder (a Hub id resolved first), --out, --data-dir and the
  release's annotation file for --split; raises the one-line errors cli.checked prints."""
  from musilingo_jax.main import cli
  cli.resolve_hub_ids(args, {"--encoder": cli.HUB_MODEL})
  remote = args.encoder if args.encoder and "://" in args.encoder else None
  cli.storage_checks(read={"--encoder": remote}, write={"--out": args.out})  # (local: check_encoder says more)
  if args.encoder:
    check_encoder(args.encoder, dataset=args.dataset, do_normalize=args.do_normalize)
  cli.check_release(args.dataset, args.data_dir, args.split, musicinstruct_file=args.musicinstruct_file)


def main(argv=None) -> int:
  args = parse_args(argv)
  from musilingo_jax.main import cli
  code, _ = cli.checked("precompute", lambda: check_inputs(args))
  if code:
    return code
  from musilingo_jax.data import readers, records
  cfg = records.PrecomputeConfig(
      dataset=args.dataset, data_dir=args.data_dir, split=args.split, out_dir=args.out,
      musicinstruct_file=args.musicinstruct_file, audio_dtype=args.audio_dtype, shard_size=args.shard_size,
      workers=args.workers, seed=args.seed, crop=args.crop, min_seconds=args.min_seconds,
      max_text_chars=args.max_text_chars, features=args.features, features_dtype=args.features_dtype,
      encoder=args.encoder, pool_frames=args.pool_frames, progress=not args.no_progress,
      do_normalize=args.do_normalize)
  encoder_fn = None
  if args.encoder:
    encoder = records.load_encoder(args.encoder, dtype=args.encoder_dtype)
    encoder_fn = records.make_encoder_fn(encoder, args.pool_frames)
  try:
    report = records.precompute(cfg, encoder_fn)
  except (readers.AnnotationError, ValueError) as err:
    print(f"error: {err}", file=sys.stderr)
    return 2
  print(records.format_report(report))
  print(f"report: {records.report_path(args.out, args.split)}")
  return 0


def run() -> None:
  """Console-script entry point (musilingo-precompute)."""
  sys.exit(main())


if __name__ == "__main__":
  run()
