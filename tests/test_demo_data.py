"""The embedded demo dataset: layout, audio format, split by piece, answers vs labels, determinism,
renderer timbres, and key labels under transposition. Tiny builds (3 + 2 pieces, 2 s clips)."""

import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from musilingo_jax.data import demo, render

TINY = dict(num_train_pieces=3, num_test_pieces=2, clips_per_piece=2, clip_seconds=2.0, seed=0)
HAVE_FLUIDSYNTH = render.resolve_renderer("auto")[0] == "fluidsynth"


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
  return tmp_path_factory.mktemp("scores")


@pytest.fixture(scope="module")
def numpy_set(tmp_path_factory, cache):
  out = tmp_path_factory.mktemp("demo_numpy")
  meta = demo.build_demo_dataset(out, renderer="numpy", workers=2, cache_dir=cache, progress=False, **TINY)
  return out, meta


def _check_layout(out: Path, meta: dict, renderer: str):
  assert meta["renderer"] == renderer and meta["params"]["renderer"] == renderer
  assert json.loads((out / "meta.json").read_text()) == meta
  n = int(round(TINY["clip_seconds"] * render.SAMPLE_RATE))
  clips = set()
  for split in demo.SPLITS:
    entries = demo.load_demo_split(out, split)
    assert len(entries) == meta["counts"][f"{split}_examples"]
    by_clip = {}
    for e in entries:
      assert set(e) == {"id", "clip_id", "audio", "question", "answer", "kind", "labels"}
      assert e["id"] == f"{e['clip_id']}-{e['kind']}" and e["audio"] == f"audio/{e['clip_id']}.wav"
      by_clip.setdefault(e["clip_id"], []).append(e["kind"])
    assert all(kinds == list(demo.QUESTION_KINDS) for kinds in by_clip.values())
    assert len(by_clip) == meta["counts"][f"{split}_clips"] == TINY["clips_per_piece"] * len(meta["pieces"][split])
    clips |= set(by_clip)
  assert {p.stem for p in (out / "audio").iterdir()} == clips
  for clip in clips:
    info = sf.info(str(out / "audio" / f"{clip}.wav"))
    assert (info.samplerate, info.channels, info.subtype, info.frames) == (render.SAMPLE_RATE, 1, "PCM_16", n)
    pcm, _ = sf.read(str(out / "audio" / f"{clip}.wav"), dtype="int16")
    assert np.sqrt(np.mean(pcm.astype(np.float64) ** 2)) > 300, f"{clip} is (nearly) silent"


def test_layout_and_audio_format(numpy_set):
  out, meta = numpy_set
  _check_layout(out, meta, "numpy")
  assert meta["counts"]["train_pieces"] == 3 and meta["counts"]["test_pieces"] == 2
  assert set(meta["instruments"]) == set(demo.INSTRUMENTS) and meta["sample_rate"] == 24_000


def test_split_by_piece_and_composer_coverage(numpy_set):
  out, meta = numpy_set
  pieces = {s: {e["labels"]["piece"] for e in demo.load_demo_split(out, s)} for s in demo.SPLITS}
  assert pieces["train"] == set(meta["pieces"]["train"]) and pieces["test"] == set(meta["pieces"]["test"])
  assert not pieces["train"] & pieces["test"]
  works = {s: {meta["piece_labels"][p]["work"] for p in pieces[s]} for s in demo.SPLITS}
  assert not works["train"] & works["test"]
  assert set(meta["composers"]["test"]) <= set(meta["composers"]["train"])


def test_answers_agree_with_labels(numpy_set):
  out, meta = numpy_set
  for split in demo.SPLITS:
    for e in demo.load_demo_split(out, split):
      lab, kind, answer = e["labels"], e["kind"], e["answer"]
      assert e["question"] in demo.QUESTIONS[kind]
      assert answer == demo.answer_for(kind, lab)
      assert lab["gm_program"] == render.INSTRUMENTS[lab["instrument"]]
      assert demo.tempo_class(lab["bpm"]) == lab["tempo_class"]
      assert demo.TRANSPOSE_RANGE[0] <= lab["transpose"] <= demo.TRANSPOSE_RANGE[1]
      piece = meta["piece_labels"][lab["piece"]]
      assert lab["key"] == demo.transpose_key(piece["key"], lab["transpose"])
      assert lab["time_signature"] == piece["time_signature"] and lab["composer"] == piece["composer"]
      expected = {"instrument": [lab["instrument"]], "tempo": [lab["tempo_class"]], "bpm": [f"{lab['bpm']} BPM"],
                  "key": [lab["key"]], "time_signature": [lab["time_signature"]],
                  "composer": [lab["composer"].capitalize()],
                  "caption": [lab["instrument"], lab["tempo_class"], lab["key"], lab["time_signature"],
                              lab["composer"].capitalize()]}[kind]
      assert all(x in answer for x in expected), (answer, expected)


def test_deterministic_and_reused(numpy_set, tmp_path, cache, capsys):
  out, meta = numpy_set
  again = demo.build_demo_dataset(tmp_path, renderer="numpy", workers=1, cache_dir=cache, progress=False, **TINY)
  assert again["pieces"] == meta["pieces"]
  for name in ("train.json", "test.json"):
    assert (tmp_path / name).read_bytes() == (out / name).read_bytes()
  for wav in (out / "audio").iterdir():
    assert (tmp_path / "audio" / wav.name).read_bytes() == wav.read_bytes(), wav.name
  capsys.readouterr()
  reused = demo.build_demo_dataset(tmp_path, renderer="numpy", workers=1, cache_dir=cache, progress=False, **TINY)
  assert "reusing" in capsys.readouterr().out and reused == again
  other = demo.build_demo_dataset(tmp_path, renderer="numpy", workers=1, cache_dir=cache, progress=False,
                                  **{**TINY, "seed": 1})
  n_clips = other["counts"]["train_clips"] + other["counts"]["test_clips"]
  assert other["params"]["seed"] == 1 and len(list((tmp_path / "audio").iterdir())) == n_clips   # stale removed


