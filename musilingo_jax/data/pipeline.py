"""Grain input pipeline: precomputed ArrayRecord shards -> numpy batches in the DESIGN.md format.

  ArrayRecordDataSource -> MapDataset.source -> shuffle(seed) -> repeat(num_epochs)
    -> this process's rows of every global batch -> decode + prompts.encode_example -> batch(prompts.collate)
    -> to_iter_dataset (thread prefetch; or worker processes with worker_count > 0)

Global batch = batch_size * process_count records; process p takes rows [p*B, (p+1)*B) of each, so the
union over processes is exactly the single-process global batch. Every process yields the same number of
batches of the same shape (multi-host steps stay in lockstep):
  * a bad record (corrupt bytes, empty answer, text that does not fit `max_len`) keeps its row as a
    filler row (`valid` 0, no labels) and is counted by reason in `it.skipped`;
  * with `drop_remainder=False` the last global batch is filled up with filler rows (end of data).
Audio is zero-padded (or cut) to a fixed `audio_samples`; features to `n_audio_tokens` frames.

Layout note: `prompts.collate` runs on each process's own rows. With layout="packed" the union over
processes equals the single-process global batch array for array; with layout="reference" the rows are the
same but the middle padding follows the longest prompt of each process's batch, as the reference's per-GPU
collater does.

The iterator's state (`get_state(it)`) is Grain's plus the process index/count and the skip counts; a
restore with a different process count is refused (the per-process slices would not line up).
"""

from __future__ import annotations

import collections
import glob
import json
import os
import sys
from pathlib import Path
from typing import Any, Sequence

import grain
import numpy as np

from musilingo_jax import prompts
from musilingo_jax.data import records

SKIP_REASONS = ("corrupt_record", "empty_answer", "over_long_text")
_END = b""  # marks a row past the end of the data (never a valid record)


def resolve_files(files: str | os.PathLike | Sequence[str | os.PathLike]) -> list[str]:
  """A glob pattern, a directory (all its *.array_record), one file, or a list of files -> sorted paths."""
  if isinstance(files, (str, os.PathLike)):
    f = os.fspath(files)
    if os.path.isdir(f):
      out = sorted(glob.glob(os.path.join(f, "*.array_record")))
    elif any(c in f for c in "*?["):
      out = sorted(glob.glob(f))
    else:
      out = [f]
  else:
    out = sorted(os.fspath(x) for x in files)
  if not out:
    raise FileNotFoundError(f"no ArrayRecord files match {files!r}")
  missing = [f for f in out if not os.path.isfile(f)]
  if missing:
    raise FileNotFoundError(f"ArrayRecord files not found: {missing[:5]}")
  return out


def _reported_audio_samples(files: Sequence[str]) -> int | None:
  """max_audio_samples from the precompute reports beside the shards ({split}-report.json)."""
  best = None
  for key in sorted({(os.path.dirname(f), os.path.basename(f).rsplit("-", 3)[0]) for f in files}):
    path = Path(key[0]) / f"{key[1]}-report.json"
    if path.is_file():
      value = json.loads(path.read_text()).get("max_audio_samples")
      best = value if best is None else max(best, value)
  return best


def _fit(x: np.ndarray, n: int) -> np.ndarray:
  """Zero-pad or cut the leading axis to n."""
  if len(x) >= n:
    return x[:n]
  return np.concatenate([x, np.zeros((n - len(x),) + x.shape[1:], x.dtype)])


class _ProcessRows(grain.MapDataset):
  """Rows [p*B, (p+1)*B) of every global batch of G = B * P records; indices past the end give `_END`."""

  def __init__(self, parent: grain.MapDataset, batch_size: int, process_index: int, process_count: int,
               drop_remainder: bool):
    super().__init__(parent)
    self._b, self._p, self._g = batch_size, process_index, batch_size * process_count
    n = len(parent)
    n_global = n // self._g if drop_remainder or n == sys.maxsize else -(-n // self._g)
    self._n, self._len = n, n_global * batch_size

  def __len__(self) -> int:
    return self._len

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.slice(index)
    step, row = divmod(index, self._b)
    g = step * self._g + self._p * self._b + row
    return self._parent[g] if g < self._n else _END

  def __str__(self) -> str:
    return f"_ProcessRows(B={self._b}, p={self._p}, G={self._g})"


