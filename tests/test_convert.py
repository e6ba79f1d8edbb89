"""Conversion: readers (safetensors, sharded, .bin, GGUF), streaming import, export, .pth, errors, CLI.

Tiny random transformers models, float32; every direction is checked against the PyTorch model.
"""

import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.torch
import torch
import transformers
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from musilingo_jax import sharding
from musilingo_jax.convert import readers
from musilingo_jax.convert.converted import TOKENIZER_DIR, load_converted
from musilingo_jax.convert.hf import export_pretrained, import_pretrained
from musilingo_jax.convert.pth import load_musilingo_pth, save_musilingo_pth
from musilingo_jax.convert.readers import open_source
from musilingo_jax.convert.rules import ConversionError, permute_qk, unpermute_qk
from musilingo_jax.convert.state import flat_params
from musilingo_jax.models import layers, llama, mert
from musilingo_jax.tokenizer import Tokenizer

ATOL = 1e-4
ROOT = Path(__file__).resolve().parents[1]


# ---- tiny HF models on disk ----------------------------------------------------------------------

def _hf_llama(**kw) -> transformers.LlamaForCausalLM:
  torch.manual_seed(0)
  hc = transformers.LlamaConfig(**{**dict(vocab_size=101, hidden_size=64, intermediate_size=128,
                                          num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                          max_position_embeddings=64, initializer_range=0.08,
                                          bos_token_id=1, eos_token_id=2), **kw})
  model = transformers.LlamaForCausalLM(hc).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "norm" in name:
        p.copy_(1.0 + 0.3 * torch.randn_like(p))
  return model


def _hf_hubert() -> transformers.HubertModel:
  torch.manual_seed(0)
  hc = transformers.HubertConfig(**mert.MERTConfig.tiny().to_hf_config())
  model = transformers.HubertModel(hc).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "norm" in name or "masked_spec" in name:
        p.copy_(p + 0.3 * torch.randn_like(p))
  return model


def _state(model) -> dict[str, torch.Tensor]:
  return {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}


def _write_config(d: Path, model) -> None:
  d.mkdir(parents=True, exist_ok=True)
  model.config.to_json_file(str(d / "config.json"))


def _write_tokenizer(d: Path, vocab_size: int) -> None:
  from tokenizers import Tokenizer, models, pre_tokenizers
  vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, vocab_size)}}
  tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
  tk.pre_tokenizer = pre_tokenizers.Whitespace()
  tk.save(str(d / "tokenizer.json"))
  (d / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>",
                                                       "unk_token": "<unk>"}))


def _write_sharded(d: Path, sd: dict, n: int, kind: str) -> None:
  keys = list(sd)
  weight_map = {}
  for j in range(n):
    part = {k: sd[k] for k in keys[j::n]}
    name = (f"model-{j + 1:05d}-of-{n:05d}.safetensors" if kind == "st"
            else f"pytorch_model-{j + 1:05d}-of-{n:05d}.bin")
    if kind == "st":
      safetensors.torch.save_file(part, str(d / name), metadata={"format": "pt"})
    else:
      torch.save(part, str(d / name))
    weight_map.update(dict.fromkeys(part, name))
  index = "model.safetensors.index.json" if kind == "st" else "pytorch_model.bin.index.json"
  (d / index).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


@pytest.fixture(scope="module")
def hf_llm():
  return _hf_llama()


@pytest.fixture(scope="module")
def hf_enc():
  return _hf_hubert()


@pytest.fixture(scope="module")
def llm_dirs(tmp_path_factory, hf_llm):
  """The same tiny LLaMA as single safetensors, 3 safetensors shards, .bin, 2 .bin shards."""
  root = tmp_path_factory.mktemp("llm")
  sd = _state(hf_llm)
  dirs = {}
  for kind in ("single", "sharded", "bin", "bin_sharded"):
    d = root / kind
    _write_config(d, hf_llm)
    if kind == "single":
      safetensors.torch.save_file(sd, str(d / "model.safetensors"), metadata={"format": "pt"})
      _write_tokenizer(d, hf_llm.config.vocab_size)
    elif kind == "sharded":
      _write_sharded(d, sd, 3, "st")
    elif kind == "bin":
      torch.save(sd, str(d / "pytorch_model.bin"))
    else:
      _write_sharded(d, sd, 2, "bin")
    dirs[kind] = d
  return dirs


