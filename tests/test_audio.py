"""Audio decode, mono mix, crop/pad policy, resampling and typed failures."""

import math

import numpy as np
import pytest
import soundfile as sf

from musilingo_jax.data import audio


def _tone(rate, seconds, freq=440.0, channels=1):
  t = np.arange(int(rate * seconds)) / rate
  x = (0.5 * np.sin(2 * np.pi * freq * t)).astype(np.float32)
  return np.stack([x] * channels, axis=1) if channels > 1 else x


@pytest.mark.parametrize("rate", [44_100, 16_000])
def test_resample_keeps_440hz(tmp_path, rate):
  path = tmp_path / f"tone_{rate}.wav"
  sf.write(path, _tone(rate, 2.0), rate, subtype="FLOAT")
  win = audio.load_window(path)
  assert win.native_rate == rate and win.audio.dtype == np.float32
  assert len(win.audio) == win.length == math.ceil(2.0 * rate * 24_000 / rate)
  spec = np.abs(np.fft.rfft(win.audio * np.hanning(len(win.audio))))
  peak = np.fft.rfftfreq(len(win.audio), 1 / 24_000)[np.argmax(spec)]
  assert abs(peak - 440.0) <= 24_000 / len(win.audio)  # within one FFT bin
  assert abs(np.abs(win.audio).max() - 0.5) < 0.02  # amplitude kept


def test_formats_and_mono_mix(tmp_path):
  stereo = _tone(24_000, 1.5, channels=2)
  stereo[:, 1] = 0.0
  for ext, kw in ((".flac", {}), (".ogg", {}), (".mp3", {}), (".wav", {"subtype": "PCM_16"})):
    sf.write(tmp_path / f"s{ext}", stereo, 24_000, **kw)
    x, rate = audio.read_audio(tmp_path / f"s{ext}")
    assert rate == 24_000 and x.ndim == 1 and x.dtype == np.float32
    tol = 0.05 if ext in (".ogg", ".mp3") else 1e-3
    assert abs(np.abs(x).max() - 0.25) < tol, ext  # mean of the two channels
  np.save(tmp_path / "c.npy", (np.stack([_tone(16_000, 1.0)] * 2) * 32767).astype(np.int16))  # [channels, n]
  x, rate = audio.read_audio(tmp_path / "c.npy", 16_000)
  assert rate == 16_000 and x.shape == (16_000,) and abs(np.abs(x).max() - 0.5) < 1e-3


def test_native_windows_match_reference():
  assert audio.NATIVE_WINDOW["lp-musiccaps-msd"] == 732_000 and audio.NATIVE_WINDOW["musicqa"] == 372_000
  assert audio.NATIVE_WINDOW["musicinstruct"] is None and audio.NATIVE_WINDOW["musiccaps"] is None


def test_crop_and_pad_at_native_rate(tmp_path):
  rate = 48_000
  x = np.arange(rate * 2, dtype=np.float32) / (rate * 2)  # a ramp: the crop start is visible
  np.save(tmp_path / "r.npy", x)
  kw = dict(sample_rate=rate, native_window=rate)  # 1 s window of a 2 s clip
  start = audio.load_window(tmp_path / "r.npy", crop="start", **kw)
  center = audio.load_window(tmp_path / "r.npy", crop="center", **kw)
  assert start.start == 0 and center.start == rate // 2
  assert len(start.audio) == start.length == 24_000
  r1 = audio.load_window(tmp_path / "r.npy", crop="random", rng=np.random.default_rng(3), **kw)
  r2 = audio.load_window(tmp_path / "r.npy", crop="random", rng=np.random.default_rng(3), **kw)
  assert r1.start == r2.start and np.array_equal(r1.audio, r2.audio)
  assert {audio.load_window(tmp_path / "r.npy", crop="random", rng=np.random.default_rng(s), **kw).start
          for s in range(5)} != {r1.start}
  # Shorter than the window: zero-padded at the native rate, true length kept.
  pad = audio.load_window(tmp_path / "r.npy", sample_rate=rate, native_window=3 * rate)
  assert len(pad.audio) == 72_000 and pad.length == 48_000 and np.abs(pad.audio[49_000:]).max() < 1e-3
  whole = audio.load_window(tmp_path / "r.npy", sample_rate=rate)  # MI/MusicCaps: whole clip
  assert len(whole.audio) == whole.length == 48_000


def test_bad_audio_reasons(tmp_path):
  def reason(path, **kw):
    with pytest.raises(audio.BadAudio) as err:
      audio.load_window(path, **kw)
    assert err.value.path == str(path)
    return err.value.reason

  assert reason(tmp_path / "nope.wav") == "missing_file"
  (tmp_path / "zero.wav").write_bytes(b"")
  assert reason(tmp_path / "zero.wav") == "empty"
  (tmp_path / "junk.flac").write_bytes(b"this is not audio at all" * 20)
  assert reason(tmp_path / "junk.flac") == "unreadable"
  sf.write(tmp_path / "full.wav", _tone(24_000, 2.0), 24_000, subtype="PCM_16")
  data = (tmp_path / "full.wav").read_bytes()
  (tmp_path / "trunc.wav").write_bytes(data[: len(data) // 2])
  assert reason(tmp_path / "trunc.wav") == "unreadable"
  (tmp_path / "hdr.wav").write_bytes(data[:30])
  assert reason(tmp_path / "hdr.wav") == "unreadable"
  sf.write(tmp_path / "nodata.wav", np.zeros(0, np.float32), 24_000)
  assert reason(tmp_path / "nodata.wav") == "empty"
  x = _tone(16_000, 2.0)
  x[100] = np.nan
  np.save(tmp_path / "nan.npy", x)
  assert reason(tmp_path / "nan.npy", sample_rate=16_000) == "nan"
  np.save(tmp_path / "short.npy", _tone(16_000, 0.2))
  assert reason(tmp_path / "short.npy", sample_rate=16_000) == "too_short"
  assert audio.load_window(tmp_path / "short.npy", sample_rate=16_000, min_seconds=0.1).length == 4_800
  np.save(tmp_path / "obj.npy", np.array(["a", "b"]))
  assert reason(tmp_path / "obj.npy", sample_rate=16_000) == "unreadable"
  assert reason(tmp_path / "nan.npy") == "unreadable"  # .npy without a sampling rate
