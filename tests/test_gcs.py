"""gs:// run paths against a real GCS JSON API server on loopback (tests/gcs.py: gcp-storage-emulator, every
client pointed at it by STORAGE_EMULATOR_HOST alone): precompute into a bucket (nothing half-written taken
for a shard), the pipeline staging shards per host, a converted checkpoint written to and loaded from a
bucket, generate / export from a gs:// workdir, and the one-line errors (missing object, unreachable
bucket) with exit status 2 before any model loads."""

import io
import json
import os
import subprocess
import sys
import zlib
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import soundfile as sf
import torch
from array_record.python import array_record_module
from etils import epath
from flax import nnx

import gcs
import tiny_hf
from musilingo_jax import build, checkpoint as ckptlib, config as cfglib, prompts, storage
from musilingo_jax import train as trainlib
from musilingo_jax.data import pipeline, records
from musilingo_jax.main import convert_hf, export_pytorch, generate, precompute

D_ENC, D_LLM = 32, 64
REPO = Path(__file__).resolve().parents[1]


def _objects(url: str) -> list[str]:
  """Every object name under a gs:// folder (recursively), relative to it."""
  return storage.list_files(url)


def test_storage_settings_follow_the_emulator_variable(gcs_bucket, monkeypatch):
  url = os.environ["STORAGE_EMULATOR_HOST"]
  assert url.startswith("http://127.0.0.1:")
  assert os.environ["TENSORSTORE_GCS_HTTP_URL"] == url and os.environ["TENSORSTORE_GCS_HTTP_VERSION"] == "1"
  assert os.environ["GOOGLE_AUTH_TOKEN_FOR_TESTING"]
  import fsspec.config
  assert fsspec.config.conf["gcs"]["token"] == "anon"
  assert storage.is_remote(gcs_bucket + "/x") and not storage.is_remote("/tmp/x") and not storage.is_remote("x")
  # Unset: every derived setting goes away (the clients would use the machine's credentials), then back.
  monkeypatch.delenv("STORAGE_EMULATOR_HOST")
  storage.configure_from_env()
  assert "TENSORSTORE_GCS_HTTP_URL" not in os.environ and "token" not in fsspec.config.conf.get("gcs", {})
  monkeypatch.setenv("STORAGE_EMULATOR_HOST", url.removeprefix("http://"))  # without a scheme: one is added
  storage.configure_from_env()
  assert os.environ["STORAGE_EMULATOR_HOST"] == url == os.environ["TENSORSTORE_GCS_HTTP_URL"]


# ----------------------------------------------------------------------------------------------------
# Precompute and the pipeline


def _musicqa(root: Path, n: int = 3) -> Path:
  qa = root / "MusicQA"
  (qa / "audios").mkdir(parents=True)
  t = np.arange(16_000) / 16_000
  for i in range(n):
    sf.write(qa / "audios" / f"c{i}.wav", (0.3 * np.sin(2 * np.pi * (220 + 50 * i) * t)).astype(np.float32),
             16_000, subtype="PCM_16")
  conv = lambda q, a: [{"from": "human", "value": q}, {"from": "gpt", "value": a}]  # noqa: E731
  (qa / "FinetuneMusicQA.json").write_text(json.dumps(
      [{"audio_name": f"c{i}.wav", "conversation": conv(f"q{i}", f"a{i}")} for i in range(n)]))
  return root