@pytest.fixture(scope="module")
def enc_dir(tmp_path_factory, hf_enc):
  d = tmp_path_factory.mktemp("enc")
  hf_enc.save_pretrained(str(d))
  return d


def _logits(model, ids) -> np.ndarray:
  graphdef, state = nnx.split(model)
  return np.asarray(jax.jit(lambda s, i: nnx.merge(graphdef, s)(i)[0])(state, ids))


def _hf_logits(hf, ids) -> np.ndarray:
  with torch.no_grad():
    return hf(torch.from_numpy(np.asarray(ids, np.int64))).logits.numpy()


def _flat(model) -> dict[str, np.ndarray]:
  return {k: np.asarray(v[...]) for k, v in flat_params(model).items()}


def _assert_bitwise(a: dict, b: dict):
  assert a.keys() == b.keys()
  for k in a:
    assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)


IDS = np.random.default_rng(0).integers(0, 101, (2, 11)).astype(np.int32)
WAV = np.random.default_rng(1).standard_normal((2, 3200)).astype(np.float32)


# ---- readers ------------------------------------------------------------------------------------

def test_all_llm_layouts_import_identically(llm_dirs, hf_llm):
  models = {k: import_pretrained(llama.HF_KIND, d)[0] for k, d in llm_dirs.items()}
  ref = _flat(models["single"])
  for kind, m in models.items():
    _assert_bitwise(_flat(m), ref)
  np.testing.assert_allclose(_logits(models["single"], IDS), _hf_logits(hf_llm, IDS), atol=ATOL)


def test_bf16_safetensors_read_exactly(tmp_path, hf_llm):
  sd = {k: v.to(torch.bfloat16) for k, v in _state(hf_llm).items()}
  safetensors.torch.save_file(sd, str(tmp_path / "model.safetensors"))
  _write_config(tmp_path, hf_llm)
  with open_source(tmp_path) as src:
    w = src.get("model.layers.0.mlp.up_proj.weight")
    assert w.dtype == jnp.bfloat16
    np.testing.assert_array_equal(w.astype(np.float32), sd["model.layers.0.mlp.up_proj.weight"].float().numpy())
  model, _ = import_pretrained(llama.HF_KIND, tmp_path, dtype="bfloat16")
  k = model.model.layers[0].mlp.up_proj.kernel[...]
  assert k.dtype == jnp.bfloat16
  np.testing.assert_array_equal(np.asarray(k.astype(jnp.float32)).T,
                                sd["model.layers.0.mlp.up_proj.weight"].float().numpy())


def test_mert_legacy_weight_norm_names_in_bin(tmp_path, enc_dir, hf_enc):
  """Older torch checkpoints spell the weight-norm pair weight_g / weight_v."""
  sd = _state(hf_enc)
  p = "encoder.pos_conv_embed.conv."
  sd[p + "weight_g"] = sd.pop(p + "parametrizations.weight.original0")
  sd[p + "weight_v"] = sd.pop(p + "parametrizations.weight.original1")
  _write_config(tmp_path, hf_enc)
  torch.save(sd, str(tmp_path / "pytorch_model.bin"))
  _assert_bitwise(_flat(import_pretrained(mert.HF_KIND, tmp_path)[0]),
                  _flat(import_pretrained(mert.HF_KIND, enc_dir)[0]))


def test_qk_permutation_inverse():
  w = np.arange(8 * 64 * 5, dtype=np.float32).reshape(8 * 64, 5)
  np.testing.assert_array_equal(unpermute_qk(permute_qk(w, 8), 8), w)
  assert not np.array_equal(permute_qk(w, 8), w)


