"""One reader per released annotation layout (docs/reference.md, Data), all yielding `Sample`s.

  lp-musiccaps-msd  HF `datasets` DatasetDict saved with `save_to_disk` (splits train/valid/test); rows
                    use `path` (relative to the audio root) and `caption_writing`; no question (stage 1).
  musicqa           `MusicQA/{Pretrain,Finetune,Eval}MusicQA.json` + `MusicQA/audios/{audio_name}`.
  musicinstruct     `MusicInstruct/music_instruct{,_short,_long}.json` {"QA": [...]} +
                    `MusicCaps_audio/{ytid}.npy` at `sampling_rate`; test split = `is_audioset_eval`.
  musiccaps         `MusicCaps_ann/all.json` {"ann": [...]}, fixed question, same .npy layout and split.
  demo              `DIR/{train,test}.json`: [{"id","clip_id","audio","question","answer","kind","labels"}].

`data_dir` is the reference's `music_data` folder (the one holding `MusicQA/`, `MusicInstruct/`, ...);
passing the dataset's own folder works too. A malformed annotation file raises `AnnotationError` naming
the file, the entry and the field. Per-entry content problems that precompute can count (an empty answer,
a missing audio file) are not errors here.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any, Iterator

DATASETS = ("lp-musiccaps-msd", "musicqa", "musicinstruct", "musiccaps", "demo")
MUSICCAPS_QUESTION = "Please give a caption to the music."
MUSICQA_SPLITS = {"pretrain": "Pretrain", "finetune": "Finetune", "train": "Finetune", "eval": "Eval",
                  "test": "Eval"}
MUSICINSTRUCT_FILES = {"all": "music_instruct.json", "short": "music_instruct_short.json",
                       "long": "music_instruct_long.json"}
MSD_SPLITS = ("train", "valid", "test")


class AnnotationError(ValueError):
  """A malformed annotation file: says which file, which entry and which field."""

  def __init__(self, file: str | os.PathLike, message: str):
    self.file = os.fspath(file)
    super().__init__(f"{self.file}: {message}")


@dataclasses.dataclass(frozen=True)
class AudioSource:
  path: str                        # wav/flac/mp3/ogg/npy
  sample_rate: int | None = None   # needed for .npy (raw arrays), None for self-describing files


@dataclasses.dataclass(frozen=True)
class Sample:
  id: str
  audio_source: AudioSource
  question: str | None             # None for stage-1 captions (no template)
  answer: str
  extra: dict[str, Any] = dataclasses.field(default_factory=dict)


def _load_json(file: Path) -> Any:
  if not file.is_file():
    raise AnnotationError(file, "annotation file not found")
  try:
    with open(file, encoding="utf-8") as f:
      return json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError) as err:
    raise AnnotationError(file, f"not valid JSON: {err}") from None


def _field(entry: Any, key: str, types: type | tuple, file: Path, where: str, *, nullable: bool = False):
  if not isinstance(entry, dict):
    raise AnnotationError(file, f"{where}: expected an object, got {type(entry).__name__}")
  if key not in entry:
    raise AnnotationError(file, f"{where}: missing field {key!r}")
  value = entry[key]
  if value is None and nullable:
    return None
  if not isinstance(value, types) or (isinstance(value, bool) and bool not in _as_tuple(types)):
    names = "/".join(t.__name__ for t in _as_tuple(types))
    raise AnnotationError(file, f"{where}: field {key!r} should be {names}, got {value!r:.80}")
  return value


def _as_tuple(types):
  return types if isinstance(types, tuple) else (types,)


def _text(entry, key, file, where) -> str:
  """A text field; null counts as empty (precompute skips and counts empty answers)."""
  return _field(entry, key, str, file, where, nullable=True) or ""


def _is_eval(entry, file, where) -> bool:
  value = _field(entry, "is_audioset_eval", (bool, int), file, where)
  if value not in (0, 1):
    raise AnnotationError(file, f"{where}: field 'is_audioset_eval' should be true/false, got {value!r}")
  return bool(value)


def _sub(data_dir: Path, name: str, probe: str) -> Path:
  """`data_dir/name` if it holds `probe`; else `data_dir` itself when it already is that folder."""
  if (data_dir / name / probe).exists():
    return data_dir / name
  if (data_dir / probe).exists():
    return data_dir
  return data_dir / name  # for the error message


def _npy_base(data_dir: Path, root: Path) -> Path:
  """The folder holding `MusicCaps_audio/`: the parent of the annotation folder."""
  if root != data_dir or (data_dir / "MusicCaps_audio").is_dir():
    return root.parent if root != data_dir else data_dir
  return data_dir.parent


def _train_or_test(split: str, dataset: str) -> bool:
  if split not in ("train", "test"):
    raise ValueError(f"{dataset} splits are 'train' and 'test' (by is_audioset_eval), got {split!r}")
  return split == "test"


def read_lp_musiccaps_msd(data_dir, split: str, *, annotations_dir=None, audio_dir=None) -> Iterator[Sample]:
  """LP-MusicCaps-MSD. Annotations: `annotations_dir` (default `data_dir`, or `data_dir/msd` when that
  holds the saved DatasetDict); audio root: `audio_dir` (default `data_dir`)."""
  if split not in MSD_SPLITS:
    raise ValueError(f"lp-musiccaps-msd splits are {MSD_SPLITS}, got {split!r}")
  data_dir = Path(data_dir)
  ann = Path(annotations_dir) if annotations_dir else None
  if ann is None:
    ann = data_dir / "msd" if (data_dir / "msd" / split).is_dir() else data_dir
  audio_root = Path(audio_dir) if audio_dir else data_dir
  split_dir = ann / split
  if not (split_dir / "state.json").is_file():
    raise AnnotationError(split_dir, "no saved `datasets` split here (expected state.json from save_to_disk)")
  import datasets  # heavy import, only for this reader
  try:
    table = datasets.load_from_disk(str(split_dir))
  except Exception as err:  # noqa: BLE001
    raise AnnotationError(split_dir, f"datasets.load_from_disk failed: {type(err).__name__}: {err}") from None
  for key in ("path", "caption_writing"):
    if key not in table.column_names:
      raise AnnotationError(split_dir, f"missing column {key!r} (columns: {table.column_names})")
  others = [c for c in table.column_names if c not in ("path", "caption_writing")]
  for i, row in enumerate(table):
    where = f"row {i}"
    path = _field(row, "path", str, split_dir, where)
    sample_id = str(row["track_id"]) if row.get("track_id") else path
    extra = {k: row[k] for k in others if isinstance(row[k], (str, int, float, bool, type(None)))}
    yield Sample(sample_id, AudioSource(str(audio_root / path)), None,
                 _text(row, "caption_writing", split_dir, where), extra)


def read_musicqa(data_dir, split: str) -> Iterator[Sample]:
  """MusicQA: split pretrain|finetune (= train)|eval (= test), or the file stems Pretrain|Finetune|Eval."""
  stem = MUSICQA_SPLITS.get(split.lower())
  if stem is None:
    raise ValueError(f"musicqa splits are {sorted(MUSICQA_SPLITS)}, got {split!r}")
  root = _sub(Path(data_dir), "MusicQA", f"{stem}MusicQA.json")
  file = root / f"{stem}MusicQA.json"
  entries = _load_json(file)
  if not isinstance(entries, list):
    raise AnnotationError(file, f"expected a list of entries, got {type(entries).__name__}")
  for i, entry in enumerate(entries):
    where = f"entry {i}"
    name = _field(entry, "audio_name", str, file, where)
    turns = _field(entry, "conversation", list, file, where)
    if len(turns) < 2 or len(turns) % 2:
      raise AnnotationError(file, f"{where}: field 'conversation' should hold human/gpt pairs, has {len(turns)} turns")
    for k in range(0, len(turns), 2):
      for t, who in ((k, "human"), (k + 1, "gpt")):
        if (got := _field(turns[t], "from", str, file, f"{where} turn {t}")) != who:
          raise AnnotationError(file, f"{where} turn {t}: field 'from' should be {who!r}, got {got!r}")
      sample_id = f"{name}#{i}" if len(turns) == 2 else f"{name}#{i}.{k // 2}"
      yield Sample(sample_id, AudioSource(str(root / "audios" / name)),
                   _text(turns[k], "value", file, f"{where} turn {k}"),
                   _text(turns[k + 1], "value", file, f"{where} turn {k + 1}"),
                   {"audio_name": name, "entry": i})


def _npy_source(base: Path, entry, file, where) -> AudioSource:
  ytid = _field(entry, "ytid", str, file, where)
  rate = _field(entry, "sampling_rate", (int, float), file, where)
  if rate <= 0 or rate != int(rate):
    raise AnnotationError(file, f"{where}: field 'sampling_rate' should be a positive integer, got {rate}")
  return AudioSource(str(base / "MusicCaps_audio" / f"{ytid}.npy"), int(rate))


def _audioset_entries(data_dir, split: str, dataset: str, sub: str, name: str, key: str):
  """(index, entry, audio source, file, where) of the entries of DIR/.../sub/name's list `key` that belong
  to `split` (train|test by `is_audioset_eval`), audio as .npy under the release's base directory."""
  want_eval = _train_or_test(split, dataset)
  data_dir = Path(data_dir)
  root = _sub(data_dir, sub, name)
  base = _npy_base(data_dir, root)
  file = root / name
  entries = _field(_load_json(file), key, list, file, "top level")
  for i, entry in enumerate(entries):
    where = f"{key}[{i}]"
    if _is_eval(entry, file, where) != want_eval:
      continue
    yield i, entry, _npy_source(base, entry, file, where), file, where


