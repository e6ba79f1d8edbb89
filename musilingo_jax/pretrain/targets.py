"""The acoustic teacher of MERT-style pretraining: per-frame targets at the encoder's frame rate.

HuBERT's first iteration predicts k-means codes of MFCC frames; MERT-v0 used k-means codes of log-mel and of
chroma frames (two codebooks), MERT-v1 the 8 codebooks of EnCodec's residual quantiser. EnCodec's weights
cannot be had offline, so we use the first kind: one k-means codebook per acoustic feature named in
`TargetConfig.features` ("logmel", "mfcc", "chroma"), plus MERT's second target, the constant-Q transform
(here log-magnitude, standardised per bin; MERT regresses the raw magnitude).

Frames: the conv stack turns samples [hop * t, hop * t + field) into frame t (hop = prod(conv_stride) = 320,
field = its receptive field = 400 at 24 kHz: 75 frames/s). librosa frames the audio shifted by field // 2
samples, so its frame t is centred where the encoder's frame t is, and the first
`MERTConfig.feature_lengths(n)` frames are kept: target t belongs to encoder frame t exactly. A crop that
starts at a multiple of `hop` samples therefore keeps its targets aligned (data.py crops that way).

`prepare_targets(clips, out_dir, cfg, encoder_cfg)` (resumable by reuse: a finished directory with the same
settings is kept):
  1. features of a seeded sample of clips -> per-dimension mean / std -> k-means (k-means++ init, Lloyd
     iterations, numpy) on at most `kmeans_frames` standardised frames per feature;
  2. every clip -> record {id, audio int16, audio_len, codes int16 [C, T], cqt float16 [T, bins]
     (standardised)} in ArrayRecord shards `{train,valid}-iiiii-of-nnnnn.array_record` (the last
     `valid_fraction` of a seeded order is the validation split);
  3. `codebooks.npz` (centroids, statistics) and `meta.json` (settings, counts) written last.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
from tqdm import tqdm

from musilingo_jax import storage
from musilingo_jax.data import records

SAMPLE_RATE = 24_000
FEATURES = ("logmel", "mfcc", "chroma")
TRAIN, VALID = "train", "valid"
VERSION = 1


@dataclasses.dataclass(frozen=True)
class TargetConfig:
  """What the targets are; every field keys the prepared directory (`meta.json` "params")."""
  features: tuple[str, ...] = ("logmel", "chroma")  # one k-means codebook each
  codebook_size: int = 100
  kmeans_frames: int = 50_000   # frames per feature the k-means is fitted on (sampled across clips)
  kmeans_iters: int = 25
  kmeans_clips: int = 200       # clips whose features give the statistics and the k-means sample
  n_mels: int = 64
  n_fft: int = 1024
  cqt_bins: int = 84
  cqt_bins_per_octave: int = 12
  cqt_fmin: float = 32.70       # C1, as MERT
  valid_fraction: float = 0.05
  shard_size: int = 256
  seed: int = 0

  def __post_init__(self):
    bad = [f for f in self.features if f not in FEATURES]
    if bad or not self.features:
      raise ValueError(f"pretrain.features = {self.features!r}: each one of {FEATURES}, at least one")
    if self.codebook_size < 2:
      raise ValueError(f"pretrain.codebook_size = {self.codebook_size}; expected at least 2")
    if self.cqt_bins % self.cqt_bins_per_octave or self.cqt_bins_per_octave % 12:
      raise ValueError(f"pretrain.cqt_bins = {self.cqt_bins} must be whole octaves of cqt_bins_per_octave = "
                       f"{self.cqt_bins_per_octave}, a multiple of 12 (chroma folds them)")

  def params(self) -> dict:
    return {**dataclasses.asdict(self), "features": list(self.features), "version": VERSION}


def frame_geometry(encoder_cfg) -> tuple[int, int]:
  """(hop, field): samples between frames (prod of the strides) and each frame's receptive field."""
  hop, field = 1, 1
  for k, s in zip(encoder_cfg.conv_kernel, encoder_cfg.conv_stride):
    field += (k - 1) * hop
    hop *= s
  return hop, field


