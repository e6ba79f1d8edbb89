"""Build the embedded demo dataset (music21 corpus scores rendered to audio, QA pairs known by construction).

  musilingo-make-demo-data --out data/demo [--num-train-pieces 40 --num-test-pieces 10
      --clips-per-piece 6 --clip-seconds 10 --seed 0 --renderer auto|fluidsynth|numpy --workers 2]
  (python scripts/make_demo_data.py ... is the same program)

Layout and labels: see musilingo_jax/data/demo.py. Reuses DIR when DIR/meta.json has the same parameters.
The arguments are checked before any score is parsed: an --out or --cache-dir that cannot be created, a count
or length that is not positive, --renderer fluidsynth without fluidsynth or a soundfont are one line
`make-demo-data: error: ...` and exit status 2.
"""

# The demo builder (numpy, music21, the renderer) is imported inside main(): --help stays instant.

import argparse
import json
import os
import sys


def check_inputs(args: argparse.Namespace) -> None:
  """Before any work: counts and lengths positive, --out and --cache-dir folders that can be created, the
  renderer available; raises the one-line errors cli.checked prints."""
  from musilingo_jax.data import render
  from musilingo_jax.main import cli
  for flag in ("num_train_pieces", "num_test_pieces", "clips_per_piece", "clip_seconds"):
    if getattr(args, flag) <= 0:
      raise cli.InputError(f"--{flag.replace('_', '-')} {getattr(args, flag)}: must be positive")
  for flag, path in (("--out", args.out), ("--cache-dir", None if args.no_cache else args.cache_dir)):
    if path and os.path.exists(path) and not os.path.isdir(path):
      raise cli.InputError(f"{flag} {path}: exists and is not a folder")
  cli.storage_checks(write={"--out": args.out, "--cache-dir": None if args.no_cache else args.cache_dir})
  try:
    render.resolve_renderer(args.renderer)
  except (RuntimeError, ValueError) as e:
    raise cli.InputError(f"--renderer {args.renderer}: {e}") from None


def main(argv=None) -> int:
  from musilingo_jax.data import demo
  from musilingo_jax.main import cli
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--out", required=True, help="output folder (audio/, train.json, test.json, meta.json)")
  p.add_argument("--num-train-pieces", type=int, default=40)
  p.add_argument("--num-test-pieces", type=int, default=10)
  p.add_argument("--clips-per-piece", type=int, default=6)
  p.add_argument("--clip-seconds", type=float, default=10.0)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--renderer", choices=("auto", "fluidsynth", "numpy"), default="auto")
  p.add_argument("--workers", type=int, default=2)
  p.add_argument("--cache-dir", default=None, help=f"parsed-score cache (default {demo.default_cache_dir()})")
  p.add_argument("--no-cache", action="store_true", help="parse every score afresh")
  args = p.parse_args(argv)
  code, _ = cli.checked("make-demo-data", lambda: check_inputs(args))
  if code:
    return code
  meta = demo.build_demo_dataset(
      args.out, num_train_pieces=args.num_train_pieces, num_test_pieces=args.num_test_pieces,
      clips_per_piece=args.clips_per_piece, clip_seconds=args.clip_seconds, seed=args.seed,
      renderer=args.renderer, workers=args.workers,
      cache_dir=False if args.no_cache else (args.cache_dir or True))
  summary = {k: meta[k] for k in ("renderer", "soundfont", "counts", "composers", "build_seconds")}
  summary["skipped"] = [f"{s['piece']}: {s['reason']}" for s in meta["skipped"]]
  print(json.dumps(summary, indent=1))
  return 0


def run() -> None:
  """Console-script entry point (musilingo-make-demo-data)."""
  sys.exit(main())


if __name__ == "__main__":
  run()
