"""Precomputed examples in ArrayRecord shards: the record format, and the resumable writer behind
`scripts/precompute.py`.

Record = one msgpack map (schema 1); numpy arrays are maps {"__nd__": dtype.str, "shape", "data"}:
  schema       1
  id, dataset, split       str
  question     str | None (None: stage-1 caption, no template)
  answer       str
  audio        int16 (x * 32767, clipped) or float16 [n] at 24 kHz, the crop/padded window; absent with
               features only
  audio_len    int, true (unpadded) samples at 24 kHz;  sample_rate  24000
  input_scale  float, MusicInstruct / MusicCaps only: `audio` x input_scale is what the reference hands
               MERT's feature extractor (2**15 for an int16 .npy, else 1; data/audio.py)
  source, source_rate, crop_start   the file, its native rate, and the crop start in native samples
  features     float16/float32 [T', D] pooled encoder features of the stored window (optional); for
               MusicInstruct / MusicCaps of the window as MERT's feature extractor passes it on
  kind, labels (JSON text)  when the annotation has them (demo set)
  extra        JSON text of the remaining annotation fields

The per-sample half of precompute (text checks, decoding, crop, the record's layout) is `Examples`; the TFDS
builders (data/tfds_builders.py) use it too, so their examples are these records byte for byte.

Shards are `{split}-{i:05d}-of-{n:05d}.array_record` (group_size 1: cheap random access). Each finished
shard has a `.json` sidecar with its counts (and record count), so a rerun skips it and still reports it;
both files are written under temporary names and renamed (sidecar first, shard last: the shard's presence =
done). `{split}-manifest.json` pins the settings a resume must share; `{split}-report.json` is the final
report.

The output folder may be a gs:// URL (musilingo_jax/storage.py): ArrayRecord writes local files only, so a
shard is written into a local temporary folder, then uploaded under a temporary object name and renamed
into place after its sidecar; a shard object therefore exists only complete, and `shard_files` never lists
a temporary name. Reports, manifest and feature statistics are written the same way (temporary name, then
rename).
"""

from __future__ import annotations

import collections
import concurrent.futures as cf
import dataclasses
import json
import math
import os
import shutil
import tempfile
import threading
import time
from typing import Any, Callable, Iterable, Iterator, Sequence

import msgpack
import numpy as np
from tqdm import tqdm

from musilingo_jax import storage
from musilingo_jax.convert.readers import read_config
from musilingo_jax.data import audio as audio_lib
from musilingo_jax.data import readers

SCHEMA = 1
SKIP_REASONS = audio_lib.BAD_AUDIO_REASONS + ("empty_answer", "over_long_text")
AUDIO_DTYPES = {"int16": np.int16, "float16": np.float16}
TRAIN_SPLITS = ("train", "pretrain", "finetune")


# ----------------------------------------------------------------------------------------------------
# Serialization


def _pack_default(obj):
  if isinstance(obj, np.ndarray):
    arr = np.ascontiguousarray(obj)
    return {"__nd__": arr.dtype.str, "shape": list(arr.shape), "data": arr.tobytes()}
  if isinstance(obj, np.generic):
    return obj.item()
  raise TypeError(f"cannot serialize {type(obj).__name__} in a record")


def _unpack_hook(d: dict):
  if "__nd__" in d:
    return np.frombuffer(d["data"], dtype=np.dtype(d["__nd__"])).reshape(d["shape"])
  return d


def encode_record(example: dict[str, Any]) -> bytes:
  """A dict of str/int/float/bool/None/bytes/numpy arrays -> bytes."""
  return msgpack.packb(example, default=_pack_default, use_bin_type=True)


def decode_record(data: bytes) -> dict[str, Any]:
  """Inverse of `encode_record` (arrays come back read-only, sharing the buffer)."""
  out = msgpack.unpackb(data, object_hook=_unpack_hook, raw=False)
  if not isinstance(out, dict) or out.get("schema") != SCHEMA:
    raise ValueError(f"not a schema-{SCHEMA} record")
  return out


def quantize_audio(x: np.ndarray, dtype: str) -> np.ndarray:
  if dtype == "int16":
    return np.clip(np.round(x * 32767.0), -32768, 32767).astype(np.int16)
  if dtype == "float16":
    return x.astype(np.float16)
  raise ValueError(f"audio dtype must be one of {sorted(AUDIO_DTYPES)}, got {dtype!r}")


