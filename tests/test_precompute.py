"""scripts/precompute.py and data/records.py: records, bad-input accounting, resumability, features."""

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from array_record.python import array_record_module

from musilingo_jax.data import records

RATE = 16_000


def _tone(seconds, rate=RATE, freq=440.0):
  t = np.arange(int(seconds * rate)) / rate
  return (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def _read(path):
  reader = array_record_module.ArrayRecordReader(str(path))
  out = [records.decode_record(b) for b in reader.read(list(range(reader.num_records())))]
  reader.close()
  return out


def _musicqa_with_bad_inputs(root: Path) -> Path:
  """8 entries: 2 good clips (3 questions on one), truncated wav, zero-length, non-audio, missing, empty
  answer, over-long answer."""
  qa = root / "MusicQA"
  audios = qa / "audios"
  audios.mkdir(parents=True)
  sf.write(audios / "good1.wav", _tone(2.0), RATE, subtype="PCM_16")
  sf.write(audios / "good2.wav", _tone(30.0), RATE, subtype="PCM_16")  # longer than the 372,000 window
  full = (audios / "good1.wav").read_bytes()
  (audios / "trunc.wav").write_bytes(full[: len(full) // 3])
  (audios / "zero.wav").write_bytes(b"")
  (audios / "junk.wav").write_bytes(b"definitely not a RIFF file" * 40)
  conv = lambda q, a: [{"from": "human", "value": q}, {"from": "gpt", "value": a}]
  entries = [("good1.wav", "Q1", "A1"), ("good1.wav", "Q2", "A2"), ("trunc.wav", "Q", "A"),
             ("zero.wav", "Q", "A"), ("junk.wav", "Q", "A"), ("missing.wav", "Q", "A"),
             ("good1.wav", "Q3", "  "), ("good2.wav", "Q4", "x" * 500)]
  (qa / "FinetuneMusicQA.json").write_text(json.dumps(
      [{"audio_name": n, "conversation": conv(q, a)} for n, q, a in entries]))
  return root


def test_bad_inputs_skipped_counted_and_named(tmp_path):
  data = _musicqa_with_bad_inputs(tmp_path / "music_data")
  cfg = records.PrecomputeConfig(dataset="musicqa", data_dir=str(data), split="finetune",
                                 out_dir=str(tmp_path / "out"), shard_size=3, workers=2, max_text_chars=400,
                                 progress=False)
  report = records.precompute(cfg)
  assert report["written"] == 2 and report["skipped"] == 6 and report["num_samples"] == 8
  by = report["skipped_by_reason"]
  assert by == {"missing_file": 1, "unreadable": 2, "empty": 1, "too_short": 0, "nan": 0,
                "empty_answer": 1, "over_long_text": 1}
  named = {s["id"]: s["reason"] for s in report["skipped_ids"]}
  assert named == {"trunc.wav#2": "unreadable", "zero.wav#3": "empty", "junk.wav#4": "unreadable",
                   "missing.wav#5": "missing_file", "good1.wav#6": "empty_answer", "good2.wav#7": "over_long_text"}
  assert "truncated WAV" in next(s["detail"] for s in report["skipped_ids"] if s["id"] == "trunc.wav#2")
  on_disk = json.loads((tmp_path / "out" / "finetune-report.json").read_text())
  assert on_disk["skipped_ids"] == report["skipped_ids"]
  files = records.shard_files(tmp_path / "out", "finetune")
  assert [Path(f).name for f in files] == [f"finetune-{i:05d}-of-00003.array_record" for i in range(3)]
  recs = [r for f in files for r in _read(f)]
  assert [r["id"] for r in recs] == ["good1.wav#0", "good1.wav#1"]
  r = recs[0]
  window = math.ceil(372_000 * 24_000 / RATE)  # MusicQA: 372,000 native samples, padded, then resampled
  assert r["audio"].dtype == np.int16 and r["audio"].shape == (window,)
  assert r["audio_len"] == 48_000 and r["sample_rate"] == 24_000 and r["source_rate"] == RATE
  assert r["question"] == "Q1" and r["answer"] == "A1" and r["dataset"] == "musicqa"
  assert abs(np.abs(r["audio"][:48_000]).max() / 32767 - 0.3) < 0.01 and not r["audio"][49_000:].any()
  assert report["audio_hours"] == pytest.approx(2 * 2.0 / 3600)
  assert report["max_audio_samples"] == window


def test_nan_npy_and_musicinstruct_whole_clips(tmp_path):
  base = tmp_path / "music_data"
  (base / "MusicCaps_audio").mkdir(parents=True)
  np.save(base / "MusicCaps_audio" / "ok.npy", (_tone(1.5, 48_000) * 32767).astype(np.int16))
  bad = _tone(1.5, 48_000)
  bad[7] = np.inf
  np.save(base / "MusicCaps_audio" / "bad.npy", bad)
  qa = [{"ytid": y, "sampling_rate": 48_000, "question": "q", "answer": "a", "is_audioset_eval": False}
        for y in ("ok", "bad")]
  (base / "MusicInstruct").mkdir()
  (base / "MusicInstruct" / "music_instruct.json").write_text(json.dumps({"QA": qa}))
  report = records.precompute(records.PrecomputeConfig(
      dataset="musicinstruct", data_dir=str(base), split="train", out_dir=str(tmp_path / "o"),
      audio_dtype="float16", progress=False))
  assert report["written"] == 1 and report["skipped_ids"][0]["id"] == "bad#1"
  assert report["skipped_by_reason"]["nan"] == 1
  (r,) = _read(records.shard_files(tmp_path / "o", "train")[0])
  assert r["audio"].dtype == np.float16 and r["audio"].shape == (36_000,) and r["audio_len"] == 36_000


def _demo(root: Path, n=5, seconds=1.0):
  (root / "audio").mkdir(parents=True)
  entries = []
  for i in range(n):
    sf.write(root / "audio" / f"c{i}.wav", _tone(seconds, 24_000, 220.0 * (i + 1)), 24_000, subtype="PCM_16")
    entries.append({"id": f"c{i}-key", "clip_id": f"c{i}", "audio": f"audio/c{i}.wav", "question": f"Q{i}?",
                    "answer": f"A{i}.", "kind": "key", "labels": {"key": "C major", "i": i}})
  (root / "train.json").write_text(json.dumps(entries))
  return root


def _load_script():
  """The program behind scripts/precompute.py."""
  from musilingo_jax.main import precompute
  return precompute


def test_cli_resumes_finished_shards(tmp_path, capsys):
  data = _demo(tmp_path / "demo")
  out = tmp_path / "rec"
  argv = ["--dataset", "demo", "--data-dir", str(data), "--split", "train", "--out", str(out),
          "--shard-size", "2", "--workers", "2", "--no-progress"]
  script = _load_script()
  assert script.main(argv) == 0
  printed = capsys.readouterr().out
  assert "wrote 5 of 5" in printed and "train-report.json" in printed
  files = records.shard_files(out, "train")
  assert len(files) == 3
  (r,) = _read(files[2])
  assert r["kind"] == "key" and json.loads(r["labels"]) == {"key": "C major", "i": 4}
  assert json.loads(r["extra"]) == {"clip_id": "c4"}
  mtimes = {f: os.stat(f).st_mtime_ns for f in files}
  os.remove(files[1])  # as if the first run had stopped during shard 1
  assert script.main(argv) == 0
  report = json.loads((out / "train-report.json").read_text())
  assert report["shards_resumed"] == 2 and report["written"] == 5
  assert os.stat(files[0]).st_mtime_ns == mtimes[files[0]] and os.stat(files[2]).st_mtime_ns == mtimes[files[2]]
  assert [x["id"] for x in _read(files[1])] == ["c2-key", "c3-key"]
  assert not list(out.glob(".*tmp"))
  # Other settings into the same folder are refused, naming the field.
  assert script.main(argv[:-3] + ["--audio-dtype", "float16", "--no-progress"]) == 2
  assert "audio_dtype" in capsys.readouterr().err


def test_same_seed_same_random_crops(tmp_path):
  data = _musicqa_with_bad_inputs(tmp_path / "d")
  def crops(seed, name):
    cfg = records.PrecomputeConfig(dataset="musicqa", data_dir=str(data), split="finetune",
                                   out_dir=str(tmp_path / name), seed=seed, progress=False, max_text_chars=1000)
    records.precompute(cfg)
    return {r["id"]: r["crop_start"] for f in records.shard_files(tmp_path / name, "finetune") for r in _read(f)}
  a, b, c = crops(1, "a"), crops(1, "b"), crops(2, "c")
  assert a == b and a["good2.wav#7"] != c["good2.wav#7"] and a["good1.wav#0"] == 0


def test_record_roundtrip():
  ex = {"schema": 1, "id": "x", "question": None, "answer": "é", "audio": np.arange(5, dtype=np.int16),
        "features": np.ones((2, 3), np.float16), "n": np.int64(3)}
  out = records.decode_record(records.encode_record(ex))
  assert out["question"] is None and out["answer"] == "é" and out["n"] == 3
  assert out["audio"].dtype == np.int16 and np.array_equal(out["audio"], ex["audio"])
  assert out["features"].shape == (2, 3) and out["features"].dtype == np.float16
  with pytest.raises(ValueError):
    records.decode_record(b"\x93\x01\x02\x03")


def _random_tiny_mert():
  """A tiny MERT with random weights, built abstractly (an eager build compiles op by op: slow on CPU)."""
  import jax
  from flax import nnx
  from musilingo_jax.models import mert
  graphdef, state = nnx.split(nnx.eval_shape(lambda: mert.MERT(mert.MERTConfig.tiny(), rngs=nnx.Rngs(0))))
  rng = np.random.default_rng(0)
  state = jax.tree.map(lambda s: jax.numpy.asarray(rng.normal(0, 0.2, s.shape).astype(s.dtype)), state)
  return nnx.merge(graphdef, state)


def test_encoder_features(tmp_path):
  import jax
  from flax import nnx
  from musilingo_jax.convert.hf import export_pretrained
  from musilingo_jax.models import mert
  encoder = _random_tiny_mert()
  fn = records.make_encoder_fn(encoder, pool_frames=10)
  data = _demo(tmp_path / "demo", n=2, seconds=0.5)
  cfg = records.PrecomputeConfig(dataset="demo", data_dir=str(data), split="train", out_dir=str(tmp_path / "rec"),
                                 features="also", features_dtype="float32", pool_frames=10, min_seconds=0.1,
                                 encoder="tiny", progress=False)
  report = records.precompute(cfg, fn)
  recs = _read(records.shard_files(tmp_path / "rec", "train")[0])
  assert recs[1]["features"].shape == (4, 32)  # 12,000 samples -> 37 frames -> ceil(37 / 10) = 4 tokens
  want = fn(records.dequantize_audio(recs[1]["audio"]))  # the clip alone, at its own length
  np.testing.assert_allclose(recs[1]["features"], want, rtol=1e-3, atol=1e-3)
  assert report["feature_frames"] == 4 and report["feature_dim"] == 32 and report["pool_frames"] == 10
  # Per-dimension statistics over every feature token of the split, cached beside the shards.
  stats = records.feature_stats(tmp_path / "rec", "train")
  every = np.concatenate([r["features"] for r in recs]).astype(np.float64)
  np.testing.assert_allclose(stats["mean"], every.mean(0), rtol=1e-6, atol=1e-9)
  np.testing.assert_allclose(stats["std"], every.std(0), rtol=1e-5, atol=1e-9)
  assert stats["tokens"] == len(every) and (tmp_path / "rec" / "train-feature-stats.json").is_file()
  assert records.feature_stats(tmp_path / "rec", "train") == stats
  with pytest.raises(FileNotFoundError, match="no test shards"):
    records.feature_stats(tmp_path / "rec", "test")
  # The CLI's --encoder path: a converted checkpoint directory loads back to the same weights.
  loaded = records.load_encoder(export_pretrained(mert.HF_KIND, encoder, tmp_path / "enc"))
  for a, b in zip(jax.tree.leaves(nnx.state(encoder, nnx.Param)), jax.tree.leaves(nnx.state(loaded, nnx.Param))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("dtype", ["float32", "int16"])
@pytest.mark.parametrize("do_normalize", [True, False])
def test_extractor_input_is_wav2vec2_feature_extractor(tmp_path, dtype, do_normalize):
  """A .npy clip as the reference's MusicInstruct / MusicCaps loader hands it to MERT's feature extractor:
  raw values cast to float32 (int16 NOT rescaled), then Wav2Vec2FeatureExtractor with do_normalize."""
  import torch
  from transformers import Wav2Vec2FeatureExtractor
  from musilingo_jax.data import audio as audio_lib
  rng = np.random.default_rng(3)
  x = (0.2 + 0.3 * rng.standard_normal(24_000)).clip(-1, 1)
  raw = (x * 32767).astype(np.int16) if dtype == "int16" else x.astype(np.float32)
  path = tmp_path / "clip.npy"
  np.save(path, raw)
  ours_float, rate = audio_lib.read_audio(path, 24_000)  # [-1, 1] floats for every format
  scale = audio_lib.reference_input_scale(path)
  assert scale == (32768.0 if dtype == "int16" else 1.0)
  got = audio_lib.extractor_input(ours_float, do_normalize=do_normalize, scale=scale)
  fe = Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=24_000, padding_value=0.0, do_normalize=do_normalize,
                                return_attention_mask=True)
  # The reference: torch.from_numpy(raw_audio).float() (resampling is the identity at 24 kHz), then the extractor.
  want = np.asarray(fe(torch.from_numpy(raw).float(), sampling_rate=24_000, return_tensors="np")["input_values"][0])
  assert got.dtype == np.float32 and want.dtype == np.float32
  np.testing.assert_array_equal(got, want)
  # The same as handing the extractor the array itself (an int16 array comes back unscaled).
  direct = np.asarray(fe(raw, sampling_rate=24_000)["input_values"][0], np.float64)
  np.testing.assert_allclose(got, direct, rtol=1e-5, atol=1e-5 if do_normalize else 0)
  if dtype == "int16" and not do_normalize:
    np.testing.assert_array_equal(got, raw.astype(np.float32))
  if do_normalize:
    assert abs(float(got.mean())) < 1e-5 and abs(float(got.std()) - 1) < 1e-4


def test_read_do_normalize(tmp_path):
  from musilingo_jax.data import audio as audio_lib
  assert audio_lib.read_do_normalize(tmp_path) is None and audio_lib.read_do_normalize(None) is None
  (tmp_path / "preprocessor_config.json").write_text(json.dumps({"do_normalize": False, "sampling_rate": 24000}))
  assert audio_lib.read_do_normalize(tmp_path) is False
  assert audio_lib.extractor_do_normalize(tmp_path, "musicinstruct") is False
  (tmp_path / "preprocessor_config.json").write_text(json.dumps({"sampling_rate": 24000}))
  assert audio_lib.read_do_normalize(tmp_path) is True  # transformers' default
  assert audio_lib.extractor_do_normalize(None, "musiccaps") is True  # random encoder: the default
  assert audio_lib.extractor_do_normalize(tmp_path / "nowhere", "musicqa") is False  # never through the extractor
  with pytest.raises(ValueError, match="preprocessor_config.json is missing"):
    audio_lib.extractor_do_normalize(tmp_path / "nowhere", "musicinstruct")


def _musicinstruct_int16(base: Path) -> Path:
  (base / "MusicCaps_audio").mkdir(parents=True)
  np.save(base / "MusicCaps_audio" / "ok.npy", (_tone(1.5, 24_000) * 32767).astype(np.int16))
  qa = [{"ytid": "ok", "sampling_rate": 24_000, "question": "q", "answer": "a", "is_audioset_eval": False}]
  (base / "MusicInstruct").mkdir()
  (base / "MusicInstruct" / "music_instruct.json").write_text(json.dumps({"QA": qa}))
  return base


@pytest.mark.parametrize("do_normalize", [True, False])
def test_musicinstruct_features_see_the_extractor_output(tmp_path, do_normalize):
  """The encoder gets the clip as the reference's extractor returns it; do_normalize from the encoder
  directory's preprocessor_config.json; the record keeps input_scale for the raw-audio path."""
  from musilingo_jax.data import audio as audio_lib
  base = _musicinstruct_int16(tmp_path / "music_data")
  enc_dir = tmp_path / "converted"
  enc_dir.mkdir()
  seen = []

  def encoder_fn(window):  # [S] -> [1, 3]: what the encoder was given, summarised
    seen.append(np.array(window))
    return np.asarray([[window.mean(), window.std(), np.abs(window).max()]], np.float32)

  cfg = dict(dataset="musicinstruct", data_dir=str(base), split="train", features="also", encoder=str(enc_dir),
             features_dtype="float32", progress=False)
  with pytest.raises(ValueError, match="preprocessor_config.json"):
    records.precompute(records.PrecomputeConfig(out_dir=str(tmp_path / "none"), **cfg), encoder_fn)
  (enc_dir / "preprocessor_config.json").write_text(json.dumps({"do_normalize": do_normalize}))
  report = records.precompute(records.PrecomputeConfig(out_dir=str(tmp_path / "o"), **cfg), encoder_fn)
  assert report["extractor_normalize"] is do_normalize
  (r,) = _read(records.shard_files(tmp_path / "o", "train")[0])
  assert r["input_scale"] == 32768.0
  raw = np.load(base / "MusicCaps_audio" / "ok.npy").astype(np.float32)  # no resampling at 24 kHz
  want = audio_lib.extractor_input(raw, do_normalize=do_normalize)
  np.testing.assert_allclose(seen[-1], want, rtol=1e-6, atol=1e-6 if do_normalize else 0)
  if not do_normalize:
    assert r["features"][0, 2] == np.abs(raw).max() > 9000  # raw int16 magnitudes reach MERT
  # Given explicitly, do_normalize wins over the file.
  records.precompute(records.PrecomputeConfig(out_dir=str(tmp_path / "x"), do_normalize=not do_normalize, **cfg),
                     encoder_fn)
  np.testing.assert_allclose(seen[-1], audio_lib.extractor_input(raw, do_normalize=not do_normalize),
                             rtol=1e-6, atol=1e-6)
