"""MERT-style self-supervised pretraining of the encoder:
`musilingo-pretrain-encoder --config configs/mert_pretrain.py:demo [--workdir DIR] [--config.x=y]`
(or `python scripts/pretrain_encoder.py ...`).

The clips' targets (k-means codes of log-mel / MFCC / chroma frames, log-CQT frames) are prepared on first
use, then `trainer.run` trains the encoder and its heads with the same loop, checkpoints, exact resume,
metrics, sharding and preemption handling as musilingo-train (re-run the same command to resume). At the end
the encoder is written to WORKDIR/encoder (a converted directory: `--config.model.encoder_init=WORKDIR/encoder`
of musilingo-train uses it, as does `scripts/precompute.py --encoder`), WORKDIR/encoder_hf (a transformers
HubertModel directory, config.pretrain.export_hf) and WORKDIR/probe.json (the eval rows: step, minutes
trained, loss terms, linear-probe accuracies). docs/pretraining.md says what is computed.
"""

# jax and the trainer are imported inside main(): --help stays instant.

import json
import os
import sys

from absl import flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file with a :preset.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (checkpoints, logs, the encoder). "
                               "Default: runs/mert_pretrain-<preset>.")
_MULTIHOST = flags.DEFINE_bool("multihost", None, "Call jax.distributed.initialize() (default: auto-detect).")


def main(argv):
  del argv
  from absl import logging as absl_logging
  if not flags.FLAGS["verbosity"].present:
    absl_logging.set_verbosity(absl_logging.WARNING)
  from musilingo_jax import launch
  launch.maybe_initialize_distributed(_MULTIHOST.value)
  import jax
  from musilingo_jax import checkpoint, config as cfglib, storage, trainer
  from musilingo_jax.pretrain import demo as demo_lib
  from musilingo_jax.pretrain import experiment as pexp
  c = _CONFIG.value
  if c.get("task", "musilingo") != "mert_pretrain":
    print(f"error: config.task = {c.get('task', 'musilingo')!r}: this program pretrains the encoder "
          "(configs/mert_pretrain.py); musilingo-train trains MusiLingo", file=sys.stderr)
    sys.exit(2)
  spec = flags.FLAGS["config"].config_filename if hasattr(flags.FLAGS["config"], "config_filename") else ""
  preset = spec.split(":", 1)[1] if ":" in spec else "demo"
  workdir = _WORKDIR.value or os.path.join("runs", f"mert_pretrain-{preset}")
  try:
    summary = trainer.run(c, workdir)
  except (cfglib.ConfigError, storage.StorageError, checkpoint.CheckpointError, trainer.NonFiniteLoss) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  if summary["preempted"] or jax.process_index() != 0:
    return
  out = storage.path(workdir)
  encoder = summary["model"].encoder
  curve = pexp.probe_curve(out)
  pexp.save_encoder(encoder, out / demo_lib.ENCODER_DIR,
                    source={"pretraining": {"workdir": os.fspath(out), "step": summary["step"]}})
  if c.pretrain.export_hf:
    pexp.export_hf(encoder, out / demo_lib.ENCODER_HF_DIR)
  record = {"curve": curve, "steps": summary["step"]}
  if c.pretrain.probe:
    from musilingo_jax.pretrain.probe import ProbeSet
    probe_set = demo_lib.qa_set_dir(c.pretrain.demo_set)
    record.update(probe_set=os.fspath(probe_set), probe_seconds=float(c.pretrain.probe_seconds),
                  majority=ProbeSet(probe_set, seconds=float(c.pretrain.probe_seconds)).majority())
  storage.write_atomic(out / demo_lib.PROBE_FILE, json.dumps(record, indent=1))
  print(f"pretrained encoder: {os.fspath(out / demo_lib.ENCODER_DIR)}"
        + (f" (HubertModel: {os.fspath(out / demo_lib.ENCODER_HF_DIR)})" if c.pretrain.export_hf else ""), flush=True)
  if curve and any(k.startswith("probe_") for k in curve[-1]):
    first, last = curve[0], curve[-1]
    tasks = [k for k in last if k.startswith("probe_")]
    print("linear probe (test clips): " + ", ".join(
        f"{k[6:]} {first.get(k, float('nan')):.2f} -> {last[k]:.2f}" for k in tasks)
          + f" (step {first['step']} -> {last['step']}, {last.get('train_minutes', 0):.1f} min trained)", flush=True)


def run() -> None:
  """Console-script entry point (musilingo-pretrain-encoder)."""
  from musilingo_jax.main import cli
  cli.absl_run(__name__, __doc__, main)


if __name__ == "__main__":
  run()
