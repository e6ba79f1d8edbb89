"""TensorFlow Datasets builders for the four released layouts and the demo set, holding precompute's records.

  name                        splits                      manual_dir (the release folder)
  musilingo_lp_musiccaps_msd  train / valid / test        holds msd/{train,valid,test}/ and the audio the rows name
  musilingo_musicqa           pretrain / finetune / eval  holds MusicQA/ (or is MusicQA/)
  musilingo_musicinstruct     train / test                holds MusicInstruct/ and MusicCaps_audio/; configs
                                                          all (default) / short / long pick the annotation file
  musilingo_musiccaps         train / test                holds MusicCaps_ann/ and MusicCaps_audio/
  musilingo_demo              train / test                the folder data/demo.py generates

`manual_dir` is the release folder exactly as `data/readers.py` (and `musilingo-precompute --data-dir`) take it.
A split whose annotation file is absent, or which holds no samples, is left out; a folder without any is a
`ManualDirError` naming it and what was expected.

Each example is one precompute record (`data/records.py`): the samples come from `readers.read_samples`, and the
checks, decoding, cropping and the record's layout from `records.Examples`, the code `records.precompute` runs,
so `records.decode_record(example["record"])` equals the record precompute writes for the same folder, split and
settings, byte for byte (raw audio windows only: no encoder features). `id`, `question` ("" for a caption)
and `answer` repeat the record's text for browsing. Samples precompute would skip are skipped; the counts and
the longest window go into the dataset's metadata (`info.metadata[split]`, as precompute's report).

Settings are `MusilingoConfig` fields, with `musilingo-precompute`'s defaults: crop (None: random for
train / pretrain / finetune, seeded per sample by `seed`; start otherwise), seed, audio_dtype, min_seconds,
max_text_chars, musicinstruct_file. A config with other settings needs its own name (it names the folder).

Builders write ArrayRecord by default (`file_format="array_record"`), which needs no TensorFlow:

  import musilingo_jax.data.tfds_builders  # registers the builders
  builder = tfds.builder("musilingo_musicqa", data_dir=OUT)
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir="/data/music_data"))
  source = tfds.data_source("musilingo_musicqa", split="finetune", data_dir=OUT)   # random access

The `tfds` command line imports TensorFlow when it starts (tfds 4.9.10), so without TensorFlow run the same
`tfds build` command through this module (its flags are TFDS' own; array_record unless --file_format says):

  python -m musilingo_jax.data.tfds_builders musilingo_musicqa --manual_dir /data/music_data --data_dir OUT
  python -m musilingo_jax.data.tfds_builders musilingo_musicinstruct --config short --manual_dir ... --data_dir OUT

With TensorFlow installed: `tfds build musilingo_musicqa --imports musilingo_jax.data.tfds_builders
--file_format array_record --manual_dir ... --data_dir OUT`.

`RecordSource` reads a built split back as the records' bytes, a Grain random-access source like the shards
`data/pipeline.py` reads (docs/tfds.md).
"""

from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import inspect
import os
import sys
from typing import Any, Iterator

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from musilingo_jax.data import audio as audio_lib
from musilingo_jax.data import readers, records

# Run as a script (`python -m musilingo_jax.data.tfds_builders`), this file's classes stay unregistered: `main`
# imports the module under its own name, which registers them once.
_AS_SCRIPT = __name__ == "__main__"
DEFAULT_FILE_FORMAT = "array_record"
WORKERS = 4  # decode threads, as precompute's default


class ManualDirError(FileNotFoundError):
  """The manual_dir holds none of the data set's annotation files: names the folder and what was expected."""


@dataclasses.dataclass(eq=False)
class MusilingoConfig(tfds.core.BuilderConfig):
  """Precompute's settings (`records.PrecomputeConfig`, defaults of `musilingo-precompute`)."""

  crop: str | None = None          # None: random for train/pretrain/finetune splits, start otherwise
  seed: int = 0                    # seeds the random crops (per sample index)
  audio_dtype: str = "int16"       # int16 | float16
  min_seconds: float = 1.0         # shorter clips are skipped (too_short)
  max_text_chars: int = 8192       # longer questions/answers are skipped (over_long_text)
  musicinstruct_file: str = "all"  # musicinstruct only: all | short | long


def _absent(err: readers.AnnotationError) -> bool:
  """Whether a reader's error means "no annotation file (or saved split) there", not a malformed one."""
  return not os.path.isfile(err.file) and not os.path.isfile(os.path.join(err.file, "state.json"))


def _instructions(dataset: str, expected: str) -> str:
  """A builder's MANUAL_DOWNLOAD_INSTRUCTIONS (TFDS shows them when manual_dir is missing or empty)."""
  return (f"Give as manual_dir the {dataset} release folder as `musilingo-precompute --data-dir` takes it "
          f"(musilingo_jax/data/readers.py): {expected}.")


