"""Every `config.model` field reaches the model `build.build_model` builds, whatever the frozen weights'
source: random presets, a converted checkpoint (scripts/convert_hf.py's `convert_musilingo` of
tiny random transformers models) or a GGUF (a tiny one written here with the `gguf` package).

Each field is set to values that differ from both the config's defaults and the model configs' own
defaults (two variants per source), and each test inspects the built modules: their configs, the layers
that read them (a Linear's compute dtype, an attention's implementation, MERT's SpecAugment RNG stream)
and the stored weights' dtypes.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import transformers

from musilingo_jax import build
from musilingo_jax import config as cfglib
from musilingo_jax.convert import readers
from musilingo_jax.main.convert_hf import convert_musilingo
from musilingo_jax.models import mert

SOURCES = ("preset", "converted", "gguf")
# Two settings of every field; each value differs from the config default (bfloat16, bfloat16, "xla", False,
# 325) or from MERTConfig/LlamaConfig's own default (float32, float32, "xla", False) where a source could
# fall back to one of those.
VARIANTS = {
    "a": dict(compute_dtype="float32", frozen_dtype="bfloat16", attention_impl="cudnn", spec_augment=True,
              pool_frames=5),
    "b": dict(compute_dtype="bfloat16", frozen_dtype="float32", attention_impl="auto", spec_augment=False,
              pool_frames=3),
}
LLM_VOCAB = 101


# ---- the sources on disk ---------------------------------------------------------------------------

def _hf_llama() -> transformers.LlamaForCausalLM:
  import torch
  torch.manual_seed(0)
  return transformers.LlamaForCausalLM(transformers.LlamaConfig(
      vocab_size=LLM_VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
      num_key_value_heads=2, max_position_embeddings=64, bos_token_id=0, eos_token_id=0)).eval()


@pytest.fixture(scope="module")
def converted_dir(tmp_path_factory):
  """A scripts/convert_hf.py directory (float32) of a tiny HubertModel and a tiny LlamaForCausalLM."""
  import torch
  root = tmp_path_factory.mktemp("sources")
  torch.manual_seed(0)
  transformers.HubertModel(transformers.HubertConfig(**mert.MERTConfig.tiny().to_hf_config())).eval() \
      .save_pretrained(str(root / "hubert"))
  _hf_llama().save_pretrained(str(root / "llama"))
  convert_musilingo(root / "converted", mert_path=root / "hubert", llm_path=root / "llama", dtype="float32",
                    progress=False)
  return root / "converted"


@pytest.fixture(scope="module")
def gguf_file(tmp_path_factory):
  """A float32 llama.cpp GGUF of a tiny LLaMA with a byte-level BPE ("gpt2") tokenizer in its metadata."""
  import gguf
  from musilingo_jax.tokenizer import _bytes_to_unicode
  hf = _hf_llama()
  c = hf.config
  path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
  w = gguf.GGUFWriter(str(path), "llama")
  w.add_block_count(c.num_hidden_layers)
  w.add_context_length(c.max_position_embeddings)
  w.add_embedding_length(c.hidden_size)
  w.add_feed_forward_length(c.intermediate_size)
  w.add_head_count(c.num_attention_heads)
  w.add_head_count_kv(c.num_key_value_heads)
  w.add_layer_norm_rms_eps(c.rms_norm_eps)
  w.add_vocab_size(c.vocab_size)
  alphabet = _bytes_to_unicode()
  tokens = ["<|endoftext|>"] + [alphabet[b] for b in range(33, 33 + LLM_VOCAB - 2)] + ["ab"]
  w.add_tokenizer_model("gpt2")
  w.add_tokenizer_pre("default")
  w.add_token_list(tokens)
  w.add_token_types([3] + [1] * (len(tokens) - 1))
  w.add_token_merges(["a b"])
  w.add_bos_token_id(0)
  w.add_eos_token_id(0)
  inverse = {v: k for k, v in readers._GGUF_LAYER_NAMES.items()}
  top = {v: k for k, v in readers._GGUF_TOP_NAMES.items()}
  for key, t in hf.state_dict().items():  # random weights: q/k rows need no llama.cpp permutation here
    parts = key.split(".")
    if key.startswith("model.layers."):
      name = f"blk.{parts[2]}.{inverse['.'.join(parts[3:-1])]}.{parts[-1]}"
    else:
      name = f"{top['.'.join(parts[:-1])]}.{parts[-1]}"
    w.add_tensor(name, np.ascontiguousarray(t.detach().numpy()))
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  return path


def _config(source: str, variant: str, paths: dict):
  c = cfglib.base_config()
  c.seed = 0
  c.train.trainable = "projection"
  c.model.encoder_preset = "tiny"
  c.model.llm_preset = "tiny"
  for k, v in VARIANTS[variant].items():
    c.model[k] = v
  if source == "converted":
    c.model.checkpoint = str(paths["converted"])
  elif source == "gguf":
    c.model.llm_gguf = str(paths["gguf"])
  return c


@pytest.fixture(scope="module")
def built(converted_dir, gguf_file):
  """built(source, variant) -> (config, MusiLingo), each built once."""
  paths = {"converted": converted_dir, "gguf": gguf_file}

  @functools.lru_cache(maxsize=None)
  def get(source, variant):
    c = _config(source, variant, paths)
    model, tok, frozen_ref = build.build_model(c)
    assert (tok is not None) == (source == "gguf")  # the converted LLM came without tokenizer files
    assert frozen_ref.get("checkpoint" if source == "converted" else "llm")
    return c, model
  return get


def _want(variant: str, field: str):
  v = VARIANTS[variant][field]
  if field.endswith("_dtype"):
    return jnp.dtype(v)
  if field == "attention_impl":
    return None if v == "auto" else v
  return v


CASES = [(s, v) for s in SOURCES for v in VARIANTS]
ids = [f"{s}-{v}" for s, v in CASES]


# ---- one test per field, each over every source ----------------------------------------------------

@pytest.mark.parametrize("source,variant", CASES, ids=ids)
def test_compute_dtype(built, source, variant):
  _, m = built(source, variant)
  want = _want(variant, "compute_dtype")
  assert jnp.dtype(m.encoder.cfg.dtype) == want
  assert jnp.dtype(m.llm.cfg.dtype) == want
  assert jnp.dtype(m.cfg.encoder.dtype) == want and jnp.dtype(m.cfg.llm.dtype) == want
  # ...and the layers compute in it.
  assert jnp.dtype(m.encoder.encoder.layers[0].attention.q_proj.dtype) == want
  assert jnp.dtype(m.llm.model.layers[0].mlp.up_proj.dtype) == want


@pytest.mark.parametrize("source,variant", CASES, ids=ids)
def test_frozen_dtype(built, source, variant):
  _, m = built(source, variant)
  want = _want(variant, "frozen_dtype")
  assert jnp.dtype(m.encoder.cfg.param_dtype) == want and jnp.dtype(m.llm.cfg.param_dtype) == want
  assert m.encoder.encoder.layers[0].attention.q_proj.kernel[...].dtype == want
  assert m.encoder.feature_projection.projection.kernel[...].dtype == want
  assert m.llm.model.layers[0].mlp.up_proj.kernel[...].dtype == want
  assert m.llm.model.embed_tokens.weight[...].dtype == want
  # The trainable projection is float32 whatever the frozen dtype.
  assert m.llama_proj.kernel[...].dtype == jnp.float32


@pytest.mark.parametrize("source,variant", CASES, ids=ids)
def test_attention_impl(built, source, variant):
  _, m = built(source, variant)
  want = _want(variant, "attention_impl")
  assert m.encoder.cfg.attention_impl == want and m.llm.cfg.attention_impl == want
  assert m.encoder.encoder.layers[0].attention.impl == want
  assert m.llm.model.layers[0].self_attn.cfg.attention_impl == want


@pytest.mark.parametrize("source,variant", CASES, ids=ids)
def test_spec_augment(built, source, variant):
  _, m = built(source, variant)
  want = _want(variant, "spec_augment")
  assert m.encoder.cfg.spec_augment is want and m.cfg.encoder.spec_augment is want
  assert (m.encoder.rngs is not None) is want  # the masks' RNG stream exists only with SpecAugment on


@pytest.mark.parametrize("source,variant", CASES, ids=ids)
def test_pool_frames(built, source, variant):
  _, m = built(source, variant)
  assert m.cfg.pool_frames == _want(variant, "pool_frames")


# ---- the one place -----------------------------------------------------------------------------------

@pytest.mark.parametrize("variant", VARIANTS)
def test_aot_and_presets_use_the_same_overrides(built, variant):
  """build.model_overrides is what every source applies; the abstract model AOT compiles (Experiment with
  abstract=True) gets the same configs, plus the run's activation sharding."""
  import dataclasses
  from musilingo_jax import experiment, sharding
  c, m = built("preset", variant)
  enc_over, llm_over = build.model_overrides(c)
  for cfg, over in ((m.encoder.cfg, enc_over), (m.llm.cfg, llm_over)):
    for k, v in over.items():
      assert getattr(cfg, k) == v, k
  assert set(enc_over) >= {"dtype", "param_dtype", "attention_impl", "spec_augment"}
  assert set(llm_over) >= {"dtype", "param_dtype", "attention_impl"}
  assert build.preset_encoder_config(c) == m.encoder.cfg and build.preset_llm_config(c) == m.llm.cfg
  mesh = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
  a = experiment.Experiment.from_config(c, mesh, abstract=True, data=False).model
  act = experiment.activations_of(c, mesh)
  assert a.cfg.encoder.activations == act and a.cfg.llm.activations == act and act is not None
  assert a.cfg == dataclasses.replace(m.cfg, encoder=dataclasses.replace(m.cfg.encoder, activations=act),
                                      llm=dataclasses.replace(m.cfg.llm, activations=act))
  assert a.encoder.encoder.layers[0].attention.q_proj.kernel.get_value().dtype == _want(variant, "frozen_dtype")
