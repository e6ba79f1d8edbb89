"""Train MusiLingo: `python scripts/train.py --config configs/finetune.py:demo [--workdir DIR] [--config.x=y]`.

Re-run the same command to resume from the latest checkpoint in --workdir. On a Cloud TPU pod run the
same command on every host (`gcloud compute tpus tpu-vm ssh ... --worker=all --command=...`);
`jax.distributed.initialize()` is called when more than one process is detected (or --multihost).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

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
  from musilingo_jax import config as cfglib, demo_report, trainer
  c = _CONFIG.value
  workdir = _WORKDIR.value or _default_workdir()
  try:
    summary = trainer.run(c, workdir)
  except (cfglib.ConfigError, trainer.NonFiniteLoss) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  if c.data.dataset == "demo" and not summary["preempted"]:
    demo_report.report(c, workdir, summary, limit=c.eval.demo_questions)


if __name__ == "__main__":
  flags.mark_flag_as_required("config")
  app.run(main)