class _Builder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """One released layout: `DATASET` (a `readers.DATASETS` name), its `SPLITS`, what `manual_dir` holds."""

  DATASET: str
  SPLITS: tuple[str, ...]
  EXPECTED: str  # what manual_dir should hold, for MANUAL_DOWNLOAD_INSTRUCTIONS and errors
  VERSION = tfds.core.Version(f"{records.SCHEMA}.0.0")
  RELEASE_NOTES = {f"{records.SCHEMA}.0.0": f"schema-{records.SCHEMA} records (musilingo_jax/data/records.py)"}
  BUILDER_CONFIGS = [MusilingoConfig(name="default", description="musilingo-precompute's default settings")]
  DEFAULT_CONFIG_NAME = "default"

  def __init__(self, *, file_format=None, **kwargs):
    super().__init__(file_format=file_format or DEFAULT_FILE_FORMAT, **kwargs)

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    """This file. TFDS 4.9.10's own lookup imports `importlib_resources`, which it does not install on
    Python >= 3.9 (tensorflow/datasets#11212), for any builder defined in a package."""
    return epath.Path(inspect.getfile(cls))

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=(f"{self.DATASET} as musilingo-precompute records: `record` is the msgpack record "
                     "(musilingo_jax.data.records.decode_record), id/question/answer repeat its text."),
        features=tfds.features.FeaturesDict({
            "record": tfds.features.Tensor(shape=(), dtype=np.object_),
            "id": tfds.features.Text(),
            "question": tfds.features.Text(),
            "answer": tfds.features.Text(),
        }),
        disable_shuffling=True,  # the examples in the readers' order, as precompute's shards hold them
        metadata=tfds.core.MetadataDict(),
    )

  def _precompute_config(self, root: str, split: str) -> records.PrecomputeConfig:
    c = self.builder_config
    cfg = records.PrecomputeConfig(
        dataset=self.DATASET, data_dir=root, split=split, out_dir="", musicinstruct_file=c.musicinstruct_file,
        audio_dtype=c.audio_dtype, workers=WORKERS, seed=c.seed, crop=c.crop, min_seconds=c.min_seconds,
        max_text_chars=c.max_text_chars, progress=False)
    # Bad settings fail here, before any work (precompute's command line checks them with its choices).
    records.quantize_audio(np.zeros(1, np.float32), cfg.audio_dtype)
    if c.crop not in (None,) + audio_lib.CROP_MODES:
      raise ValueError(f"{self.name}: crop must be None or one of {audio_lib.CROP_MODES}, got {c.crop!r}")
    return cfg

  def _split_generators(self, dl_manager):
    root = os.fspath(dl_manager.manual_dir)  # TFDS refuses a missing or empty folder, with the instructions
    found, missing = {}, []
    for split in self.SPLITS:
      try:
        samples = list(readers.read_samples(self.DATASET, root, split,
                                            musicinstruct_file=self.builder_config.musicinstruct_file))
      except readers.AnnotationError as err:
        if not _absent(err):
          raise
        missing.append(err.file)
        continue
      if samples:
        found[split] = samples
    if not found:
      why = f"none of {sorted(set(missing))} exists" if missing else "its annotation files hold no samples"
      raise ManualDirError(f"manual_dir {root} is not a {self.DATASET} release folder ({why}); expected "
                           f"{self.EXPECTED}")
    return {split: self._generate_examples(root=root, split=split, samples=samples)
            for split, samples in found.items()}

  def _generate_examples(self, root: str, split: str, samples: list[readers.Sample]) -> Iterator[tuple[int, dict]]:
    """(sample index, example) of the samples precompute writes, in order; the rest counted in the metadata."""
    examples = records.Examples(self._precompute_config(root, split))
    stats = {"samples": len(samples), "written": 0, "skipped_by_reason": {r: 0 for r in records.SKIP_REASONS},
             "skipped_ids": [], "audio_samples": 0, "max_audio_samples": 0}
    self.info.metadata[split] = stats
    with cf.ThreadPoolExecutor(max_workers=WORKERS) as pool:
      for index, sample, res in examples.map(enumerate(samples), pool, in_flight=2 * WORKERS + 2):
        if "reason" in res:
          stats["skipped_by_reason"][res["reason"]] += 1
          stats["skipped_ids"].append(res)
          continue
        record = examples.record(sample, res)
        stats["written"] += 1
        stats["audio_samples"] += record["audio_len"]
        stats["max_audio_samples"] = max(stats["max_audio_samples"], len(record["audio"]))
        yield index, {"record": records.encode_record(record), "id": sample.id,
                      "question": sample.question or "", "answer": sample.answer}
    if not stats["written"]:
      raise ValueError(f"{self.DATASET}/{split} in {root}: all {len(samples)} samples were skipped "
                       f"({ {k: v for k, v in stats['skipped_by_reason'].items() if v} }); nothing to write")