def _write_gguf(path: Path, hf, arch: str = "llama") -> None:
  """A float32 llama.cpp GGUF of `hf` (q/k rows permuted as llama.cpp's converter does)."""
  import gguf
  c = hf.config
  w = gguf.GGUFWriter(str(path), arch)
  w.add_block_count(c.num_hidden_layers)
  w.add_context_length(c.max_position_embeddings)
  w.add_embedding_length(c.hidden_size)
  w.add_feed_forward_length(c.intermediate_size)
  w.add_head_count(c.num_attention_heads)
  w.add_head_count_kv(c.num_key_value_heads)
  w.add_rope_freq_base(c.rope_parameters["rope_theta"])
  w.add_layer_norm_rms_eps(c.rms_norm_eps)
  w.add_vocab_size(c.vocab_size)
  inverse = {v: k for k, v in readers._GGUF_LAYER_NAMES.items()}
  top = {v: k for k, v in readers._GGUF_TOP_NAMES.items()}
  for key, t in _state(hf).items():
    a = t.numpy()
    parts = key.split(".")
    if key.startswith("model.layers."):
      name = f"blk.{parts[2]}.{inverse['.'.join(parts[3:-1])]}.{parts[-1]}"
    else:
      name = f"{top['.'.join(parts[:-1])]}.{parts[-1]}"
    if "q_proj" in key:
      a = permute_qk(a, c.num_attention_heads)
    elif "k_proj" in key:
      a = permute_qk(a, c.num_key_value_heads)
    w.add_tensor(name, np.ascontiguousarray(a))
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()


def test_gguf_reader_unpermutes_and_matches_transformers(tmp_path, hf_llm):
  _write_gguf(tmp_path / "tiny.gguf", hf_llm)
  with open_source(tmp_path / "tiny.gguf") as src:
    assert src.config["num_key_value_heads"] == 2 and src.config["tie_word_embeddings"] is False
    sd = _state(hf_llm)
    assert set(src.keys()) == set(sd)
    for k in sd:
      np.testing.assert_array_equal(src.get(k), sd[k].numpy(), err_msg=k)
  model, _ = import_pretrained(llama.HF_KIND, tmp_path / "tiny.gguf")
  np.testing.assert_allclose(_logits(model, IDS), _hf_logits(hf_llm, IDS), atol=ATOL)


# ---- export round trips -------------------------------------------------------------------------

def test_llama_export_round_trip_and_transformers(tmp_path, llm_dirs, hf_llm):
  model, cfg = import_pretrained(llama.HF_KIND, llm_dirs["single"])
  export_pretrained(llama.HF_KIND, model, tmp_path / "out", "float32")
  _assert_bitwise(_flat(import_pretrained(llama.HF_KIND, tmp_path / "out")[0]), _flat(model))
  reloaded = transformers.LlamaForCausalLM.from_pretrained(str(tmp_path / "out")).eval()
  np.testing.assert_allclose(_hf_logits(reloaded, IDS), _logits(model, IDS), atol=ATOL)


def test_llama_export_merges_lora(tmp_path, llm_dirs):
  lora = layers.LoRAConfig(rank=4, alpha=8.0, target_modules=("q_proj", "v_proj", "down_proj"))
  model, _ = import_pretrained(llama.HF_KIND, llm_dirs["single"], lora=lora)
  rng = np.random.default_rng(0)
  for _, v in nnx.to_flat_state(nnx.state(model, nnx.LoRAParam)):  # adapters away from zero
    v.set_value(jnp.asarray(0.1 * rng.standard_normal(v.shape), v.dtype))
  export_pretrained(llama.HF_KIND, model, tmp_path / "merged", "float32")
  reloaded = transformers.LlamaForCausalLM.from_pretrained(str(tmp_path / "merged")).eval()
  ours = _logits(model, IDS)
  assert np.abs(ours - _logits(import_pretrained(llama.HF_KIND, llm_dirs["single"])[0], IDS)).max() > 1e-2
  np.testing.assert_allclose(_hf_logits(reloaded, IDS), ours, atol=ATOL)


