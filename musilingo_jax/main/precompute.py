"""Decode, crop and resample a released data set once, into ArrayRecord shards (+ optional encoder features).

  musilingo-precompute --dataset musicqa --data-dir /data/music_data --split finetune --out /data/rec/musicqa
  musilingo-precompute --dataset demo --data-dir /tmp/demo --split train --out /tmp/demo_rec \
      --encoder /ckpt/mert-v1-330m-converted --features also

Resumable: rerun the same command and finished shards are kept. The report (written, skipped by reason with
the skipped ids, hours of audio) is printed and written to OUT/{split}-report.json. OUT (and --encoder) may
be a gs:// URL: shards are written locally, then uploaded whole (data/records.py); an unreachable bucket is
one line naming it and exit status 2, before anything loads.
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


def main(argv=None) -> int:
  args = parse_args(argv)
  from musilingo_jax.main import cli
  code = cli.check_storage("precompute", read={"--encoder": args.encoder}, write={"--out": args.out})
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