def dequantize_audio(a: np.ndarray) -> np.ndarray:
  """Stored audio -> float32 in [-1, 1]."""
  if a.dtype == np.int16:
    return a.astype(np.float32) * np.float32(1 / 32767)
  return a.astype(np.float32)


# ----------------------------------------------------------------------------------------------------
# File names


def shard_name(split: str, index: int, count: int) -> str:
  return f"{split}-{index:05d}-of-{count:05d}.array_record"


def shard_files(out_dir: str | os.PathLike, split: str) -> list[str]:
  """The finished shards of a split, in order (local paths or gs:// URLs)."""
  d = storage.path(out_dir)
  if not d.is_dir():
    return []
  return sorted(os.fspath(p) for p in d.glob(f"{split}-?????-of-?????.array_record"))


def report_path(out_dir, split):
  """OUT/{split}-report.json (an etils.epath.Path: local or gs://)."""
  return storage.path(out_dir) / f"{split}-report.json"


def manifest_path(out_dir, split):
  return storage.path(out_dir) / f"{split}-manifest.json"


def sidecar_path(shard: str | os.PathLike):
  """A shard's `.json` sidecar (its counts; `written` = records in the shard)."""
  return storage.path(os.fspath(shard) + ".json")


def _atomic_write_text(path, text: str) -> None:
  storage.write_atomic(path, text)


# ----------------------------------------------------------------------------------------------------
# Precompute


@dataclasses.dataclass
class PrecomputeConfig:
  dataset: str
  data_dir: str
  split: str
  out_dir: str
  musicinstruct_file: str = "all"
  audio_dtype: str = "int16"
  shard_size: int = 1024
  workers: int = 4
  seed: int = 0
  crop: str | None = None          # None: random for training splits, start otherwise
  min_seconds: float = 1.0
  max_text_chars: int = 8192
  features: str | None = None      # None | "also" | "only" (needs encoder_fn)
  features_dtype: str = "float16"
  encoder: str | None = None       # recorded in the manifest (where the features came from)
  pool_frames: int = 325           # recorded in the manifest (encoder_fn applies it)
  progress: bool = True
  # MERT feature extractor's do_normalize, for the features of MusicInstruct / MusicCaps clips (the data sets
  # whose reference loader runs the extractor); None: read from the encoder directory's preprocessor_config.json.
  do_normalize: bool | None = None

  def extractor_normalize(self) -> bool | None:
    """do_normalize applied before the encoder; None when the extractor does not apply (no features, or a
    data set that skips it)."""
    if not self.features or self.dataset not in audio_lib.EXTRACTOR_DATASETS:
      return None
    if self.do_normalize is not None:
      return bool(self.do_normalize)
    value = audio_lib.read_do_normalize(self.encoder)
    if value is None:
      raise ValueError(f"{self.dataset} features: the encoder directory {self.encoder!r} has no "
                       f"{audio_lib.PREPROCESSOR_CONFIG} to say whether MERT's feature extractor normalises "
                       "(do_normalize); convert the checkpoint again or pass do_normalize")
    return value

  def resolved_crop(self) -> str:
    return self.crop or ("random" if self.split.lower() in TRAIN_SPLITS else "start")

  def manifest(self, num_samples: int, num_shards: int) -> dict:
    return {"schema": SCHEMA, "dataset": self.dataset, "split": self.split,
            "musicinstruct_file": self.musicinstruct_file if self.dataset == "musicinstruct" else None,
            "audio_dtype": self.audio_dtype, "shard_size": self.shard_size, "seed": self.seed,
            "crop": self.resolved_crop(), "min_seconds": self.min_seconds,
            "max_text_chars": self.max_text_chars, "features": self.features,
            "features_dtype": self.features_dtype if self.features else None, "encoder": self.encoder,
            "pool_frames": self.pool_frames if self.features else None,
            "native_window": audio_lib.NATIVE_WINDOW[self.dataset], "num_samples": num_samples,
            "num_shards": num_shards, "extractor_normalize": self.extractor_normalize()}


