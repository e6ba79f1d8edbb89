"""Readers on tiny fixtures in each released layout (docs/reference.md, Data)."""

import json

import pytest

from musilingo_jax.data import readers


def _write(path, obj):
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps(obj))


def _musicqa(root):
  qa = root / "MusicQA"
  conv = lambda q, a: [{"from": "human", "value": q}, {"from": "gpt", "value": a}]
  _write(qa / "FinetuneMusicQA.json", [{"audio_name": "000001.wav", "conversation": conv("Q1?", "A1.")},
                                       {"audio_name": "000001.wav", "conversation": conv("Q2?", "A2.")}])
  _write(qa / "EvalMusicQA.json", [{"audio_name": "000009.wav", "conversation": conv("Qe?", "Ae.")}])
  _write(qa / "PretrainMusicQA.json", [])
  return qa


def test_musicqa_layout(tmp_path):
  qa = _musicqa(tmp_path)
  train = list(readers.read_samples("musicqa", tmp_path, "finetune"))
  assert [s.id for s in train] == ["000001.wav#0", "000001.wav#1"]
  assert train[1].question == "Q2?" and train[1].answer == "A2."
  assert train[0].audio_source == readers.AudioSource(str(qa / "audios" / "000001.wav"), None)
  assert [s.id for s in readers.read_musicqa(tmp_path, "train")] == [s.id for s in train]  # train = Finetune
  assert [s.answer for s in readers.read_musicqa(tmp_path, "Eval")] == ["Ae."]
  assert [s.answer for s in readers.read_musicqa(qa, "test")] == ["Ae."]  # the MusicQA folder itself works
  assert list(readers.read_musicqa(tmp_path, "pretrain")) == []
  with pytest.raises(ValueError, match="musicqa splits"):
    list(readers.read_musicqa(tmp_path, "valid"))


def _mi_entry(ytid, ev, q="What key?", a="C major."):
  return {"ytid": ytid, "sampling_rate": 48000, "question": q, "answer": a, "is_audioset_eval": ev,
          "caption": "x"}


def test_musicinstruct_layout_and_split(tmp_path):
  _write(tmp_path / "MusicInstruct" / "music_instruct.json",
         {"QA": [_mi_entry("aaa", False), _mi_entry("bbb", True), _mi_entry("ccc", False)]})
  _write(tmp_path / "MusicInstruct" / "music_instruct_short.json", {"QA": [_mi_entry("ddd", True)]})
  train = list(readers.read_samples("musicinstruct", tmp_path, "train"))
  assert [s.id for s in train] == ["aaa#0", "ccc#2"]
  assert train[0].audio_source == readers.AudioSource(str(tmp_path / "MusicCaps_audio" / "aaa.npy"), 48000)
  assert train[0].question == "What key?" and train[0].extra["ytid"] == "aaa"
  test = list(readers.read_samples("musicinstruct", tmp_path, "test", musicinstruct_file="short"))
  assert [s.id for s in test] == ["ddd#0"]
  # Given the MusicInstruct folder itself, audio still resolves to the sibling MusicCaps_audio/.
  alone = list(readers.read_musicinstruct(tmp_path / "MusicInstruct", "train"))
  assert alone[0].audio_source.path == str(tmp_path / "MusicCaps_audio" / "aaa.npy")
  with pytest.raises(readers.AnnotationError, match="music_instruct_long.json"):
    list(readers.read_musicinstruct(tmp_path, "train", which="long"))


def test_musiccaps_layout(tmp_path):
  _write(tmp_path / "MusicCaps_ann" / "all.json",
         {"ann": [{"ytid": "y1", "sampling_rate": 16000, "caption": "A song.", "is_audioset_eval": True},
                  {"ytid": "y2", "sampling_rate": 16000, "caption": "Drums.", "is_audioset_eval": False}]})
  test = list(readers.read_samples("musiccaps", tmp_path, "test"))
  assert len(test) == 1 and test[0].id == "y1" and test[0].answer == "A song."
  assert test[0].question == "Please give a caption to the music."
  assert test[0].audio_source == readers.AudioSource(str(tmp_path / "MusicCaps_audio" / "y1.npy"), 16000)
  assert [s.id for s in readers.read_musiccaps(tmp_path, "train")] == ["y2"]