class MusilingoLpMusiccapsMsd(_Builder, skip_registration=_AS_SCRIPT):
  """LP-MusicCaps-MSD captions (stage 1: no question)."""

  DATASET = "lp-musiccaps-msd"
  SPLITS = readers.MSD_SPLITS
  EXPECTED = ("msd/{train,valid,test}/ (a `datasets` DatasetDict saved with save_to_disk) and the audio "
              "files at the rows' `path`, relative to this folder")
  MANUAL_DOWNLOAD_INSTRUCTIONS = _instructions(DATASET, EXPECTED)


class MusilingoMusicqa(_Builder, skip_registration=_AS_SCRIPT):
  """MusicQA question-answer pairs (split eval = test, finetune = train)."""

  DATASET = "musicqa"
  SPLITS = ("pretrain", "finetune", "eval")
  EXPECTED = "MusicQA/{Pretrain,Finetune,Eval}MusicQA.json and MusicQA/audios/ (or give MusicQA/ itself)"
  MANUAL_DOWNLOAD_INSTRUCTIONS = _instructions(DATASET, EXPECTED)


class MusilingoMusicinstruct(_Builder, skip_registration=_AS_SCRIPT):
  """MusicInstruct; configs all / short / long pick the annotation file; test = is_audioset_eval."""

  DATASET = "musicinstruct"
  SPLITS = ("train", "test")
  EXPECTED = ("MusicInstruct/music_instruct{,_short,_long}.json (the config's file) and "
              "MusicCaps_audio/{ytid}.npy beside it")
  MANUAL_DOWNLOAD_INSTRUCTIONS = _instructions(DATASET, EXPECTED)
  BUILDER_CONFIGS = [MusilingoConfig(name=which, musicinstruct_file=which,
                                     description=f"MusicInstruct/{readers.MUSICINSTRUCT_FILES[which]}")
                     for which in ("all", "short", "long")]
  DEFAULT_CONFIG_NAME = "all"


class MusilingoMusiccaps(_Builder, skip_registration=_AS_SCRIPT):
  """MusicCaps captions with the fixed question; test = is_audioset_eval."""

  DATASET = "musiccaps"
  SPLITS = ("train", "test")
  EXPECTED = "MusicCaps_ann/all.json and MusicCaps_audio/{ytid}.npy beside it"
  MANUAL_DOWNLOAD_INSTRUCTIONS = _instructions(DATASET, EXPECTED)


class MusilingoDemo(_Builder, skip_registration=_AS_SCRIPT):
  """The generated demo set (musilingo_jax/data/demo.py)."""

  DATASET = "demo"
  SPLITS = ("train", "test")
  EXPECTED = "{train,test}.json and the audio/ files they name (the folder musilingo_jax/data/demo.py builds)"
  MANUAL_DOWNLOAD_INSTRUCTIONS = _instructions(DATASET, EXPECTED)


BUILDERS = (MusilingoLpMusiccapsMsd, MusilingoMusicqa, MusilingoMusicinstruct, MusilingoMusiccaps, MusilingoDemo)
NAMES = {b.DATASET: b.name for b in BUILDERS}  # readers.DATASETS name -> TFDS name


class RecordSource:
  """A built split as precompute's record bytes: a Grain random-access source (len, [i] -> bytes), each item
  `records.decode_record`s to the record precompute writes. `max_audio_samples` (the longest stored window,
  from the build's metadata) is what `data/pipeline.py` otherwise reads from `{split}-report.json`.

    source = RecordSource("musilingo_musicqa", "finetune", data_dir=OUT)
    ds = grain.MapDataset.source(source).map(records.decode_record)
  """

  def __init__(self, name: str, split: str, *, data_dir, config: str | MusilingoConfig | None = None):
    self.name, self.split = name, split
    kwargs = {"config": config} if config is not None else None
    self._source = tfds.data_source(name, split=split, data_dir=data_dir, download=False, builder_kwargs=kwargs)
    self.metadata: dict[str, Any] = dict(self._source.dataset_info.metadata or {}).get(split, {})
    self.max_audio_samples: int | None = self.metadata.get("max_audio_samples")

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index: int) -> bytes:
    return self._source[int(index)]["record"]

  def __repr__(self) -> str:
    return f"RecordSource({self.name}, {self.split!r}, {len(self)} records)"


def main(argv: list[str] | None = None) -> int:
  """`tfds build` (TFDS' own command and flags) without TensorFlow: registers these builders, defaults to
  --file_format array_record. Datasets by name (`musilingo_musicqa`, `musilingo_musicinstruct/short`, ...)."""
  import importlib
  importlib.import_module("musilingo_jax.data.tfds_builders")  # registers the builders (this file may be __main__)
  from tensorflow_datasets.scripts.cli import build, cli_utils
  argv = list(sys.argv[1:] if argv is None else argv)
  if not any(a == "--file_format" or a.startswith("--file_format=") for a in argv):
    argv += ["--file_format", DEFAULT_FILE_FORMAT]
  parse = cli_utils.make_flags_parser(build.Args, description="tfds build for the musilingo_* data sets")
  parse(["musilingo_jax.data.tfds_builders"] + argv).execute()
  return 0


if __name__ == "__main__":
  sys.exit(main())