class _ClipCache:
  """Recently decoded clips (MusicQA has ~9 questions per clip, usually adjacent). Thread-safe."""

  def __init__(self, size: int):
    self._size, self._items, self._lock = size, collections.OrderedDict(), threading.Lock()

  def get(self, source: readers.AudioSource):
    key = (source.path, source.sample_rate)
    with self._lock:
      if key in self._items:
        self._items.move_to_end(key)
        return self._items[key]
    try:
      value = audio_lib.read_audio(source.path, source.sample_rate)
    except audio_lib.BadAudio as err:
      value = err
    with self._lock:
      self._items[key] = value
      while len(self._items) > self._size:
        self._items.popitem(last=False)
    return value


def _bounded_map(pool: cf.Executor, fn: Callable, items: Iterable, in_flight: int) -> Iterator:
  """pool.map in order, holding at most `in_flight` results (audio is large)."""
  pending: collections.deque = collections.deque()
  for item in items:
    pending.append(pool.submit(fn, item))
    if len(pending) >= in_flight:
      yield pending.popleft().result()
  while pending:
    yield pending.popleft().result()


def _skip(sample: readers.Sample, reason: str, detail: str) -> dict:
  return {"id": sample.id, "reason": reason, "detail": detail, "path": sample.audio_source.path}


class Examples:
  """The per-sample half of precompute, shared with the TFDS builders (data/tfds_builders.py), so both give
  the same bytes for a sample: the text checks, decoding (a cache of recently decoded clips), the crop/pad
  and resampling by the data set's policy (a random crop seeded by (cfg.seed, sample index)), and the
  record's layout. Thread-safe: `load` runs in a thread pool.

    ex = Examples(cfg)
    for index, sample, res in ex.map(enumerate(samples), pool, in_flight=8):
      if "reason" in res: ...                      # a skip: {"id", "reason", "detail", "path"}
      else: record = ex.record(sample, res)        # res = {"window": audio.Window, "scale": float}
  """

  def __init__(self, cfg: PrecomputeConfig):
    self.cfg = cfg
    self.crop = cfg.resolved_crop()
    self.window = audio_lib.NATIVE_WINDOW[cfg.dataset]
    self.extractor = cfg.dataset in audio_lib.EXTRACTOR_DATASETS
    self._cache = _ClipCache(size=max(8, 2 * cfg.workers))

  def load(self, item: tuple[int, readers.Sample]) -> tuple[int, readers.Sample, dict]:
    """(index, sample) -> (index, sample, {"window": Window, "scale": input_scale}) or (index, sample, skip),
    a skip being {"id", "reason" (one of SKIP_REASONS), "detail", "path"}. `scale` is
    `audio.reference_input_scale` for the data sets whose clips go through MERT's feature extractor, else 1."""
    cfg = self.cfg
    index, sample = item
    answer, question = sample.answer, sample.question or ""
    if not answer.strip():
      return index, sample, _skip(sample, "empty_answer", "answer is empty")
    longest = max(len(answer), len(question))
    if longest > cfg.max_text_chars:
      return index, sample, _skip(sample, "over_long_text", f"{longest} characters > {cfg.max_text_chars}")
    clip = self._cache.get(sample.audio_source)
    if isinstance(clip, audio_lib.BadAudio):
      return index, sample, _skip(sample, clip.reason, clip.detail)
    rng = np.random.default_rng([cfg.seed, index])
    try:
      win = audio_lib.load_window(sample.audio_source.path, native_window=self.window, crop=self.crop, rng=rng,
                                  min_seconds=cfg.min_seconds, clip=clip)
    except audio_lib.BadAudio as err:
      return index, sample, _skip(sample, err.reason, err.detail)
    except Exception as err:  # noqa: BLE001 - a corrupt input never stops the run
      return index, sample, _skip(sample, "unreadable", f"{type(err).__name__}: {err}")
    scale = 1.0
    if self.extractor:
      try:
        scale = audio_lib.reference_input_scale(sample.audio_source.path)
      except Exception as err:  # noqa: BLE001 - as above
        return index, sample, _skip(sample, "unreadable", f"{type(err).__name__}: {err}")
    return index, sample, {"window": win, "scale": scale}

  def map(self, items: Iterable[tuple[int, readers.Sample]], pool: cf.Executor,
          in_flight: int) -> Iterator[tuple[int, readers.Sample, dict]]:
    """`load` over (index, sample) items in `pool`, in order, at most `in_flight` loaded at a time."""
    return _bounded_map(pool, self.load, items, in_flight)

  def record(self, sample: readers.Sample, loaded: dict, features: np.ndarray | None = None) -> dict:
    """The record (module docstring) of a loaded sample; `features` [T', D] when precomputed."""
    cfg, win = self.cfg, loaded["window"]
    record = {"schema": SCHEMA, "id": sample.id, "dataset": cfg.dataset, "split": cfg.split,
              "question": sample.question, "answer": sample.answer, "audio_len": win.length,
              "sample_rate": audio_lib.TARGET_SR, "source": sample.audio_source.path,
              "source_rate": win.native_rate, "crop_start": win.start}
    if self.extractor:
      record["input_scale"] = loaded["scale"]
    if cfg.features != "only":
      record["audio"] = quantize_audio(win.audio, cfg.audio_dtype)
    if features is not None:
      record["features"] = features.astype(cfg.features_dtype)
    extra = dict(sample.extra)
    for key in ("kind", "labels"):
      if key in extra:
        value = extra.pop(key)
        record[key] = value if key == "kind" else json.dumps(value)
    record["extra"] = json.dumps(extra, default=str)
    return record