def test_llama_tied_export(tmp_path):
  hf = _hf_llama(tie_word_embeddings=True)
  hf.save_pretrained(str(tmp_path / "in"))
  model, cfg = import_pretrained(llama.HF_KIND, tmp_path / "in")
  assert model.lm_head is None and cfg.tie_word_embeddings
  export_pretrained(llama.HF_KIND, model, tmp_path / "out", "float32")
  reloaded = transformers.LlamaForCausalLM.from_pretrained(str(tmp_path / "out")).eval()
  np.testing.assert_allclose(_hf_logits(reloaded, IDS), _hf_logits(hf, IDS), atol=ATOL)


def _hidden(model, wav):
  graphdef, state = nnx.split(model)
  return [np.asarray(h) for h in jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))(state, wav)]


def _assert_hubert_close(hf, ours_states, wav):
  with torch.no_grad():
    out = hf(torch.from_numpy(wav), output_hidden_states=True)
  assert len(ours_states) == len(out.hidden_states)
  for i, h in enumerate(ours_states[:-1]):
    np.testing.assert_allclose(h, out.hidden_states[i].numpy(), atol=ATOL, err_msg=f"hidden state {i}")
  # transformers 5 puts the pre-LayerNorm output last in hidden_states (docs/reference.md, Model).
  np.testing.assert_allclose(ours_states[-1], out.last_hidden_state.numpy(), atol=ATOL)


def test_mert_export_round_trip_and_transformers(tmp_path, enc_dir, hf_enc):
  model, _ = import_pretrained(mert.HF_KIND, enc_dir)
  ours = _hidden(model, WAV)
  _assert_hubert_close(hf_enc, ours, WAV)
  export_pretrained(mert.HF_KIND, model, tmp_path / "out")
  with open_source(tmp_path / "out") as src:
    assert "encoder.pos_conv_embed.conv.parametrizations.weight.original0" in src.keys()
  _assert_bitwise(_flat(import_pretrained(mert.HF_KIND, tmp_path / "out")[0]), _flat(model))
  reloaded = transformers.HubertModel.from_pretrained(str(tmp_path / "out")).eval()
  assert set(reloaded.state_dict()) == set(_state(hf_enc))
  _assert_hubert_close(reloaded, ours, WAV)


# ---- MusiLingo .pth -----------------------------------------------------------------------------

def test_pth_round_trip_and_errors(tmp_path):
  rng = np.random.default_rng(0)
  kernel, bias = rng.standard_normal((32, 64)).astype(np.float32), rng.standard_normal(64).astype(np.float32)
  save_musilingo_pth(tmp_path / "ckpt.pth", kernel, bias)
  raw = torch.load(str(tmp_path / "ckpt.pth"), weights_only=True)
  w = raw["model"]["llama_proj.weight"]
  assert w.shape == (64, 32) and w.dtype == torch.float32
  k2, b2 = load_musilingo_pth(tmp_path / "ckpt.pth")
  np.testing.assert_array_equal(k2, kernel)
  np.testing.assert_array_equal(b2, bias)
  # A reference-style checkpoint: the extra entries are ignored.
  torch.save({**raw, "optimizer": {"state": {}, "param_groups": []}, "config": {"run": {"lr": 1e-4}},
              "scaler": None, "epoch": 3}, str(tmp_path / "released.pth"))
  np.testing.assert_array_equal(load_musilingo_pth(tmp_path / "released.pth")[0], kernel)
  torch.save({"model": {"llama_proj.weight": raw["model"]["llama_proj.weight"]}}, str(tmp_path / "bad.pth"))
  with pytest.raises(ConversionError, match=r"bad\.pth.*missing keys \['llama_proj\.bias'\]"):
    load_musilingo_pth(tmp_path / "bad.pth")
  with pytest.raises(ConversionError, match=r"nope\.pth: no such file"):
    load_musilingo_pth(tmp_path / "nope.pth")


# ---- errors -------------------------------------------------------------------------------------

def _variant(tmp_path, hf, edit, name="variant"):
  d = tmp_path / name
  _write_config(d, hf)
  sd = _state(hf)
  edit(sd)
  safetensors.torch.save_file(sd, str(d / "model.safetensors"))
  return d


