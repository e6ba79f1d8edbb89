"""Train MusiLingo: `musilingo-train --config configs/finetune.py:demo [--workdir DIR] [--config.x=y]`
(or `python scripts/train.py ...`).

--workdir may be a local directory or a gs:// URL (config.json, metrics.jsonl, tb/, checkpoints/ all go
there). Re-run the same command to resume from the latest checkpoint in --workdir that restores (a newer,
damaged one is set aside with a warning). On a Cloud TPU pod run the
same command on every host (`gcloud compute tpus tpu-vm ssh ... --worker=all --command=...`);
`jax.distributed.initialize()` is called when more than one process is detected (or --multihost).

--config is a config file with a `:preset` (configs/finetune.py, configs/lora.py, configs/pretrain.py; their
presets live in musilingo_jax/configs/).
"""

# jax and the trainer are imported inside main(): --help stays instant.

import os
import sys

from absl import flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file with a :preset.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (checkpoints, logs). Default: runs/<preset>.")
_MULTIHOST = flags.DEFINE_bool("multihost", None, "Call jax.distributed.initialize() (default: auto-detect "
                               "a TPU pod / Slurm / JAX_COORDINATOR_ADDRESS).")


def _default_workdir() -> str:
  spec = flags.FLAGS["config"].config_filename if hasattr(flags.FLAGS["config"], "config_filename") else ""
  name = os.path.splitext(os.path.basename(spec.split(":")[0]))[0] if spec else "run"
  preset = spec.split(":", 1)[1] if ":" in spec else ""
  return os.path.join("runs", f"{name}-{preset}" if preset else name)


def main(argv):
  del argv
  from absl import logging as absl_logging
  if not flags.FLAGS["verbosity"].present:  # Orbax logs every save step at INFO; -v 0 brings it back
    absl_logging.set_verbosity(absl_logging.WARNING)
  from musilingo_jax import launch
  launch.maybe_initialize_distributed(_MULTIHOST.value)
  from musilingo_jax import checkpoint, config as cfglib, demo_report, storage, trainer
  c = _CONFIG.value
  workdir = _WORKDIR.value or _default_workdir()
  try:
    summary = trainer.run(c, workdir)
  except (cfglib.ConfigError, storage.StorageError, checkpoint.CheckpointError, trainer.NonFiniteLoss) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  if c.data.dataset == "demo" and not summary["preempted"]:
    demo_report.report(c, workdir, summary, limit=c.eval.demo_questions)


def run() -> None:
  """Console-script entry point (musilingo-train)."""
  from musilingo_jax.main import cli
  cli.absl_run(__name__, __doc__, main)


if __name__ == "__main__":
  run()
