"""A run's logs, in a local or gs:// workdir: `metrics.jsonl`, TensorBoard events, optional Weights & Biases.

Written by process 0 only (`MetricsWriter` is a no-op elsewhere). What survives a `kill -9`: everything up to
the last `flush()`, which the trainer calls after each step that logged (train metrics or an eval).

- `metrics.jsonl`, one JSON object a line (`{"step", "split", <metrics>}`). Local: appended and flushed per
  line. On an object store (gs://) an object cannot be appended to, so the file is kept in memory (seeded
  with what the bucket already holds, when resuming) and uploaded whole at each flush: a single-object upload
  replaces the object atomically, so the bucket always holds one complete file up to the last log, read back
  with one command (`gcloud storage cat gs://.../metrics.jsonl`). A resumed run appends after what is there
  (steps between the last checkpoint and the kill appear twice; the later row is the resumed run's).
- TensorBoard: tensorboardX writes event files into `WORKDIR/tb`. For a gs:// workdir it writes them into a
  local temporary folder and each flush uploads the current event file to `WORKDIR/tb/<same name>` through
  our one storage client (gcsfs, via etils.epath): no second client library (tensorboardX's own gs:// writer
  needs google-cloud-storage), and the bucket's copy is complete up to the last log rather than up to
  tensorboardX's 120 s flush timer. A file that passes `TB_ROTATE_BYTES` is closed and a new one started
  (TensorBoard reads every event file in the folder), so each upload stays small however long the run.
  `tensorboard --logdir gs://...` reads them where TensorBoard has GCS access.
- Weights & Biases (`config.log.wandb_project`, off by default): `wandb` is imported only when enabled. The
  run id is kept in `WORKDIR/wandb_run_id`, so a resumed run continues the same W&B run. `wandb_mode`
  "offline" writes only locally (under $WANDB_DIR, or the current directory).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import uuid
from typing import Any

from etils import epath

from musilingo_jax import storage

log = logging.getLogger("musilingo_jax")

TB_ROTATE_BYTES = 8 << 20


class JsonlLog:
  """`metrics.jsonl`: appended locally, uploaded whole at each flush on gs:// (module docstring)."""

  def __init__(self, path: epath.Path):
    self.path = path
    self.remote = storage.is_remote(os.fspath(path))
    self._dirty = False
    if self.remote:
      self._text = path.read_text() if path.exists() else ""
      if self._text and not self._text.endswith("\n"):
        self._text += "\n"
      self._f = None
    else:
      self._f = open(os.fspath(path), "a")

  def write(self, row: dict) -> None:
    line = json.dumps(row) + "\n"
    if self.remote:
      self._text += line
      self._dirty = True
    else:
      self._f.write(line)

  def flush(self) -> None:
    if self.remote:
      if self._dirty:
        self.path.write_text(self._text)  # one object upload: atomic on GCS
        self._dirty = False
    else:
      self._f.flush()

  def close(self) -> None:
    self.flush()
    if self._f is not None:
      self._f.close()


class TensorBoard:
  """tensorboardX event files in `logdir`; for a gs:// `logdir`, written locally and uploaded at each flush."""

  def __init__(self, logdir: epath.Path):
    from tensorboardX import SummaryWriter
    self._writer_cls = SummaryWriter
    self.logdir = logdir
    self.remote = storage.is_remote(os.fspath(logdir))
    self._local = tempfile.mkdtemp(prefix="musilingo-tb-") if self.remote else os.fspath(logdir)
    self._uploaded: dict[str, int] = {}
    self._open()

  def _open(self) -> None:
    # The pid and a random tag keep event file names unique across restarts within the same second.
    self.tb = self._writer_cls(self._local, filename_suffix=f".{os.getpid()}.{uuid.uuid4().hex[:6]}")

  def add_scalar(self, tag: str, value: float, step: int) -> None:
    self.tb.add_scalar(tag, value, step)

  def _upload(self) -> None:
    for name in sorted(os.listdir(self._local)):
      local = os.path.join(self._local, name)
      size = os.path.getsize(local)
      if self._uploaded.get(name) != size:
        with open(local, "rb") as f:
          (self.logdir / name).write_bytes(f.read())  # one object upload: atomic on GCS
        self._uploaded[name] = size

  def flush(self) -> None:
    self.tb.flush()
    if not self.remote:
      return
    self._upload()
    if any(os.path.getsize(os.path.join(self._local, n)) >= TB_ROTATE_BYTES for n in os.listdir(self._local)):
      self.tb.close()  # this file is complete in the bucket: start a new one, drop the local copy
      self._upload()
      for name in os.listdir(self._local):
        os.remove(os.path.join(self._local, name))
      self._open()

  def close(self) -> None:
    self.tb.close()
    if self.remote:
      self._upload()
      shutil.rmtree(self._local, ignore_errors=True)


class WandB:
  """One W&B run per workdir (resumed with it); `wandb` imported here only."""

  def __init__(self, c, workdir: epath.Path):
    import wandb  # only when config.log.wandb_project is set
    id_file = workdir / "wandb_run_id"
    run_id = id_file.read_text().strip() if id_file.exists() else ""
    if not run_id:
      run_id = uuid.uuid4().hex[:12]
      id_file.write_text(run_id + "\n")
    mode = c.log.get("wandb_mode", "") or None
    self.run = wandb.init(project=c.log.wandb_project, entity=c.log.get("wandb_entity", "") or None,
                          mode=mode, id=run_id, resume="allow", name=c.log.get("wandb_name", "") or None,
                          config=json.loads(c.to_json_best_effort()), notes=f"workdir: {os.fspath(workdir)}")

  def log(self, step: int, metrics: dict[str, float]) -> None:
    self.run.log(metrics, step=step)

  def close(self) -> None:
    self.run.finish()


class MetricsWriter:
  """TensorBoard events + `metrics.jsonl` (+ W&B when configured), written by process 0 only."""

  def __init__(self, workdir: epath.Path | str, c=None, *, enabled: bool | None = None):
    import jax
    self.enabled = jax.process_index() == 0 if enabled is None else enabled
    if not self.enabled:
      return
    workdir = storage.path(workdir)
    self.tb = TensorBoard(workdir / "tb")
    self.jsonl = JsonlLog(workdir / "metrics.jsonl")
    self.wandb = None
    if c is not None and c.get("log") is not None and c.log.get("wandb_project", ""):
      self.wandb = WandB(c, workdir)
    self._pending: dict[int, dict[str, Any]] = {}

  def write(self, step: int, metrics: dict[str, float], prefix: str = "train") -> None:
    if not self.enabled:
      return
    for k, v in metrics.items():
      self.tb.add_scalar(f"{prefix}/{k}", v, step)
    self.jsonl.write({"step": step, "split": prefix, **metrics})
    if self.wandb is not None:  # one W&B row per step (train and eval together), sent at flush
      self._pending.setdefault(step, {}).update({f"{prefix}/{k}": v for k, v in metrics.items()})

  def flush(self) -> None:
    """Makes everything written so far durable (local files flushed; gs:// objects uploaded)."""
    if not self.enabled:
      return
    self.jsonl.flush()
    self.tb.flush()
    if self.wandb is not None:
      for step in sorted(self._pending):
        self.wandb.log(step, self._pending[step])
      self._pending.clear()

  def close(self) -> None:
    if not self.enabled:
      return
    self.flush()
    self.jsonl.close()
    self.tb.close()
    if self.wandb is not None:
      self.wandb.close()
