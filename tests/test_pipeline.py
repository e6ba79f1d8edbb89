"""Grain pipeline: batch format, determinism, exact restore, per-process slices, bad records."""

import json
import zlib

import numpy as np
import pytest
from array_record.python import array_record_module

from musilingo_jax import prompts
from musilingo_jax.data import pipeline, records

S = 800          # audio samples per row in these tests
N_AUDIO = 3      # audio token slots (the longest clip's tokens)
MAX_LEN = 48


class WordTokenizer:
  """Stand-in tokenizer: one id per whitespace-separated word."""
  bos_id, eos_id, pad_id = 1, 2, 2

  def encode(self, text):
    return [3 + zlib.crc32(w.encode()) % 500 for w in text.split()]


TOK = WordTokenizer()


def TOKENS(samples):
  """Stand-in for the encoder's frames / pool: 400..799 samples -> 1 or 2 audio tokens."""
  return 1 + samples // 600
CFG = prompts.PromptConfig(template=True, end_sym="###", max_txt_len=16)


def _record(i, *, answer=None, question=None, features=False):
  n = 400 + 37 * i % 400
  rec = {"schema": 1, "id": f"r{i}", "dataset": "demo", "split": "train",
         "question": question if question is not None else f"what is clip {i} ?",
         "answer": answer if answer is not None else " ".join(["word"] * (1 + i % 5)) + f" {i}",
         "audio": ((np.arange(n) % 100 + i) * 100).astype(np.int16), "audio_len": n, "sample_rate": 24000}
  if features:
    rec["features"] = np.full((1 + i % 3, 4), i, np.float16)
  return records.encode_record(rec)


def _write(path, blobs):
  w = array_record_module.ArrayRecordWriter(str(path), "group_size:1")
  for b in blobs:
    w.write(b)
  w.close()
  return str(path)


@pytest.fixture
def shards(tmp_path):
  blobs = [_record(i) for i in range(22)]
  return [_write(tmp_path / "train-00000-of-00002.array_record", blobs[:11]),
          _write(tmp_path / "train-00001-of-00002.array_record", blobs[11:])]


def _make(files, **kw):
  args = dict(tokenizer=TOK, prompt_cfg=CFG, batch_size=4, seed=0, audio_slots=N_AUDIO, max_len=MAX_LEN,
              audio_samples=S, process_index=0, process_count=1, tokens_of_samples=TOKENS)
  args.update(kw)
  return pipeline.make_dataset(files, **args)


def _take(it, n):
  return [next(it) for _ in range(n)]


def _assert_same(a, b):
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_batch_format(shards):
  (batch,) = _take(_make(shards, shuffle=False), 1)
  shapes = {k: (v.shape, v.dtype) for k, v in batch.items()}
  i32 = np.dtype(np.int32)
  assert shapes == {"input_ids": ((4, MAX_LEN), i32), "attention_mask": ((4, MAX_LEN), i32),
                    "labels": ((4, MAX_LEN), i32), "positions": ((4, MAX_LEN), i32), "audio_start": ((4,), i32),
                    "audio_tokens": ((4,), i32), "audio": ((4, S), np.dtype(np.float32)), "audio_len": ((4,), i32),
                    "audio_pad_len": ((4,), i32), "valid": ((4,), i32)}
  assert (batch["input_ids"][:, 0] == TOK.bos_id).all() and batch["valid"].tolist() == [1, 1, 1, 1]
  ex = prompts.encode_example(TOK, "what is clip 0 ?", "word 0", CFG)
  assert batch["audio_start"][0] == 1 + len(ex["before"])
  assert sorted(batch["labels"][0][batch["labels"][0] != -100].tolist()) == sorted(ex["answer"].tolist())
  n0 = 400
  assert batch["audio_len"][0] == n0
  lens = [400 + 37 * i % 400 for i in range(4)]
  # Reference layout: every row attends the micro-batch's longest clip's tokens, audio padded to it.
  assert batch["audio_tokens"].tolist() == [max(TOKENS(n) for n in lens)] * 4
  assert batch["audio_pad_len"].tolist() == [max(lens)] * 4
  np.testing.assert_allclose(batch["audio"][0, :n0], (np.arange(n0) % 100) * 100 / 32767, rtol=1e-6)
  assert not batch["audio"][0, n0:].any()


def test_same_seed_same_batches(shards):
  a, b = _take(_make(shards, seed=3), 6), _take(_make(shards, seed=3), 6)
  for x, y in zip(a, b):
    _assert_same(x, y)
  c = _take(_make(shards, seed=4), 1)[0]
  assert not np.array_equal(a[0]["input_ids"], c["input_ids"])
  # Epochs are reshuffled (22 records, 4 per batch: batch 6 starts epoch 2).
  ids = lambda bs: [tuple(r) for b in bs for r in b["input_ids"]]
  assert ids(a)[:22] != ids(_take(_make(shards, seed=3), 12))[22:44]