def test_demo_layout(tmp_path):
  _write(tmp_path / "train.json", [{"id": "d0", "clip_id": "c0", "audio": "audio/c0.wav", "question": "Key?",
                                    "answer": "G major.", "kind": "key", "labels": {"key": "G"}}])
  (s,) = readers.read_samples("demo", tmp_path, "train")
  assert s.id == "d0" and s.audio_source.path == str(tmp_path / "audio" / "c0.wav")
  assert s.extra == {"clip_id": "c0", "kind": "key", "labels": {"key": "G"}}


def test_lp_musiccaps_msd_layout(tmp_path):
  datasets = pytest.importorskip("datasets")
  def split(n, offset):
    return datasets.Dataset.from_dict({
        "track_id": [f"TR{offset + i}" for i in range(n)], "title": ["t"] * n,
        "path": [f"A/B/{offset + i}.clip.mp3" for i in range(n)],
        "caption_writing": [f"caption {offset + i}" for i in range(n)],
        "caption_summary": ["s"] * n, "year": [2000] * n})
  datasets.DatasetDict({"train": split(3, 0), "valid": split(1, 10), "test": split(2, 20)}).save_to_disk(
      str(tmp_path / "msd"))
  train = list(readers.read_samples("lp-musiccaps-msd", tmp_path, "train"))
  assert [s.id for s in train] == ["TR0", "TR1", "TR2"]
  assert train[1].question is None and train[1].answer == "caption 1"
  assert train[1].audio_source.path == str(tmp_path / "A/B/1.clip.mp3")  # relative to the data dir
  assert train[0].extra["year"] == 2000
  assert len(list(readers.read_lp_musiccaps_msd(tmp_path / "msd", "valid", audio_dir=tmp_path))) == 1
  with pytest.raises(readers.AnnotationError, match="state.json"):
    list(readers.read_lp_musiccaps_msd(tmp_path / "nowhere", "test"))
  datasets.Dataset.from_dict({"path": ["x.mp3"]}).save_to_disk(str(tmp_path / "bad" / "train"))
  with pytest.raises(readers.AnnotationError, match="caption_writing"):
    list(readers.read_lp_musiccaps_msd(tmp_path / "bad", "train"))


@pytest.mark.parametrize("content, match", [
    ("{not json", "not valid JSON"),
    (json.dumps({"QB": []}), "missing field 'QA'"),
    (json.dumps({"QA": [{"ytid": "a", "sampling_rate": "48k", "question": "q", "answer": "a",
                         "is_audioset_eval": False}]}), r"QA\[0\]: field 'sampling_rate'"),
    (json.dumps({"QA": [{"ytid": "a", "sampling_rate": 48000, "question": "q", "answer": "a"}]}),
     r"QA\[0\]: missing field 'is_audioset_eval'"),
    (json.dumps({"QA": [{"ytid": "a", "sampling_rate": 48000, "question": 3, "answer": "a",
                         "is_audioset_eval": False}]}), r"field 'question' should be str"),
])
def test_bad_annotation_names_file_and_field(tmp_path, content, match):
  file = tmp_path / "MusicInstruct" / "music_instruct.json"
  file.parent.mkdir()
  file.write_text(content)
  with pytest.raises(readers.AnnotationError, match=match) as err:
    list(readers.read_musicinstruct(tmp_path, "train"))
  assert str(file) in str(err.value)


def test_bad_musicqa_conversation(tmp_path):
  _write(tmp_path / "MusicQA" / "EvalMusicQA.json",
         [{"audio_name": "a.wav", "conversation": [{"from": "gpt", "value": "A"}, {"from": "human", "value": "Q"}]}])
  with pytest.raises(readers.AnnotationError, match="entry 0 turn 0: field 'from' should be 'human'"):
    list(readers.read_musicqa(tmp_path, "eval"))
  _write(tmp_path / "MusicQA" / "EvalMusicQA.json", [{"conversation": []}])
  with pytest.raises(readers.AnnotationError, match="entry 0: missing field 'audio_name'"):
    list(readers.read_musicqa(tmp_path, "eval"))


def test_null_answer_is_empty_not_an_error(tmp_path):
  _write(tmp_path / "MusicCaps_ann" / "all.json",
         {"ann": [{"ytid": "y", "sampling_rate": 16000, "caption": None, "is_audioset_eval": False}]})
  (s,) = readers.read_musiccaps(tmp_path, "train")
  assert s.answer == ""