def test_precompute_writes_shards_and_report_to_a_bucket(gcs_prefix, tmp_path, monkeypatch, capsys):
  data = _musicqa(tmp_path / "music_data")
  out = gcs_prefix + "/records"
  args = ["--dataset", "musicqa", "--data-dir", str(data), "--split", "finetune", "--out", out,
          "--shard-size", "1", "--workers", "1", "--no-progress", "--min-seconds", "0.5"]
  # Interrupted in the second shard: the first is finished, the second leaves nothing that looks like one.
  real, calls = records.encode_record, []

  def failing(rec):
    calls.append(rec["id"])
    if len(calls) == 2:
      raise KeyboardInterrupt("killed")
    return real(rec)
  monkeypatch.setattr(records, "encode_record", failing)
  with pytest.raises(KeyboardInterrupt):
    precompute.main(args)
  monkeypatch.setattr(records, "encode_record", real)
  names = [os.path.basename(f) for f in records.shard_files(out, "finetune")]
  assert names == ["finetune-00000-of-00003.array_record"]
  assert not any(o.startswith("finetune-00001") for o in _objects(out))
  assert "finetune-report.json" not in _objects(out)

  assert precompute.main(args) == 0  # resumes: the finished shard is kept
  assert f"report: {out}/finetune-report.json" in capsys.readouterr().out
  objs = _objects(out)
  shards = [f"finetune-{i:05d}-of-00003.array_record" for i in range(3)]
  assert [o for o in objs if ".tmp" not in o] == sorted(
      shards + [s + ".json" for s in shards] + ["finetune-manifest.json", "finetune-report.json"])
  report = json.loads(epath.Path(out, "finetune-report.json").read_text())
  assert report["written"] == 3 and report["shards_resumed"] == 1 and report["out_dir"] == out
  assert records.read_report(out, "finetune")["max_audio_samples"] == report["max_audio_samples"] > 0
  recs = build.read_records(records.shard_files(out, "finetune"))
  assert [(r["question"], r["answer"]) for r in recs] == [("q0", "a0"), ("q1", "a1"), ("q2", "a2")]
  # A half-uploaded object under a temporary name is never listed as a shard.
  epath.Path(out, "finetune-00001-of-00003.array_record.tmp-0000").write_bytes(b"partial")
  assert len(records.shard_files(out, "finetune")) == 3


class _WordTokenizer:
  bos_id, eos_id, pad_id = 1, 2, 2

  def encode(self, text):
    return [3 + zlib.crc32(w.encode()) % 500 for w in text.split()]


def _local_shards(d: Path) -> list[str]:
  """Two shards of 6 + 5 tiny raw-audio records, with sidecars and a report, as precompute leaves them."""
  d.mkdir()
  files = []
  for s, ids in enumerate((range(6), range(6, 11))):
    f = d / records.shard_name("train", s, 2)
    w = array_record_module.ArrayRecordWriter(str(f), "group_size:1")
    for i in ids:
      n = 400 + 37 * i % 400
      w.write(records.encode_record({"schema": 1, "id": f"r{i}", "dataset": "demo", "split": "train",
                                     "question": f"clip {i} ?", "answer": f"word {i}", "audio_len": n,
                                     "audio": (np.arange(n) % 100 * 100).astype(np.int16),
                                     "features": np.full((1 + i % 3, 4), i, np.float16), "sample_rate": 24000}))
    w.close()
    (d / (f.name + ".json")).write_text(json.dumps({"written": len(ids)}))
    files.append(str(f))
  (d / "train-report.json").write_text(json.dumps({"max_audio_samples": 800}))
  return files


def test_pipeline_reads_bucket_shards_staged_per_host(gcs_prefix, tmp_path, monkeypatch):
  local = _local_shards(tmp_path / "rec")
  storage.upload_tree(tmp_path / "rec", gcs_prefix)
  cache = tmp_path / "staging"
  monkeypatch.setenv(storage.CACHE_ENV, str(cache))
  kw = dict(tokenizer=_WordTokenizer(), prompt_cfg=prompts.PromptConfig(template=True, end_sym="###",
                                                                       max_txt_len=16),
            batch_size=2, seed=3, audio_slots=3, max_len=48, tokens_of_samples=lambda s: 1 + s // 600,
            process_count=2, num_threads=1, prefetch=1)
  remote = records.shard_files(gcs_prefix, "train")
  assert [os.path.basename(f) for f in remote] == [os.path.basename(f) for f in local]
  src = pipeline.array_record_source(remote)
  assert isinstance(src, pipeline.StagedArrayRecordSource) and len(src) == 11
  assert not cache.exists() or not any(cache.rglob("*.array_record"))  # lengths from the sidecars only
  assert records.decode_record(src[7])["id"] == "r7"  # stages the second shard only
  assert [p.name for p in cache.rglob("*.array_record")] == ["train-00001-of-00002.array_record"]
  for p in range(2):  # process p of 2: the same batches as from the local shards
    it_l = pipeline.make_dataset(local, process_index=p, **kw)
    it_r = pipeline.make_dataset(gcs_prefix, process_index=p, **kw)  # the folder: *.array_record
    for _ in range(4):
      a, b = next(it_l), next(it_r)
      assert a.keys() == b.keys()
      for k in a:
        np.testing.assert_array_equal(a[k], b[k], k)
  assert len(list(cache.rglob("*.array_record"))) == 2  # staged once each, reused
  # The feature statistics (config.model.feature_norm) of bucket shards, cached beside them in the bucket.
  stats = records.feature_stats(gcs_prefix, "train")
  assert stats["mean"] == records.feature_stats(tmp_path / "rec", "train")["mean"]
  assert json.loads(epath.Path(gcs_prefix, "train-feature-stats.json").read_text())["tokens"] == stats["tokens"]