def test_restored_iterator_continues_exactly(shards):
  it = _make(shards, seed=7)
  _take(it, 2)
  state = json.loads(json.dumps(pipeline.get_state(it)))  # as saved beside a checkpoint
  expected = _take(it, 3)
  fresh = _make(shards, seed=7)
  pipeline.set_state(fresh, state)
  for x, y in zip(expected, _take(fresh, 3)):
    _assert_same(x, y)
  assert fresh.batches == 5
  other = _make(shards, seed=7, batch_size=2, process_index=0, process_count=2)
  with pytest.raises(ValueError, match="process_count=1, this run has 2"):
    pipeline.set_state(other, state)


def _rows(batch):
  """Per-row content independent of the micro-batch's padding (middle pads, audio token count): text
  tokens, labels, audio."""
  m = batch["attention_mask"] == 1
  pos = np.arange(m.shape[1])
  out = []
  for r in range(len(batch["valid"])):
    start = batch["audio_start"][r]
    text = m[r] & ~((pos >= start) & (pos < start + batch["audio_tokens"][r]))
    out.append((tuple(batch["input_ids"][r][text]), tuple(batch["labels"][r][batch["labels"][r] != -100]),
                batch["audio"][r].tobytes(), int(batch["audio_len"][r]), int(batch["valid"][r])))
  return out


@pytest.mark.parametrize("layout", ["packed", "reference"])
@pytest.mark.parametrize("epochs", [None, 1])
def test_union_of_processes_is_the_global_batch(shards, layout, epochs):
  kw = dict(num_epochs=epochs, drop_remainder=False, layout=layout, seed=5)
  take = (lambda it: list(it)) if epochs else (lambda it: _take(it, 7))
  single = take(_make(shards, batch_size=4, **kw))
  per_process = [take(_make(shards, batch_size=2, process_index=p, process_count=2, **kw)) for p in range(2)]
  assert len(per_process[0]) == len(per_process[1]) == len(single)
  for g, a, b in zip(single, *per_process):
    if layout == "packed":  # every array is identical
      for k in g:
        np.testing.assert_array_equal(g[k], np.concatenate([a[k], b[k]]), err_msg=k)
    else:  # the same rows; middle padding follows each process's own batch, like the reference's per-GPU collater
      assert _rows(g) == _rows(a) + _rows(b)
  if epochs:  # 22 records, global batch 4, no drop: 6 batches, the last with 2 filler rows (valid 0, no labels)
    last = single[-1]
    assert len(single) == 6 and last["valid"].tolist() == [1, 1, 0, 0] and (last["labels"][2:] == -100).all()


def test_bad_records_are_skipped_and_counted(tmp_path):
  blobs = [b"\x00garbage first", _record(1, answer=""), _record(2, answer=" ".join(["w"] * 40)),
           b"\x00garbage", _record(4), _record(5, question=" ".join(["long"] * 50))]
  files = [_write(tmp_path / "x.array_record", blobs)]
  it = _make(files, batch_size=3, shuffle=False, num_epochs=1, layout="packed")
  batches = list(it)
  assert [b["valid"].tolist() for b in batches] == [[0, 0, 1], [0, 1, 0]]
  assert dict(it.skipped) == {"empty_answer": 1, "corrupt_record": 2, "over_long_text": 1}
  assert (batches[0]["labels"][1] == -100).all() and not batches[0]["audio"][1].any()
  # Answer truncated to max_txt_len keeps record 2; record 5's question does not fit max_len (48).
  assert batches[0]["valid"][2] == 1 and batches[1]["valid"][2] == 0
  state = it.get_state()
  assert state["skipped"] == {"empty_answer": 1, "corrupt_record": 2, "over_long_text": 1}


def test_reference_layout_drops_rows_that_overflow_with_batch_padding(tmp_path):
  # Alone each fits; together the long question's padding leaves no room for the long answer.
  blobs = [_record(0, question=" ".join(["q"] * 14), answer="a"), _record(1, question="q", answer=" ".join(["w"] * 15))]
  files = [_write(tmp_path / "y.array_record", blobs)]
  it = _make(files, batch_size=2, shuffle=False, num_epochs=1, max_len=30)  # alone: 22 and 23 positions
  (b,) = list(it)
  assert b["valid"].tolist() == [1, 0] and dict(it.skipped) == {"over_long_text": 1}
  (p,) = list(_make(files, batch_size=2, shuffle=False, num_epochs=1, max_len=30, layout="packed"))
  assert p["valid"].tolist() == [1, 1]


