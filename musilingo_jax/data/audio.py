"""Audio I/O for precompute: read any released format, mix to mono, crop/pad by the reference's policy,
resample to 24 kHz.

Reference policy (docs/reference.md, Data):
  * LP-MusicCaps-MSD: crop (random in training) or zero-pad to 732,000 samples counted at the file's
    native rate, then resample to 24 kHz;
  * MusicQA: the same with 372,000 native samples (random crop at eval too in the reference; ours is
    deterministic at eval: `start` or `center`);
  * MusicInstruct / MusicCaps: the whole (~10 s) clip, resampled.
Order as in the reference: mono (mean over channels) -> crop/pad at the native rate -> resample.

Every failure is a `BadAudio(reason, path)` with `reason` in `BAD_AUDIO_REASONS`, so callers can count
and name skipped clips; nothing is replaced by another clip.

MERT's feature extractor (docs/reference_details.md): the reference's MusicInstruct and MusicCaps loaders read the
.npy clip as raw values cast to float (an int16 array is NOT rescaled to [-1, 1]), resample it and pass it
through `Wav2Vec2FeatureExtractor`, which with the checkpoint's `do_normalize` standardises the clip on its
own (zero mean, unit variance, 1e-7 added to the variance). `read_audio` returns [-1, 1] floats for every
format; `reference_input_scale` is the factor back to the raw values, and `extractor_input` is the
extractor's output for one clip. MusicQA and LP-MusicCaps-MSD clips never go through the extractor.
"""

from __future__ import annotations

import dataclasses
import math
import os
import struct

import numpy as np
import soundfile as sf
import soxr

TARGET_SR = 24_000
# Native-rate window per dataset (None = whole clip).
NATIVE_WINDOW = {
    "lp-musiccaps-msd": 732_000,
    "musicqa": 372_000,
    "musicinstruct": None,
    "musiccaps": None,
    "demo": None,
}
CROP_MODES = ("random", "start", "center")
# Data sets whose reference loader hands each clip to MERT's feature extractor.
EXTRACTOR_DATASETS = ("musicinstruct", "musiccaps")
PREPROCESSOR_CONFIG = "preprocessor_config.json"  # the feature extractor's settings in an HF MERT directory
BAD_AUDIO_REASONS = ("missing_file", "unreadable", "empty", "too_short", "nan")


class BadAudio(Exception):
  """A clip that cannot be used: `reason` (one of BAD_AUDIO_REASONS), `path`, and a human detail."""

  def __init__(self, reason: str, path: str, detail: str = ""):
    if reason not in BAD_AUDIO_REASONS:
      raise ValueError(f"unknown BadAudio reason {reason!r}")
    self.reason, self.path, self.detail = reason, str(path), detail
    super().__init__(f"{reason}: {path}" + (f" ({detail})" if detail else ""))


@dataclasses.dataclass(frozen=True)
class Window:
  audio: np.ndarray     # [S] float32 at `TARGET_SR` (zero-padded past `length`)
  length: int           # true (unpadded) samples at TARGET_SR
  start: int            # crop start in native samples
  native_rate: int      # the file's sampling rate


def _check_wav_truncation(path: str) -> None:
  """libsndfile silently reads a truncated WAV up to where it ends; treat that as unreadable."""
  size = os.path.getsize(path)
  with open(path, "rb") as f:
    head = f.read(12)
    if len(head) < 12 or head[:4] not in (b"RIFF", b"RIFX") or head[8:12] != b"WAVE":
      return  # not a plain RIFF/WAVE file (e.g. RF64): leave it to libsndfile
    fmt = "<I" if head[:4] == b"RIFF" else ">I"
    pos = 12
    while pos + 8 <= size:
      f.seek(pos)
      cid, (clen,) = f.read(4), struct.unpack(fmt, f.read(4))
      if cid == b"data":
        if clen in (0, 0xFFFFFFFF):  # streamed WAV with unknown length
          return
        have = size - (pos + 8)
        if have < clen:
          raise BadAudio("unreadable", path, f"truncated WAV: data chunk declares {clen} bytes, file holds {have}")
        return
      pos += 8 + clen + (clen & 1)
    raise BadAudio("unreadable", path, "WAV without a data chunk")


