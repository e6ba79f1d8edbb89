"""Render a score excerpt (note events) to 24 kHz mono audio.

Two renderers, same input:
  fluidsynth  a format-0 General MIDI file (one channel per part, all with the same program, tempo meta
              event = the clip's BPM) played by the `fluidsynth` binary with a GM soundfont.
  numpy       an additive synthesizer: per-instrument partials (ratio, amplitude), ADSR or percussive
              decay envelopes, vibrato and breath noise, so the instruments differ in spectrum and envelope.

Notes are a float array [N, 4]: (part, start, duration, midi pitch), start and duration in quarter notes.
Every renderer returns float32 [n_samples] at SAMPLE_RATE, loudness-normalized (RMS 0.1, peak <= 0.95).
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import struct
import subprocess
import tempfile

import numpy as np
import soundfile as sf

SAMPLE_RATE = 24_000
RENDERERS = ("auto", "fluidsynth", "numpy")
# name -> General MIDI program (0-based)
INSTRUMENTS: dict[str, int] = {
    "piano": 0, "harpsichord": 6, "marimba": 12, "church organ": 19, "acoustic guitar": 24,
    "violin": 40, "cello": 42, "trumpet": 56, "clarinet": 71, "flute": 73,
}
SOUNDFONT_DIRS = ("/usr/share/sounds/sf2", "/usr/share/soundfonts")
SOUNDFONT_PREFERENCE = ("FluidR3_GM.sf2", "TimGM6mb.sf2", "default-GM.sf2")
_TICKS_PER_QUARTER = 480
_MIDI_CHANNELS = tuple(c for c in range(16) if c != 9)   # channel 10 (index 9) is drums in GM
_TARGET_RMS, _PEAK = 0.1, 0.95


def part_velocity(part: int) -> int:
  """The top part (usually the melody) a little louder than the others."""
  return 92 if part == 0 else 72


# ---------------------------------------------------------------------------------------- fluidsynth

def find_soundfont() -> str | None:
  """A General MIDI soundfont from the Debian locations, resolved through symlinks; None if none."""
  for d in SOUNDFONT_DIRS:
    for name in SOUNDFONT_PREFERENCE:
      path = os.path.join(d, name)
      if os.path.isfile(path):
        return os.path.realpath(path)
  for d in SOUNDFONT_DIRS:
    if os.path.isdir(d):
      found = sorted(f for f in os.listdir(d) if f.lower().endswith(".sf2"))
      if found:
        return os.path.realpath(os.path.join(d, found[0]))
  return None


def fluidsynth_version() -> str | None:
  exe = shutil.which("fluidsynth")
  if exe is None:
    return None
  out = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=30).stdout
  return out.splitlines()[0].strip() if out else "unknown"


def resolve_renderer(renderer: str) -> tuple[str, str | None]:
  """(renderer, soundfont path or None). `auto` picks fluidsynth when the binary and a soundfont exist."""
  if renderer not in RENDERERS:
    raise ValueError(f"renderer={renderer!r}; expected one of {RENDERERS}")
  if renderer == "numpy":
    return "numpy", None
  exe, sf2 = shutil.which("fluidsynth"), find_soundfont()
  if exe and sf2:
    return "fluidsynth", sf2
  if renderer == "fluidsynth":
    missing = "the `fluidsynth` binary" if not exe else f"a .sf2 soundfont under {SOUNDFONT_DIRS}"
    raise RuntimeError(f"renderer='fluidsynth' needs {missing}: apt-get install -y --no-install-recommends "
                       "fluidsynth timgm6mb-soundfont, or pass renderer='numpy'")
  return "numpy", None


def _vlq(n: int) -> bytes:
  """MIDI variable-length quantity."""
  out = [n & 0x7F]
  n >>= 7
  while n:
    out.append(0x80 | (n & 0x7F))
    n >>= 7
  return bytes(reversed(out))


def midi_file(notes: np.ndarray, *, bpm: float, program: int, end_quarters: float) -> bytes:
  """Format-0 standard MIDI file: tempo, one program change per used channel, the notes cut at end_quarters."""
  q = _TICKS_PER_QUARTER
  end_tick = int(round(end_quarters * q))
  events = []   # (tick, order, bytes): note-offs (order 0) before note-ons (order 1) at the same tick
  for part, start, dur, pitch in notes:
    on, off = int(round(start * q)), min(int(round((start + dur) * q)), end_tick)
    if on >= end_tick or off <= on:
      continue
    ch, key = _MIDI_CHANNELS[int(part) % len(_MIDI_CHANNELS)], int(np.clip(pitch, 0, 127))
    events.append((on, 1, bytes([0x90 | ch, key, part_velocity(int(part))])))
    events.append((off, 0, bytes([0x80 | ch, key, 0])))
  channels = sorted({_MIDI_CHANNELS[int(p) % len(_MIDI_CHANNELS)] for p in notes[:, 0]}) if len(notes) else [0]
  head = [(0, -2, b"\xff\x51\x03" + int(round(60e6 / bpm)).to_bytes(3, "big"))]
  head += [(0, -1, bytes([0xC0 | ch, program])) for ch in channels]
  track, last = bytearray(), 0
  for tick, _, data in head + sorted(events):
    track += _vlq(tick - last) + data
    last = tick
  track += _vlq(max(end_tick - last, 0)) + b"\xff\x2f\x00"
  return (b"MThd" + struct.pack(">IHHH", 6, 0, 1, q) + b"MTrk" + struct.pack(">I", len(track))
          + bytes(track))


def render_fluidsynth(notes: np.ndarray, *, bpm: float, program: int, n_samples: int,
                      soundfont: str) -> np.ndarray:
  end_q = n_samples / SAMPLE_RATE * bpm / 60.0
  with tempfile.TemporaryDirectory(prefix="musilingo_demo_") as tmp:
    mid, wav = os.path.join(tmp, "in.mid"), os.path.join(tmp, "out.wav")
    with open(mid, "wb") as f:
      f.write(midi_file(notes, bpm=bpm, program=program, end_quarters=end_q))
    cmd = ["fluidsynth", "-ni", "-q", "-g", "0.6", "-r", str(SAMPLE_RATE), "-F", wav, soundfont, mid]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    if proc.returncode != 0 or not os.path.isfile(wav):
      raise RuntimeError(f"{' '.join(cmd)} failed (exit {proc.returncode}): {proc.stderr.strip()[:500]}")
    audio, rate = sf.read(wav, dtype="float32", always_2d=True)
  if rate != SAMPLE_RATE:
    raise RuntimeError(f"fluidsynth wrote {rate} Hz, asked for {SAMPLE_RATE}")
  return _fit(audio.mean(axis=1), n_samples)


# ---------------------------------------------------------------------------------------- numpy synth

@dataclasses.dataclass(frozen=True)
class Timbre:
  harmonics: tuple[float, ...]                # amplitude of partial k * f0, k = 1, 2, ...
  attack: float                               # seconds to full level
  release: float                              # seconds to silence after the note ends
  extra: tuple[tuple[float, float], ...] = ()  # inharmonic partials (frequency ratio, amplitude)
  sustain: float = 1.0                        # sustained instruments: level after the attack transient
  tau: float | None = None                    # struck/plucked: e-folding time (s) of the fundamental at C4
  tau_slope: float = 0.0                      # partial k decays (1 + tau_slope * (k - 1)) times faster
  vibrato: tuple[float, float] = (0.0, 0.0)   # (rate Hz, depth cents)
  noise: float = 0.0                          # breath/bow noise level


def _amps(values) -> tuple[float, ...]:
  return tuple(float(v) if v > 1e-3 else 0.0 for v in values)


TIMBRES: dict[str, Timbre] = {
    "piano": Timbre(_amps(k ** -1.5 for k in range(1, 11)), attack=0.004, release=0.12, tau=1.0,
                    tau_slope=0.5),
    "harpsichord": Timbre(_amps(abs(np.sin(np.pi * k / 8)) / k ** 0.4 for k in range(1, 15)), attack=0.002,
                          release=0.08, tau=0.7, tau_slope=0.3),
    "marimba": Timbre((1.0,), extra=((3.93, 0.25), (9.54, 0.06)), attack=0.002, release=0.15, tau=0.35,
                      tau_slope=1.5),
    "church organ": Timbre((1.0, 0.7, 0.35, 0.45, 0.0, 0.2, 0.0, 0.25), extra=((0.5, 0.45),), attack=0.04,
                           release=0.12),
    "acoustic guitar": Timbre(_amps(abs(np.sin(np.pi * k / 4)) / k ** 1.2 for k in range(1, 13)), attack=0.003,
                              release=0.1, tau=1.2, tau_slope=0.6),
    "violin": Timbre(_amps(k ** -0.8 for k in range(1, 15)), attack=0.07, release=0.08, sustain=0.85,
                     vibrato=(5.5, 18.0), noise=0.01),
    "cello": Timbre(_amps([1.0, 0.9] + [k ** -1.3 for k in range(3, 13)]), attack=0.09, release=0.12,
                    sustain=0.85, vibrato=(5.0, 14.0), noise=0.008),
    "trumpet": Timbre((0.6, 0.9, 1.0, 0.85, 0.65, 0.5, 0.35, 0.25, 0.18, 0.12, 0.08, 0.05), attack=0.03,
                      release=0.06, sustain=0.8),
    "clarinet": Timbre((1.0, 0.02, 0.75, 0.02, 0.5, 0.02, 0.35, 0.02, 0.2, 0.0, 0.12), attack=0.03,
                       release=0.06, sustain=0.9),
    "flute": Timbre((1.0, 0.3, 0.12, 0.04), attack=0.06, release=0.08, sustain=0.9, vibrato=(5.0, 8.0),
                    noise=0.05),
}
assert set(TIMBRES) == set(INSTRUMENTS)


def _note(timbre: Timbre, f0: float, n_dur: int) -> tuple[np.ndarray, np.ndarray]:
  """One note lasting n_dur samples plus the release: (tone, envelope), float32 [n], tone peak about 1."""
  n = n_dur + int(round(timbre.release * SAMPLE_RATE))
  t = np.arange(n, dtype=np.float32) / np.float32(SAMPLE_RATE)
  dur = n_dur / SAMPLE_RATE
  phase = np.float32(2 * np.pi * f0) * t                          # [n]
  rate, cents = timbre.vibrato
  if cents:
    delta = 2 ** (cents / 1200) - 1
    phase += np.float32(f0 * delta / rate) * (1 - np.cos(np.float32(2 * np.pi * rate) * t))
  env = np.minimum(t / np.float32(timbre.attack), np.float32(1))  # attack ramp
  env[n_dur:] *= np.maximum(1 - (t[n_dur:] - np.float32(dur)) / np.float32(timbre.release), 0)
  if timbre.tau is None:                                          # sustained: transient -> sustain level
    env *= timbre.sustain + (1 - timbre.sustain) * np.exp(t / np.float32(-0.1))
  tau = None if timbre.tau is None else timbre.tau * np.sqrt(261.6 / f0)
  decay = None if tau is None else np.exp(t / np.float32(-tau))   # of the fundamental
  step = None if tau is None or not timbre.tau_slope else np.exp(t * np.float32(-timbre.tau_slope / tau))
  # sin(k phase) by the Chebyshev recurrence: one sin and one cos per note instead of one sin per partial
  y = np.zeros(n, np.float32)
  s_prev, s_k, two_cos = np.zeros(n, np.float32), np.sin(phase), 2 * np.cos(phase)
  for k, amp in enumerate(timbre.harmonics, start=1):
    if f0 * k >= 0.45 * SAMPLE_RATE:
      break
    if amp:
      y += amp * s_k if decay is None else (amp * decay) * s_k
    if step is not None:
      decay = decay * step
    s_prev, s_k = s_k, two_cos * s_k - s_prev
  for ratio, amp in timbre.extra:
    if f0 * ratio < 0.45 * SAMPLE_RATE:
      a = amp if tau is None else amp * np.exp(t * np.float32(-(1 + timbre.tau_slope * (ratio - 1)) / tau))
      y += a * np.sin(np.float32(ratio) * phase)
  return y * env, env


def render_numpy(notes: np.ndarray, *, bpm: float, instrument: str, n_samples: int,
                 seed: int = 0) -> np.ndarray:
  timbre, rng = TIMBRES[instrument], np.random.default_rng(seed)
  out = np.zeros(n_samples, np.float32)
  samples_per_quarter = 60.0 / bpm * SAMPLE_RATE
  cache: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = {}   # repeated (pitch, length) notes
  for part, start, dur, pitch in notes:
    i0 = int(round(start * samples_per_quarter))
    if i0 >= n_samples:
      continue
    key = (int(pitch), max(int(round(dur * samples_per_quarter)), 1))
    if key not in cache:
      cache[key] = _note(timbre, 440.0 * 2 ** ((key[0] - 69) / 12), key[1])
    y, env = (a[: n_samples - i0] for a in cache[key])
    if timbre.noise:
      y = y + timbre.noise * env * rng.standard_normal(len(y), dtype=np.float32)
    out[i0:i0 + len(y)] += (part_velocity(int(part)) / 127) * y
  return _normalize(out)


# ---------------------------------------------------------------------------------------- common

def _fit(x: np.ndarray, n: int) -> np.ndarray:
  x = np.asarray(x, np.float32)[:n]
  return _normalize(np.pad(x, (0, n - len(x))))


def _normalize(x: np.ndarray) -> np.ndarray:
  rms, peak = float(np.sqrt(np.mean(np.square(x)))), float(np.max(np.abs(x), initial=0.0))
  if rms < 1e-6:
    return x
  return (x * min(_TARGET_RMS / rms, _PEAK / peak)).astype(np.float32)


def render(notes: np.ndarray, *, bpm: float, instrument: str, n_samples: int, renderer: str,
           soundfont: str | None = None, seed: int = 0) -> np.ndarray:
  """Dispatch to a resolved renderer ('fluidsynth' or 'numpy'); float32 [n_samples]."""
  if renderer == "fluidsynth":
    return render_fluidsynth(notes, bpm=bpm, program=INSTRUMENTS[instrument], n_samples=n_samples,
                             soundfont=soundfont)
  if renderer == "numpy":
    return render_numpy(notes, bpm=bpm, instrument=instrument, n_samples=n_samples, seed=seed)
  raise ValueError(f"renderer={renderer!r}: resolve 'auto' with resolve_renderer() first")


def write_wav(path: str | os.PathLike, audio: np.ndarray) -> None:
  """int16 PCM mono at SAMPLE_RATE (the conversion is ours, so the bytes are reproducible)."""
  pcm = np.clip(np.round(audio * 32767.0), -32768, 32767).astype(np.int16)
  sf.write(os.fspath(path), pcm, SAMPLE_RATE, subtype="PCM_16", format="WAV")