@pytest.mark.skipif(not HAVE_FLUIDSYNTH, reason="fluidsynth or a GM soundfont is not installed")
def test_fluidsynth_build(tmp_path, cache):
  meta = demo.build_demo_dataset(tmp_path, renderer="fluidsynth", workers=2, cache_dir=cache, progress=False,
                                 **TINY)
  _check_layout(tmp_path, meta, "fluidsynth")
  assert meta["soundfont"] and Path(meta["soundfont"]).is_file() and meta["fluidsynth_version"]
  # a clip rendered again (a fresh fluidsynth process) gives the same bytes
  entry = demo.load_demo_split(tmp_path, "test")[0]
  lab = entry["labels"]
  _, piece, _ = demo._parse_job((meta["piece_labels"][lab["piece"]]["file"], str(cache)))
  notes = demo.clip_notes(piece, lab["bpm"], lab["transpose"], TINY["clip_seconds"])
  audio = render.render(notes, bpm=lab["bpm"], instrument=lab["instrument"], n_samples=meta["clip_samples"],
                        renderer="fluidsynth", soundfont=meta["soundfont"])
  render.write_wav(tmp_path / "again.wav", audio)
  assert (tmp_path / "again.wav").read_bytes() == (tmp_path / entry["audio"]).read_bytes()


def test_numpy_instruments_differ_spectrally():
  melody = np.array([[0, 0.5 * i, 0.5, p] for i, p in enumerate([57, 60, 64, 67, 65, 62, 59, 57])], np.float64)
  edges = np.geomspace(60, 11_000, 33)
  freqs = np.fft.rfftfreq(2400, 1 / render.SAMPLE_RATE)

  def bands(y):   # long-term spectrum in 32 log-spaced bands, dB relative to the total
    power = (np.abs(np.fft.rfft(y.reshape(-1, 2400) * np.hanning(2400), axis=1)) ** 2).mean(0)
    b = np.array([power[(freqs >= lo) & (freqs < hi)].sum() for lo, hi in zip(edges[:-1], edges[1:])])
    return 10 * np.log10(b / b.sum() + 1e-10)

  spectra = {name: bands(render.render_numpy(melody, bpm=120, instrument=name, n_samples=48_000))
             for name in render.INSTRUMENTS}
  names = list(spectra)
  for i, a in enumerate(names):
    for b in names[i + 1:]:
      dist = np.sqrt(np.mean((spectra[a] - spectra[b]) ** 2))
      assert dist > 3.0, f"{a} and {b} differ by only {dist:.1f} dB"


def test_key_label_follows_transposition():
  from music21 import chord, key, meter, note, stream
  s = stream.Part()
  s.append(meter.TimeSignature("4/4"))
  s.append(key.KeySignature(0))
  for names in (["C4", "E4", "G4"], ["F4", "A4", "C5"], ["G4", "B4", "D5"], ["C4", "E4", "G4"]) * 3:
    s.append(chord.Chord(names, quarterLength=1.0))
  for p in ["C4", "D4", "E4", "F4", "G4", "A4", "B4", "C5"]:
    s.append(note.Note(p, quarterLength=1.0))
  score = stream.Score([s])
  base = demo.score_summary(score)
  assert base["key"] == "C major" and base["time_signature"] == "4/4"
  assert demo.transpose_key(base["key"], 2) == "D major"
  up = demo.score_summary(score.transpose(2))                  # the transposed score analyses as D major
  assert up["key"] == "D major"
  notes = demo.clip_notes(base, bpm=120, transpose=2, clip_seconds=10.0)
  assert np.array_equal(notes[:, 3], np.array([n[3] for n in up["notes"]][: len(notes)]))
  # a real chorale: bwv66.6 is in F-sharp minor
  chorale = demo.extract_piece("bach/bwv66.6.mxl")
  assert chorale["key"] == "F-sharp minor" and chorale["time_signature"] == "4/4" and chorale["composer"] == "bach"
  assert demo.transpose_key(chorale["key"], 2) == "G-sharp minor"
  assert demo.transpose_key(chorale["key"], -1) == "F minor"


def test_failed_piece_is_skipped_named_and_replaced(monkeypatch, cache):
  real = demo._parse_job
  first = {}

  def flaky(args):
    relpath, cache_dir = args
    if not first:
      first["piece"] = relpath
      return relpath, None, "RuntimeError: injected failure"
    return real(args)

  monkeypatch.setattr(demo, "_parse_job", flaky)
  chosen, skipped = demo._select_pieces({"train": 3, "test": 2}, 0, lambda fn, xs: list(map(fn, xs)),
                                        str(cache), False)
  assert skipped == [{"piece": first["piece"], "reason": "RuntimeError: injected failure"}]
  assert len(chosen["test"]) == 2 and len(chosen["train"]) == 3
  assert first["piece"].rsplit(".", 1)[0] not in {p["piece"] for s in demo.SPLITS for p in chosen[s]}
  _, piece, reason = real(("bach/no_such_piece.mxl", None))
  assert piece is None and "no_such_piece" in reason
