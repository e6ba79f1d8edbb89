"""The embedded demo dataset: real music21 corpus scores rendered to audio, QA pairs known by construction.

Each clip is the opening of a corpus score (all parts, from the first note, read straight through: repeats
are not expanded, so music21's ExpanderException cannot occur) played by one General MIDI instrument
(INSTRUMENTS) at a BPM from TEMPO_CLASSES, transposed by TRANSPOSE_RANGE semitones, cut or zero-padded
to exactly `clip_seconds`. Labels come from the score (key, time signature, composer folder) and from what
the renderer was told (instrument, BPM, transposition). Renderers: see data/render.py.

Layout of `DIR` (what `data.readers.read_demo` reads):
  DIR/audio/{clip_id}.wav   int16 PCM, 24 kHz, mono, exactly round(clip_seconds * 24000) samples
  DIR/train.json            [{"id": "<clip_id>-<kind>", "clip_id", "audio": "audio/<clip_id>.wav",
  DIR/test.json               "question", "answer", "kind", "labels": {...}}, ...]; one entry per
                              (clip, kind in QUESTION_KINDS), grouped by clip
  DIR/meta.json             version, params, renderer (+ soundfont, fluidsynth version), seed, counts,
                            composers, instruments, pieces per split, piece_labels (untransposed key,
                            time signature, work), skipped pieces with reasons, build time; written
                            last (its presence with the same params means "reuse")

labels: instrument (name), gm_program (0-based), bpm (quarter notes per minute), tempo_class
(slow/moderate/fast), key ("F-sharp minor", after transposition), time_signature ("3/4"), composer
(lowercase, e.g. "bach"), piece (corpus path without extension, e.g. "bach/bwv66.6"), transpose (semitones).
Answers are one template per kind (`answer_for`); questions one of 3 phrasings (QUESTIONS).

Key rule: music21's key analysis of the opening (first ANALYSIS_QUARTERS quarter notes) decides between
the key signature's major key and its relative minor; a minor key written with one flat fewer (the
Baroque "dorian" signature) wins when the analysis prefers it by more than DORIAN_MARGIN. The tonic is
then moved by the transposition and spelled with the fewer accidentals (KEY_NAMES).

Splits are by work (a multi-movement work's movements, or a Palestrina mass's sections, stay together),
so no piece is in both. Test pieces come from the smaller half of each composer's works, round-robin over
the composers that train pieces also use. A piece that fails to parse or has no usable labels is skipped,
named in meta["skipped"] and replaced by the next candidate of its composer. MusicXML is cut to its first
MAX_MEASURES measures before parsing; parsed pieces (notes + labels) are cached as JSON under `cache_dir`.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import multiprocessing
import os
import re
import sys
import time
import xml.etree.ElementTree as ET
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from musilingo_jax.data import render as render_lib

VERSION = 1
SPLITS = ("train", "test")
QUESTION_KINDS = ("instrument", "tempo", "bpm", "key", "time_signature", "composer", "caption")
INSTRUMENTS = tuple(render_lib.INSTRUMENTS)
# tempo class -> BPM grid (quarter notes per minute); gaps between classes keep them audibly apart
TEMPO_CLASSES = {"slow": tuple(range(60, 81, 5)), "moderate": tuple(range(95, 121, 5)),
                 "fast": tuple(range(135, 171, 5))}
TRANSPOSE_RANGE = (-3, 3)
# corpus folder -> (label, display name, file suffixes, max file size in bytes: bounds the parse time)
COMPOSERS = {
    "bach": ("bach", "Bach", (".mxl",), 40_000),
    "beethoven": ("beethoven", "Beethoven", (".mxl",), 80_000),
    "haydn": ("haydn", "Haydn", (".mxl",), 80_000),
    "monteverdi": ("monteverdi", "Monteverdi", (".mxl",), 80_000),
    "mozart": ("mozart", "Mozart", (".mxl",), 80_000),
    "palestrina": ("palestrina", "Palestrina", (".krn",), 10_000),
    "schumann_robert": ("schumann", "Schumann", (".mxl", ".xml"), 130_000),
}
EXCLUDE = ("schumann_robert/dichterliebe_no2.xml",)   # the same song as schumann_robert/opus48no2.mxl
MIN_QUARTERS = 16          # shorter pieces are skipped
MAX_MEASURES = 48          # MusicXML measures parsed per piece (3/8: 72 quarter notes, 25 s at 170 BPM)
MAX_QUARTERS = 256         # notes kept per piece (a 90 s clip at 170 BPM)
ANALYSIS_QUARTERS = 32     # the opening used for key analysis and the time-signature check
DORIAN_MARGIN = 0.1
_EXTRACT_VERSION = 2       # bump when extract_piece's output changes (invalidates the parsed-score cache)
KEY_NAMES = {  # tonic pitch class -> spelling with the fewer accidentals (ties: sharps for major, flats for minor)
    "major": ("C", "D-flat", "D", "E-flat", "E", "F", "F-sharp", "G", "A-flat", "A", "B-flat", "B"),
    "minor": ("C", "C-sharp", "D", "E-flat", "E", "F", "F-sharp", "G", "G-sharp", "A", "B-flat", "B"),
}
QUESTIONS = {
    "instrument": ("What instrument is playing?", "Which instrument plays this piece?",
                   "What instrument do you hear in this recording?"),
    "tempo": ("Is the tempo slow, moderate or fast?", "How fast is this piece?",
              "What is the tempo of this music?"),
    "bpm": ("What is the tempo in BPM?", "About how many beats per minute is this piece?",
            "Estimate the BPM of this music."),
    "key": ("What key is this piece in?", "In which key is this music?", "What is the key of this piece?"),
    "time_signature": ("What is the time signature?", "What meter is this piece in?",
                       "What is the time signature of this music?"),
    "composer": ("Who composed this piece?", "Who is the composer of this music?", "Which composer wrote this?"),
    "caption": ("Describe this music.", "Give a short description of this piece.", "Describe what you hear."),
}
_DISPLAY = {label: display for label, display, _, _ in COMPOSERS.values()}
_CAPTION_TEMPO = {"slow": "slow", "moderate": "moderate-tempo", "fast": "fast"}


class SkipPiece(Exception):
  """A corpus piece we cannot label or render; the reason goes into meta["skipped"]."""


# ---------------------------------------------------------------------------------------- answers

def key_name(tonic_pc: int, mode: str) -> str:
  return f"{KEY_NAMES[mode][tonic_pc % 12]} {mode}"


def transpose_key(name: str, semitones: int) -> str:
  """"D major" + 2 -> "E major", spelled as KEY_NAMES spells it."""
  tonic, mode = name.rsplit(" ", 1)
  if mode not in KEY_NAMES or tonic not in KEY_NAMES[mode]:
    raise ValueError(f"key {name!r} is not spelled as in KEY_NAMES")
  return key_name(KEY_NAMES[mode].index(tonic) + semitones, mode)


def tempo_class(bpm: float) -> str:
  for name, grid in TEMPO_CLASSES.items():
    if grid[0] <= bpm <= grid[-1]:
      return name
  raise ValueError(f"bpm={bpm} is outside every tempo class {TEMPO_CLASSES}")


def answer_for(kind: str, labels: dict[str, Any]) -> str:
  """The templated answer for a question kind, from the structured labels."""
  composer = _DISPLAY[labels["composer"]]
  if kind == "instrument":
    return f"The instrument is the {labels['instrument']}."
  if kind == "tempo":
    return f"The tempo is {labels['tempo_class']}."
  if kind == "bpm":
    return f"The tempo is about {labels['bpm']} BPM."
  if kind == "key":
    return f"The key is {labels['key']}."
  if kind == "time_signature":
    return f"The time signature is {labels['time_signature']}."
  if kind == "composer":
    return f"The composer is {composer}."
  if kind == "caption":
    return (f"A {_CAPTION_TEMPO[labels['tempo_class']]} piece in {labels['key']} in "
            f"{labels['time_signature']} time, played on the {labels['instrument']}, by {composer}.")
  raise ValueError(f"unknown question kind {kind!r}; expected one of {QUESTION_KINDS}")


# ---------------------------------------------------------------------------------------- corpus pieces

def _corpus_root() -> Path:
  import music21
  return Path(music21.__file__).parent / "corpus"


def _work_of(piece: str) -> str:
  """Movements of one work (composer/work/movement) or sections of one Palestrina mass share a work id."""
  parts = piece.split("/")
  if parts[0] == "palestrina":
    m = re.search(r"_(\d+)", parts[-1])
    return f"palestrina/mass{m.group(1) if m else '_unnumbered'}"   # Kyrie_20, Credo_20_b: mass 20
  return "/".join(parts[:2]) if len(parts) >= 3 else piece


def _candidates(root: Path) -> dict[str, list[str]]:
  """Composer folder -> sorted candidate files (corpus-relative, with suffix)."""
  out = {}
  for folder, (_, _, suffixes, max_bytes) in COMPOSERS.items():
    files = [p for p in (root / folder).rglob("*") if p.suffix in suffixes and "_old" not in p.stem
             and p.stat().st_size <= max_bytes and p.stat().st_size >= 2_500]
    out[folder] = sorted(rel for p in files if (rel := p.relative_to(root).as_posix()) not in EXCLUDE)
  return out


def _choose_key(analysis, sharps: int | None) -> tuple[int, str]:
  """(tonic pitch class, mode) of the opening; see the module docstring for the rule."""
  from music21 import key as m21key
  scores = {(k.tonic.pitchClass, k.mode): k.correlationCoefficient
            for k in [analysis] + list(analysis.alternateInterpretations) if k.mode in ("major", "minor")}
  top = max(scores, key=scores.get)
  if sharps is None:
    return top
  sig = m21key.KeySignature(sharps)
  major, minor = sig.asKey("major"), sig.asKey("minor")
  best = max([(major.tonic.pitchClass, "major"), (minor.tonic.pitchClass, "minor")],
             key=lambda k: scores.get(k, -1.0))
  dorian = (top[1] == "minor" and (minor.tonic.pitchClass + 7) % 12 == top[0])   # one flat fewer
  if dorian and scores[top] - scores.get(best, -1.0) > DORIAN_MARGIN:
    return top
  return best


def _part_notes(part: int, flat) -> list[tuple[int, float, float, int]]:
  """(part, start, duration, midi) of a flattened part, tied notes merged (music21's stripTies is ~100x
  slower on long parts)."""
  out, open_ties = [], {}   # midi -> index in out of the note a tie continues
  for n in flat.notes:
    ql, start = float(n.quarterLength), float(n.offset)
    if ql <= 0:                                    # grace notes
      continue
    members = [(c.pitch, c.tie or n.tie) for c in n.notes] if n.isChord else [(getattr(n, "pitch", None), n.tie)]
    for p, tie in members:
      if p is None:                                # unpitched percussion
        continue
      midi, kind = int(round(p.ps)), (tie.type if tie is not None else None)
      j = open_ties.get(midi)
      if kind in ("stop", "continue") and j is not None and abs(out[j][1] + out[j][2] - start) < 1e-6:
        out[j] = (part, out[j][1], start + ql - out[j][1], midi)
        if kind == "stop":
          del open_ties[midi]
        continue
      out.append((part, start, ql, midi))
      if kind in ("start", "continue"):
        open_ties[midi] = len(out) - 1
      else:
        open_ties.pop(midi, None)
  return out


def _read_score(path: Path):
  """music21 score of a corpus file; MusicXML is cut to its first MAX_MEASURES measures before music21
  sees it (its parser costs ~10 ms per measure, and we only need the opening)."""
  from music21 import converter
  if path.suffix not in (".mxl", ".xml", ".musicxml"):
    return converter.parse(str(path), forceSource=True)
  if path.suffix == ".mxl":
    with zipfile.ZipFile(path) as z:
      names = [n for n in z.namelist() if not n.startswith("META-INF") and n.endswith((".xml", ".musicxml"))]
      data = z.read(names[0])
  else:
    data = path.read_bytes()
  root = ET.fromstring(data)
  if root.tag == "score-partwise":
    for part in root.findall("part"):
      for m in part.findall("measure")[MAX_MEASURES:]:
        part.remove(m)
  elif root.tag == "score-timewise":
    for m in root.findall("measure")[MAX_MEASURES:]:
      root.remove(m)
  return converter.parseData(ET.tostring(root, encoding="unicode"), format="musicxml")


def score_summary(score) -> dict[str, Any]:
  """Notes (from the first note, at most MAX_QUARTERS), time signature and key of a music21 score.

  Raises SkipPiece when a label is unknown or ambiguous."""
  from music21 import key as m21key, meter, stream
  if isinstance(score, stream.Opus):
    raise SkipPiece("an opus of several pieces")
  parts = list(score.parts) or [score]
  notes = []
  for i, part in enumerate(parts):
    notes += _part_notes(i, part.flatten())
  if not notes:
    raise SkipPiece("no pitched notes")
  notes.sort(key=lambda x: (x[1], x[0], x[3]))
  first = notes[0][1]
  notes = [(p, s - first, d, m) for p, s, d, m in notes if s - first < MAX_QUARTERS]
  length = max(s + d for _, s, d, _ in notes)
  if length < MIN_QUARTERS:
    raise SkipPiece(f"too short ({length:g} quarter notes < {MIN_QUARTERS})")

  flat0 = parts[0].flatten()
  opening = first + ANALYSIS_QUARTERS
  sigs = [ts for ts in flat0.getElementsByClass(meter.TimeSignature) if ts.offset < opening]
  if not sigs:
    raise SkipPiece("no time signature")
  if len({ts.ratioString for ts in sigs}) > 1:
    raise SkipPiece("time signature changes in the opening: " + ", ".join(ts.ratioString for ts in sigs))
  keysigs = [k for k in flat0.getElementsByClass(m21key.KeySignature) if k.offset <= first]
  sharps = keysigs[-1].sharps if keysigs else None
  head = score.flatten().notes.getElementsByOffset(first, opening, includeEndBoundary=False).stream()
  tonic, mode = _choose_key(head.analyze("key"), sharps)
  return {"time_signature": sigs[0].ratioString, "key": key_name(tonic, mode), "key_tonic": tonic,
          "key_mode": mode, "key_signature": sharps, "parts": len(parts), "quarters": length,
          "notes": [list(n) for n in notes]}


def extract_piece(relpath: str, root: Path | None = None) -> dict[str, Any]:
  """Parse one corpus file (e.g. "bach/bwv66.6.mxl") into JSON-able notes + labels; raises SkipPiece."""
  piece = relpath.rsplit(".", 1)[0]
  summary = score_summary(_read_score((root or _corpus_root()) / relpath))
  return {"piece": piece, "file": relpath, "composer": COMPOSERS[relpath.split("/")[0]][0],
          "work": _work_of(piece), **summary}


def _cache_file(cache_dir: Path, root: Path, relpath: str) -> Path:
  import music21
  st = (root / relpath).stat()
  ident = (f"{_EXTRACT_VERSION}|{MAX_MEASURES}|{MAX_QUARTERS}|{music21.__version__}|{relpath}|"
           f"{st.st_size}|{st.st_mtime_ns}")
  return cache_dir / f"{hashlib.sha1(ident.encode()).hexdigest()[:20]}.json"


def _parse_job(args) -> tuple[str, dict | None, str | None]:
  """Worker: (relpath, piece or None, skip reason or None), through the JSON cache when given."""
  relpath, cache_dir = args
  root = _corpus_root()
  try:
    cache = _cache_file(Path(cache_dir), root, relpath) if cache_dir else None
  except OSError:   # a missing file: extract_piece below names the error
    cache = None
  if cache is not None and cache.is_file():
    with open(cache, encoding="utf-8") as f:
      cached = json.load(f)
    return relpath, cached.get("piece"), cached.get("skip")
  try:
    piece, skip = extract_piece(relpath, root), None
  except SkipPiece as err:
    piece, skip = None, str(err)
  except Exception as err:  # music21 raises many types on odd files; the piece is skipped and named
    piece, skip = None, f"{type(err).__name__}: {str(err)[:200]}"
  if cache is not None:
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_suffix(f".{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
      json.dump({"piece": piece, "skip": skip}, f)
    os.replace(tmp, cache)
  # the cached and the fresh path return identical values (floats survive the JSON round trip)
  return relpath, json.loads(json.dumps(piece)), skip


def _queues(root: Path, seed: int) -> tuple[list[str], dict[str, list[str]], set[str]]:
  """A seeded composer order; per composer its candidate files in a seeded order; the works test may use
  (the smaller half of each composer's works, at least one), so every test composer keeps training works."""
  rng = np.random.default_rng([seed, 1])
  cands = _candidates(root)
  order = [c for c in sorted(cands) if cands[c]]
  order = [order[i] for i in rng.permutation(len(order))]
  queues, test_ok = {}, set()
  for folder in order:
    works: dict[str, list[str]] = {}
    for f in cands[folder]:
      works.setdefault(_work_of(f.rsplit(".", 1)[0]), []).append(f)
    names = [sorted(works)[w] for w in rng.permutation(len(works))]
    files = {w: [works[w][i] for i in rng.permutation(len(works[w]))] for w in names}
    # round-robin over the works, so consecutive picks come from different works
    queues[folder] = [files[w][i] for i in range(max(map(len, files.values()))) for w in names
                      if i < len(files[w])]
    # test may use the smaller half of the works (at least one); the rest is kept for training
    test_ok.update(sorted(names, key=lambda w: len(files[w]))[:max(1, len(names) // 2)])
  return order, queues, test_ok


def _select_pieces(num: dict[str, int], seed: int, pool_map, cache_dir, progress: bool):
  """Fill the test slots, then the train slots, round-robin over the composer order, replacing failures.

  Returns ({split: [piece, ...]}, [{"piece", "reason"}, ...]). Deterministic: candidates are taken in a
  seeded order and results are placed in slot order, whatever order the workers finish in. Train never
  takes a file of a work used in test. Test slots use only the composers that train slots will get.
  """
  order, queues, test_ok = _queues(_corpus_root(), seed)
  chosen = {s: [] for s in SPLITS}
  skipped, test_works, tried = [], set(), set()

  def next_candidate(folder: str, composers: list[str], split: str) -> str | None:
    for c in [folder] + [c for c in composers if c != folder]:   # an exhausted composer falls over
      for f in queues[c]:
        work = _work_of(f.rsplit(".", 1)[0])
        if f not in tried and (work in test_ok if split == "test" else work not in test_works):
          tried.add(f)
          return f
    return None

  bar = tqdm(total=num["test"] + num["train"], desc="parse", unit="piece", disable=not progress)
  for split in ("test", "train"):
    composers = order[:min(len(order), num["train"])] if split == "test" else order
    slots = [composers[i % len(composers)] for i in range(num[split])]
    while slots:
      batch = [(folder, f) for folder in slots if (f := next_candidate(folder, composers, split)) is not None]
      if not batch:
        break
      slots = []
      results = pool_map(_parse_job, [(f, cache_dir) for _, f in batch])
      for (folder, f), (_, piece, skip) in zip(batch, results):
        if piece is None:
          skipped.append({"piece": f, "reason": skip})
          slots.append(folder)
          continue
        if split == "test":
          test_works.add(piece["work"])
        chosen[split].append(piece)
        bar.update(1)
  bar.close()
  unseen = {p["composer"] for p in chosen["test"]} - {p["composer"] for p in chosen["train"]}
  if unseen:
    raise RuntimeError(f"test composers {sorted(unseen)} have no training piece (too few candidates); "
                       "raise num_train_pieces")
  return chosen, skipped


# ---------------------------------------------------------------------------------------- clips

def _clip_specs(pieces: list[dict], split: str, clips_per_piece: int, seed: int) -> list[dict]:
  """Instrument and tempo class cycle through seeded permutations (balanced); BPM and transpose are drawn."""
  rng = np.random.default_rng([seed, 2, SPLITS.index(split)])
  n = len(pieces) * clips_per_piece

  def balanced(k: int) -> np.ndarray:   # [n] values in range(k), each block of k a fresh permutation
    return np.concatenate([rng.permutation(k) for _ in range(-(-n // k))])[:n]

  instruments, tempos = balanced(len(INSTRUMENTS)), balanced(len(TEMPO_CLASSES))
  specs = []
  for i, piece in enumerate(pieces):
    slug = re.sub(r"[^A-Za-z0-9]+", "_", piece["piece"]).strip("_")
    for c in range(clips_per_piece):
      j = i * clips_per_piece + c
      klass = tuple(TEMPO_CLASSES)[tempos[j]]
      instrument = INSTRUMENTS[instruments[j]]
      bpm = int(rng.choice(TEMPO_CLASSES[klass]))
      transpose = int(rng.integers(TRANSPOSE_RANGE[0], TRANSPOSE_RANGE[1] + 1))
      labels = {"instrument": instrument, "gm_program": render_lib.INSTRUMENTS[instrument], "bpm": bpm,
                "tempo_class": klass, "key": transpose_key(piece["key"], transpose),
                "time_signature": piece["time_signature"], "composer": piece["composer"],
                "piece": piece["piece"], "transpose": transpose}
      phrasing = rng.integers(0, 3, size=len(QUESTION_KINDS))
      specs.append({"clip_id": f"{slug}_{c:02d}", "labels": labels, "piece_index": i,
                    "phrasing": [int(p) for p in phrasing], "noise_seed": int(rng.integers(2**31))})
  return specs


def clip_notes(piece: dict, bpm: float, transpose: int, clip_seconds: float) -> np.ndarray:
  """[N, 4] (part, start, duration, pitch) of the notes that start inside the clip, transposed."""
  end_q = clip_seconds * bpm / 60.0
  notes = np.asarray([n for n in piece["notes"] if n[1] < end_q], np.float64).reshape(-1, 4)
  notes[:, 3] += transpose
  return notes


def _render_job(args) -> tuple[str, float]:
  """Worker: render one clip and write its wav; returns (clip_id, rms)."""
  notes, labels, n_samples, renderer, soundfont, noise_seed, path = args
  audio = render_lib.render(notes, bpm=labels["bpm"], instrument=labels["instrument"], n_samples=n_samples,
                            renderer=renderer, soundfont=soundfont, seed=noise_seed)
  render_lib.write_wav(path, audio)
  return os.path.basename(path), float(np.sqrt(np.mean(np.square(audio))))


def _examples(spec: dict) -> list[dict]:
  clip_id, labels = spec["clip_id"], spec["labels"]
  return [{"id": f"{clip_id}-{kind}", "clip_id": clip_id, "audio": f"audio/{clip_id}.wav",
           "question": QUESTIONS[kind][spec["phrasing"][k]], "answer": answer_for(kind, labels),
           "kind": kind, "labels": labels} for k, kind in enumerate(QUESTION_KINDS)]


# ---------------------------------------------------------------------------------------- build / load

def _make_pool(workers: int):
  """A process pool, or None to run inline. fork when jax is not imported (fast, no main-module
  re-import); forkserver when it is (forking a process that runs JAX threads can deadlock). forkserver
  re-imports the caller's main module, so a caller without a main file (python - < script) runs inline."""
  if workers <= 1:
    return None
  if "jax" not in sys.modules:
    return multiprocessing.get_context("fork").Pool(workers)
  main = sys.modules.get("__main__")
  main_file = getattr(main, "__file__", None)
  if getattr(main, "__spec__", None) is None and main_file and not os.path.isfile(main_file):
    print(f"demo dataset: main module {main_file!r} is not a file (forkserver cannot start workers); "
          "building with one process")
    return None
  ctx = multiprocessing.get_context("forkserver")
  ctx.set_forkserver_preload(["musilingo_jax.data.demo"])
  return ctx.Pool(workers)


@contextlib.contextmanager
def _worker_pool(workers: int):
  """(pool or None, map over it): _make_pool's pool, closed and joined on the way out."""
  pool = _make_pool(workers)
  try:
    yield pool, ((lambda fn, xs: pool.map(fn, xs, chunksize=1)) if pool else (lambda fn, xs: list(map(fn, xs))))
  finally:
    if pool:
      pool.close()
      pool.join()


def _render_all(pool, jobs: list, desc: str, progress: bool) -> list[str]:
  """Render every _render_job job (in the pool when there is one), with a progress bar; the silent ones' names."""
  results = pool.imap(_render_job, jobs, chunksize=1) if pool else map(_render_job, jobs)
  return [name for name, rms in tqdm(results, total=len(jobs), desc=desc, unit="clip", disable=not progress)
          if rms < 1e-4]


def _reusable(meta_file: Path, params: dict, *, also=lambda meta: True) -> dict | None:
  """The meta.json of a set built with these `params` (and passing `also`), or None; a stale meta.json is
  removed first, so a build interrupted from here on is never taken for a finished one."""
  if not meta_file.is_file():
    return None
  with open(meta_file, encoding="utf-8") as f:
    meta = json.load(f)
  if meta.get("params") == params and also(meta):
    return meta
  meta_file.unlink()
  return None


def _score_cache(cache_dir) -> Path | None:
  """cache_dir as the builders take it: True = default_cache_dir(), a path, or None/False for no cache."""
  return None if cache_dir in (None, False) else (default_cache_dir() if cache_dir is True else Path(cache_dir))


def _write_meta(meta_file: Path, meta: dict) -> None:
  """meta.json written last and atomically: its presence means the folder is complete."""
  tmp = meta_file.with_name(meta_file.name + ".tmp")
  with open(tmp, "w", encoding="utf-8") as f:
    json.dump(meta, f, indent=1)
  os.replace(tmp, meta_file)


def default_cache_dir() -> Path:
  base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return Path(base) / "musilingo_jax" / "demo_scores"


def build_demo_dataset(out_dir, *, num_train_pieces: int = 40, num_test_pieces: int = 10,
                       clips_per_piece: int = 6, clip_seconds: float = 10.0, seed: int = 0,
                       renderer: str = "auto", workers: int = 2, cache_dir=True,
                       progress: bool = True) -> dict:
  """Build (or reuse) the demo dataset under out_dir; returns meta (also written to out_dir/meta.json).

  cache_dir: True = default_cache_dir(), a path, or None/False to parse every piece afresh.
  """
  if num_train_pieces < 1 or num_test_pieces < 1 or clips_per_piece < 1 or clip_seconds <= 0:
    raise ValueError("num_train_pieces, num_test_pieces, clips_per_piece and clip_seconds must be positive")
  out = Path(out_dir)
  resolved, soundfont = render_lib.resolve_renderer(renderer)
  params = {"version": VERSION, "num_train_pieces": num_train_pieces, "num_test_pieces": num_test_pieces,
            "clips_per_piece": clips_per_piece, "clip_seconds": float(clip_seconds), "seed": seed,
            "renderer": resolved, "soundfont": soundfont}
  meta_file = out / "meta.json"
  meta = _reusable(meta_file, params, also=lambda m: all((out / f"{s}.json").is_file() for s in SPLITS))
  if meta is not None:
    print(f"demo dataset: reusing {out} (same parameters, built {meta.get('built_at')})")
    return meta
  t0 = time.time()
  cache = _score_cache(cache_dir)
  (out / "audio").mkdir(parents=True, exist_ok=True)

  with _worker_pool(workers) as (pool, pool_map):
    chosen, skipped = _select_pieces({"train": num_train_pieces, "test": num_test_pieces}, seed, pool_map,
                                     str(cache) if cache else None, progress)
    t_parse = time.time() - t0
    n_samples = int(round(clip_seconds * render_lib.SAMPLE_RATE))
    specs = {s: _clip_specs(chosen[s], s, clips_per_piece, seed) for s in SPLITS}
    ids = [sp["clip_id"] for s in SPLITS for sp in specs[s]]
    if len(set(ids)) != len(ids):
      raise RuntimeError(f"clip ids collide: {sorted({i for i in ids if ids.count(i) > 1})}")
    jobs = [(clip_notes(chosen[s][sp["piece_index"]], sp["labels"]["bpm"], sp["labels"]["transpose"],
                        clip_seconds), sp["labels"], n_samples, resolved, soundfont, sp["noise_seed"],
             str(out / "audio" / f"{sp['clip_id']}.wav")) for s in SPLITS for sp in specs[s]]
    silent = _render_all(pool, jobs, f"render ({resolved})", progress)
  if silent:
    raise RuntimeError(f"{len(silent)} rendered clips are silent, e.g. {silent[:3]}")
  keep = {f"{sp['clip_id']}.wav" for s in SPLITS for sp in specs[s]}
  for stale in (out / "audio").glob("*.wav"):   # left over from a build with other parameters
    if stale.name not in keep:
      stale.unlink()
  for s in SPLITS:
    with open(out / f"{s}.json", "w", encoding="utf-8") as f:
      json.dump([ex for sp in specs[s] for ex in _examples(sp)], f, indent=1)

  composers = {s: sorted({p["composer"] for p in chosen[s]}) for s in SPLITS}
  meta = {
      "version": VERSION, "params": params, "renderer": resolved, "soundfont": soundfont,
      "fluidsynth_version": render_lib.fluidsynth_version() if resolved == "fluidsynth" else None,
      "seed": seed, "sample_rate": render_lib.SAMPLE_RATE, "clip_seconds": float(clip_seconds),
      "clip_samples": n_samples, "question_kinds": list(QUESTION_KINDS),
      "counts": {**{f"{s}_pieces": len(chosen[s]) for s in SPLITS},
                 **{f"{s}_clips": len(specs[s]) for s in SPLITS},
                 **{f"{s}_examples": len(specs[s]) * len(QUESTION_KINDS) for s in SPLITS},
                 "skipped_pieces": len(skipped)},
      "composers": composers, "instruments": {name: render_lib.INSTRUMENTS[name] for name in INSTRUMENTS},
      "tempo_classes": {k: [v[0], v[-1]] for k, v in TEMPO_CLASSES.items()},
      "pieces": {s: [p["piece"] for p in chosen[s]] for s in SPLITS},
      "piece_labels": {p["piece"]: {k: p[k] for k in ("file", "composer", "work", "key", "time_signature",
                                                      "parts")} for s in SPLITS for p in chosen[s]},
      "skipped": skipped,
      "built_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      "build_seconds": {"parse": round(t_parse, 2), "total": round(time.time() - t0, 2)},
  }
  _write_meta(meta_file, meta)
  return meta


def load_demo_split(data_dir, split: str) -> list[dict]:
  """The entries of DIR/{split}.json (audio paths stay relative to DIR)."""
  if split not in SPLITS:
    raise ValueError(f"split={split!r}; expected one of {SPLITS}")
  file = Path(data_dir) / f"{split}.json"
  if not file.is_file():
    raise FileNotFoundError(f"{file}: no demo split here; build it with "
                            f"scripts/make_demo_data.py --out {data_dir}")
  with open(file, encoding="utf-8") as f:
    return json.load(f)


# ---------------------------------------------------------------------------------------- unlabeled renderings

def set_dir_name(pieces: tuple[int, int], clips_per_piece: int, clip_seconds: float) -> str:
  """The folder name of a demo set under the cache (build.demo_dirs, the pretraining probe)."""
  return f"set-{pieces[0]}x{pieces[1]}-{clips_per_piece}-{clip_seconds:g}s"


def build_unlabeled_set(out_dir, *, num_pieces: int, num_test_pieces: int, clips_per_piece: int,
                        clip_seconds: float, seed: int = 0, renderer: str = "auto", workers: int = 2,
                        cache_dir=True, exclude_pieces=(), progress: bool = True) -> dict:
  """Unlabeled renderings for encoder pretraining (pretrain/): `clips_per_piece` renderings of each of
  `num_pieces` training pieces, every one with its own instrument, BPM and transposition (drawn from
  another seeded stream than the QA set's), `clip_seconds` long. No QA pairs: DIR/audio/*.wav and
  DIR/meta.json (params, pieces, counts; written last, its presence with the same params means "reuse").

  Pieces are chosen exactly as `build_demo_dataset(num_train_pieces=num_pieces, num_test_pieces=
  num_test_pieces, seed=seed)` chooses its training pieces: the test pieces of a demo set built with the
  same `num_test_pieces` and `seed` (and any work of theirs) are never rendered. `exclude_pieces` (e.g. that
  set's meta["pieces"]["test"]) is checked as well: a chosen piece of the same work raises."""
  if num_pieces < 1 or num_test_pieces < 1 or clips_per_piece < 1 or clip_seconds <= 0:
    raise ValueError("num_pieces, num_test_pieces, clips_per_piece and clip_seconds must be positive")
  out = Path(out_dir)
  resolved, soundfont = render_lib.resolve_renderer(renderer)
  params = {"version": VERSION, "kind": "unlabeled", "num_pieces": num_pieces, "num_test_pieces": num_test_pieces,
            "clips_per_piece": clips_per_piece, "clip_seconds": float(clip_seconds), "seed": seed,
            "renderer": resolved, "soundfont": soundfont}
  meta_file = out / "meta.json"
  meta = _reusable(meta_file, params)
  if meta is not None:
    if progress:
      print(f"demo unlabeled set: reusing {out} ({meta['counts']['clips']} clips)")
    return meta
  t0 = time.time()
  cache = _score_cache(cache_dir)
  (out / "audio").mkdir(parents=True, exist_ok=True)
  with _worker_pool(workers) as (pool, pool_map):
    chosen, skipped = _select_pieces({"train": num_pieces, "test": num_test_pieces}, seed, pool_map,
                                     str(cache) if cache else None, progress)
    pieces = chosen["train"]
    excluded = {_work_of(p) for p in exclude_pieces}
    clash = sorted(p["piece"] for p in pieces if p["work"] in excluded)
    if clash:
      raise RuntimeError(f"unlabeled renderings would include test works: {clash}")
    rng = np.random.default_rng([seed, 4])
    n = len(pieces) * clips_per_piece
    instruments = np.concatenate([rng.permutation(len(INSTRUMENTS)) for _ in range(-(-n // len(INSTRUMENTS)))])
    tempos = np.concatenate([rng.permutation(len(TEMPO_CLASSES)) for _ in range(-(-n // len(TEMPO_CLASSES)))])
    n_samples = int(round(clip_seconds * render_lib.SAMPLE_RATE))
    jobs, names = [], []
    for i, piece in enumerate(pieces):
      slug = re.sub(r"[^A-Za-z0-9]+", "_", piece["piece"]).strip("_")
      for c in range(clips_per_piece):
        j = i * clips_per_piece + c
        klass = tuple(TEMPO_CLASSES)[tempos[j]]
        bpm = int(rng.choice(TEMPO_CLASSES[klass]))
        transpose = int(rng.integers(TRANSPOSE_RANGE[0], TRANSPOSE_RANGE[1] + 1))
        labels = {"instrument": INSTRUMENTS[instruments[j]], "bpm": bpm}
        name = f"{slug}_u{c:02d}.wav"
        names.append(name)
        jobs.append((clip_notes(piece, bpm, transpose, clip_seconds), labels, n_samples, resolved, soundfont,
                     int(rng.integers(2**31)), str(out / "audio" / name)))
    silent = _render_all(pool, jobs, f"render unlabeled ({resolved})", progress)
  for name in silent:  # a silent excerpt teaches nothing: dropped, and counted
    (out / "audio" / name).unlink()
  keep = set(names) - set(silent)
  for stale in (out / "audio").glob("*.wav"):
    if stale.name not in keep:
      stale.unlink()
  meta = {"version": VERSION, "params": params, "renderer": resolved, "soundfont": soundfont,
          "sample_rate": render_lib.SAMPLE_RATE, "clip_samples": n_samples,
          "counts": {"pieces": len(pieces), "clips": len(keep), "silent": len(silent), "skipped_pieces": len(skipped)},
          "pieces": [p["piece"] for p in pieces], "skipped": skipped,
          "built_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
          "build_seconds": round(time.time() - t0, 2)}
  _write_meta(meta_file, meta)
  return meta
