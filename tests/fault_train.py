"""scripts/train.py's command line with a fault injected through trainer hooks (used by the tests).

  python tests/fault_train.py --nan-at-step N  <train.py flags...>   # NaN audio inputs at step N
  python tests/fault_train.py --kill-at-step N <train.py flags...>   # SIGKILL itself after step N
"""

import argparse
import os
import runpy
import signal
import sys
from pathlib import Path

import numpy as np

from musilingo_jax import trainer


class NaNInputsAt(trainer.Hook):
  """Step `at`'s audio inputs (features or raw audio) become NaN: the loss is non-finite at that step."""

  def __init__(self, at: int):
    self.at = at

  def on_batch(self, step, batch):
    if step != self.at:
      return batch
    return {k: (v * np.nan if k in ("features", "audio") else v) for k, v in batch.items()}


class KillAfter(trainer.Hook):
  """SIGKILL after step `at` (its checkpoint save may still be in flight, as in a real crash)."""

  def __init__(self, at: int):
    self.at = at

  def after_step(self, step):
    if step == self.at:
      os.kill(os.getpid(), signal.SIGKILL)


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--nan-at-step", type=int)
  p.add_argument("--kill-at-step", type=int)
  args, rest = p.parse_known_args()
  if args.nan_at_step is not None:
    trainer.HOOKS.append(NaNInputsAt(args.nan_at_step))
  if args.kill_at_step is not None:
    trainer.HOOKS.append(KillAfter(args.kill_at_step))
  script = Path(__file__).resolve().parents[1] / "scripts" / "train.py"
  sys.argv = [str(script)] + rest
  runpy.run_path(str(script), run_name="__main__")


if __name__ == "__main__":
  main()