def precompute(cfg: PrecomputeConfig,
               encoder_fn: Callable[[np.ndarray], np.ndarray] | None = None) -> dict:
  """Writes the shards of one split and returns (and writes) the report. Resumable.

  encoder_fn: 24 kHz float32 window [S] -> pooled features [T', D] (required with cfg.features).
  """
  if cfg.features not in (None, "also", "only"):
    raise ValueError(f"features must be None, 'also' or 'only', got {cfg.features!r}")
  if cfg.features and encoder_fn is None:
    raise ValueError("features requested but no encoder given")
  quantize_audio(np.zeros(1, np.float32), cfg.audio_dtype)  # validates the dtype name
  if cfg.dataset not in readers.DATASETS:
    raise ValueError(f"unknown dataset {cfg.dataset!r}; expected one of {readers.DATASETS}")
  samples = list(readers.read_samples(cfg.dataset, cfg.data_dir, cfg.split,
                                      musicinstruct_file=cfg.musicinstruct_file))
  out = storage.makedirs(cfg.out_dir)
  remote = storage.is_remote(cfg.out_dir)
  n_shards = max(1, math.ceil(len(samples) / cfg.shard_size))
  manifest = cfg.manifest(len(samples), n_shards)
  mpath = manifest_path(out, cfg.split)
  if mpath.is_file():
    old = json.loads(mpath.read_text())
    diff = {k: (old.get(k), v) for k, v in manifest.items() if old.get(k) != v}
    if diff:
      lines = ", ".join(f"{k}: was {a!r}, now {b!r}" for k, (a, b) in diff.items())
      raise ValueError(f"{out} already holds {cfg.split} shards made with other settings ({lines}); "
                       "use another --out or delete them")
  else:
    _atomic_write_text(mpath, json.dumps(manifest, indent=1))

  examples = Examples(cfg)
  normalize = manifest["extractor_normalize"]
  features_cache: collections.OrderedDict = collections.OrderedDict()

  def features_of(sample, win, scale):
    key = (sample.audio_source.path, win.start)
    if key in features_cache:
      return features_cache[key]
    x = win.audio if normalize is None else audio_lib.extractor_input(win.audio, do_normalize=normalize,
                                                                      scale=scale)
    feats = np.asarray(encoder_fn(x), np.float32)
    if feats.ndim != 2:
      raise RuntimeError(f"encoder_fn must return [T', D] features, got shape {feats.shape}")
    features_cache[key] = feats
    while len(features_cache) > 16:
      features_cache.popitem(last=False)
    return feats

  shard_stats: list[dict] = []
  resumed = 0
  t0 = time.time()
  done_before = 0
  todo = []
  for i in range(n_shards):
    final = out / shard_name(cfg.split, i, n_shards)
    side = final.with_name(final.name + ".json")
    if final.is_file() and side.is_file():
      shard_stats.append(json.loads(side.read_text()))
      resumed += 1
      done_before += len(samples[i * cfg.shard_size:(i + 1) * cfg.shard_size])
    else:
      shard_stats.append(None)
      todo.append(i)

  bar = tqdm(total=len(samples), initial=done_before, unit="ex", disable=not cfg.progress,
             desc=f"{cfg.dataset}/{cfg.split}")
  local_tmp = tempfile.mkdtemp(prefix="musilingo-shards-") if remote and todo else None
  try:
    _write_shards(cfg, out, todo, samples, n_shards, shard_stats, examples, features_of, bar, remote, local_tmp)
  finally:
    if local_tmp is not None:
      shutil.rmtree(local_tmp, ignore_errors=True)
  bar.close()
  report = _report(cfg, manifest, shard_stats, resumed, time.time() - t0)
  _atomic_write_text(report_path(out, cfg.split), json.dumps(report, indent=1))
  return report