def _to_float(x: np.ndarray) -> np.ndarray:
  if np.issubdtype(x.dtype, np.integer):
    return x.astype(np.float32) / float(-np.iinfo(x.dtype).min)
  if np.issubdtype(x.dtype, np.floating):
    return x.astype(np.float32)
  raise TypeError(f"array of dtype {x.dtype} is not audio")


def _mono(x: np.ndarray) -> np.ndarray:
  """[n] or [n, c] / [c, n] (channels = the smaller axis) -> [n] by the mean over channels."""
  if x.ndim == 1:
    return x
  if x.ndim != 2:
    raise ValueError(f"audio array has shape {x.shape}; expected [n] or [n, channels]")
  if x.shape[0] < x.shape[1]:
    x = x.T
  return x.mean(axis=1)


def read_audio(path: str | os.PathLike, sample_rate: int | None = None) -> tuple[np.ndarray, int]:
  """Decodes a clip to mono float32 at its native rate: ([n], rate).

  wav/flac/ogg/mp3 through libsndfile (librosa as fallback for what it cannot open); .npy is a raw array
  whose rate must be given (`sample_rate`, from the annotation). Raises BadAudio.
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise BadAudio("missing_file", path, "no such file")
  if os.path.getsize(path) == 0:
    raise BadAudio("empty", path, "zero-byte file")
  try:
    if path.lower().endswith(".npy"):
      if not sample_rate:
        raise BadAudio("unreadable", path, ".npy audio needs a sampling_rate from its annotation")
      x = np.load(path, allow_pickle=False)
      rate = int(sample_rate)
      x = _mono(_to_float(np.asarray(x)))
    else:
      if path.lower().endswith((".wav", ".wave")):
        _check_wav_truncation(path)
      try:
        x, rate = sf.read(path, dtype="float32", always_2d=True)
        x = x.mean(axis=1)
      except sf.LibsndfileError as err:
        if not path.lower().endswith(".mp3"):
          raise BadAudio("unreadable", path, str(err)) from None
        import librosa  # slow import; only for mp3s libsndfile refuses
        x, rate = librosa.load(path, sr=None, mono=True)
  except BadAudio:
    raise
  except Exception as err:  # noqa: BLE001 - any decoder failure is one reason: unreadable
    raise BadAudio("unreadable", path, f"{type(err).__name__}: {err}") from None
  return np.ascontiguousarray(x, np.float32), int(rate)


def resample(x: np.ndarray, rate_in: int, rate_out: int = TARGET_SR) -> np.ndarray:
  """soxr (HQ) resampling; output length is ceil(n * out / in) (torchaudio's Resample length)."""
  if rate_in == rate_out:
    return x.astype(np.float32, copy=False)
  n_out = math.ceil(len(x) * rate_out / rate_in)
  y = soxr.resample(x.astype(np.float32, copy=False), rate_in, rate_out, quality="HQ")
  if len(y) < n_out:
    y = np.pad(y, (0, n_out - len(y)))
  return np.ascontiguousarray(y[:n_out], np.float32)


def crop_start(n: int, window: int, mode: str, rng: np.random.Generator | None) -> int:
  """Start of a `window`-sample crop in an `n`-sample clip (0 when the clip is not longer)."""
  if mode not in CROP_MODES:
    raise ValueError(f"crop mode must be one of {CROP_MODES}, got {mode!r}")
  if n <= window:
    return 0
  if mode == "random":
    if rng is None:
      raise ValueError("a random crop needs an rng (seeded per example)")
    return int(rng.integers(0, n - window + 1))
  return 0 if mode == "start" else (n - window) // 2


def load_window(path: str | os.PathLike, *, sample_rate: int | None = None, native_window: int | None = None,
                crop: str = "start", rng: np.random.Generator | None = None, min_seconds: float = 1.0,
                target_rate: int = TARGET_SR, clip: tuple[np.ndarray, int] | None = None) -> Window:
  """Reads (or takes an already decoded `clip`), validates, crops/pads and resamples one clip.

  native_window: samples at the file's own rate to crop/zero-pad to (None = whole clip).
  min_seconds: clips shorter than this (before padding) are BadAudio('too_short').
  """
  path = os.fspath(path)
  x, rate = clip if clip is not None else read_audio(path, sample_rate)
  if len(x) == 0:
    raise BadAudio("empty", path, "no samples")
  if not np.isfinite(x).all():
    raise BadAudio("nan", path, f"{int((~np.isfinite(x)).sum())} NaN/Inf samples")
  if len(x) < min_seconds * rate:
    raise BadAudio("too_short", path, f"{len(x) / rate:.3f} s < minimum {min_seconds} s")
  start, true_native = 0, len(x)
  if native_window is not None:
    start = crop_start(len(x), native_window, crop, rng)
    x = x[start:start + native_window]
    true_native = len(x)
    if len(x) < native_window:
      x = np.pad(x, (0, native_window - len(x)))
  y = resample(x, rate, target_rate)
  length = min(len(y), math.ceil(true_native * target_rate / rate))
  return Window(audio=y, length=int(length), start=int(start), native_rate=rate)


# ---- MERT's feature extractor, as the reference applies it -----------------------------------------------

def reference_input_scale(path: str | os.PathLike) -> float:
  """Factor from `read_audio`'s float samples to the values the reference's loader hands the feature
  extractor: 2**(bits - 1) for a signed-integer .npy (read as raw integers cast to float; we divide by
  that factor), 1 for a float .npy and for every decoded format (wav/mp3/... decode to [-1, 1] there too)."""
  path = os.fspath(path)
  if not path.lower().endswith(".npy"):
    return 1.0
  dtype = np.load(path, mmap_mode="r", allow_pickle=False).dtype
  if np.issubdtype(dtype, np.signedinteger):
    return float(-np.iinfo(dtype).min)
  return 1.0


def extractor_input(x: np.ndarray, *, do_normalize: bool, scale: float = 1.0) -> np.ndarray:
  """`Wav2Vec2FeatureExtractor(do_normalize=do_normalize)(x * scale)["input_values"][0]` for one clip [S]
  (no padding): float32; with do_normalize, (y - mean(y)) / sqrt(var(y) + 1e-7) over the clip, in float32
  as the extractor computes it."""
  y = np.asarray(x, np.float32)
  if scale != 1.0:
    y = y * np.float32(scale)
  if do_normalize:
    y = (y - y.mean()) / np.sqrt(y.var() + 1e-7)
  return np.ascontiguousarray(y, np.float32)


def read_do_normalize(directory: str | os.PathLike | None) -> bool | None:
  """`do_normalize` of the feature extractor config (preprocessor_config.json) of a converted checkpoint
  (scripts/convert_hf.py keeps MERT's) or an HF MERT directory; None when the file is not there. A file
  without the key means transformers' default, True."""
  if not directory:
    return None
  import json

  from etils import epath
  f = epath.Path(directory) / PREPROCESSOR_CONFIG  # a local folder or a gs:// URL
  if not f.is_file():
    return None
  cfg = json.loads(f.read_text(encoding="utf-8"))
  value = cfg.get("do_normalize", True)
  if not isinstance(value, bool):
    raise ValueError(f"{f}: do_normalize = {value!r}; expected true or false")
  return value


def extractor_do_normalize(directory: str | os.PathLike | None, dataset: str) -> bool:
  """The do_normalize the reference's extractor applies to `dataset`'s clips with this MERT checkpoint:
  False for data sets that skip the extractor; else the checkpoint's preprocessor_config.json, or
  transformers' default (True, also MERT-v1-330M's setting) when no checkpoint is given (random encoder).
  A checkpoint without the file is refused: its setting cannot be known."""
  if dataset not in EXTRACTOR_DATASETS:
    return False
  value = read_do_normalize(directory)
  if value is not None:
    return value
  if directory:
    raise ValueError(f"{os.path.join(os.fspath(directory), PREPROCESSOR_CONFIG)} is missing: {dataset} clips go "
                     "through MERT's feature extractor, whose do_normalize it holds. Re-run scripts/convert_hf.py "
                     "(it keeps the file) or copy it from the MERT checkpoint")
  return True


# ---- why a file is not audio (the programs' input checks) ----------------------------------------------

_MAGIC = ((b"RIFF", "WAV/RIFF"), (b"RIFX", "WAV/RIFX"), (b"fLaC", "FLAC"), (b"OggS", "Ogg"), (b"ID3", "MP3 (ID3)"),
          (b"FORM", "AIFF"), (b"\x93NUMPY", ".npy array"))


def _sniff(head: bytes) -> str | None:
  """What the first bytes of a file say it is: a known audio container, text (with its start), or None."""
  for magic, name in _MAGIC:
    if head.startswith(magic):
      return name
  if len(head) >= 2 and head[0] == 0xFF and head[1] & 0xE0 == 0xE0:
    return "MP3 frames"
  try:
    text = head.decode("utf-8")
  except UnicodeDecodeError:
    return None
  if text and sum(c.isprintable() or c in "\r\n\t" for c in text) >= 0.95 * len(text):
    first = " ".join(text.split())[:40]
    return f"text ({first!r})"
  return None


class _CapturedStderr:
  """Collects what C decoders (libsndfile's mpg123, ffmpeg) write straight to file descriptor 2 while
  probing, so a program's stderr stays one line; `.text` holds it afterwards."""

  def __enter__(self):
    import tempfile
    self._tmp = tempfile.TemporaryFile()
    try:
      self._saved = os.dup(2)
      os.dup2(self._tmp.fileno(), 2)
    except OSError:
      self._saved = None
    return self

  def __exit__(self, *exc):
    if self._saved is not None:
      os.dup2(self._saved, 2)
      os.close(self._saved)
    self._tmp.seek(0)
    self.text = self._tmp.read().decode("utf-8", "replace")
    self._tmp.close()


def _soundfile_reason(path: str, err: Exception, captured: str) -> str:
  msg = str(err).strip()
  prefix = f"Error opening {path!r}: "
  if msg.startswith(prefix):
    msg = msg[len(prefix):]
  notes = [ln.split(":", 1)[-1].strip() for ln in captured.splitlines() if ln.strip()]
  if notes and "does not exist or is not a regular file" in msg:  # libsndfile's word for an mp3 it cannot decode
    msg = f"mpg123: {notes[0]}"
  return msg.rstrip(".")


def not_audio_reason(path: str | os.PathLike) -> str | None:
  """None when a decoder opens `path` as audio; else one phrase saying why it is not audio, with each
  decoder's reason, tried as `read_audio` tries them: libsndfile (soundfile) first, then audioread (librosa's
  fallback), e.g. "not audio: the file holds text ('hello'); soundfile: Format not recognised; audioread:
  no backend could decode it (backends: RawAudioFile)". Only headers are read. A missing or empty file, or a
  .npy (raw arrays, read as such), gives the matching BadAudio reason; what the C decoders print to stderr
  while probing is kept out of the program's stderr."""
  path = os.fspath(path)
  if not os.path.isfile(path):
    return "missing_file: no such file" if not os.path.exists(path) else "not audio: a folder, not a file"
  if os.path.getsize(path) == 0:
    return "empty: zero-byte file"
  if path.lower().endswith(".npy"):
    return None
  with open(path, "rb") as f:
    kind = _sniff(f.read(512))
  reasons = []
  with _CapturedStderr() as cap:
    try:
      sf.info(path)
      return None
    except Exception as err:  # noqa: BLE001 - any failure is a reason to report
      sf_err = err
  reasons.append(f"soundfile: {_soundfile_reason(path, sf_err, cap.text)}")
  try:
    import audioread
    with _CapturedStderr():
      try:
        with audioread.audio_open(path):
          return None
      except audioread.NoBackendError:
        names = ", ".join(b.__name__ for b in audioread.available_backends()) or "none"
        reasons.append(f"audioread: no backend could decode it (backends: {names})")
      except Exception as err:  # noqa: BLE001
        reasons.append(f"audioread: {type(err).__name__}" + (f": {err}" if str(err).strip() else ""))
  except ImportError:
    pass
  what = f"the file holds {kind}" if kind and kind.startswith("text") else (
      f"it starts like {kind} but does not decode" if kind else "unknown format")
  return f"not audio: {what}; " + "; ".join(reasons)