def test_features_and_caption_records(tmp_path):
  files = [_write(tmp_path / "f.array_record", [_record(i, features=True) for i in range(4)])]
  (b,) = _take(_make(files, use_features=True, shuffle=False), 1)
  assert "audio" not in b and b["features"].shape == (4, N_AUDIO, 4) and b["features"].dtype == np.float32
  assert b["features"][2].tolist() == [[2.0] * 4] * 3 and not b["features"][0, 1:].any()
  assert b["audio_tokens"].tolist() == [3] * 4   # the micro-batch's longest clip: 3 tokens
  (p,) = _take(_make(files, use_features=True, shuffle=False, layout="packed"), 1)
  assert p["audio_tokens"].tolist() == [1, 2, 3, 1]  # packed: each clip its own
  with pytest.raises(ValueError, match="'r2'.*3 audio tokens"):  # never cut to fit a smaller bound
    _take(_make(files, use_features=True, shuffle=False, audio_slots=2), 1)
  caption = records.encode_record({"schema": 1, "id": "c", "question": None, "answer": "a caption",
                                   "audio": np.zeros(10, np.int16), "audio_len": 10})
  files = [_write(tmp_path / "c.array_record", [caption] * 2)]
  with pytest.raises(ValueError, match="template=False"):
    _take(_make(files, batch_size=2), 1)
  stage1 = prompts.PromptConfig(template=False, end_sym="\n", max_txt_len=32)
  (b,) = _take(_make(files, batch_size=2, prompt_cfg=stage1), 1)
  assert b["audio_start"].tolist() == [1, 1] and b["valid"].tolist() == [1, 1]


@pytest.mark.parametrize("layout", ["reference", "packed"])
def test_each_micro_batch_is_laid_out_on_its_own(shards, layout):
  """accum_steps micro-batches in one batch: each padded (middle pads, audio tokens) from its own rows, as
  the reference's collater pads each micro-batch, and interleaved as the train step takes them apart."""
  (big,) = _take(_make(shards, batch_size=8, accum_steps=2, shuffle=False, layout=layout), 1)
  prep = pipeline._Prepare(TOK, CFG, audio_slots=N_AUDIO, max_len=MAX_LEN, audio_samples=S, use_features=False,
                           feature_dim=0, normalize_audio=False, tokens_of_samples=TOKENS)
  blobs = [_record(i) for i in range(8)]
  for a in range(2):
    exs = [{k: v for k, v in prep(b).items() if k != "_skip"} for b in blobs[4 * a:4 * a + 4]]
    want = prompts.collate(exs, max_len=MAX_LEN, bos_id=TOK.bos_id, pad_id=TOK.eos_id, layout=layout)
    got = {k: v[a::2] for k, v in big.items()}
    _assert_same(want, got)
  if layout == "reference":  # the two micro-batches really differ in their padding
    assert big["audio_start"][0::2].tolist() != big["audio_start"][1::2].tolist() or \
        big["audio_tokens"][0::2].tolist() != big["audio_tokens"][1::2].tolist()


def test_pad_is_eos_whatever_the_tokenizer_says(tmp_path):
  class PadTokenizer(WordTokenizer):
    pad_id = 0  # a tokenizer whose files name a [PAD] token
  files = [_write(tmp_path / "p.array_record", [_record(0), _record(1, question="a much longer question here ?")])]
  (b,) = _take(_make(files, tokenizer=PadTokenizer(), batch_size=2, shuffle=False), 1)
  pads = b["attention_mask"] == 0
  assert pads.any() and (b["input_ids"][pads] == PadTokenizer.eos_id).all()
  (t,) = _take(_make(files, tokenizer=PadTokenizer(), batch_size=2, shuffle=False, pad_id=0), 1)
  assert (t["input_ids"][t["attention_mask"] == 0] == 0).all()


@pytest.mark.parametrize("normalize", [True, False])
def test_raw_audio_through_the_reference_feature_extractor(tmp_path, normalize):
  """MusicInstruct / MusicCaps clips go to MERT as the reference's feature extractor returns them (raw .npy
  values: input_scale; per-clip standardisation with do_normalize); a MusicQA clip as stored."""
  from musilingo_jax.data import audio as audio_lib
  recs = []
  for i, (dataset, scale) in enumerate((("musicinstruct", 32768.0), ("musiccaps", 1.0), ("musicqa", None))):
    rec = records.decode_record(_record(i))
    rec["dataset"] = dataset
    if scale is not None:
      rec["input_scale"] = scale
    recs.append(records.encode_record(rec))
  files = [_write(tmp_path / "x.array_record", recs + [_record(3)])]
  (b,) = _take(_make(files, shuffle=False, normalize_audio=normalize), 1)
  for i, scale in enumerate((32768.0, 1.0, None)):
    n = int(b["audio_len"][i])
    stored = records.decode_record(recs[i])["audio"].astype(np.float32) * np.float32(1 / 32767)
    want = stored if scale is None else audio_lib.extractor_input(stored, do_normalize=normalize, scale=scale)
    np.testing.assert_allclose(b["audio"][i, :n], want, rtol=1e-6, atol=1e-6)
    assert not b["audio"][i, n:].any()
  if not normalize:
    assert b["audio"][0].max() > 1000  # the int16 .npy's raw magnitudes, as the reference feeds MERT