def test_missing_unexpected_and_shape_errors(tmp_path, hf_llm):
  d = _variant(tmp_path, hf_llm, lambda sd: sd.pop("model.layers.1.mlp.up_proj.weight"), "missing")
  with pytest.raises(ConversionError, match=r"missing.*model\.safetensors.*missing keys "
                                            r"'model\.layers\.1\.mlp\.up_proj\.weight'"):
    import_pretrained(llama.HF_KIND, d)
  d = _variant(tmp_path, hf_llm, lambda sd: sd.update({"model.extra.weight": torch.zeros(3)}), "unexpected")
  with pytest.raises(ConversionError, match=r"unexpected keys.*model\.extra\.weight \(in .*model\.safetensors\)"):
    import_pretrained(llama.HF_KIND, d)
  d = _variant(tmp_path, hf_llm, lambda sd: sd.update({"model.norm.weight": torch.ones(65)}), "shape")
  with pytest.raises(ConversionError, match=r"shape.*model\.safetensors: key 'model\.norm\.weight' has shape "
                                            r"\(65,\).*expected \(64,\)"):
    import_pretrained(llama.HF_KIND, d)


def test_unsupported_architecture_and_fields(tmp_path, llm_dirs, hf_llm):
  d = tmp_path / "gpt2"
  shutil.copytree(llm_dirs["single"], d)
  cfg = json.loads((d / "config.json").read_text())
  (d / "config.json").write_text(json.dumps({**cfg, "model_type": "gpt2"}))
  with pytest.raises(ConversionError, match=r"config\.json: unsupported model_type 'gpt2'.*'model_type'"):
    import_pretrained(llama.HF_KIND, d)
  with pytest.raises(ConversionError, match=r"model_type 'llama'.*for the encoder"):
    import_pretrained(mert.HF_KIND, llm_dirs["single"])
  (d / "config.json").write_text(json.dumps({**cfg, "hidden_act": "gelu"}))
  with pytest.raises(ConversionError, match="hidden_act"):
    import_pretrained(llama.HF_KIND, d)
  _write_gguf(tmp_path / "other.gguf", hf_llm, arch="gpt2")
  with pytest.raises(ConversionError, match=r"other\.gguf: unsupported general\.architecture 'gpt2'"):
    open_source(tmp_path / "other.gguf")


def test_truncated_files(tmp_path, llm_dirs, hf_llm):
  d = tmp_path / "cut"
  shutil.copytree(llm_dirs["single"], d)
  f = d / "model.safetensors"
  data = f.read_bytes()
  f.write_bytes(data[:len(data) - 1000])
  with pytest.raises(ConversionError, match=r"cut/model\.safetensors: truncated safetensors file"):
    import_pretrained(llama.HF_KIND, d)
  f.write_bytes(data[:5])
  with pytest.raises(ConversionError, match=r"cut/model\.safetensors: truncated or corrupt"):
    open_source(d)
  _write_gguf(tmp_path / "cut.gguf", hf_llm)
  g = (tmp_path / "cut.gguf").read_bytes()
  for n in (len(g) - 100, 200):
    (tmp_path / "cut.gguf").write_bytes(g[:n])
    with pytest.raises(ConversionError, match=r"cut\.gguf: truncated GGUF file"):
      open_source(tmp_path / "cut.gguf")


# ---- CLI: convert, load onto 8 devices, verify -------------------------------------------------

def _load_converted(directory, roles=("encoder", "llm"), **kw):
  """(encoder | None, llm | None, Tokenizer | None, meta) of a converted directory, as build.build_model
  reads one: the kinds named by `roles`, and the tokenizer beside them."""
  kinds = [k for k in (mert.HF_KIND, llama.HF_KIND) if k.name in roles]
  models, meta = load_converted(directory, kinds, **kw)
  got = {k.name: m for k, m in zip(kinds, models)}
  tok_dir = Path(directory) / TOKENIZER_DIR
  tok = Tokenizer.from_dir(tok_dir) if "llm" in roles and tok_dir.is_dir() else None
  return got.get("encoder"), got.get("llm"), tok, meta