# ----------------------------------------------------------------------------------------------------
# Converted checkpoints, runs, generate and export


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory):
  """A tiny HF MERT and LLaMA (word-level tokenizer) on local disk, their local conversion, a projection."""
  root = tmp_path_factory.mktemp("gcs_hf")
  tiny_hf.converted_tiny_models(root, encoder_preprocessor={"do_normalize": False})
  rng = np.random.default_rng(1)
  np.save(root / "feats.npy", rng.standard_normal((2, D_ENC)).astype(np.float32))
  return root


@pytest.fixture(scope="module")
def bucket_checkpoint(gcs_bucket, hf_models):
  """musilingo-convert --out gs://...: the converted checkpoint in the bucket, and the projection beside it."""
  url = f"{gcs_bucket}/converted-{os.getpid()}"
  assert convert_hf.main(["--mert", str(hf_models / "encoder"), "--llm", str(hf_models / "llm"), "--out", url,
                          "--no-progress"]) == 0
  storage.upload(hf_models / "proj.npz", f"{url}-proj.npz")
  storage.upload(hf_models / "feats.npy", f"{url}-feats.npy")
  return url


def _flat(model) -> dict:
  return {".".join(map(str, k)): np.asarray(v.get_value()) for k, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def test_converted_checkpoint_in_a_bucket_loads(bucket_checkpoint, hf_models):
  objs = _objects(bucket_checkpoint)
  for name in ("meta.json", "encoder_config.json", "llm_config.json", "preprocessor_config.json",
               "tokenizer/tokenizer.json", "tokenizer/tokenizer_config.json"):
    assert name in objs, name
  assert any(o.startswith("params/llm/") for o in objs) and not any(".tmp" in o for o in objs)
  assert storage.is_remote(bucket_checkpoint) and json.loads(
      epath.Path(bucket_checkpoint, "meta.json").read_text())["tokenizer"] == "tokenizer"
  remote, tok_r, _ = build.load_for_inference(checkpoint=bucket_checkpoint, projection=f"{bucket_checkpoint}-proj.npz",
                                              dtype="float32")
  local, tok_l, _ = build.load_for_inference(checkpoint=str(hf_models / "converted"),
                                             projection=str(hf_models / "proj.npz"), dtype="float32")
  a, b = _flat(remote), _flat(local)
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], k)
  assert tok_r.encode("w5 w7") == tok_l.encode("w5 w7")


@pytest.fixture(scope="module")
def bucket_run(gcs_bucket, bucket_checkpoint):
  """A training run's directory in the bucket (config.json naming the gs:// converted checkpoint, an Orbax
  step of trained-looking projection + LoRA written by the run's Checkpointer) -> (url, trained params)."""
  c = cfglib.base_config()
  c.model.checkpoint = bucket_checkpoint
  c.model.compute_dtype = c.model.frozen_dtype = "float32"
  c.model.pool_frames = 4
  c.train.trainable = "projection+lora"
  c.train.lora.rank, c.train.lora.dropout = 4, 0.0
  model, _, _ = build.build_model(c)
  rng = np.random.default_rng(3)
  _, trainable, _ = trainlib.split_model(model, c.train.trainable)
  trainable = jax.tree.map(lambda x: jnp.asarray(rng.standard_normal(x.shape).astype(np.float32)), trainable)
  nnx.update(model, trainable)
  url = f"{gcs_bucket}/run-{os.getpid()}"
  epath.Path(url, "config.json").write_text(c.to_json_best_effort(indent=2))
  ckpt = ckptlib.Checkpointer(f"{url}/checkpoints", save_every=1, keep=1, keep_best=False)
  ckpt.save(1, trainable=trainable, opt_state={"count": np.zeros((), np.int32)}, data_state=None,
            config_json=c.to_json_best_effort(), frozen_ref={}, force=True)
  ckpt.close()
  kernel = np.asarray(model.llama_proj.kernel.get_value())
  bias = np.asarray(model.llama_proj.bias.get_value())
  return url, kernel, bias


