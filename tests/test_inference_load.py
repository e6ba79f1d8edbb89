"""Loading for inference: frozen weights in bfloat16 (the default) split over the 8 CPU devices, the
projection and LoRA in float32, the memory report, a training run's weights unchanged by the dtype
override, and --dtype through scripts/generate.py (chat), evaluate.py and export_pytorch.py."""

import importlib
import io
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.torch
import torch
from jax.sharding import PartitionSpec as P

import tiny_hf
from musilingo_jax import build, generate as gen, prompts

D_ENC, D_LLM, N_AUDIO, N_NEW = 32, 64, 2, 8
NO_STOP = dict(stop_sequences=(), eos_ids=())


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
  """A converted tiny MERT + LLaMA (float32, with a word-level tokenizer) and a projection .npz."""
  root = tmp_path_factory.mktemp("inference")
  tiny_hf.converted_tiny_models(root)
  return root


_params = tiny_hf.params_of


def _expected_memory(model) -> dict:
  """The report's numbers from the arrays' sizes and their shardings' shard shapes (not their shards)."""
  frozen = trainable = 0
  per_device: dict = {}
  for path, x in _params(model).items():
    if path.startswith("llama_proj.") or ".lora_" in path:
      trainable += x.size * x.dtype.itemsize
    else:
      frozen += x.size * x.dtype.itemsize
    shard_bytes = math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize
    for d in x.sharding.device_set:
      per_device[d] = per_device.get(d, 0) + shard_bytes
  return {"frozen": frozen, "trainable": trainable, "per_device": per_device}


def _check_report(model, frozen_dtype):
  report = build.memory_report(model)
  want = _expected_memory(model)
  assert report["frozen_bytes"] == want["frozen"] and report["trainable_bytes"] == want["trainable"]
  assert report["total_bytes"] == want["frozen"] + want["trainable"]
  assert report["per_device"] == want["per_device"] and report["devices"] == len(jax.devices()) == 8
  assert report["max_device_bytes"] == max(want["per_device"].values())
  assert report["max_device_bytes"] < report["total_bytes"] / 2  # the frozen weights are split, not copied
  assert report["frozen_dtype"] == frozen_dtype and report["trainable_dtype"] == "float32"
  line = build.format_memory_report(report)
  assert line.startswith("model memory: ") and f"in {frozen_dtype} over 8 devices, at most " in line
  return report


def _assert_split(x: jax.Array):
  """Split over all 8 devices (not replicated): each device holds 1/8 of it."""
  assert x.sharding.spec != P() and any(a is not None for a in x.sharding.spec)
  assert len(x.sharding.device_set) == 8
  assert math.prod(x.sharding.shard_shape(x.shape)) * 8 == x.size


def _assert_frozen_dtype(model, dtype):
  for name, x in {**_params(model.encoder), **_params(model.llm)}.items():
    assert x.dtype == (jnp.float32 if ".lora_" in name else dtype), name
  assert model.encoder.cfg.dtype == model.encoder.cfg.param_dtype == dtype
  assert model.llm.cfg.dtype == model.llm.cfg.param_dtype == dtype


def _batch(seed=0) -> dict:
  rng = np.random.default_rng(seed)
  enc = [{"before": rng.integers(3, 101, nb), "after": rng.integers(3, 101, na)} for nb, na in ((3, 5), (6, 4))]
  batch = prompts.collate_prompts(enc, n_audio_tokens=N_AUDIO, bos_id=1, pad_id=0)
  batch["features"] = rng.normal(size=(2, N_AUDIO, D_ENC)).astype(np.float32)
  return batch


def _greedy(model) -> np.ndarray:
  tokens, _, _ = gen.generate_ids(model, _batch(), max_new_tokens=N_NEW, greedy=True, **NO_STOP)
  return np.asarray(tokens)


