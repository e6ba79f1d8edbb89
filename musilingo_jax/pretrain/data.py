"""The pretraining data: a Grain pipeline over the prepared target shards (pretrain/targets.py).

Each training row is a random crop of one clip: `crop_seconds` of audio starting at a multiple of the hop
(320 samples), so encoder frame t of the crop is frame f0 + t of the clip and its codes and CQT frames are
the clip's, sliced (targets.py). The crop's frame offset is drawn by Grain's `random_map` from
(config.seed, the row's index in the shuffled stream): a resumed run (the iterator's state is saved with the
checkpoint, as in the MusiLingo pipeline) sees the same crops. A clip shorter than the crop is zero-padded
(its `audio_len` and -1 codes mark the padding). Processes read their own rows of every global batch
(data.pipeline's `_ProcessRows`).

Batch (numpy, fixed shapes): audio [B, S] float32, audio_len [B] int32, codes [B, C, T] int32 (-1 = none),
cqt [B, T, bins] float32. Eval batches crop every validation clip from its start.
"""

from __future__ import annotations

from typing import Any

import grain
import jax
import numpy as np

from musilingo_jax.data import pipeline, records
from musilingo_jax.pretrain import targets as targets_lib


def crop_samples(seconds: float, encoder_cfg) -> int:
  """The crop length in samples: `seconds` rounded to whole hops, at least one frame's receptive field."""
  hop, field = targets_lib.frame_geometry(encoder_cfg)
  return max(field, int(round(seconds * targets_lib.SAMPLE_RATE / hop)) * hop)


class _Crop:
  """Record bytes (+ rng) -> one row: a hop-aligned crop with its targets (module docstring)."""

  def __init__(self, samples: int, encoder_cfg, n_codebooks: int, cqt_bins: int):
    self.samples, self.cfg = samples, encoder_cfg
    self.hop = targets_lib.frame_geometry(encoder_cfg)[0]
    self.frames = int(encoder_cfg.feature_lengths(samples))
    self.n_codebooks, self.cqt_bins = n_codebooks, cqt_bins

  def filler(self) -> dict:
    return {"audio": np.zeros(self.samples, np.float32), "audio_len": np.int32(0),
            "codes": np.full((self.n_codebooks, self.frames), -1, np.int32),
            "cqt": np.zeros((self.frames, self.cqt_bins), np.float32)}

  def __call__(self, raw: bytes, rng: np.random.Generator | None = None) -> dict:
    if raw == pipeline._END:  # past the end of the eval data: a row with nothing to predict
      return self.filler()
    rec = records.decode_record(raw)
    audio = records.dequantize_audio(rec["audio"])[:int(rec["audio_len"])]
    codes, cqt = np.asarray(rec["codes"], np.int32), np.asarray(rec["cqt"], np.float32)
    n, s, t = len(audio), self.samples, self.frames
    f0 = 0
    if n > s and rng is not None:
      f0 = int(rng.integers(0, (n - s) // self.hop + 1))
    a = audio[self.hop * f0:self.hop * f0 + s]
    row = self.filler()
    row["audio"][:len(a)] = a
    row["audio_len"] = np.int32(len(a))
    c = codes[:, f0:f0 + t]
    row["codes"][:, :c.shape[1]] = c
    q = cqt[f0:f0 + t]
    row["cqt"][:len(q)] = q
    return row


def _stack(rows) -> dict:
  return {k: np.stack([r[k] for r in rows]) for k in rows[0]}


class PretrainIterator:
  """Numpy batches with Grain's checkpointable state, checked on restore as the MusiLingo pipeline's is."""

  def __init__(self, it, *, process_index: int, process_count: int, batch_size: int):
    self._it = it
    self.process_index, self.process_count, self.batch_size = process_index, process_count, batch_size

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    return next(self._it)

  def get_state(self) -> dict[str, Any]:
    return {"grain": self._it.get_state(), "process_index": self.process_index,
            "process_count": self.process_count, "batch_size": self.batch_size}

  def set_state(self, state: dict[str, Any]) -> None:
    for key in ("process_count", "process_index", "batch_size"):
      if state.get(key) != getattr(self, key):
        raise ValueError(f"data iterator state was saved with {key}={state.get(key)}, this run has "
                         f"{getattr(self, key)}: resume with the same processes and batch size")
    self._it.set_state(state["grain"])


class PretrainData:
  """The trainer's data interface (train_iterator, get/set_train_state, eval_batches) for pretraining."""

  def __init__(self, c, targets_dir: str, encoder_cfg):
    self.c = c
    self.meta = targets_lib.read_meta(targets_dir)
    self.train_files = records.shard_files(targets_dir, targets_lib.TRAIN)
    self.eval_files = records.shard_files(targets_dir, targets_lib.VALID)
    if not self.train_files:
      raise ValueError(f"config.pretrain.targets_dir = {targets_dir!r}: no {targets_lib.TRAIN} shards")
    self.rows_per_process = pipeline.rows_per_process(c.train.batch_size, c.train.accum_steps, jax.process_count())
    self.samples = crop_samples(float(c.pretrain.crop_seconds), encoder_cfg)
    self.crop = _Crop(self.samples, encoder_cfg, len(self.meta["features"]), int(self.meta["cqt_bins"]))

  @property
  def frames(self) -> int:
    return self.crop.frames

  def _make(self, files, *, train: bool, batch_size: int) -> PretrainIterator:
    p, n_proc = jax.process_index(), jax.process_count()
    ds = grain.MapDataset.source(pipeline.array_record_source(files))
    if train:
      ds = ds.shuffle(seed=self.c.seed).repeat(None)
    ds = pipeline._ProcessRows(ds, batch_size, p, n_proc, drop_remainder=train)
    ds = ds.random_map(self.crop, seed=self.c.seed) if train else ds.map(self.crop)
    ds = ds.batch(batch_size, drop_remainder=train, batch_fn=_stack)
    read = grain.ReadOptions(num_threads=2, prefetch_buffer_size=4)
    return PretrainIterator(iter(ds.to_iter_dataset(read)), process_index=p, process_count=n_proc,
                            batch_size=batch_size)

  def train_iterator(self) -> PretrainIterator:
    return self._make(self.train_files, train=True, batch_size=self.rows_per_process)

  def get_train_state(self, it: PretrainIterator) -> dict:
    return it.get_state()

  def set_train_state(self, it: PretrainIterator, state: dict) -> None:
    it.set_state(state)

  def eval_batches(self, n: int) -> list[dict]:
    if not self.eval_files:
      return []
    b = max(1, self.c.train.batch_size // jax.process_count())
    out = []
    for batch in self._make(self.eval_files, train=False, batch_size=b):
      out.append(batch)
      if len(out) >= n:
        break
    return out