def _write_shards(cfg, out, todo, samples, n_shards, shard_stats, examples: Examples, features_of, bar, remote,
                  local_tmp) -> None:
  """Writes the shards `todo` (precompute's loop); a remote shard goes through `local_tmp`, then upload."""
  from array_record.python import array_record_module
  with cf.ThreadPoolExecutor(max_workers=max(1, cfg.workers)) as pool:
    for i in todo:
      final = out / shard_name(cfg.split, i, n_shards)
      side = final.with_name(final.name + ".json")
      # ArrayRecord writes local files: beside the shard, or in a local folder when OUT is gs://
      tmp = (os.path.join(local_tmp, final.name) if remote
             else os.fspath(final.with_name(f".{final.name}.tmp")))
      lo = i * cfg.shard_size
      chunk = list(enumerate(samples[lo:lo + cfg.shard_size], start=lo))
      stats = {"shard": final.name, "samples": len(chunk), "written": 0, "skipped": [],
               "audio_samples": 0, "max_audio_samples": 0, "feature_frames": 0, "feature_dim": 0}
      writer = array_record_module.ArrayRecordWriter(tmp, "group_size:1")
      try:
        for _, sample, res in examples.map(chunk, pool, in_flight=2 * max(1, cfg.workers) + 2):
          bar.update(1)
          if "reason" in res:
            stats["skipped"].append(res)
            continue
          feats = None
          if cfg.features:
            feats = features_of(sample, res["window"], res["scale"])
            if not np.isfinite(feats).all():
              stats["skipped"].append(_skip(sample, "nan", "encoder features are not finite"))
              continue
            stats["feature_frames"] = max(stats["feature_frames"], feats.shape[0])
            stats["feature_dim"] = feats.shape[1]
          writer.write(encode_record(examples.record(sample, res, feats)))
          stats["written"] += 1
          stats["audio_samples"] += res["window"].length
          stats["max_audio_samples"] = max(stats["max_audio_samples"], len(res["window"].audio))
      finally:
        writer.close()
      _atomic_write_text(side, json.dumps(stats))
      if remote:
        storage.upload(tmp, final)  # a temporary object renamed into place: the shard exists only whole
        os.remove(tmp)
      else:
        os.replace(tmp, final)
      shard_stats[i] = stats


def _report(cfg: PrecomputeConfig, manifest: dict, shard_stats: Sequence[dict], resumed: int,
            seconds: float) -> dict:
  skipped = [s for st in shard_stats for s in st["skipped"]]
  by_reason = {r: 0 for r in SKIP_REASONS}
  for s in skipped:
    by_reason[s["reason"]] += 1
  return {
      **manifest,
      "out_dir": str(cfg.out_dir),
      "data_dir": str(cfg.data_dir),
      "written": sum(st["written"] for st in shard_stats),
      "skipped": len(skipped),
      "skipped_by_reason": by_reason,
      "skipped_ids": skipped,
      "audio_hours": sum(st["audio_samples"] for st in shard_stats) / audio_lib.TARGET_SR / 3600,
      "max_audio_samples": max(st["max_audio_samples"] for st in shard_stats),
      "feature_frames": max(st["feature_frames"] for st in shard_stats),
      "feature_dim": max(st["feature_dim"] for st in shard_stats),
      "shards": [st["shard"] for st in shard_stats],
      "shards_resumed": resumed,
      "seconds": round(seconds, 2),
  }