class _Prepare:
  """Record bytes -> the example dict `prompts.collate` takes (or a filler row with a skip reason)."""

  def __init__(self, tokenizer, prompt_cfg, *, n_audio_tokens, max_len, audio_samples, use_features,
               feature_dim, normalize_audio):
    self.tok, self.cfg = tokenizer, prompt_cfg
    self.n_audio, self.max_len, self.samples = n_audio_tokens, max_len, audio_samples
    self.use_features, self.feature_dim, self.normalize = use_features, feature_dim, normalize_audio

  def filler(self, reason: str | None) -> dict:
    empty = np.zeros((0,), np.int32)
    ex = {"before": empty, "after": empty, "answer": empty, "valid": 0, "_skip": reason,
          "audio_len": np.int32(0)}
    if self.use_features:
      ex["features"] = np.zeros((self.n_audio, self.feature_dim), np.float32)
    else:
      ex["audio"] = np.zeros((self.samples,), np.float32)
    return ex

  def __call__(self, raw: bytes) -> dict:
    if raw == _END:
      return self.filler(None)
    try:
      rec = records.decode_record(raw)
    except Exception:  # noqa: BLE001 - counted, never fatal
      return self.filler("corrupt_record")
    answer = rec.get("answer") or ""
    if not answer.strip():
      return self.filler("empty_answer")
    question = rec.get("question")
    if self.cfg.template and question is None:
      raise ValueError(f"record {rec.get('id')!r} ({rec.get('dataset')}) has no question, but the prompt "
                       "config uses the instruction template: use PromptConfig(template=False) for captions")
    ex = prompts.encode_example(self.tok, question, answer, self.cfg)
    if 1 + len(ex["before"]) + self.n_audio + len(ex["after"]) + len(ex["answer"]) > self.max_len:
      return self.filler("over_long_text")
    n = int(rec.get("audio_len", 0))
    if self.use_features:
      if "features" not in rec:
        raise ValueError(f"record {rec.get('id')!r} has no features: precompute with --encoder/--features")
      ex["features"] = _fit(np.asarray(rec["features"], np.float32), self.n_audio)
    else:
      if "audio" not in rec:
        raise ValueError(f"record {rec.get('id')!r} has no audio (precomputed with --features only): "
                         "use use_features=True")
      stored = rec["audio"]
      m = min(len(stored), self.samples)
      audio = np.zeros((self.samples,), np.float32)  # one pass: cast into the padded row, then scale
      audio[:m] = stored[:m]
      if stored.dtype == np.int16:
        audio[:m] *= np.float32(1 / 32767)
      n = min(n, self.samples)
      if self.normalize and n:
        # Wav2Vec2FeatureExtractor(do_normalize=True) on the clip alone: zero mean, unit variance.
        x = audio[:n]
        audio = np.zeros_like(audio)
        audio[:n] = (x - x.mean()) / np.sqrt(x.var() + 1e-7)
      ex["audio"] = audio
    ex["audio_len"] = np.int32(n)
    ex["valid"] = 1
    ex["_skip"] = None
    return ex


class _Collate:
  def __init__(self, tokenizer, *, n_audio_tokens, max_len, layout, filler):
    self.kw = dict(n_audio_tokens=n_audio_tokens, max_len=max_len, bos_id=tokenizer.bos_id,
                   pad_id=tokenizer.pad_id, layout=layout)
    self.filler = filler

  def __call__(self, examples: Sequence[dict]) -> dict:
    examples = list(examples)
    if self.kw["layout"] == "reference":
      # Middle padding to the batch's longest segments can push a row past max_len: that row is skipped.
      lb = max(len(e["before"]) for e in examples)
      la = max(len(e["after"]) for e in examples)
      fixed = 1 + lb + self.kw["n_audio_tokens"] + la
      examples = [self.filler("over_long_text") if e["valid"] and fixed + len(e["answer"]) > self.kw["max_len"]
                  else e for e in examples]
    reasons = tuple(e["_skip"] for e in examples if e["_skip"])
    batch = prompts.collate([{k: v for k, v in e.items() if k != "_skip"} for e in examples], **self.kw)
    batch["_skipped"] = reasons
    return batch