def test_checkpoint_loads_bf16_split_over_all_devices(converted):
  model, tok, c = build.load_for_inference(checkpoint=str(converted / "converted"),
                                           projection=str(converted / "proj.npz"))
  assert c.model.frozen_dtype == c.model.compute_dtype == "bfloat16" and tok is not None
  _assert_frozen_dtype(model, jnp.bfloat16)
  with np.load(converted / "proj.npz") as z:
    for name in ("kernel", "bias"):
      x = getattr(model.llama_proj, name).get_value()
      assert x.dtype == jnp.float32
      np.testing.assert_array_equal(np.asarray(x), z[name])
  _assert_split(model.llm.model.layers[0].mlp.up_proj.kernel.get_value())  # [embed, mlp]
  _assert_split(model.llm.model.embed_tokens.weight.get_value())          # [vocab, embed]
  enc_kernels = [x for n, x in _params(model.encoder).items() if n.endswith("kernel") and x.ndim == 2]
  assert enc_kernels and any(len(x.sharding.device_set) == 8 and x.sharding.spec != P() for x in enc_kernels)
  bf16 = _check_report(model, "bfloat16")

  model32, _, _ = build.load_for_inference(checkpoint=str(converted / "converted"),
                                           projection=str(converted / "proj.npz"), dtype="float32")
  _assert_frozen_dtype(model32, jnp.float32)
  f32 = _check_report(model32, "float32")
  assert f32["frozen_bytes"] == 2 * bf16["frozen_bytes"] and f32["trainable_bytes"] == bf16["trainable_bytes"]
  # bf16 is the float32 weights rounded once.
  ref, ours = _params(model32.llm), _params(model.llm)
  for name in ref:
    np.testing.assert_array_equal(np.asarray(ours[name]), np.asarray(ref[name].astype(jnp.bfloat16)), name)

  # Greedy tokens: float32 split over 8 devices = float32 on one device (as loaded before); bf16 runs.
  one, _, _ = build.load_for_inference(checkpoint=str(converted / "converted"),
                                       projection=str(converted / "proj.npz"), dtype="float32",
                                       mesh=build.inference_mesh(jax.local_devices()[:1]))
  assert build.memory_report(one)["devices"] == 1
  np.testing.assert_array_equal(_greedy(model32), _greedy(one))
  tokens = _greedy(model)
  assert tokens.shape == (2, N_NEW) and ((tokens >= 0) & (tokens < 101)).all()


@pytest.mark.parametrize("frozen_from", ["random", "checkpoint"])
def test_workdir_run_loads_bf16_with_its_weights(tmp_path, converted, frozen_from):
  c = tiny_hf.run_config(tmp_path / "demo", str(converted / "converted") if frozen_from == "checkpoint" else "")
  workdir = tmp_path / "run"
  workdir.mkdir()
  frozen, trained = tiny_hf.fake_run(workdir, c)
  model, _, c_loaded = build.load_for_inference(workdir=str(workdir))
  assert c_loaded.model.frozen_dtype == c_loaded.model.compute_dtype == "bfloat16"
  _assert_frozen_dtype(model, jnp.bfloat16)
  params = _params(model)
  # The run's frozen weights (random ones initialised as the run did), rounded to bf16; trained values exact.
  for name, value in frozen.items():
    np.testing.assert_array_equal(np.asarray(params[name]), np.asarray(jnp.asarray(value).astype(jnp.bfloat16)),
                                  name)
  assert sorted(trained) == sorted(k for k in params if k.startswith("llama_proj.") or ".lora_" in k)
  for name, value in trained.items():
    assert params[name].dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(params[name]), value, name)
  assert model.feature_norm is not None  # the run's demo statistics were found under the run's dtypes
  _assert_split(model.llm.model.layers[0].mlp.up_proj.kernel.get_value())
  _assert_split(model.llama_proj.kernel.get_value())  # [in, embed]: trainable, split too
  _check_report(model, "bfloat16")
  tokens = _greedy(model)
  assert tokens.shape == (2, N_NEW)

  if frozen_from == "random":
    return  # (building the random presets again costs ~25 s on 2 CPU cores)
  # dtype=None: as the run was trained (float32).
  model32, _, c32 = build.load_for_inference(workdir=str(workdir), dtype=None)
  assert c32.model.frozen_dtype == "float32"
  _assert_frozen_dtype(model32, jnp.float32)
  for name, value in frozen.items():
    np.testing.assert_array_equal(np.asarray(_params(model32)[name]), value, name)