def format_report(report: dict) -> str:
  """A few human lines for the console."""
  lines = [f"{report['dataset']}/{report['split']}: wrote {report['written']} of {report['num_samples']} "
           f"examples ({report['audio_hours']:.3f} h of audio) into {len(report['shards'])} shards "
           f"({report['shards_resumed']} already done) in {report['seconds']} s",
           f"skipped {report['skipped']}: " + ", ".join(f"{k} {v}" for k, v in report["skipped_by_reason"].items())]
  for s in report["skipped_ids"][:20]:
    lines.append(f"  skipped {s['id']}: {s['reason']} ({s['detail']}) {s['path']}")
  if report["skipped"] > 20:
    lines.append(f"  ... and {report['skipped'] - 20} more (see the JSON report)")
  return "\n".join(lines)


def read_report(out_dir, split) -> dict | None:
  path = report_path(out_dir, split)
  return json.loads(path.read_text()) if path.is_file() else None


def feature_stats(out_dir, split: str) -> dict:
  """Per-dimension mean and std of the precomputed pooled features of a split (every token of every
  record, as training sees them) -> {"mean", "std", "tokens", "shards"}; cached in
  {split}-feature-stats.json and recomputed when the shards change (names and sizes)."""
  import grain
  files = shard_files(out_dir, split)
  if not files:
    raise FileNotFoundError(f"{out_dir}: no {split} shards to compute feature statistics from")
  shards = [[os.path.basename(f), storage.path(f).stat().length] for f in files]
  path = storage.path(out_dir) / f"{split}-feature-stats.json"
  if path.is_file():
    cached = json.loads(path.read_text())
    if cached.get("shards") == shards:
      return cached
  total = total_sq = None
  tokens = 0
  for f in files:
    src = grain.sources.ArrayRecordDataSource([storage.stage(f)])
    for i in range(len(src)):
      rec = decode_record(src[i])
      feats = rec.get("features")
      if feats is None:
        raise ValueError(f"{f}: record {rec.get('id', i)!r} has no 'features' (precompute with --features)")
      x = np.asarray(feats, np.float64).reshape(-1, np.shape(feats)[-1])
      if total is None:
        total, total_sq = np.zeros(x.shape[1]), np.zeros(x.shape[1])
      total += x.sum(0)
      total_sq += np.square(x).sum(0)
      tokens += x.shape[0]
  mean = total / tokens
  std = np.sqrt(np.maximum(total_sq / tokens - np.square(mean), 0.0))
  stats = {"mean": mean.tolist(), "std": std.tolist(), "tokens": tokens, "shards": shards}
  _atomic_write_text(path, json.dumps(stats))
  return stats


# ----------------------------------------------------------------------------------------------------
# Encoder features


def make_encoder_fn(encoder, pool_frames: int) -> Callable[[np.ndarray], np.ndarray]:
  """A MERT module -> fn(window [S] float32) -> pooled features [T', D] float32, one clip at its own
  length (no batch padding, so GroupNorm sees only this clip; jit retraces once per distinct length)."""
  import jax
  from flax import nnx

  from musilingo_jax.models.musilingo import pooled_features
  encoder.eval()
  graphdef, state = nnx.split(encoder)

  @jax.jit
  def run(state, audio):  # [1, S] -> [1, T', D]
    return pooled_features(nnx.merge(graphdef, state), audio, pool_frames)

  def fn(window: np.ndarray) -> np.ndarray:
    return np.asarray(run(state, np.asarray(window, np.float32)[None]))[0]
  return fn


def load_encoder(directory: str | os.PathLike, *, dtype: str = "float32"):
  """The MERT encoder of a scripts/convert_hf.py directory (params/encoder), or of a Hugging Face
  MERT/HuBERT directory (config.json + safetensors/bin) -> MERT module."""
  # Local: jax, flax, Orbax and the model load only when an encoder is wanted (as elsewhere in this module).
  from musilingo_jax.convert.converted import load_converted
  from musilingo_jax.convert.hf import import_pretrained
  from musilingo_jax.models import mert
  if (storage.path(directory) / "params" / mert.HF_KIND.name).exists():
    (encoder,), _ = load_converted(directory, (mert.HF_KIND,), dtype=dtype)
    return encoder
  if read_config(directory) is None:
    raise ValueError(f"{directory}: neither a converted checkpoint (params/encoder) nor an HF MERT "
                     "directory (config.json)")
  encoder, _ = import_pretrained(mert.HF_KIND, directory, dtype=dtype)
  return encoder