class BatchIterator:
  """Iterator of numpy batches with Grain's checkpointable state and skip counts (`skipped`)."""

  def __init__(self, grain_iter, *, process_index: int, process_count: int, batch_size: int):
    self._it = grain_iter
    self.process_index, self.process_count, self.batch_size = process_index, process_count, batch_size
    self.skipped: collections.Counter = collections.Counter()
    self.batches = 0

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    batch = next(self._it)
    self.skipped.update(batch.pop("_skipped"))
    self.batches += 1
    return batch

  def get_state(self) -> dict[str, Any]:
    return {"grain": self._it.get_state(), "process_index": self.process_index,
            "process_count": self.process_count, "batch_size": self.batch_size, "batches": self.batches,
            "skipped": dict(self.skipped)}

  def set_state(self, state: dict[str, Any]) -> None:
    if state.get("process_count") != self.process_count:
      raise ValueError(
          f"data iterator state was saved with process_count={state.get('process_count')}, this run has "
          f"{self.process_count}: each process's slice of the global batch would differ. Restart the data "
          "at a step boundary (fresh iterator with a new seed) or resume with the same process count.")
    if state.get("process_index") != self.process_index:
      raise ValueError(f"data iterator state belongs to process {state.get('process_index')}, "
                       f"not {self.process_index}: save and restore the state per process")
    if state.get("batch_size") != self.batch_size:
      raise ValueError(f"data iterator state was saved with batch_size={state.get('batch_size')}, "
                       f"this run has {self.batch_size}")
    self._it.set_state(state["grain"])
    self.batches = int(state.get("batches", 0))
    self.skipped = collections.Counter(state.get("skipped", {}))


def get_state(it: BatchIterator) -> dict[str, Any]:
  """JSON-serializable iterator state (save it per process with the checkpoint)."""
  return it.get_state()


def set_state(it: BatchIterator, state: dict[str, Any]) -> None:
  it.set_state(state)


def make_dataset(files, *, tokenizer, prompt_cfg: prompts.PromptConfig, batch_size: int, seed: int = 0,
                 shuffle: bool = True, num_epochs: int | None = None, n_audio_tokens: int, max_len: int,
                 layout: str = "reference", use_features: bool = False, drop_remainder: bool = True,
                 process_index: int | None = None, process_count: int | None = None, worker_count: int = 0,
                 num_threads: int = 2, prefetch: int = 4, audio_samples: int | None = None,
                 normalize_audio: bool = False) -> BatchIterator:
  """Batches of `batch_size` rows (per process) for this process. See the module docstring.

  files: shard paths, a directory or a glob. num_epochs None repeats forever. audio_samples: fixed S of
  `audio` (default: max_audio_samples from the precompute report beside the shards). worker_count > 0 runs
  decode in Grain worker processes (the tokenizer must pickle; each costs ~3 s to start), else threads.
  normalize_audio: per-clip zero-mean/unit-variance (a MERT processor with do_normalize=True).
  """
  if process_index is None or process_count is None:
    import jax
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index {process_index} not in [0, {process_count})")
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}")
  paths = resolve_files(files)
  source = grain.sources.ArrayRecordDataSource(paths)
  if len(source) == 0:
    raise ValueError(f"no records in {paths}")
  first = None
  for i in range(min(len(source), 64)):  # the first decodable record tells what the shards hold
    try:
      first = records.decode_record(source[i])
      break
    except Exception:  # noqa: BLE001 - a corrupt record is counted later, not fatal here
      continue
  if first is None:
    raise ValueError(f"none of the first {min(len(source), 64)} records of {paths[0]} decodes as a record")
  feature_dim = 0
  if use_features:
    if "features" not in first:
      raise ValueError(f"{paths[0]} holds no encoder features: precompute with --encoder and --features")
    feature_dim = int(first["features"].shape[-1])
  else:
    if "audio" not in first:
      raise ValueError(f"{paths[0]} holds features only: use use_features=True")
    if audio_samples is None:
      audio_samples = _reported_audio_samples(paths)
    if audio_samples is None:
      raise ValueError("audio_samples not given and no precompute report ({split}-report.json) beside "
                       f"{paths[0]} says max_audio_samples")

  ds = grain.MapDataset.source(source)
  if shuffle:
    ds = ds.shuffle(seed=seed)
  ds = ds.repeat(num_epochs)
  ds = _ProcessRows(ds, batch_size, process_index, process_count, drop_remainder)
  prepare = _Prepare(tokenizer, prompt_cfg, n_audio_tokens=n_audio_tokens, max_len=max_len,
                     audio_samples=audio_samples, use_features=use_features, feature_dim=feature_dim,
                     normalize_audio=normalize_audio)
  ds = ds.map(prepare)
  ds = ds.batch(batch_size, drop_remainder=True,
                batch_fn=_Collate(tokenizer, n_audio_tokens=n_audio_tokens, max_len=max_len, layout=layout,
                                  filler=prepare.filler))
  it_ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=max(1, num_threads), prefetch_buffer_size=prefetch))
  if worker_count > 0:
    from absl import flags
    if not flags.FLAGS.is_parsed():  # Grain's workers read absl flags; outside absl.app nothing parsed them
      flags.FLAGS.mark_as_parsed()
    it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))
  return BatchIterator(iter(it_ds), process_index=process_index, process_count=process_count,
                       batch_size=batch_size)