# ---------------------------------------------------------------------------------------- features

def frame_features(audio: np.ndarray, cfg: TargetConfig, encoder_cfg) -> dict[str, np.ndarray]:
  """Float audio [n] at 24 kHz -> {feature: [T, d] float32} for cfg.features and "cqt" [T, bins], where
  T = encoder_cfg.feature_lengths(n) (module docstring: frame t of each is the encoder's frame t)."""
  import librosa
  hop, field = frame_geometry(encoder_cfg)
  n = len(audio)
  t = int(encoder_cfg.feature_lengths(n))
  if t < 1:
    raise ValueError(f"a clip of {n} samples gives no encoder frame")
  y = np.ascontiguousarray(audio[field // 2:], np.float32)
  y = np.pad(y, (0, max(0, hop * t - len(y))))
  out: dict[str, np.ndarray] = {}
  cqt = np.abs(librosa.cqt(y, sr=SAMPLE_RATE, hop_length=hop, fmin=cfg.cqt_fmin, n_bins=cfg.cqt_bins,
                           bins_per_octave=cfg.cqt_bins_per_octave))
  out["cqt"] = librosa.amplitude_to_db(cqt, ref=1.0, amin=1e-5, top_db=None).T
  if "logmel" in cfg.features or "mfcc" in cfg.features:
    mel = librosa.feature.melspectrogram(y=y, sr=SAMPLE_RATE, n_fft=cfg.n_fft, hop_length=hop, n_mels=cfg.n_mels)
    logmel = librosa.power_to_db(mel, ref=1.0, amin=1e-10, top_db=None)
    if "logmel" in cfg.features:
      out["logmel"] = logmel.T
    if "mfcc" in cfg.features:  # HuBERT's: 13 coefficients + deltas + delta-deltas
      mfcc = librosa.feature.mfcc(S=logmel, n_mfcc=13)
      width = min(9, mfcc.shape[1] - (1 - mfcc.shape[1] % 2))
      if width >= 3:
        d1 = librosa.feature.delta(mfcc, width=width, order=1)
        d2 = librosa.feature.delta(mfcc, width=width, order=2)
      else:
        d1 = d2 = np.zeros_like(mfcc)
      out["mfcc"] = np.concatenate([mfcc, d1, d2]).T
  if "chroma" in cfg.features:
    out["chroma"] = librosa.feature.chroma_cqt(C=cqt, bins_per_octave=cfg.cqt_bins_per_octave, n_chroma=12).T
  return {k: _fit_frames(v.astype(np.float32), t) for k, v in out.items()}


def _fit_frames(x: np.ndarray, t: int) -> np.ndarray:
  if len(x) >= t:
    return x[:t]
  return np.concatenate([x, np.repeat(x[-1:], t - len(x), axis=0)])


# ---------------------------------------------------------------------------------------- k-means

def kmeans(x: np.ndarray, k: int, *, iters: int = 25, seed: int = 0) -> np.ndarray:
  """Centroids [k, d] of `x` [n, d] (float32): k-means++ initialisation, then `iters` Lloyd iterations; an
  emptied cluster takes the point farthest from its centroid. Deterministic given `seed`."""
  x = np.asarray(x, np.float32)
  n = len(x)
  if n < k:
    raise ValueError(f"k-means: {n} frames for {k} clusters")
  rng = np.random.default_rng(seed)
  centers = np.empty((k, x.shape[1]), np.float32)
  centers[0] = x[rng.integers(n)]
  d2 = _sq_dist(x, centers[:1])[:, 0]
  for j in range(1, k):
    p = d2 / d2.sum() if d2.sum() > 0 else np.full(n, 1.0 / n)
    centers[j] = x[rng.choice(n, p=p)]
    d2 = np.minimum(d2, _sq_dist(x, centers[j:j + 1])[:, 0])
  for _ in range(iters):
    assign, dist = assign_codes(x, centers, return_dist=True)
    counts = np.bincount(assign, minlength=k)
    sums = np.zeros_like(centers, dtype=np.float64)
    np.add.at(sums, assign, x)
    new = (sums / np.maximum(counts, 1)[:, None]).astype(np.float32)
    empty = np.flatnonzero(counts == 0)
    if len(empty):
      far = np.argsort(-dist)[:len(empty)]
      new[empty] = x[far]
    if np.allclose(new, centers):
      centers = new
      break
    centers = new
  return centers


def _sq_dist(x: np.ndarray, c: np.ndarray) -> np.ndarray:
  return np.maximum((x * x).sum(1)[:, None] - 2.0 * x @ c.T + (c * c).sum(1)[None, :], 0.0)


def assign_codes(x: np.ndarray, centers: np.ndarray, *, chunk: int = 16384, return_dist: bool = False):
  """Index of the nearest centroid (squared Euclidean) of every row of `x`, in chunks."""
  out = np.empty(len(x), np.int64)
  dist = np.empty(len(x), np.float32)
  for lo in range(0, len(x), chunk):
    d = _sq_dist(x[lo:lo + chunk], centers)
    out[lo:lo + chunk] = d.argmin(1)
    dist[lo:lo + chunk] = d.min(1)
  return (out, dist) if return_dist else out


# ---------------------------------------------------------------------------------------- prepare

@dataclasses.dataclass
class Codebooks:
  """Centroids (in standardised feature space) and the statistics that standardise features and CQT."""
  centers: dict[str, np.ndarray]
  mean: dict[str, np.ndarray]
  std: dict[str, np.ndarray]

  def codes(self, feats: dict[str, np.ndarray], features: Sequence[str]) -> np.ndarray:
    """[C, T] int16 codes of one clip's features."""
    return np.stack([assign_codes((feats[f] - self.mean[f]) / self.std[f], self.centers[f])
                     for f in features]).astype(np.int16)

  def cqt(self, feats: dict[str, np.ndarray]) -> np.ndarray:
    return ((feats["cqt"] - self.mean["cqt"]) / self.std["cqt"]).astype(np.float16)

  def save(self, path) -> None:
    arrays = {}
    for f, c in self.centers.items():
      arrays[f"centers/{f}"] = c
    for f in self.mean:
      arrays[f"mean/{f}"], arrays[f"std/{f}"] = self.mean[f], self.std[f]
    tmp = f"{os.fspath(path)}.tmp.npz"
    np.savez(tmp, **arrays)
    os.replace(tmp, path)

  @classmethod
  def load(cls, path) -> "Codebooks":
    with np.load(storage.stage(path)) as z:
      out = cls({}, {}, {})
      for key in z.files:
        kind, name = key.split("/", 1)
        getattr(out, {"centers": "centers", "mean": "mean", "std": "std"}[kind])[name] = np.asarray(z[key])
    return out


KEEP_FEATURE_BYTES = 512 << 20  # the k-means sample's features are kept for step 2 up to this size


def fit_codebooks(sample: Iterable[np.ndarray], cfg: TargetConfig, encoder_cfg, *, progress: bool = True,
                  keep: list | None = None) -> Codebooks:
  """Statistics and k-means codebooks from the clips of `sample` (float audio arrays). `keep`: a list that
  receives each clip's features (in order) while they fit in KEEP_FEATURE_BYTES, to be reused."""
  frames: dict[str, list[np.ndarray]] = {}
  kept = 0
  for audio in tqdm(sample, desc="targets: features for k-means", unit="clip", disable=not progress):
    feats = frame_features(audio, cfg, encoder_cfg)
    for name, x in feats.items():
      frames.setdefault(name, []).append(x)
    kept += sum(x.nbytes for x in feats.values())
    if keep is not None and kept <= KEEP_FEATURE_BYTES:
      keep.append(feats)
  if not frames:
    raise ValueError("no clips to fit the codebooks on")
  rng = np.random.default_rng([cfg.seed, 7])
  books = Codebooks({}, {}, {})
  for name, xs in frames.items():
    x = np.concatenate(xs)
    books.mean[name] = x.mean(0).astype(np.float32)
    books.std[name] = np.maximum(x.std(0), 1e-3).astype(np.float32)
    if name == "cqt":
      continue
    if len(x) > cfg.kmeans_frames:
      x = x[np.sort(rng.choice(len(x), cfg.kmeans_frames, replace=False))]
    z = (x - books.mean[name]) / books.std[name]
    t0 = time.perf_counter()
    books.centers[name] = kmeans(z, cfg.codebook_size, iters=cfg.kmeans_iters, seed=cfg.seed)
    if progress:
      print(f"targets: k-means {name}: {len(z)} frames x {z.shape[1]} dims -> {cfg.codebook_size} codes "
            f"({time.perf_counter() - t0:.1f} s)", flush=True)
  return books


def is_prepared(out_dir, cfg: TargetConfig, source: str) -> bool:
  meta = storage.path(out_dir) / "meta.json"
  if not meta.is_file():
    return False
  m = json.loads(meta.read_text())
  return m.get("params") == cfg.params() and m.get("source") == source


def prepare_targets(clips: Sequence[tuple[str, Any]], out_dir, cfg: TargetConfig, encoder_cfg, *,
                    source: str, load_audio, progress: bool = True) -> dict:
  """Targets of `clips` ((id, handle) pairs; `load_audio(handle)` -> float32 [n] at 24 kHz) into `out_dir`
  (local or gs://): shards, codebooks.npz and meta.json (module docstring). `source` names where the clips
  came from; with `cfg` it keys reuse: a directory whose meta.json has both is returned as is."""
  out = storage.makedirs(out_dir)
  if is_prepared(out, cfg, source):
    meta = json.loads((out / "meta.json").read_text())
    if progress:
      print(f"targets: reusing {os.fspath(out)} ({meta['counts']})", flush=True)
    return meta
  if not clips:
    raise ValueError(f"no clips to prepare targets from ({source})")
  t0 = time.time()
  rng = np.random.default_rng([cfg.seed, 5])
  order = [clips[i] for i in rng.permutation(len(clips))]
  n_valid = min(len(order) - 1, max(1, int(round(cfg.valid_fraction * len(order))))) if len(order) > 1 else 0
  splits = {TRAIN: order[:len(order) - n_valid], VALID: order[len(order) - n_valid:]}
  sample = splits[TRAIN][:cfg.kmeans_clips]
  kept: list = []
  books = fit_codebooks((load_audio(h) for _, h in sample), cfg, encoder_cfg, progress=progress, keep=kept)
  known = {clip_id: feats for (clip_id, _), feats in zip(sample, kept)}
  books_path = out / "codebooks.npz"
  if storage.is_remote(out):
    import tempfile
    with tempfile.TemporaryDirectory(prefix="musilingo-targets-") as tmp:
      books.save(os.path.join(tmp, "codebooks.npz"))
      storage.upload(os.path.join(tmp, "codebooks.npz"), books_path)
  else:
    books.save(books_path)
  counts: dict[str, Any] = {}
  for split, items in splits.items():
    counts[split] = _write_split(out, split, items, books, cfg, encoder_cfg, load_audio, progress, known)
  meta = {"params": cfg.params(), "source": source, "counts": counts,
          "codebook_sizes": [cfg.codebook_size] * len(cfg.features), "features": list(cfg.features),
          "cqt_bins": cfg.cqt_bins, "frame_rate": SAMPLE_RATE / frame_geometry(encoder_cfg)[0],
          "seconds": round(time.time() - t0, 1)}
  storage.write_atomic(out / "meta.json", json.dumps(meta, indent=1))
  return meta


def _write_split(out, split, items, books: Codebooks, cfg: TargetConfig, encoder_cfg, load_audio,
                 progress, known: dict) -> dict:
  from array_record.python import array_record_module
  for old in records.shard_files(out, split):  # a previous, unfinished preparation with other settings
    storage.path(old).unlink()
  n_shards = max(1, math.ceil(len(items) / cfg.shard_size))
  remote = storage.is_remote(out)
  stats = {"clips": 0, "frames": 0, "max_samples": 0}
  bar = tqdm(total=len(items), desc=f"targets: {split}", unit="clip", disable=not progress)
  for i in range(n_shards):
    final = out / records.shard_name(split, i, n_shards)
    if remote:
      import tempfile
      tmp_dir = tempfile.mkdtemp(prefix="musilingo-targets-")
      tmp = os.path.join(tmp_dir, final.name)
    else:
      tmp = os.fspath(final.with_name(f".{final.name}.tmp"))
    writer = array_record_module.ArrayRecordWriter(tmp, "group_size:1")
    written = 0
    try:
      for clip_id, handle in items[i * cfg.shard_size:(i + 1) * cfg.shard_size]:
        audio = np.asarray(load_audio(handle), np.float32)
        feats = known.pop(clip_id, None) or frame_features(audio, cfg, encoder_cfg)
        codes = books.codes(feats, cfg.features)
        writer.write(records.encode_record({
            "schema": records.SCHEMA, "id": str(clip_id), "audio": records.quantize_audio(audio, "int16"),
            "audio_len": int(len(audio)), "sample_rate": SAMPLE_RATE, "codes": codes, "cqt": books.cqt(feats)}))
        written += 1
        stats["frames"] += int(codes.shape[1])
        stats["max_samples"] = max(stats["max_samples"], int(len(audio)))
        bar.update(1)
    finally:
      writer.close()
    storage.write_atomic(records.sidecar_path(final), json.dumps({"written": written}))
    if remote:
      storage.upload(tmp, final)
      os.remove(tmp)
    else:
      os.replace(tmp, final)
    stats["clips"] += written
  bar.close()
  return stats


def read_meta(targets_dir) -> dict:
  path = storage.path(targets_dir) / "meta.json"
  if not path.is_file():
    raise FileNotFoundError(f"{os.fspath(path)}: no prepared targets (scripts/pretrain_encoder.py prepares them)")
  return json.loads(path.read_text())


# ---------------------------------------------------------------------------------------- clip sources

def wav_clips(directory) -> list[tuple[str, str]]:
  """(id, path) of every .wav under `directory` (sorted): the demo's unlabeled renderings, any folder of
  24 kHz clips."""
  root = os.fspath(directory)
  out = []
  for dirpath, _, files in os.walk(root):
    out += [(os.path.relpath(os.path.join(dirpath, f), root)[:-4], os.path.join(dirpath, f))
            for f in files if f.endswith(".wav")]
  return sorted(out)


def load_wav(path: str) -> np.ndarray:
  """A wav file as float32 mono at 24 kHz (resampled when it is not)."""
  from musilingo_jax.data import audio as audio_lib
  x, sr = audio_lib.read_audio(path)
  return audio_lib.resample(x, sr, SAMPLE_RATE) if sr != SAMPLE_RATE else x


def record_clips(records_dir, split: str) -> list[tuple[str, tuple[str, int]]]:
  """(id, (shard, index)) of every record of a precompute split that holds audio (scripts/precompute.py)."""
  import grain
  out = []
  for shard in records.shard_files(records_dir, split):
    src = grain.sources.ArrayRecordDataSource([storage.stage(shard)])
    for i in range(len(src)):
      out.append((f"{os.path.basename(shard)}:{i}", (shard, i)))
  if not out:
    raise ValueError(f"{os.fspath(records_dir)}: no {split} shards")
  return out


_SOURCES: dict[str, Any] = {}


def load_record_audio(handle: tuple[str, int]) -> np.ndarray:
  import grain
  shard, i = handle
  if shard not in _SOURCES:
    if len(_SOURCES) >= 64:  # a bounded number of open shards
      _SOURCES.pop(next(iter(_SOURCES)))
    _SOURCES[shard] = grain.sources.ArrayRecordDataSource([storage.stage(shard)])
  rec = records.decode_record(_SOURCES[shard][i])
  if "audio" not in rec:
    raise ValueError(f"{shard} record {i} holds no audio (features only): precompute with audio")
  return records.dequantize_audio(rec["audio"])[:int(rec.get("audio_len", len(rec["audio"])))]


def iter_records(files: Sequence[str]) -> Iterator[dict]:
  import grain
  for f in files:
    src = grain.sources.ArrayRecordDataSource([storage.stage(f)])
    for i in range(len(src)):
      yield records.decode_record(src[i])
