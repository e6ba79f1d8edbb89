"""A --config that cannot be built is one line on stderr and exit status 2, before anything is built: a
missing config file, an unknown preset, an override of a key the config lacks (with the closest known keys).
And the config a run stores names its local paths absolutely (config.absolute_paths, applied by trainer.run)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TRAIN = [sys.executable, str(ROOT / "scripts" / "train.py")]
FINETUNE = str(ROOT / "configs" / "finetune.py")


@pytest.mark.parametrize("args,expect", [
    ([f"--config={FINETUNE}:smoke", "--config.nonexistent=1"],
     "error: --config.nonexistent: " + FINETUNE + ":smoke has no key 'nonexistent'"),
    ([f"--config={FINETUNE}:smoke", "--config.train.num_step=3"],
     "closest known: config.train.num_steps"),
    ([f"--config={ROOT / 'configs' / 'nope.py'}:smoke"], "no such config file"),
    ([f"--config={FINETUNE}:nopreset"], "unknown preset 'nopreset'"),
])
def test_bad_config_is_one_line_and_exit_2(tmp_path, args, expect):
  workdir = tmp_path / "run"
  proc = subprocess.run(TRAIN + args + ["--workdir", str(workdir)], capture_output=True, text=True, timeout=300)
  assert proc.returncode == 2, proc.stderr[-2000:]
  errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
  assert len(errors) == 1 and expect in errors[0], proc.stderr[-2000:]
  assert "Traceback" not in proc.stderr
  assert not workdir.exists()  # nothing was created


def test_run_config_paths_become_absolute(tmp_path, monkeypatch):
  from musilingo_jax import config as cfglib
  from musilingo_jax.configs import finetune
  monkeypatch.chdir(tmp_path)
  c = finetune.get_config("smoke")
  c.data.records_dir, c.model.checkpoint, c.compilation_cache = "records/musicqa", "gs://bucket/converted", ""
  a = cfglib.absolute_paths(c)
  assert a.data.records_dir == str(tmp_path / "records" / "musicqa")
  assert a.model.checkpoint == "gs://bucket/converted"       # URLs as given
  assert a.model.llm_gguf == "smollm2" and a.compilation_cache == ""  # a name, and "", as given
  assert c.data.records_dir == "records/musicqa"              # the caller's config is not changed
  c.model.llm_gguf = "models/x.gguf"
  assert cfglib.absolute_paths(c).model.llm_gguf == str(tmp_path / "models" / "x.gguf")


# ---- every program checks its inputs before any model loads: one line `<prog>: error: ...`, exit 2 ----------

def _fake_converted(d: Path, enc: int = 32, llm: int = 64) -> Path:
  """What the checks read of a musilingo-convert folder (no weights: nothing may load them)."""
  for part in ("encoder", "llm"):
    (d / "params" / part).mkdir(parents=True)
  (d / "meta.json").write_text("{}")
  (d / "encoder_config.json").write_text(json.dumps({"hidden_size": enc}))
  (d / "llm_config.json").write_text(json.dumps({"hidden_size": llm}))
  return d


@pytest.fixture
def no_load(monkeypatch):
  """Fails the test if a program gets past its input checks: any model load or conversion."""
  from musilingo_jax import build
  from musilingo_jax.data import demo, records
  from musilingo_jax.main import convert_hf, verify_conversion

  def fail(*_a, **_k):
    raise AssertionError("got past the input checks")
  for obj, name in ((build, "load_for_inference"), (convert_hf, "convert_musilingo"), (records, "load_encoder"),
                    (records, "precompute"), (verify_conversion, "verify_mert"), (verify_conversion, "verify_llm"),
                    (demo, "build_demo_dataset")):
    monkeypatch.setattr(obj, name, fail)


def _inputs(t: Path) -> None:
  """The files and folders the cases below point at, under `t`."""
  import numpy as np
  _fake_converted(t / "ckpt")
  (t / "empty").mkdir()
  np.save(t / "feats.npy", np.zeros((3, 32), np.float32))
  np.save(t / "feats3.npy", np.zeros((1, 3, 32), np.float32))
  np.save(t / "feats16.npy", np.zeros((3, 16), np.float32))
  np.savez(t / "proj16.npz", kernel=np.zeros((16, 64), np.float32), bias=np.zeros(64, np.float32))
  (t / "text.mp3").write_text("hello this is text\n")
  (t / "notes.npy").write_text("not an array")
  (t / "afile").write_text("x")
  (t / "rec").mkdir()
  (t / "rec" / "train-00000-of-00001.array_record").write_bytes(b"")
  (t / "weights").mkdir()
  (t / "weights" / "model.safetensors").write_bytes(b"")
  (t / "bert").mkdir()
  (t / "bert" / "config.json").write_text(json.dumps({"model_type": "bert"}))


GEN = ["--question", "q"]
CASES = [  # (program, argv with {t} for the folder of _inputs, the exact error line)
    ("generate", ["--checkpoint", "{t}/ckpt", "--audio", "{t}/missing.wav", *GEN],
     "generate: error: --audio {t}/missing.wav: not found"),
    ("generate", ["--checkpoint", "/nonexistent", "--features", "{t}/feats.npy", *GEN],
     "generate: error: --checkpoint /nonexistent: no such folder (expected a converted checkpoint: musilingo-convert "
     "--mert DIR --llm DIR --out OUT writes one)"),
    ("generate", ["--checkpoint", "{t}/empty", "--features", "{t}/feats.npy", *GEN],
     "generate: error: --checkpoint {t}/empty: not a converted checkpoint: no meta.json (musilingo-convert --mert "
     "DIR --llm DIR --out OUT writes one)"),
    ("generate", ["--workdir", "{t}/empty", "--features", "{t}/feats.npy", *GEN],
     "generate: error: --workdir {t}/empty: not a training run directory: no config.json"),
    ("generate", ["--checkpoint", "{t}/ckpt", "--features", "{t}/notes.npy", *GEN],
     "generate: error: --features {t}/notes.npy: not a .npy array (ValueError: "),
    ("generate", ["--checkpoint", "{t}/ckpt", "--features", "{t}/feats3.npy", *GEN],
     "generate: error: --features {t}/feats3.npy: a float32 array of shape (1, 3, 32); expected pooled encoder "
     "features of one clip, float [T', 32]"),
    ("generate", ["--checkpoint", "{t}/ckpt", "--features", "{t}/feats16.npy", *GEN],
     "generate: error: --features {t}/feats16.npy: shape (3, 16); the encoder's width is 32 (expected [T', 32])"),
    ("generate", ["--checkpoint", "{t}/ckpt", "--projection", "{t}/proj16.npz", "--features", "{t}/feats.npy", *GEN],
     "generate: error: --projection {t}/proj16.npz: the projection maps 16 -> 64 (kernel.T (64, 16)), the models "
     "need 32 (encoder dim) -> 64 (LLM dim)"),
    ("generate", ["--checkpoint", "{t}/ckpt", "--features", "{t}/feats.npy"],
     "generate: error: --question is required (or use --chat)"),
    ("evaluate", ["--checkpoint", "{t}/ckpt", "--records", "{t}/rec", "--split", "test", "--out", "{t}/out"],
     "evaluate: error: --records {t}/rec: no 'test' shards (expected test-00000-of-00001.array_record, "
     "test-00000-of-NNNNN.array_record ...; it holds shards of train; musilingo-precompute writes them)"),
    ("evaluate", ["--checkpoint", "{t}/ckpt", "--dataset", "musicqa", "--data-dir", "{t}/empty", "--split", "eval",
                  "--out", "{t}/out"],
     "evaluate: error: --data-dir {t}/empty/MusicQA/EvalMusicQA.json: annotation file not found"),
    ("precompute", ["--dataset", "demo", "--data-dir", "{t}/nope", "--split", "train", "--out", "{t}/out"],
     "precompute: error: --data-dir {t}/nope: no such folder (expected the demo release)"),
    ("precompute", ["--dataset", "demo", "--data-dir", "{t}/empty", "--split", "train", "--out", "{t}/out",
                    "--encoder", "{t}/empty", "--features", "also"],
     "precompute: error: --encoder {t}/empty: neither a converted checkpoint (meta.json, params/encoder) nor an HF "
     "MERT folder (config.json)"),
    ("convert_hf", ["--llm", "{t}/weights", "--out", "{t}/out"],
     "convert: error: --llm {t}/weights: not a Hugging Face model folder: no config.json (expected an HF LLaMA "
     "folder or a .gguf file; found: model.safetensors)"),
    ("convert_hf", ["--mert", "{t}/nope", "--out", "{t}/out"],
     "convert: error: --mert {t}/nope: no such file or folder (expected an HF MERT/HuBERT folder)"),
    ("convert_hf", ["--llm", "{t}/bert", "--out", "{t}/out"],
     "convert: error: --llm {t}/bert/config.json: unsupported model_type 'bert' in config field 'model_type'; "
     "supported for the llm: "),
    ("verify_conversion", ["--mert", "{t}/weights"],
     "verify: error: --mert {t}/weights: not a Hugging Face model folder: no config.json (expected an HF "
     "MERT/HuBERT folder; found: model.safetensors)"),
    ("export_pytorch", ["--checkpoint", "{t}/empty", "--out", "{t}/out"],
     "export: error: --checkpoint {t}/empty: not a converted checkpoint: no meta.json (musilingo-convert --mert "
     "DIR --llm DIR --out OUT writes one)"),
    ("export_pytorch", ["--checkpoint", "{t}/ckpt", "--projection", "{t}/proj16.npz", "--out", "{t}/out"],
     "export: error: --projection {t}/proj16.npz: the projection maps 16 -> 64 (kernel.T (64, 16)), the models "
     "need 32 (encoder dim) -> 64 (LLM dim)"),
    ("export_pytorch", ["--workdir", "{t}/empty", "--out", "{t}/out"],
     "export: error: --workdir {t}/empty: not a training run directory: no config.json"),
    ("make_demo_data", ["--out", "{t}/afile"], "make-demo-data: error: --out {t}/afile: exists and is not a folder"),
    ("make_demo_data", ["--out", "{t}/demo", "--clip-seconds", "0"],
     "make-demo-data: error: --clip-seconds 0.0: must be positive"),
]
PREFIX_ONLY = ("(ValueError: ", "supported for the llm: ")  # lines whose end is the library's wording


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
  t = tmp_path_factory.mktemp("inputs")
  _inputs(t)
  return t


@pytest.mark.parametrize("prog,argv,line", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_input_errors_are_one_line_before_any_load(prog, argv, line, inputs, no_load, capsys):
  import importlib
  main = importlib.import_module(f"musilingo_jax.main.{prog}").main
  assert main([a.format(t=inputs) for a in argv]) == 2
  err = capsys.readouterr().err
  lines = err.splitlines()
  assert len(lines) == 1, err
  want = line.format(t=inputs)
  if want.endswith(PREFIX_ONLY):
    assert lines[0].startswith(want), (lines[0], want)
  else:
    assert lines[0] == want


def test_text_named_mp3_is_not_audio_with_the_decoders_reasons(inputs, no_load, capfd):
  """The decoders' own chatter on file descriptor 2 (libsndfile's mpg123) is kept out: still one line."""
  from musilingo_jax.main import generate
  assert generate.main(["--checkpoint", f"{inputs}/ckpt", "--audio", f"{inputs}/text.mp3", "--question", "q"]) == 2
  err = capfd.readouterr().err
  (line,) = err.splitlines()
  assert line.startswith(f"generate: error: --audio {inputs}/text.mp3: not audio: the file holds text ('hello this "
                         f"is text'); soundfile: "), line
  assert "; audioread: " in line and "NoBackendError: )" not in line


def test_good_audio_is_read_before_the_model(tmp_path):
  """A clip that decodes passes the probe and comes back as the 24 kHz window (what generate encodes)."""
  import argparse

  import numpy as np
  import soundfile as sf
  from musilingo_jax.main import generate
  sf.write(tmp_path / "tone.wav", np.sin(np.arange(48000) / 10).astype(np.float32), 16000)
  args = argparse.Namespace(features=None, audio=str(tmp_path / "tone.wav"), max_seconds=2.0, question="q", chat=False)
  kind, clip = generate.read_inputs(args, {"template": True, "dims": (32, 64)})
  assert kind == "audio" and clip.dtype == np.float32 and clip.shape == (48000,)  # 2 s of 16 kHz at 24 kHz