def _run_script(name, args):
  """main() of the program behind scripts/{name}.py."""
  import importlib
  return importlib.import_module(f"musilingo_jax.main.{name}").main([str(a) for a in args])


def test_convert_script_and_load_converted_fsdp(tmp_path, llm_dirs, enc_dir):
  out = tmp_path / "converted"
  mert_dir = tmp_path / "mert"  # the MERT directory with its feature extractor settings
  shutil.copytree(enc_dir, mert_dir)
  transformers.Wav2Vec2FeatureExtractor(sampling_rate=24000, do_normalize=False).save_pretrained(str(mert_dir))
  assert _run_script("convert_hf", ["--mert", mert_dir, "--llm", llm_dirs["sharded"], "--out", out,
                                    "--no-progress"]) == 0
  from musilingo_jax.data import audio as audio_lib
  assert audio_lib.read_do_normalize(out) is False  # preprocessor_config.json kept beside the params
  # The sharded dir has no tokenizer; convert again from the one that has.
  assert _run_script("convert_hf", ["--llm", llm_dirs["single"], "--out", tmp_path / "llm_only",
                                    "--dtype", "bfloat16", "--no-progress"]) == 0
  assert (out / "params" / "encoder").is_dir() and (out / "params" / "llm").is_dir()
  assert json.loads((out / "llm_config.json").read_text())["model_type"] == "llama"
  assert json.loads((out / "encoder_config.json").read_text())["model_type"] == "hubert"

  mesh = sharding.make_mesh((1, 8, 1))
  enc, llm_model, tok, meta = _load_converted(out, mesh=mesh, sharding_rules="fsdp")
  assert tok is None and meta["dtype"] == "float32"
  kernel = llm_model.model.layers[0].mlp.up_proj.kernel[...]  # [embed, mlp]: embed over fsdp
  assert kernel.sharding == NamedSharding(mesh, P("fsdp", None))
  assert len(kernel.addressable_shards) == 8 and kernel.addressable_shards[0].data.shape == (8, 128)
  ref_llm = import_pretrained(llama.HF_KIND, llm_dirs["single"])[0]
  _assert_bitwise(_flat(llm_model), _flat(ref_llm))
  np.testing.assert_allclose(_logits(llm_model, IDS), _logits(ref_llm, IDS), atol=1e-5)  # sharded sums
  ref_enc = import_pretrained(mert.HF_KIND, enc_dir)[0]
  _assert_bitwise(_flat(enc), _flat(ref_enc))
  for a, b in zip(_hidden(enc, WAV), _hidden(ref_enc, WAV)):
    np.testing.assert_allclose(a, b, atol=1e-5)

  enc_only, none, _, meta_enc = _load_converted(out, roles=("encoder",), compute_dtype="bfloat16")
  assert none is None and enc_only.cfg.dtype == jnp.bfloat16 and enc_only.cfg.param_dtype == jnp.float32

  # The bf16 conversion restores onto one device; its tokenizer came along.
  enc2, llm2, tok2, meta2 = _load_converted(tmp_path / "llm_only")
  assert enc2 is None and meta2["dtype"] == "bfloat16"
  assert llm2.model.embed_tokens.weight[...].dtype == jnp.bfloat16
  assert tok2 is not None and tok2.eos_id == 2 and tok2.encode("w5 w7") == [5, 7]
  # ...and a float32 restore of it is the bf16 values widened.
  _, llm3, _, _ = _load_converted(tmp_path / "llm_only", dtype="float32")
  np.testing.assert_array_equal(np.asarray(llm3.model.norm.weight[...]),
                                np.asarray(llm2.model.norm.weight[...].astype(jnp.float32)))


def test_verify_script(llm_dirs, enc_dir, capsys):
  assert _run_script("verify_conversion", ["--mert", enc_dir, "--llm", llm_dirs["single"],
                                           "--seconds", "0.2", "--seq", "8"]) == 0
  out = capsys.readouterr().out
  assert "mert hidden_states[2] vs last_hidden_state" in out and "llm logits" in out
  assert _run_script("verify_conversion", ["--llm", llm_dirs["single"], "--tol", "0", "--seq", "8"]) == 1
