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
Audio is zero-padded to a fixed `audio_samples`, features to `audio_slots` rows (static shapes; never cut:
a longer clip is an error). Each row says how many audio tokens it attends (`audio_tokens`).
A batch of `accum_steps` micro-batches lays out each micro-batch on its own (`_Collate`).

Layout note: `prompts.collate` runs on each process's own rows. With layout="packed" the union over
processes equals the single-process global batch array for array; with layout="reference" the rows are the
same but the middle padding follows the longest prompt of each process's batch, as the reference's per-GPU
collater does.

The iterator's state (`get_state(it)`) is Grain's plus the process index/count and the skip counts; a
restore with a different process count is refused (the per-process slices would not line up).

Shards in a bucket (gs://): ArrayRecord reads local files only, so `StagedArrayRecordSource` stages each
shard into this host's local cache (`storage.stage`: $MUSILINGO_STAGING_DIR, keyed by URL, size and mtime,
copied under a temporary name and renamed) the first time this process reads a record of it. Lengths come
from the shards' sidecars (`written`), so nothing is downloaded up front: each host downloads only the
shards its rows fall in, once (a restart finds them in the cache). docs/DESIGN.md, "Paths: local or gs://".
"""

from __future__ import annotations

import bisect
import collections
import copy
import json
import os
import sys
import threading
from typing import Any, Sequence

import grain
import numpy as np

from musilingo_jax import prompts, storage
from musilingo_jax.data import audio as audio_lib
from musilingo_jax.data import records

SKIP_REASONS = ("corrupt_record", "empty_answer", "over_long_text")
_END = b""  # marks a row past the end of the data (never a valid record)


def _glob(pattern: str) -> list[str]:
  """Files matching a glob pattern (local or gs://; magic characters in the last component only when
  remote)."""
  if not storage.is_remote(pattern):
    import glob
    return glob.glob(pattern)
  parent, name = pattern.rsplit("/", 1)
  return [os.fspath(p) for p in storage.path(parent).glob(name)]


def resolve_files(files: str | os.PathLike | Sequence[str | os.PathLike]) -> list[str]:
  """A glob pattern, a directory (all its *.array_record), one file, or a list of files -> sorted paths
  (local paths or gs:// URLs)."""
  if isinstance(files, (str, os.PathLike)):
    f = os.fspath(files)
    if any(c in f for c in "*?["):
      out = sorted(_glob(f))
    elif storage.path(f).is_dir():
      out = sorted(os.fspath(p) for p in storage.path(f).glob("*.array_record"))
    else:
      out = [f]
  else:
    out = sorted(os.fspath(x) for x in files)
  if not out:
    raise FileNotFoundError(f"no ArrayRecord files match {files!r}")
  missing = [f for f in out if not storage.path(f).is_file()]
  if missing:
    raise FileNotFoundError(f"ArrayRecord files not found: {missing[:5]}")
  return out


def _split_of(f: str) -> tuple[str, str]:
  """(folder, split) of a shard path `{folder}/{split}-00000-of-00001.array_record`."""
  folder, name = os.fspath(f).rsplit("/", 1) if "/" in os.fspath(f) else (".", os.fspath(f))
  return folder, name.rsplit("-", 3)[0]


def _reported_audio_samples(files: Sequence[str]) -> int | None:
  """max_audio_samples from the precompute reports beside the shards ({split}-report.json)."""
  best = None
  for folder, split in sorted({_split_of(f) for f in files}):
    path = storage.path(folder) / f"{split}-report.json"
    if path.is_file():
      value = json.loads(path.read_text()).get("max_audio_samples")
      best = value if best is None else max(best, value)
  return best


class StagedArrayRecordSource:
  """A Grain random-access source over ArrayRecord shards in a bucket (gs://): each shard is staged into
  the host's local cache (`storage.stage`) when this process first reads one of its records, then read
  with ArrayRecord. Record counts come from the shards' sidecars (`{shard}.json`, "written"; a shard
  without one is staged to count it). Pickles without its open readers (Grain worker processes)."""

  def __init__(self, files: Sequence[str]):
    self._files = [os.fspath(f) for f in files]
    counts = []
    for f in self._files:
      side = storage.path(f + ".json")
      n = json.loads(side.read_text()).get("written") if side.is_file() else None
      if n is None:
        n = len(grain.sources.ArrayRecordDataSource([storage.stage(f)]))
      counts.append(int(n))
    self._starts = np.concatenate([[0], np.cumsum(counts)]).tolist()
    self._readers: dict[int, Any] = {}
    self._lock = threading.Lock()

  def __len__(self) -> int:
    return int(self._starts[-1])

  def _reader(self, shard: int):
    reader = self._readers.get(shard)
    if reader is None:
      with self._lock:
        reader = self._readers.get(shard)
        if reader is None:
          reader = grain.sources.ArrayRecordDataSource([storage.stage(self._files[shard])])
          have, want = len(reader), self._starts[shard + 1] - self._starts[shard]
          if have != want:
            raise ValueError(f"{self._files[shard]}: {have} records, its sidecar says {want}")
          self._readers[shard] = reader
    return reader

  def __getitem__(self, index: int) -> bytes:
    index = int(index)
    if not 0 <= index < len(self):
      raise IndexError(index)
    shard = bisect.bisect_right(self._starts, index) - 1
    return self._reader(shard)[index - self._starts[shard]]

  def __getstate__(self):
    return {"_files": self._files, "_starts": self._starts}

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._readers, self._lock = {}, threading.Lock()

  def __repr__(self) -> str:
    return f"StagedArrayRecordSource({len(self._files)} shards, {len(self)} records, {self._files[0]}...)"


def rows_per_process(batch_size: int, accum_steps: int, processes: int) -> int:
  """The rows each process reads per optimiser step; a clear error when the batch does not split evenly."""
  rows = batch_size * accum_steps
  if rows % processes:
    raise ValueError(f"config.train.batch_size * accum_steps = {rows} does not split over {processes} processes")
  if batch_size % processes:
    raise ValueError(f"config.train.batch_size = {batch_size} (one micro-batch) does not split over "
                     f"{processes} processes")
  return rows // processes


def array_record_source(paths: Sequence[str]):
  """Grain's ArrayRecordDataSource over local shards; `StagedArrayRecordSource` when any is remote."""
  if any(storage.is_remote(p) for p in paths):
    return StagedArrayRecordSource(paths)
  return grain.sources.ArrayRecordDataSource(list(paths))


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
  """Record bytes -> the example dict `prompts.collate` takes (or a filler row with a skip reason).

  Each example carries its own clip's audio token count (`audio_tokens`): the rows of its precomputed
  features, or ceil(frames(audio_len) / pool) for raw audio (`tokens_of_samples`). Features are
  zero-padded to `audio_slots` rows and audio to `audio_samples`; nothing is ever cut: a clip that needs
  more is an error naming the record (the slot bound comes from the precompute reports, so it means the
  shards and their reports disagree).
  """

  def __init__(self, tokenizer, prompt_cfg, *, audio_slots, max_len, audio_samples, use_features,
               feature_dim, normalize_audio, tokens_of_samples=None):
    self.tok, self.cfg = tokenizer, prompt_cfg
    self.slots, self.max_len, self.samples = audio_slots, max_len, audio_samples
    self.use_features, self.feature_dim, self.normalize = use_features, feature_dim, normalize_audio
    self.tokens_of_samples = tokens_of_samples

  def filler(self, reason: str | None) -> dict:
    empty = np.zeros((0,), np.int32)
    ex = {"before": empty, "after": empty, "answer": empty, "valid": 0, "_skip": reason,
          "audio_len": np.int32(0), "audio_tokens": 0}
    if self.use_features:
      ex["features"] = np.zeros((self.slots, self.feature_dim), np.float32)
    else:
      ex["audio"] = np.zeros((self.samples,), np.float32)
    return ex

  def _too_long(self, rec: dict, what: str) -> ValueError:
    return ValueError(
        f"record {rec.get('id')!r} ({rec.get('source') or rec.get('dataset')}) needs {what}, more than the "
        f"slot bound of this run (config.data.n_audio_tokens / the precompute reports' longest clip): the "
        "shards and their {split}-report.json disagree; re-run scripts/precompute.py or raise the bound")

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
    n = int(rec.get("audio_len", 0))
    if self.use_features:
      if "features" not in rec:
        raise ValueError(f"record {rec.get('id')!r} has no features: precompute with --encoder/--features")
      feats = np.asarray(rec["features"], np.float32)
      if len(feats) > self.slots:
        raise self._too_long(rec, f"{len(feats)} audio tokens")
      n_tokens = len(feats)
      ex["features"] = _fit(feats, self.slots)
    else:
      if "audio" not in rec:
        raise ValueError(f"record {rec.get('id')!r} has no audio (precomputed with --features only): "
                         "use use_features=True")
      stored = rec["audio"]
      if len(stored) > self.samples or n > self.samples:
        raise self._too_long(rec, f"{max(len(stored), n)} audio samples > {self.samples}")
      m = len(stored)
      audio = np.zeros((self.samples,), np.float32)  # one pass: cast into the padded row, then scale
      audio[:m] = stored
      if stored.dtype == np.int16:
        audio[:m] *= np.float32(1 / 32767)
      if rec.get("dataset") in audio_lib.EXTRACTOR_DATASETS and m:
        # The reference passes these clips through MERT's feature extractor: back to the raw .npy values
        # (input_scale), then, with the checkpoint's do_normalize, standardised over the clip alone.
        audio[:m] = audio_lib.extractor_input(audio[:m], do_normalize=self.normalize,
                                              scale=float(rec.get("input_scale", 1.0)))
      ex["audio"] = audio
      # The clip as the reference's dataset hands it to the collater: the whole stored window (a file
      # shorter than the dataset's native-rate window is zero-padded to it before resampling, and those
      # zeros are audio to the reference, not padding).
      n = m
      n_tokens = int(self.tokens_of_samples(n))
      if n_tokens > self.slots:
        raise self._too_long(rec, f"{n_tokens} audio tokens")
    if 1 + len(ex["before"]) + n_tokens + len(ex["after"]) + len(ex["answer"]) > self.max_len:
      return self.filler("over_long_text")
    ex["audio_tokens"] = n_tokens
    ex["audio_len"] = np.int32(n)
    ex["valid"] = 1
    ex["_skip"] = None
    return ex


class _Collate:
  """This process's rows of one global batch -> `accum_steps` micro-batches, each laid out on its own (the
  reference pads each micro-batch: middle padding and audio token count come from its own rows), then
  interleaved as the train step takes them apart (`prompts.interleave_micro_batches`)."""

  def __init__(self, tokenizer, *, max_len, layout, filler, pad_id, accum_steps=1):
    self.kw = dict(max_len=max_len, bos_id=tokenizer.bos_id, pad_id=pad_id, layout=layout)
    self.filler, self.accum = filler, accum_steps

  def _one(self, examples: list[dict]) -> tuple[dict, list]:
    if self.kw["layout"] == "reference":
      # Middle padding to the micro-batch's longest segments can push a row past max_len: that row is skipped.
      for _ in range(2):  # a skipped row may have set the longest segment: lay out the rest again
        lb = max(len(e["before"]) for e in examples)
        la = max(len(e["after"]) for e in examples)
        n_audio = max(int(e["audio_tokens"]) for e in examples)
        fixed = 1 + lb + n_audio + la
        examples = [self.filler("over_long_text") if e["valid"] and fixed + len(e["answer"]) > self.kw["max_len"]
                    else e for e in examples]
    reasons = [e["_skip"] for e in examples if e["_skip"]]
    return prompts.collate([{k: v for k, v in e.items() if k != "_skip"} for e in examples], **self.kw), reasons

  def __call__(self, examples: Sequence[dict]) -> dict:
    examples = list(examples)
    if len(examples) % self.accum:
      raise ValueError(f"{len(examples)} rows do not split into {self.accum} micro-batches")
    per = len(examples) // self.accum
    micro, reasons = [], []
    for a in range(self.accum):
      batch, why = self._one(examples[a * per:(a + 1) * per])
      micro.append(batch)
      reasons += why
    batch = prompts.interleave_micro_batches(micro)
    batch["_skipped"] = tuple(reasons)
    return batch


def row_fits(row: Sequence[dict], ex: dict, *, max_len: int, max_segments: int, max_labels: int) -> bool:
  """Whether example `ex` joins packed row `row`: the row's positions stay within max_len, it holds at most
  max_segments examples and their answers at most max_labels tokens."""
  return (len(row) < max_segments
          and sum(prompts.example_positions(e) for e in row) + prompts.example_positions(ex) <= max_len
          and sum(len(e["answer"]) for e in row) + len(ex["answer"]) <= max_labels)


class _PackRows(grain.IterDataset):
  """Examples -> packed rows: a greedy next-fit packer, in stream order (no reordering, so the rows are a
  pure function of the example stream). A row takes examples while its positions stay within `max_len`,
  it holds at most `max_segments` of them and their answers at most `max_labels` tokens (the LM head's
  per-row budget, config.loss_positions); skipped examples (filler rows) leave only their reason.

  Checkpointable and exact on resume: the state is the parent's state at the start of the next row (before
  an example read but not placed is read again), so a restored iterator re-packs the same rows."""

  def __init__(self, parent: grain.IterDataset, *, max_len: int, max_segments: int, max_labels: int):
    super().__init__(parent)
    self.max_len, self.max_segments, self.max_labels = max_len, max_segments, max_labels

  def __iter__(self):
    return _PackIterator(self._parent.__iter__(), self.max_len, self.max_segments, self.max_labels)

  def __str__(self) -> str:
    return f"_PackRows(max_len={self.max_len}, max_segments={self.max_segments}, max_labels={self.max_labels})"


class _PackIterator(grain.DatasetIterator):

  def __init__(self, parent: grain.DatasetIterator, max_len: int, max_segments: int, max_labels: int):
    super().__init__(parent)
    self.max_len, self.max_segments, self.max_labels = max_len, max_segments, max_labels
    self._pending = None  # (an example read but not placed, the parent's state before it)

  def __next__(self) -> dict:
    row, skipped = [], []
    if self._pending is not None:
      row = [self._pending[0]]
      self._pending = None
    while True:
      state = copy.deepcopy(self._parent.get_state())
      try:
        ex = next(self._parent)
      except StopIteration:
        if row or skipped:
          return {"examples": row, "skipped": skipped}
        raise
      if not ex["valid"]:
        if ex["_skip"]:
          skipped.append(ex["_skip"])
        continue  # a skipped record takes no space; a row past the end of finite data (no reason) neither
      if row and not row_fits(row, ex, max_len=self.max_len, max_segments=self.max_segments,
                              max_labels=self.max_labels):
        self._pending = (ex, state)
        return {"examples": row, "skipped": skipped}
      row.append(ex)

  def get_state(self) -> dict:
    return {"parent": copy.deepcopy(self._pending[1] if self._pending is not None else self._parent.get_state())}

  def set_state(self, state: dict) -> None:
    self._parent.set_state(state["parent"])
    self._pending = None


class _CollatePacked:
  """Packed rows of one global batch (this process's) -> `accum_steps` micro-batches of
  `prompts.collate_packed`, interleaved as the train step takes them apart."""

  def __init__(self, tokenizer, *, max_len, max_segments, pad_id, accum_steps=1):
    self.kw = dict(max_len=max_len, bos_id=tokenizer.bos_id, pad_id=pad_id, max_segments=max_segments)
    self.accum = accum_steps

  def __call__(self, rows: Sequence[dict]) -> dict:
    rows = list(rows)
    if len(rows) % self.accum:
      raise ValueError(f"{len(rows)} rows do not split into {self.accum} micro-batches")
    per = len(rows) // self.accum
    clean = lambda ex: {k: v for k, v in ex.items() if k != "_skip"}  # noqa: E731
    micro = [prompts.collate_packed([[clean(ex) for ex in r["examples"]] for r in rows[a * per:(a + 1) * per]],
                                    **self.kw) for a in range(self.accum)]
    batch = prompts.interleave_micro_batches(micro)
    batch["_skipped"] = tuple(reason for r in rows for reason in r["skipped"])
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


def _is_source(files) -> bool:
  """Whether `files` is a random-access source of records (len, [i] -> bytes) rather than paths."""
  return (hasattr(files, "__getitem__") and hasattr(files, "__len__")
          and not isinstance(files, (str, bytes, os.PathLike, list, tuple)))


def make_dataset(files, *, tokenizer, prompt_cfg: prompts.PromptConfig, batch_size: int, seed: int = 0,
                 shuffle: bool = True, num_epochs: int | None = None, audio_slots: int, max_len: int,
                 layout: str = "reference", use_features: bool = False, drop_remainder: bool = True,
                 process_index: int | None = None, process_count: int | None = None, worker_count: int = 0,
                 num_threads: int = 2, prefetch: int = 4, audio_samples: int | None = None,
                 normalize_audio: bool = False, accum_steps: int = 1, pad_id: int | None = None,
                 tokens_of_samples=None, pack_segments: int = 1, pack_labels: int | None = None) -> BatchIterator:
  """Batches of `batch_size` rows (per process) for this process. See the module docstring.

  pack_segments > 1 (layout="packed"): each row holds up to that many examples (`_PackRows`: greedy, in
  stream order, exact on resume), their answers at most `pack_labels` tokens (the LM head's budget per row);
  rows past the end of finite data are not filled up. files: shard paths, a directory or a glob, or a random-access source of record bytes (len and [i]; e.g.
  data.tfds_builders.RecordSource over a TFDS build, whose max_audio_samples stands in for the report). num_epochs None repeats forever. audio_slots: the static
  number of audio-token slots (`features` rows; >= every clip's tokens, see `audio_slot_bound`).
  audio_samples: fixed S of `audio` (default: max_audio_samples from the precompute report beside the
  shards). accum_steps: the batch holds that many micro-batches, each laid out on its own. pad_id: the pad
  token (default the tokenizer's eos: the reference pads with eos whatever the tokenizer files say).
  tokens_of_samples: samples -> audio tokens of a clip (raw audio only; the encoder's frame count / pool).
  worker_count > 0 runs decode in Grain worker processes (the tokenizer must pickle; each costs ~3 s to
  start), else threads. normalize_audio: the MERT feature extractor's do_normalize (the checkpoint's
  preprocessor_config.json, `audio.extractor_do_normalize`); raw audio of MusicInstruct / MusicCaps records
  goes through the extractor as in the reference (`audio.extractor_input`: the record's input_scale, then
  per-clip zero mean / unit variance when normalize_audio), other data sets' audio as stored.
  """
  if batch_size % accum_steps:
    raise ValueError(f"batch_size {batch_size} rows do not split into accum_steps={accum_steps} micro-batches")
  if not use_features and tokens_of_samples is None:
    raise ValueError("raw audio batches need tokens_of_samples (the encoder's frames per clip / pool_frames)")
  if process_index is None or process_count is None:
    import jax
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index {process_index} not in [0, {process_count})")
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}")
  if _is_source(files):  # a random-access source of record bytes (e.g. tfds_builders.RecordSource)
    paths, source = [repr(files)], files
    if audio_samples is None:
      audio_samples = getattr(files, "max_audio_samples", None)
  else:
    paths = resolve_files(files)
    source = array_record_source(paths)
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
    if audio_samples is None and not _is_source(files):
      audio_samples = _reported_audio_samples(paths)
    if audio_samples is None:
      raise ValueError("audio_samples not given and no precompute report ({split}-report.json) beside "
                       f"{paths[0]} says max_audio_samples")

  ds = grain.MapDataset.source(source)
  if shuffle:
    ds = ds.shuffle(seed=seed)
  ds = ds.repeat(num_epochs)
  ds = _ProcessRows(ds, batch_size, process_index, process_count, drop_remainder)
  prepare = _Prepare(tokenizer, prompt_cfg, audio_slots=audio_slots, max_len=max_len,
                     audio_samples=audio_samples, use_features=use_features, feature_dim=feature_dim,
                     normalize_audio=normalize_audio, tokens_of_samples=tokens_of_samples)
  ds = ds.map(prepare)
  pad = tokenizer.eos_id if pad_id is None else pad_id
  read = grain.ReadOptions(num_threads=max(1, num_threads), prefetch_buffer_size=prefetch)
  if pack_segments > 1:  # several examples per row: pack the example stream, then batch the rows
    if layout != "packed":
      raise ValueError(f"pack_segments = {pack_segments} needs layout='packed' (got {layout!r})")
    it_ds = _PackRows(ds.to_iter_dataset(read), max_len=max_len, max_segments=pack_segments,
                      max_labels=pack_labels or max_len)
    it_ds = it_ds.batch(batch_size, drop_remainder=True,
                        batch_fn=_CollatePacked(tokenizer, max_len=max_len, max_segments=pack_segments, pad_id=pad,
                                                accum_steps=accum_steps))
  else:
    ds = ds.batch(batch_size, drop_remainder=True,
                  batch_fn=_Collate(tokenizer, max_len=max_len, layout=layout, filler=prepare.filler, pad_id=pad,
                                    accum_steps=accum_steps))
    it_ds = ds.to_iter_dataset(read)
  if worker_count > 0:
    from absl import flags
    if not flags.FLAGS.is_parsed():  # Grain's workers read absl flags; outside absl.app nothing parsed them
      flags.FLAGS.mark_as_parsed()
    it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))
  return BatchIterator(iter(it_ds), process_index=process_index, process_count=process_count,
                       batch_size=batch_size)