def read_musicinstruct(data_dir, split: str, *, which: str = "all") -> Iterator[Sample]:
  """MusicInstruct (all|short|long); split train|test by `is_audioset_eval`."""
  if which not in MUSICINSTRUCT_FILES:
    raise ValueError(f"musicinstruct file must be one of {sorted(MUSICINSTRUCT_FILES)}, got {which!r}")
  name = MUSICINSTRUCT_FILES[which]
  for i, entry, source, file, where in _audioset_entries(data_dir, split, "musicinstruct", "MusicInstruct",
                                                         name, "QA"):
    extra = {k: v for k, v in entry.items() if k not in ("question", "answer") and isinstance(v, (str, int, float, bool))}
    yield Sample(f"{entry['ytid']}#{i}", source, _text(entry, "question", file, where),
                 _text(entry, "answer", file, where), extra)


def read_musiccaps(data_dir, split: str) -> Iterator[Sample]:
  """MusicCaps captions with the fixed question; split train|test by `is_audioset_eval`."""
  for i, entry, source, file, where in _audioset_entries(data_dir, split, "musiccaps", "MusicCaps_ann",
                                                         "all.json", "ann"):
    yield Sample(entry["ytid"], source, MUSICCAPS_QUESTION, _text(entry, "caption", file, where),
                 {"ytid": entry["ytid"], "entry": i})


