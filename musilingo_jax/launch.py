"""Multi-process start-up: one process per host (TPU pod) or per GPU/node (Slurm), or local processes.

TPU pods: `jax.distributed.initialize()` with no arguments finds the coordinator itself.
Slurm / GPUs: JAX reads SLURM_* variables; pass local device ids explicitly when each process should see
one GPU (else every process grabs every GPU on the node): JAX_LOCAL_DEVICE_IDS=0 (comma list).
Anywhere: JAX_COORDINATOR_ADDRESS=host:port, JAX_NUM_PROCESSES=N, JAX_PROCESS_ID=i.
"""

from __future__ import annotations

import os


def _detected() -> bool:
  env = os.environ
  return bool(env.get("JAX_COORDINATOR_ADDRESS") or env.get("TPU_WORKER_HOSTNAMES", "").count(",")
              or int(env.get("SLURM_NTASKS", "1")) > 1)


def maybe_initialize_distributed(force: bool | None = None) -> bool:
  """Calls jax.distributed.initialize() when asked, or when a multi-process launch is detected."""
  if force is False or (force is None and not _detected()):
    return False
  import jax
  kwargs = {}
  env = os.environ
  if env.get("JAX_COORDINATOR_ADDRESS"):
    kwargs = dict(coordinator_address=env["JAX_COORDINATOR_ADDRESS"],
                  num_processes=int(env["JAX_NUM_PROCESSES"]), process_id=int(env["JAX_PROCESS_ID"]))
  if env.get("JAX_LOCAL_DEVICE_IDS"):
    kwargs["local_device_ids"] = [int(i) for i in env["JAX_LOCAL_DEVICE_IDS"].split(",")]
  jax.distributed.initialize(**kwargs)
  return True
