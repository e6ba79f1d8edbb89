"""MERT parity against transformers.HubertModel (tiny random fp32 models), conversion both ways, SpecAugment."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from transformers import HubertConfig, HubertModel

from musilingo_jax.convert.hf import export_hf_tensors, load_hf_tensors
from musilingo_jax.convert.rules import ConversionError
from musilingo_jax.models.mert import HF_KEY_RULES, MERT, MERTConfig, time_mask_indices

G_NEW = "encoder.pos_conv_embed.conv.parametrizations.weight.original0"
V_NEW = "encoder.pos_conv_embed.conv.parametrizations.weight.original1"
G_OLD = "encoder.pos_conv_embed.conv.weight_g"
V_OLD = "encoder.pos_conv_embed.conv.weight_v"

NUM_SAMPLES = 6480  # -> 20 frames with the 320x conv stack
PAD_LENGTH = 4000  # second clip's true length -> 12 frames

CASES = {
    "pre_ln": MERTConfig.tiny(num_hidden_layers=3, do_stable_layer_norm=True),
    "post_ln": MERTConfig.tiny(num_hidden_layers=2, do_stable_layer_norm=False),
    "post_ln_layer_norm_convs": MERTConfig.tiny(num_hidden_layers=2, do_stable_layer_norm=False,
                                                feat_extract_norm="layer", conv_bias=True,
                                                feat_proj_layer_norm=False, num_conv_pos_embeddings=15),
}


def hf_model(cfg: MERTConfig, seed: int = 0) -> HubertModel:
  """A random HubertModel from our config, with norms, biases and g perturbed away from their trivial init."""
  torch.manual_seed(seed)
  model = HubertModel(HubertConfig(**cfg.to_hf_config(), attn_implementation="eager")).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name == G_NEW:
        p.mul_(1 + 0.2 * torch.rand_like(p))
      elif p.ndim == 1:
        p.add_(0.2 * torch.randn_like(p))
  return model


def hf_tensors(model: HubertModel) -> dict[str, np.ndarray]:
  return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def ours_from(cfg: MERTConfig, tensors: dict) -> MERT:
  """Our model with the HF weights; built abstractly (no init compute), every parameter is then loaded."""
  model = nnx.eval_shape(lambda: MERT(cfg, rngs=nnx.Rngs(0)))
  load_hf_tensors(model, HF_KEY_RULES, tensors, source="test")
  return model


def inputs(batch: int = 2):
  rng = np.random.default_rng(1)
  x = rng.standard_normal((batch, NUM_SAMPLES)).astype(np.float32)
  mask = np.ones((batch, NUM_SAMPLES), np.int32)
  mask[1, PAD_LENGTH:] = 0
  x[1, PAD_LENGTH:] = 0.0
  return x, mask


def reference_states(model: HubertModel, x, mask=None, **kw) -> list[np.ndarray]:
  """HF hidden states in the reference order (transformers 5 leaves the final LayerNorm out of the pre-LN list)."""
  with torch.no_grad():
    out = model(torch.from_numpy(x), attention_mask=None if mask is None else torch.from_numpy(mask),
                output_hidden_states=True, **kw)
  states = [h.numpy() for h in out.hidden_states]
  states[-1] = out.last_hidden_state.numpy()
  return states


def assert_states_close(ours, theirs, frames=None, atol=1e-4):
  assert len(ours) == len(theirs)
  for i, (a, b) in enumerate(zip(ours, theirs)):
    a = np.asarray(a, np.float32)
    assert a.shape == b.shape, (i, a.shape, b.shape)
    rows = range(a.shape[0]) if frames is None else range(len(frames))
    for r in rows:
      n = a.shape[1] if frames is None else frames[r]
      np.testing.assert_allclose(a[r, :n], b[r, :n], atol=atol, rtol=1e-4, err_msg=f"state {i} row {r}")


def test_feature_lengths():
  cfg = MERTConfig.mert_v1_330m()
  assert [cfg.feature_lengths(int(s * 24000)) for s in (30.5, 15.5, 10)] == [2287, 1162, 749]
  np.testing.assert_array_equal(cfg.feature_lengths(np.array([NUM_SAMPLES, PAD_LENGTH])), [20, 12])


@pytest.mark.parametrize("case", list(CASES))
def test_parity_with_hubert(case):
  cfg = CASES[case]
  hf = hf_model(cfg)
  ours = ours_from(cfg, hf_tensors(hf))
  x, mask = inputs()

  states = ours(jnp.asarray(x))
  assert len(states) == cfg.num_hidden_layers + 1
  assert_states_close(states, reference_states(hf, x))

  frames = [int(n) for n in cfg.feature_lengths(mask.sum(-1))]
  states = ours(jnp.asarray(x), jnp.asarray(mask))
  assert_states_close(states, reference_states(hf, x, mask), frames=frames)


def test_weight_norm_checkpoint_names():
  cfg = CASES["pre_ln"]
  hf = hf_model(cfg)
  new = hf_tensors(hf)
  assert G_NEW in new and V_NEW in new
  old = {{G_NEW: G_OLD, V_NEW: V_OLD}.get(k, k): v for k, v in new.items()}
  a, b = ours_from(cfg, new), ours_from(cfg, old)
  for (pa, va), (pb, vb) in zip(nnx.to_flat_state(nnx.state(a, nnx.Param)),
                                nnx.to_flat_state(nnx.state(b, nnx.Param))):
    assert pa == pb
    np.testing.assert_array_equal(va[...], vb[...])
  # g * v / ||v|| over all axes but the kernel axis, exactly as torch's weight_norm(dim=2)
  np.testing.assert_allclose(np.asarray(a.encoder.pos_conv_embed.conv.weight()),
                             hf.encoder.pos_conv_embed.conv.weight.detach().numpy(), atol=1e-6, rtol=1e-6)


def test_export_reloads_into_hubert():
  cfg = CASES["post_ln_layer_norm_convs"]
  hf = hf_model(cfg)
  ours = ours_from(cfg, hf_tensors(hf))
  exported = export_hf_tensors(ours, HF_KEY_RULES)
  assert G_OLD in exported and V_OLD in exported
  renamed = {{G_OLD: G_NEW, V_OLD: V_NEW}.get(k, k): torch.from_numpy(v) for k, v in exported.items()}
  fresh = HubertModel(HubertConfig(**cfg.to_hf_config()))
  fresh.load_state_dict(renamed, strict=True)
  for k, v in hf.state_dict().items():
    np.testing.assert_array_equal(fresh.state_dict()[k].numpy(), v.numpy(), err_msg=k)


def test_hf_config_round_trip():
  for cfg in (*CASES.values(), MERTConfig.mert_v1_330m(), MERTConfig.mert_v1_95m()):
    d = cfg.to_hf_config()
    assert d["architectures"] == ["HubertModel"] and d["model_type"] == "hubert"
    assert MERTConfig.from_hf_config(d) == cfg
    assert MERTConfig.from_hf_config(HubertConfig(**d).to_dict()) == cfg
  big = MERTConfig.mert_v1_330m()
  assert (big.hidden_size, big.num_hidden_layers, big.num_hidden_states, big.mask_time_prob) == (1024, 24, 25, 0.075)
  small = MERTConfig.mert_v1_95m()
  assert (small.hidden_size, small.do_stable_layer_norm, small.num_hidden_states) == (768, False, 13)
  assert MERTConfig.from_hf_config(big.to_hf_config(), dtype=jnp.bfloat16).dtype == jnp.bfloat16


@pytest.mark.parametrize("field,value", [("feat_extract_activation", "relu"), ("hidden_act", "gelu_new"),
                                         ("conv_pos_batch_norm", True), ("mask_feature_prob", 0.1),
                                         ("feat_extract_norm", "batch"), ("feature_extractor_cqt", True)])
def test_unsupported_hf_config_field(field, value):
  d = {**MERTConfig.tiny().to_hf_config(), field: value}
  with pytest.raises(ConversionError, match=field):
    MERTConfig.from_hf_config(d)


def test_params_have_logical_axes():
  model = nnx.eval_shape(lambda: MERT(CASES["post_ln_layer_norm_convs"], rngs=nnx.Rngs(0)))
  for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    names = var.get_metadata()["out_sharding"]
    assert len(names) == len(var.shape), (path, names)
    assert set(names) <= {"embed", "mlp", "heads", "conv_kernel", "conv_in", "conv_out", None}, (path, names)


def test_masked_spec_embed_matches_hubert():
  cfg = CASES["pre_ln"]
  hf = hf_model(cfg)
  ours = ours_from(cfg, hf_tensors(hf))
  x, _ = inputs()
  m = np.zeros((2, 20), bool)
  m[0, 3:6] = m[1, 10:12] = True
  assert_states_close(ours(jnp.asarray(x), mask_time_indices=jnp.asarray(m)),
                      reference_states(hf, x, mask_time_indices=torch.from_numpy(m)))


def test_time_mask_indices():
  lengths = jnp.array([200, 120, 5])
  draw = jax.jit(lambda key: time_mask_indices(key, lengths, 200, mask_prob=0.3, mask_length=4, min_masks=1))
  m = np.asarray(draw(jax.random.key(0)))
  np.testing.assert_array_equal(m, draw(jax.random.key(0)))
  assert not np.array_equal(m, draw(jax.random.key(1)))
  assert m[1, 120:].sum() == 0 and m[2, 5:].sum() == 0  # spans stay inside the valid frames
  assert 0.1 < m[0].mean() <= 0.3 and 0 < m[2].sum() <= 5


def test_spec_augment_modes():
  base = dataclasses.replace(CASES["pre_ln"], mask_time_prob=0.5)
  tensors = hf_tensors(hf_model(base))
  x, mask = inputs()
  x, mask = jnp.asarray(x), jnp.asarray(mask)
  plain = ours_from(base, tensors)
  augmented = ours_from(dataclasses.replace(base, spec_augment=True), tensors)
  augmented.rngs = nnx.Rngs(dropout=3)["dropout"].fork()  # (abstractly built: give it a concrete stream)
  ref = plain(x, mask)[-1]

  np.testing.assert_array_equal(augmented(x, mask)[-1], ref)  # eval mode (the default): off
  plain.train()
  np.testing.assert_array_equal(plain(x, mask)[-1], ref)  # spec_augment disabled: off in training too
  augmented.train()
  a = augmented(x, mask, rngs=nnx.Rngs(dropout=7))[-1]
  b = augmented(x, mask, rngs=nnx.Rngs(dropout=7))[-1]
  c = augmented(x, mask)[-1]  # from the model's own stream
  np.testing.assert_array_equal(a, b)  # deterministic given the rng
  changed = np.abs(np.asarray(a - ref)).max(-1) > 1e-6
  assert changed.any() and not np.array_equal(np.asarray(c), np.asarray(a))
  augmented.eval()
  np.testing.assert_array_equal(augmented(x, mask)[-1], ref)


def test_bfloat16_compute_close_to_float32():
  cfg = CASES["pre_ln"]
  tensors = hf_tensors(hf_model(cfg))
  x, mask = inputs()
  f32 = ours_from(cfg, tensors)(jnp.asarray(x), jnp.asarray(mask))
  bf16_model = ours_from(dataclasses.replace(cfg, dtype=jnp.bfloat16), tensors)
  # one jit compile costs less than compiling each bf16 op eagerly (the f32 ops are already warm)
  bf16 = nnx.jit(lambda model, x, mask: model(x, mask))(bf16_model, jnp.asarray(x), jnp.asarray(mask))
  assert all(s.dtype == jnp.bfloat16 for s in bf16)
  for a, b in zip(f32, bf16):
    a, b = np.asarray(a[0]), np.asarray(b[0], np.float32)
    assert np.abs(a - b).max() < 0.1 * (np.abs(a).max() + 1)