def read_demo(data_dir, split: str) -> Iterator[Sample]:
  """The generated demo set (musilingo_jax/data/demo.py): DIR/{split}.json, audio paths relative to DIR."""
  root = Path(data_dir)
  file = root / f"{split}.json"
  entries = _load_json(file)
  if not isinstance(entries, list):
    raise AnnotationError(file, f"expected a list of entries, got {type(entries).__name__}")
  for i, entry in enumerate(entries):
    where = f"entry {i}"
    sample_id = _field(entry, "id", (str, int), file, where)
    audio = _field(entry, "audio", str, file, where)
    labels = entry.get("labels")
    extra = {"clip_id": entry.get("clip_id"), "kind": entry.get("kind"), "labels": labels}
    yield Sample(str(sample_id), AudioSource(str(root / audio)), _text(entry, "question", file, where),
                 _text(entry, "answer", file, where), {k: v for k, v in extra.items() if v is not None})


def read_samples(dataset: str, data_dir, split: str, *, musicinstruct_file: str = "all",
                 **kwargs) -> Iterator[Sample]:
  """Dispatch by dataset name (one of DATASETS)."""
  if dataset == "lp-musiccaps-msd":
    return read_lp_musiccaps_msd(data_dir, split, **kwargs)
  if dataset == "musicqa":
    return read_musicqa(data_dir, split)
  if dataset == "musicinstruct":
    return read_musicinstruct(data_dir, split, which=musicinstruct_file)
  if dataset == "musiccaps":
    return read_musiccaps(data_dir, split)
  if dataset == "demo":
    return read_demo(data_dir, split)
  raise ValueError(f"unknown dataset {dataset!r}; expected one of {DATASETS}")