def _script(name):
  """The program behind scripts/{name}.py."""
  return importlib.import_module(f"musilingo_jax.main.{name}")


def test_generate_chat_and_evaluate_scripts_load_bf16(converted, tmp_path, capsys, monkeypatch):
  feats = tmp_path / "feats.npy"
  np.save(feats, np.random.default_rng(0).standard_normal((N_AUDIO, D_ENC)).astype(np.float32))
  src = ["--checkpoint", str(converted / "converted"), "--projection", str(converted / "proj.npz")]
  generate = _script("generate")
  assert generate.parse_args(src + ["--features", str(feats)]).dtype == "bfloat16"
  monkeypatch.setattr("sys.stdin", io.StringIO(""))  # chat: one question given, then end of input
  assert generate.main(src + ["--features", str(feats), "--chat", "--question", "w5 w7", "--greedy",
                              "--max-new-tokens", "3", "--json"]) == 0
  out = capsys.readouterr()
  assert "model memory: " in out.err and "in bfloat16 over 8 devices" in out.err
  answers = [json.loads(line) for line in out.out.splitlines() if line.startswith("{")]
  assert [a["question"] for a in answers] == ["w5 w7"]

  evaluate = _script("evaluate")
  seen = {}

  def fake_evaluate(model, tokenizer, examples, **kw):
    seen["dtype"] = model.llm.model.layers[0].mlp.up_proj.kernel.get_value().dtype
    return {}
  monkeypatch.setattr(evaluate, "records_examples", lambda *a: [])
  monkeypatch.setattr("musilingo_jax.evaluate.evaluate", fake_evaluate)  # what evaluate.main imports
  monkeypatch.setattr("musilingo_jax.evaluate.write_report", lambda r, out: {"json": "j", "table": "t"})
  monkeypatch.setattr("musilingo_jax.evaluate.format_report", lambda r: "")
  assert evaluate.main(src + ["--records", str(tmp_path), "--out", str(tmp_path / "eval"), "--dtype",
                              "float32"]) == 0
  assert seen["dtype"] == jnp.float32 and "in float32 over 8 devices" in capsys.readouterr().out


def test_export_script_dtypes(converted, tmp_path, capsys):
  export = _script("export_pytorch")
  src = ["--checkpoint", str(converted / "converted"), "--projection", str(converted / "proj.npz")]
  hf = safetensors.torch.load_file(str(converted / "llm" / "model.safetensors"))
  with np.load(converted / "proj.npz") as z:
    kernel, bias = z["kernel"], z["bias"]
  for dtype, torch_dtype in (("bfloat16", torch.bfloat16), ("float32", torch.float32)):
    out = tmp_path / dtype
    args = src + ["--out", str(out)] + ([] if dtype == "bfloat16" else ["--dtype", dtype])
    assert export.main(args) == 0
    assert f"in {dtype} over 8 devices" in capsys.readouterr().out
    sd = torch.load(out / "musilingo_checkpoint.pth", map_location="cpu", weights_only=True)["model"]
    assert sd["llama_proj.weight"].dtype == sd["llama_proj.bias"].dtype == torch.float32  # always, as the reference
    np.testing.assert_array_equal(sd["llama_proj.weight"].numpy(), kernel.T)
    np.testing.assert_array_equal(sd["llama_proj.bias"].numpy(), bias)
    llm = safetensors.torch.load_file(str(out / "llm" / "model.safetensors"))
    enc = safetensors.torch.load_file(str(out / "encoder" / "model.safetensors"))
    assert {v.dtype for v in llm.values()} == {v.dtype for v in enc.values()} == {torch_dtype}
    assert json.loads((out / "llm" / "config.json").read_text())["torch_dtype"] == dtype
    assert set(llm) == set(hf)
    for key, value in hf.items():  # the source float32 weights, rounded once to the export dtype
      torch.testing.assert_close(llm[key], value.to(torch_dtype), rtol=0, atol=0, msg=key)
