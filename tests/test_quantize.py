"""int8 weight-only inference (musilingo_jax/quantize.py): per-channel int8 kernels and embedding rows give
logits close to float32 and mostly the same greedy tokens; LoRA is merged first; --dtype int8 loads a
converted checkpoint for generation."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import tiny_hf
from musilingo_jax import build, generate as gen, quantize
from musilingo_jax.models import layers, llama


def _llm(scan=False, lora=None):
  lm = llama.Llama(llama.LlamaConfig.tiny(scan_layers=scan, tie_word_embeddings=True), rngs=nnx.Rngs(0), lora=lora)
  rng = np.random.default_rng(1)
  for _, v in nnx.to_flat_state(nnx.state(lm, nnx.LoRAParam)):
    v.set_value(jnp.asarray(0.05 * rng.standard_normal(v.get_value().shape), np.float32))
  return lm


def test_int8_logits_and_greedy_tokens_follow_float32():
  for scan in (False, True):
    ref = _llm(scan)
    q = _llm(scan)
    stats = quantize.quantize_int8(q)
    assert stats["tensors"] == 7 * (1 if scan else ref.cfg.num_hidden_layers) + 1 and stats["bytes_after"] < 0.3 * stats["bytes_before"]
    kernel = q.model.layers[0].mlp.up_proj.kernel if not scan else q.model.layers.mlp.up_proj.kernel
    assert kernel.get_value().dtype == jnp.int8
    ids = np.random.default_rng(0).integers(3, ref.cfg.vocab_size, (2, 16))
    want, got = np.asarray(ref(input_ids=ids)[0]), np.asarray(q(input_ids=ids)[0])
    assert np.abs(got - want).max() < 0.05 * np.abs(want).max()
    assert (got.argmax(-1) == want.argmax(-1)).mean() >= 0.9
    # The quantization error is what int8 rounding allows: at most half a step of each channel's scale.
    w = np.asarray((ref.model.layers[0] if not scan else ref.model.layers).mlp.up_proj.kernel.get_value())
    s = np.asarray((q.model.layers[0] if not scan else q.model.layers).mlp.up_proj.quant_scale.get_value())
    deq = np.asarray(kernel.get_value()).astype(np.float32) * s[..., None, :]
    assert np.abs(deq - w).max() <= 0.5 * s.max() + 1e-7


def test_lora_is_merged_before_quantizing():
  lora = layers.LoRAConfig(rank=2, alpha=4.0, dropout=0.0)
  ref = _llm(lora=lora)
  ids = np.random.default_rng(2).integers(3, ref.cfg.vocab_size, (1, 12))
  want = np.asarray(ref(input_ids=ids)[0])
  quantize.quantize_int8(ref)
  assert ref.model.layers[0].self_attn.q_proj.lora is None
  got = np.asarray(ref(input_ids=ids)[0])
  assert np.abs(got - want).max() < 0.05 * np.abs(want).max()


def test_load_for_inference_int8_generates(tmp_path):
  tiny_hf.converted_tiny_models(tmp_path)
  model, tok, c = build.load_for_inference(checkpoint=str(tmp_path / "converted"),
                                           projection=str(tmp_path / "proj.npz"), dtype="int8")
  assert c.model.frozen_dtype == "int8"
  assert model.llm.model.layers[0].mlp.down_proj.kernel.get_value().dtype == jnp.int8
  down = model.llm.model.layers[0].mlp.down_proj   # [intermediate, hidden]: a scale per block of INT8_GROUP rows
  assert down.quant_scale.get_value().shape == (model.llm.cfg.intermediate_size // quantize.INT8_GROUP,
                                                model.llm.cfg.hidden_size)
  assert model.encoder.cfg.param_dtype == jnp.float32
  report = build.memory_report(model)
  assert report["frozen_dtype"] in ("int8", "float32")
  feats = np.random.default_rng(0).standard_normal((2, 32)).astype(np.float32)
  batch = gen.prompt_batch(tok, ["w5 w6"], n_audio_tokens=2)
  batch["features"] = feats[None]
  out = gen.generate(model, batch, tokenizer=tok, greedy=True, max_new_tokens=6)
  assert len(out[0].token_ids) >= 1
  jax.block_until_ready(model.llm.model.embed_tokens.quant_scale.get_value())


def test_group_wise_scales_bound_each_block_and_follow_float32_closer():
  """group_size=16: scales per output channel and block of 16 input rows ([in/16, out]; the embedding's
  [vocab, embed/16]); each block's error is at most half its own step, and with an outlier row the weights and
  the logits sit closer to float32 than with one scale per channel (the outlier coarsens only its block)."""
  for scan in (False, True):
    ref, per, grp = _llm(scan), _llm(scan), _llm(scan)
    for lm in (ref, per, grp):  # one outlier weight per kernel row block: what group-wise scales are for
      for _, v in nnx.to_flat_state(nnx.state(lm, nnx.Param)):
        w = np.array(v.get_value())
        if w.ndim >= 2 and w.shape[-2] % 16 == 0:
          w[..., 3, :] *= 8.0
          v.set_value(jnp.asarray(w))
    quantize.quantize_int8(per)
    quantize.quantize_int8(grp, group_size=16)
    layer = (lambda m: m.model.layers[0]) if not scan else (lambda m: m.model.layers)
    up = layer(grp).mlp.up_proj
    w = np.asarray(layer(ref).mlp.up_proj.kernel.get_value())
    s = np.asarray(up.quant_scale.get_value())
    assert s.shape == w.shape[:-2] + (w.shape[-2] // 16, w.shape[-1])
    deq = np.asarray(up.kernel.get_value()).astype(np.float32) * np.repeat(s, 16, axis=-2)
    assert (np.abs(deq - w) <= 0.5 * np.repeat(s, 16, axis=-2) + 1e-7).all()
    pu = layer(per).mlp.up_proj
    deq_per = np.asarray(pu.kernel.get_value()).astype(np.float32) * np.asarray(pu.quant_scale.get_value())[..., None, :]
    assert np.abs(deq - w).mean() < 0.5 * np.abs(deq_per - w).mean()   # the outlier coarsens one block of four
    emb = grp.model.embed_tokens.quant_scale.get_value()
    assert emb.shape == (ref.cfg.vocab_size, ref.cfg.hidden_size // 16)
    ids = np.random.default_rng(0).integers(3, ref.cfg.vocab_size, (2, 16))
    want = np.asarray(ref(input_ids=ids)[0])
    err_per = np.abs(np.asarray(per(input_ids=ids)[0]) - want).max()
    err_grp = np.abs(np.asarray(grp(input_ids=ids)[0]) - want).max()
    assert err_grp < err_per, (err_grp, err_per)
