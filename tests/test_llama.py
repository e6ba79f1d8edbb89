"""LLaMA port parity against transformers' LlamaForCausalLM (tiny random models, fp32)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from musilingo_jax.convert.hf import export_hf_tensors, load_hf_tensors
from musilingo_jax.convert.rules import ConversionError
from musilingo_jax.models import layers, llama
from musilingo_jax.models.llama import Llama, LlamaConfig

ATOL = 1e-4


def hf_model(cfg: LlamaConfig, seed: int = 0) -> transformers.LlamaForCausalLM:
  """A random HF model for `cfg`; larger-than-default init and non-unit RMSNorm weights."""
  torch.manual_seed(seed)
  hc = transformers.LlamaConfig(**{**cfg.to_hf_config(), "initializer_range": 0.08})
  hc._attn_implementation = "eager"
  model = transformers.LlamaForCausalLM(hc).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "norm" in name:
        p.copy_(1.0 + 0.3 * torch.randn_like(p))
  return model


def hf_tensors(hf) -> dict[str, np.ndarray]:
  return {k: v.detach().numpy() for k, v in hf.state_dict().items()}


def ours_from(hf, cfg: LlamaConfig, **kw) -> Llama:
  model = Llama(cfg, rngs=nnx.Rngs(0), **kw)
  load_hf_tensors(model, llama.HF_KEY_RULES, hf_tensors(hf), ignore=llama.hf_ignore_keys(cfg))
  return model


def forward(model: Llama, ids=None, **kw) -> np.ndarray:
  graphdef, state = nnx.split(model)
  f = jax.jit(lambda state, ids, kw: nnx.merge(graphdef, state)(ids, **kw)[0])
  return np.asarray(f(state, ids, kw))


def hf_logits(hf, ids, mask=None, positions=None) -> np.ndarray:
  t = lambda a: None if a is None else torch.tensor(np.array(a), dtype=torch.long)  # noqa: E731
  with torch.no_grad():
    return hf(input_ids=t(ids), attention_mask=t(mask), position_ids=t(positions)).logits.numpy()


def rand_ids(cfg, shape, seed=0):
  return np.random.default_rng(seed).integers(0, cfg.vocab_size, shape).astype(np.int32)


@pytest.mark.parametrize("kw", [
    dict(),  # MHA, untied
    dict(num_key_value_heads=2),  # GQA
    dict(num_key_value_heads=2, tie_word_embeddings=True),
    dict(vocab_size=32001),  # Vicuna's vocabulary size
])
def test_logits_match_transformers(kw):
  cfg = LlamaConfig.tiny(**kw)
  hf = hf_model(cfg)
  ids = rand_ids(cfg, (2, 9))
  ref = hf_logits(hf, ids)
  got = forward(ours_from(hf, cfg), jnp.asarray(ids))
  assert got.dtype == np.float32 and got.shape == (2, 9, cfg.vocab_size)
  np.testing.assert_allclose(got, ref, atol=ATOL, rtol=0)


def test_right_padded_batch_and_inputs_embeds():
  cfg = LlamaConfig.tiny(num_key_value_heads=2)
  hf = hf_model(cfg)
  ids = rand_ids(cfg, (2, 8))
  mask = np.ones((2, 8), np.int32)
  mask[1, 5:] = 0
  positions = np.broadcast_to(np.arange(8, dtype=np.int32), (2, 8))
  ref = hf_logits(hf, ids, mask, positions)
  model = ours_from(hf, cfg)
  got = forward(model, jnp.asarray(ids), attention_mask=jnp.asarray(mask), positions=jnp.asarray(positions))
  valid = mask.astype(bool)
  np.testing.assert_allclose(got[valid], ref[valid], atol=ATOL, rtol=0)
  # The inputs_embeds path (what the MusiLingo splice uses) equals the ids path.
  emb = model.embed(jnp.asarray(ids))
  got_emb = forward(model, None, inputs_embeds=emb, attention_mask=jnp.asarray(mask),
                    positions=jnp.asarray(positions))
  np.testing.assert_allclose(got_emb, got, atol=1e-6, rtol=0)
  with pytest.raises(ValueError, match="exactly one"):
    model(jnp.asarray(ids), inputs_embeds=emb)


def _decode(model: Llama, ids, mask, positions, n_prefill: int, max_len: int) -> tuple[np.ndarray, int]:
  """Prefill n_prefill tokens, then feed the rest one at a time through one jitted step."""
  graphdef, state = nnx.split(model)

  @jax.jit
  def step(state, cache, tok, idx, pos, buf_mask):
    return nnx.merge(graphdef, state)(tok, attention_mask=buf_mask, positions=pos, cache=cache, cache_index=idx)

  b, length = ids.shape
  buf_mask = np.zeros((b, max_len), np.int32)
  buf_mask[:, :length] = mask
  buf_mask = jnp.asarray(buf_mask)
  cache = model.init_cache(b, max_len)
  logits, cache = step(state, cache, ids[:, :n_prefill], jnp.int32(0), positions[:, :n_prefill], buf_mask)
  out = [np.asarray(logits)]
  for i in range(n_prefill, length):
    logits, cache = step(state, cache, ids[:, i:i + 1], jnp.int32(i), positions[:, i:i + 1], buf_mask)
    out.append(np.asarray(logits))
  return np.concatenate(out, axis=1), step._cache_size()


def test_kv_cache_decode_matches_full_forward():
  cfg = LlamaConfig.tiny(num_key_value_heads=2)
  hf = hf_model(cfg)
  model = ours_from(hf, cfg)
  ids = jnp.asarray(rand_ids(cfg, (2, 10)))
  mask = np.ones((2, 10), np.int32)
  positions = jnp.broadcast_to(jnp.arange(10, dtype=jnp.int32), (2, 10))
  full = forward(model, ids)
  got, n_compiles = _decode(model, ids, mask, positions, n_prefill=4, max_len=16)
  np.testing.assert_allclose(got, full, atol=ATOL, rtol=0)
  assert n_compiles == 2  # prefill shape + one decode shape: cache_index is traced, not baked in


def test_kv_cache_left_padded_batch():
  cfg = LlamaConfig.tiny(num_key_value_heads=2)
  hf = hf_model(cfg)
  model = ours_from(hf, cfg)
  ids = rand_ids(cfg, (2, 10))
  mask = np.ones((2, 10), np.int32)
  mask[1, :3] = 0  # row 1: 3 left pads, then a 3-token prompt, then 4 generated tokens
  positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0).astype(np.int32)
  valid = mask.astype(bool)
  ref = hf_logits(hf, ids, mask, positions)
  full = forward(model, jnp.asarray(ids), attention_mask=jnp.asarray(mask), positions=jnp.asarray(positions))
  np.testing.assert_allclose(full[valid], ref[valid], atol=ATOL, rtol=0)
  got, _ = _decode(model, jnp.asarray(ids), mask, jnp.asarray(positions), n_prefill=6, max_len=12)
  assert np.isfinite(got).all() and np.isfinite(full).all()  # pad queries see no key: no NaN
  np.testing.assert_allclose(got[valid], full[valid], atol=ATOL, rtol=0)


@pytest.mark.parametrize("rope,extra", [
    ({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
      "original_max_position_embeddings": 64},  # one of the 8 frequencies falls in the smoothed band
     dict(rope_theta=500000.0, max_position_embeddings=128)),
    ({"rope_type": "linear", "factor": 2.0}, {}),
    ({"rope_type": "dynamic", "factor": 2.0}, dict(max_position_embeddings=16)),  # 24 tokens > 16: rescaled
])
def test_rope_scaling_matches_transformers(rope, extra):
  cfg = LlamaConfig.tiny(rope_scaling=rope, **extra)
  hf = hf_model(cfg)
  ids = rand_ids(cfg, (1, 24))
  positions = np.arange(24)[None] * 3  # larger positions make the scaling matter more
  if rope["rope_type"] == "dynamic":
    positions = np.arange(24)[None]
  np.testing.assert_allclose(forward(ours_from(hf, cfg), jnp.asarray(ids), positions=jnp.asarray(positions)),
                             hf_logits(hf, ids, positions=positions), atol=ATOL, rtol=0)


def test_config_round_trip():
  cases = [LlamaConfig.vicuna_7b(), LlamaConfig.tiny(num_key_value_heads=2, tie_word_embeddings=True),
           LlamaConfig.tiny(rope_theta=500000.0, eos_token_id=(128001, 128009), rope_scaling={
               "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192})]
  for cfg in cases:
    d = cfg.to_hf_config()
    assert LlamaConfig.from_hf_config(d) == cfg
    hc = transformers.LlamaConfig(**d)
    assert (hc.architectures, hc.model_type) == (["LlamaForCausalLM"], "llama")
    assert hc.rope_parameters["rope_theta"] == cfg.rope_theta
    assert hc.rope_parameters["rope_type"] == cfg.rope.get("rope_type", "default")
    assert LlamaConfig.from_hf_config(hc.to_dict()) == cfg
  # transformers 4 spelling, as in older config.json files.
  old = LlamaConfig.from_hf_config({**LlamaConfig.tiny().to_hf_config(), "rope_parameters": None,
                                    "rope_scaling": {"type": "linear", "factor": 2.0}})
  assert old.rope == {"rope_type": "linear", "factor": 2.0}
  assert LlamaConfig.from_hf_config(LlamaConfig.tiny().to_hf_config(), dtype=jnp.bfloat16).dtype == jnp.bfloat16


@pytest.mark.parametrize("change,field", [
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"model_type": "mistral"}, "model_type"),
    ({"attention_dropout": 0.1}, "attention_dropout"),
    ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}}, "rope_type"),
    ({"rope_parameters": {"rope_type": "llama3", "factor": 8.0, "high_freq_factor": 4.0}}, "low_freq_factor"),
    ({"rope_parameters": {"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5}},
     "partial_rotary_factor"),
    ({"num_key_value_heads": 3}, "num_key_value_heads"),
])
def test_unsupported_config_fields(change, field):
  with pytest.raises(ConversionError, match=field):
    LlamaConfig.from_hf_config({**LlamaConfig.tiny().to_hf_config(), **change})


@pytest.mark.parametrize("tied", [False, True])
def test_export_reloads_in_transformers(tied):
  cfg = LlamaConfig.tiny(num_key_value_heads=2, tie_word_embeddings=tied)
  hf = hf_model(cfg)
  model = ours_from(hf, cfg)
  exported = export_hf_tensors(model, llama.HF_KEY_RULES)
  assert ("lm_head.weight" in exported) == (not tied)
  fresh = hf_model(cfg, seed=1)
  state = {k: torch.from_numpy(np.array(v)) for k, v in exported.items()}
  if tied:
    missing, unexpected = fresh.load_state_dict(state, strict=False)
    assert set(missing) <= {"lm_head.weight"} and not unexpected
    assert torch.equal(fresh.lm_head.weight, fresh.model.embed_tokens.weight)
  else:
    fresh.load_state_dict(state, strict=True)
  ids = rand_ids(cfg, (2, 7))
  np.testing.assert_allclose(hf_logits(fresh, ids), hf_logits(hf, ids), atol=1e-6, rtol=0)
  # A tied state_dict still lists lm_head.weight: importing it needs the tied ignore pattern.
  if tied:
    with pytest.raises(ConversionError, match="lm_head"):
      load_hf_tensors(Llama(cfg, rngs=nnx.Rngs(0)), llama.HF_KEY_RULES, hf_tensors(hf),
                      ignore=llama.HF_IGNORE_KEYS)
  # Old checkpoints carry rotary buffers; they are ignored.
  tensors = {**hf_tensors(hf), "model.layers.0.self_attn.rotary_emb.inv_freq": np.zeros(8, np.float32)}
  load_hf_tensors(Llama(cfg, rngs=nnx.Rngs(0)), llama.HF_KEY_RULES, tensors, ignore=llama.hf_ignore_keys(cfg))


def test_param_axes_lora_and_pluggable_attention():
  cfg = LlamaConfig.tiny(num_key_value_heads=2)
  hf = hf_model(cfg)
  base = ours_from(hf, cfg)
  axes = {".".join(map(str, p)): v.get_metadata()["out_sharding"]
          for p, v in nnx.to_flat_state(nnx.state(base, nnx.Param))}
  assert axes["model.embed_tokens.weight"] == ("vocab", "embed")
  assert axes["model.layers.1.self_attn.q_proj.kernel"] == ("embed", "heads")
  assert axes["model.layers.1.self_attn.k_proj.kernel"] == ("embed", "kv_heads")
  assert axes["model.layers.1.self_attn.o_proj.kernel"] == ("heads", "embed")
  assert axes["model.layers.1.mlp.down_proj.kernel"] == ("mlp", "embed")
  assert axes["lm_head.kernel"] == ("embed", "vocab")
  ids = jnp.asarray(rand_ids(cfg, (2, 6)))
  ref = forward(base, ids)
  # LoRA on q/v: adapters exist, are not checkpoint keys, and start as the identity.
  lora = ours_from(hf, cfg, lora=layers.LoRAConfig(rank=4, target_modules=("q_proj", "v_proj")))
  assert len(nnx.to_flat_state(nnx.state(lora, nnx.LoRAParam))) == 2 * 2 * cfg.num_hidden_layers
  np.testing.assert_allclose(forward(lora, ids), ref, atol=1e-6, rtol=0)

  # A hand-written attention (repeat kv heads, additive mask) plugs in and agrees.
  def naive(q, k, v, mask, implementation):
    rep = q.shape[2] // k.shape[2]
    k, v = jnp.repeat(k, rep, axis=2), jnp.repeat(v, rep, axis=2)
    s = jnp.einsum("bthd,bshd->bhts", q, k) / np.sqrt(q.shape[-1])
    p = jax.nn.softmax(jnp.where(mask, s, -1e30), axis=-1)
    return jnp.einsum("bhts,bshd->bthd", p, v)

  plugged = ours_from(hf, cfg, attention_fn=naive)
  np.testing.assert_allclose(forward(plugged, ids), ref, atol=1e-5, rtol=0)


def test_bf16_compute_is_close_to_f32():
  cfg = LlamaConfig.tiny(num_key_value_heads=2)
  hf = hf_model(cfg)
  ids = jnp.asarray(rand_ids(cfg, (2, 8)))
  ref = forward(ours_from(hf, cfg), ids)
  bf16 = ours_from(hf, LlamaConfig.tiny(num_key_value_heads=2, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16))
  got = forward(bf16, ids)
  assert got.dtype == np.float32 and np.isfinite(got).all()
  assert np.abs(got - ref).max() < 0.05 * np.abs(ref).max()


def test_bf16_dot_accumulates_in_f32_forward_and_backward():
  """layers.dot in bfloat16: bf16 inputs, f32 accumulation, bf16 result, and the same for both gradient products
  (a custom VJP): values and gradients follow the float32 product of the bf16-rounded inputs to bf16 rounding,
  and float32 is the plain product."""
  from musilingo_jax.models import layers
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((2, 3, 256)), jnp.float32).astype(jnp.bfloat16)
  w = jnp.asarray(rng.standard_normal((256, 64)) * 0.05, jnp.float32).astype(jnp.bfloat16)
  g = jnp.asarray(rng.standard_normal((2, 3, 64)), jnp.float32)
  loss = lambda f: lambda a, b: (f(a, b).astype(jnp.float32) * g).sum()  # noqa: E731
  ours = jax.jit(jax.value_and_grad(loss(lambda a, b: layers.dot(a, b, jnp.bfloat16)), argnums=(0, 1)))
  ref = jax.value_and_grad(loss(lambda a, b: jnp.dot(a.astype(jnp.float32), b.astype(jnp.float32))), argnums=(0, 1))
  (v, (dx, dw)), (rv, (rdx, rdw)) = ours(x, w), ref(x, w)
  assert layers.dot(x, w, jnp.bfloat16).dtype == jnp.bfloat16 and dx.dtype == dw.dtype == jnp.bfloat16
  np.testing.assert_allclose(float(v), float(rv), rtol=1e-2)
  for a, b in ((dx, rdx), (dw, rdw)):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    assert np.abs(a - b).max() <= 1e-2 * np.abs(b).max()
  xf, wf = x.astype(jnp.float32), w.astype(jnp.float32)
  np.testing.assert_array_equal(np.asarray(layers.dot(xf, wf, jnp.float32)), np.asarray(jnp.dot(xf, wf)))
