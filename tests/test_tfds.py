"""data/tfds_builders.py: each TFDS builder, built from the tiny release folders of the reader and precompute
tests, gives exactly the records `records.precompute` writes for the same folder, split and settings."""

import json
import os
import subprocess
import sys
from pathlib import Path

import grain
import numpy as np
import pytest
import soundfile as sf
import tensorflow_datasets as tfds

from musilingo_jax import prompts
from musilingo_jax.data import pipeline, records
from musilingo_jax.data import tfds_builders as tb
from test_data_readers import _mi_entry, _write
from test_pipeline import WordTokenizer
from test_precompute import RATE, _demo, _musicinstruct_int16, _musicqa_with_bad_inputs, _tone


def _msd(root: Path) -> Path:
  """LP-MusicCaps-MSD: train = a 50 s clip (longer than the 732,000-sample window) + a missing one; test = 2 s;
  no valid split."""
  datasets = pytest.importorskip("datasets")
  (root / "A").mkdir(parents=True)
  sf.write(root / "A" / "long.wav", _tone(50.0, RATE, 330.0), RATE, subtype="PCM_16")
  sf.write(root / "A" / "short.wav", _tone(2.0), RATE, subtype="PCM_16")
  def split(paths):
    return datasets.Dataset.from_dict({"track_id": [f"TR{i}" for i in range(len(paths))], "path": paths,
                                       "caption_writing": [f"caption of {p}" for p in paths],
                                       "year": [2000] * len(paths)})
  datasets.DatasetDict({"train": split(["A/long.wav", "A/gone.wav"]), "test": split(["A/short.wav"])}).save_to_disk(
      str(root / "msd"))
  return root


def _musicinstruct(root: Path) -> Path:
  """MusicInstruct's short file: one train and one test question on a 24 kHz int16 .npy, one missing clip."""
  base = _musicinstruct_int16(root)
  qa = [_mi_entry("ok", False), _mi_entry("ok", True, q="Mode?", a="Major."), _mi_entry("gone", True)]
  _write(base / "MusicInstruct" / "music_instruct_short.json", {"QA": [{**e, "sampling_rate": 24_000} for e in qa]})
  return base


def _musiccaps(root: Path) -> Path:
  base = _musicinstruct_int16(root)  # MusicCaps_audio/ok.npy
  ann = [{"ytid": "ok", "sampling_rate": 24_000, "caption": "A tone.", "is_audioset_eval": False},
         {"ytid": "gone", "sampling_rate": 24_000, "caption": "Missing.", "is_audioset_eval": False},
         {"ytid": "ok", "sampling_rate": 16_000, "caption": "Slow tone.", "is_audioset_eval": True}]
  _write(base / "MusicCaps_ann" / "all.json", {"ann": ann})
  return base


# dataset -> (fixture, builder config (None: the default), precompute settings the same as that config, splits)
CASES = {
    "lp-musiccaps-msd": (_msd, tb.MusilingoConfig(name="start", crop="start"), {"crop": "start"}, ("train", "test")),
    "musicqa": (_musicqa_with_bad_inputs, None, {}, ("finetune",)),  # seeded random crops, as precompute's
    "musicinstruct": (_musicinstruct, "short", {"musicinstruct_file": "short"}, ("train", "test")),
    "musiccaps": (_musiccaps, None, {}, ("train", "test")),
}


def _build(name, data, out, config=None):
  builder = tfds.builder(name, data_dir=str(out), **({"config": config} if config is not None else {}))
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=str(data)))
  return builder