def test_generate_and_export_from_a_bucket_workdir(bucket_run, bucket_checkpoint, capsys, monkeypatch):
  url, kernel, bias = bucket_run
  monkeypatch.setattr("sys.stdin", io.StringIO(""))
  assert generate.main(["--workdir", url, "--features", f"{bucket_checkpoint}-feats.npy", "--question", "w5 w7",
                        "--greedy", "--max-new-tokens", "3", "--json", "--dtype", "float32"]) == 0
  answer = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert answer["question"] == "w5 w7" and len(answer["token_ids"]) <= 3

  out = f"{url}-export"
  assert export_pytorch.main(["--workdir", url, "--out", out, "--dtype", "float32", "--no-encoder"]) == 0
  printed = capsys.readouterr().out
  assert f"wrote {out}/musilingo_checkpoint.pth" in printed and f"uploaded to {out}" in printed
  objs = _objects(out)
  assert "musilingo_checkpoint.pth" in objs and "llm/model.safetensors" in objs and "llm/tokenizer.json" in objs
  assert not any(".tmp" in o for o in objs)
  sd = torch.load(io.BytesIO(epath.Path(out, "musilingo_checkpoint.pth").read_bytes()), weights_only=True)["model"]
  np.testing.assert_array_equal(sd["llama_proj.weight"].numpy(), kernel.T)
  np.testing.assert_array_equal(sd["llama_proj.bias"].numpy(), bias)


# ----------------------------------------------------------------------------------------------------
# One-line errors


def _one_error_line(err: str, *must: str) -> str:
  lines = [l for l in err.strip().splitlines() if l.strip()]
  assert len(lines) == 1, err
  for m in must:
    assert m in lines[0], lines[0]
  return lines[0]


def test_missing_objects_are_one_line_and_exit_2(gcs_bucket, tmp_path, capsys, monkeypatch):
  def fail(*_a, **_k):
    raise AssertionError("a model was loaded")
  monkeypatch.setattr(build, "load_for_inference", fail)
  missing = f"{gcs_bucket}/no-such-run"
  assert generate.main(["--workdir", missing, "--features", "x.npy", "--question", "q"]) == 2
  _one_error_line(capsys.readouterr().err, "generate: error: --workdir", f"{missing}/config.json", "not found")
  assert export_pytorch.main(["--checkpoint", f"{gcs_bucket}/no-such-ckpt", "--out", str(tmp_path / "o")]) == 2
  _one_error_line(capsys.readouterr().err, f"{gcs_bucket}/no-such-ckpt/meta.json", "not found")
  assert precompute.main(["--dataset", "musicqa", "--data-dir", str(tmp_path), "--split", "finetune",
                          "--out", "gs://no-such-bucket/rec"]) == 2
  _one_error_line(capsys.readouterr().err, "gs://no-such-bucket/rec", "bucket gs://no-such-bucket does not exist")


def test_unreachable_bucket_is_one_line_and_exit_2(gcs_bucket, tmp_path):
  """A subprocess (the console program) whose STORAGE_EMULATOR_HOST points at a closed port."""
  env = {**os.environ, "STORAGE_EMULATOR_HOST": f"127.0.0.1:{gcs.closed_port()}"}
  for script, args, url in (
      ("generate", ["--workdir", f"{gcs_bucket}/run", "--features", "f.npy", "--question", "q"],
       f"{gcs_bucket}/run/config.json"),
      ("export_pytorch", ["--checkpoint", f"{gcs_bucket}/ckpt", "--out", str(tmp_path / "x")],
       f"{gcs_bucket}/ckpt/meta.json"),
      ("convert_hf", ["--llm", str(tmp_path), "--out", f"{gcs_bucket}/conv"], f"{gcs_bucket}/conv")):
    proc = subprocess.run([sys.executable, "-X", "importtime", str(REPO / "scripts" / f"{script}.py"), *args],
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    imported = [l.rsplit("|", 1)[-1].strip() for l in proc.stderr.splitlines() if l.startswith("import time:")]
    assert "musilingo_jax.storage" in imported
    assert "jax" not in imported and "torch" not in imported  # stopped before any model code loads
    err = "\n".join(l for l in proc.stderr.splitlines() if not l.startswith("import time:"))
    _one_error_line(err, url, "unreachable", "Connection refused")
