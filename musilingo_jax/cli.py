"""Command-line pieces the scripts share (no heavy imports: `--help` stays instant)."""

from __future__ import annotations

import argparse


DTYPES = ("bfloat16", "float32")
DTYPE_HELP = ("dtype of the frozen encoder and LLM weights and of their compute (default %(default)s; float32 "
              "takes twice the memory); the projection and LoRA adapters stay float32. The frozen weights are "
              "split over all local devices (FSDP); the memory they take is printed at load")


def add_model_source(p: argparse.ArgumentParser, *, dtypes: tuple[str, ...] = DTYPES,
                     dtype_help: str = DTYPE_HELP) -> None:
  """--workdir | --checkpoint [--projection] [--dtype]: where a trained model comes from and the dtype its
  frozen parts load in (build.load_for_inference)."""
  src = p.add_mutually_exclusive_group(required=True)
  src.add_argument("--workdir", help="a training run's directory (config + latest checkpoint)")
  src.add_argument("--checkpoint", help="a converted checkpoint directory (scripts/convert_hf.py)")
  p.add_argument("--projection", help="with --checkpoint: projection weights (ours, or a released MusiLingo .pth)")
  p.add_argument("--dtype", choices=dtypes, default="bfloat16", help=dtype_help)


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