def _assert_same_as_precompute(name, config, data, tfds_dir, out, dataset, split, settings):
  """Every example of the built split is the record precompute writes, in order, byte for byte."""
  report = records.precompute(records.PrecomputeConfig(dataset=dataset, data_dir=str(data), split=split,
                                                       out_dir=str(out), progress=False, **settings))
  shards = grain.sources.ArrayRecordDataSource(records.shard_files(out, split))
  want = [shards[i] for i in range(len(shards))]
  kwargs = {"config": config} if config is not None else None
  source = tfds.data_source(name, split=split, data_dir=str(tfds_dir), download=False, builder_kwargs=kwargs)
  examples = [source[i] for i in range(len(source))]
  assert len(examples) == report["written"] > 0
  assert [e["record"] for e in examples] == want
  for example, raw in zip(examples, want):
    got, rec = records.decode_record(example["record"]), records.decode_record(raw)
    assert got["id"] == rec["id"] == example["id"].decode()
    assert got["question"] == rec["question"] and example["question"].decode() == (rec["question"] or "")
    assert got["answer"] == rec["answer"] == example["answer"].decode()
    assert got["audio"].dtype == rec["audio"].dtype and np.array_equal(got["audio"], rec["audio"])
    assert (got["split"], got["dataset"], got["crop_start"]) == (split, dataset, rec["crop_start"])
  # The Grain path: the records' bytes, and precompute's report numbers in the build's metadata.
  rs = tb.RecordSource(name, split, data_dir=tfds_dir, config=config)
  assert [r["id"] for r in grain.MapDataset.source(rs).map(records.decode_record)] == [
      records.decode_record(b)["id"] for b in want]
  assert rs.max_audio_samples == report["max_audio_samples"]
  assert rs.metadata["skipped_by_reason"] == report["skipped_by_reason"]
  assert rs.metadata["skipped_ids"] == report["skipped_ids"]
  # ... and our Grain pipeline reads the build as it reads precompute's shards: the same first batch.
  kw = dict(tokenizer=WordTokenizer(), prompt_cfg=prompts.PromptConfig(template=dataset != "lp-musiccaps-msd"),
            batch_size=2, shuffle=False, num_epochs=1, audio_slots=8, max_len=512, drop_remainder=False,
            tokens_of_samples=lambda n: 1 + n // 200_000)
  got = next(iter(pipeline.make_dataset(rs, **kw)))
  ref = next(iter(pipeline.make_dataset(records.shard_files(out, split), **kw)))
  assert sorted(got) == sorted(ref) and all(np.array_equal(got[k], ref[k]) for k in ref)
  return report


@pytest.mark.parametrize("dataset", sorted(CASES))
def test_builder_examples_are_precompute_records(tmp_path, dataset):
  fixture, config, settings, splits = CASES[dataset]
  data = fixture(tmp_path / "release")
  name = tb.NAMES[dataset]
  builder = _build(name, data, tmp_path / "tfds", config)
  assert sorted(builder.info.splits) == sorted(splits)  # absent or empty splits are left out
  reports = {split: _assert_same_as_precompute(name, config, data, tmp_path / "tfds", tmp_path / f"rec-{split}",
                                               dataset, split, settings) for split in splits}
  if dataset == "musicqa":  # the 30 s clip is cropped at random, seeded per sample, the same in both
    assert reports["finetune"]["crop"] == "random" and reports["finetune"]["skipped"] == 5
  if dataset == "lp-musiccaps-msd":
    assert reports["train"]["crop"] == "start" and reports["train"]["skipped_by_reason"]["missing_file"] == 1
  assert "tensorflow" not in sys.modules


def test_demo_through_the_build_command(tmp_path):
  """`python -m musilingo_jax.data.tfds_builders` (TFDS' build command, without TensorFlow), a custom config given
  as JSON; the result is precompute's records with those settings."""
  data = _demo(tmp_path / "demo", n=3)
  config = {"name": "f16", "crop": "start", "audio_dtype": "float16"}
  cmd = [sys.executable, "-m", "musilingo_jax.data.tfds_builders", "musilingo_demo", "--config", json.dumps(config),
         "--manual_dir", str(data), "--data_dir", str(tmp_path / "tfds")]
  done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env={**os.environ, "TQDM_DISABLE": "1"})
  assert done.returncode == 0, done.stderr[-3000:]
  shards = list((tmp_path / "tfds" / "musilingo_demo" / "f16").glob("*/musilingo_demo-train.array_record-*"))
  assert len(shards) == 1
  report = _assert_same_as_precompute("musilingo_demo", tb.MusilingoConfig(**config), data, tmp_path / "tfds",
                                      tmp_path / "rec", "demo", "train", {"crop": "start", "audio_dtype": "float16"})
  assert report["written"] == 3


def test_wrong_or_missing_manual_dir(tmp_path):
  demo = _demo(tmp_path / "demo", n=1)
  with pytest.raises(tb.ManualDirError, match="not a musicqa release folder") as err:
    _build("musilingo_musicqa", demo, tmp_path / "tfds")
  assert str(demo) in str(err.value) and "MusicQA/{Pretrain,Finetune,Eval}MusicQA.json" in str(err.value)
  nowhere = tmp_path / "nowhere"
  with pytest.raises(AssertionError, match="does not exist or is empty") as err:
    _build("musilingo_demo", nowhere, tmp_path / "tfds")
  assert str(nowhere) in str(err.value) and "{train,test}.json" in str(err.value)
  base = _musicinstruct_int16(tmp_path / "music_data")  # music_instruct.json only
  with pytest.raises(tb.ManualDirError, match="music_instruct_long.json"):
    _build("musilingo_musicinstruct", base, tmp_path / "tfds", "long")
