"""Command-line pieces the scripts share (no heavy imports: `--help` stays instant)."""

from __future__ import annotations

import argparse


def add_model_source(p: argparse.ArgumentParser) -> None:
  """--workdir | --checkpoint [--projection]: where a trained model comes from (build.load_for_inference)."""
  src = p.add_mutually_exclusive_group(required=True)
  src.add_argument("--workdir", help="a training run's directory (config + latest checkpoint)")
  src.add_argument("--checkpoint", help="a converted checkpoint directory (scripts/convert_hf.py)")
  p.add_argument("--projection", help="with --checkpoint: projection weights (ours, or a released MusiLingo .pth)")


def add_sampling(p: argparse.ArgumentParser, *, greedy_help: str = "argmax decoding instead of sampling") -> None:
  """The reference's sampling settings as defaults (SPEC.md section 4)."""
  p.add_argument("--greedy", action="store_true", help=greedy_help)
  p.add_argument("--max-new-tokens", type=int, default=300)
  p.add_argument("--temperature", type=float, default=0.1)
  p.add_argument("--top-p", type=float, default=0.5)
  p.add_argument("--seed", type=int, default=0)


def check_model_source(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
  if args.projection and not args.checkpoint:
    p.error("--projection goes with --checkpoint")
