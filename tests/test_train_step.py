"""The composition against a PyTorch reference, both ways in, the sharded step, what trains, LoRA, schedule.

The PyTorch reference (musilingo_jax/testing/torch_reference.py, written from the reference code, see
docs/reference.md: HubertModel + Linear +
LlamaForCausalLM, the reference's instruction_prompt_wrap / forward) shares random weights with ours through
the key tables.
"""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from flax import nnx

from musilingo_jax import config as cfglib
from musilingo_jax import experiment, prompts, sharding
from musilingo_jax import train as trainlib
from musilingo_jax.models import layers, llama, mert
from musilingo_jax.models.musilingo import MusiLingo, MusiLingoConfig, causal_lm_loss, pooled_features
from musilingo_jax.testing import torch_reference as tr
from musilingo_jax.testing.torch_reference import TorchMusiLingo
from musilingo_jax.testing.torch_reference import reference_loss as _torch_reference_loss

POOL = 7
SAMPLES = 2400  # 0.1 s at 24 kHz -> 7 frames with the conv stack below... computed by the config
BOS, PAD = 1, 2


def _configs(lora=None):
  enc = mert.MERTConfig.tiny()
  llm = llama.LlamaConfig.tiny(num_key_value_heads=2)
  return MusiLingoConfig(encoder=enc, llm=llm, pool_frames=POOL, lora=lora)


def _perturb(module: torch.nn.Module, seed: int):
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in module.named_parameters():
      p.add_(0.05 * torch.randn(p.shape, generator=g))


@pytest.fixture(scope="module")
def reference():
  """Tiny random torch models + our model holding the same weights."""
  torch.manual_seed(0)
  cfg = _configs()
  ref = TorchMusiLingo.random(cfg)
  hub, lm, proj = ref.hub, ref.lm, ref.proj
  _perturb(hub, 1)
  _perturb(lm, 2)
  ours = MusiLingo.random(cfg, rngs=nnx.Rngs(0))
  ref.load_into_ours(ours)
  return cfg, hub, lm, proj, ours


def _token_batch(rng, cfg, n_audio):
  """Two examples with different question and answer lengths (so the reference pads in the middle)."""
  V = cfg.llm.vocab_size
  exs = []
  for la, lt in ((3, 5), (6, 2)):
    exs.append({"before": rng.integers(3, V, 4).astype(np.int32),
                "after": rng.integers(3, V, la).astype(np.int32),
                "answer": rng.integers(3, V, lt).astype(np.int32)})
  return exs


def _our_batch(cfg, exs, audio, n_audio, max_len=48):
  batch = prompts.collate(exs, n_audio_tokens=n_audio, max_len=max_len, bos_id=BOS, pad_id=PAD)
  batch["audio"] = audio
  return batch


def _loss_fn(model, batch):
  return causal_lm_loss(model(batch), batch["labels"])[0]


def test_composition_matches_pytorch_reference(reference):
  cfg, hub, lm, proj, ours = reference
  rng = np.random.default_rng(0)
  samples = 4000
  audio = rng.standard_normal((2, samples)).astype(np.float32)
  n_audio = math.ceil(cfg.encoder.feature_lengths(samples) / POOL)
  exs = _token_batch(rng, cfg, n_audio)
  ref = _torch_reference_loss(hub, lm, proj, audio, exs, POOL)
  ref.backward()
  batch = jax.tree.map(jnp.asarray, _our_batch(cfg, exs, audio, n_audio))

  graphdef, proj_state, rest = trainlib.split_model(ours, "projection")

  def loss_of_proj(p):
    return _loss_fn(nnx.merge(graphdef, p, rest), batch)

  loss, g = jax.value_and_grad(loss_of_proj)(proj_state)
  gk, gb = g["llama_proj"]["kernel"].get_value(), g["llama_proj"]["bias"].get_value()
  np.testing.assert_allclose(float(loss), ref.item(), rtol=1e-4)
  np.testing.assert_allclose(np.asarray(gk), proj.weight.grad.numpy().T, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(np.asarray(gb), proj.bias.grad.numpy(), rtol=1e-4, atol=1e-6)
  proj.zero_grad()


def test_precomputed_features_give_the_same_loss(reference):
  cfg, _, _, _, ours = reference
  rng = np.random.default_rng(1)
  samples = 4000
  audio = rng.standard_normal((2, samples)).astype(np.float32)
  n_audio = math.ceil(cfg.encoder.feature_lengths(samples) / POOL)
  batch = _our_batch(cfg, _token_batch(rng, cfg, n_audio), audio, n_audio)
  raw = float(_loss_fn(ours, jax.tree.map(jnp.asarray, batch)))
  # Precompute clip by clip, as scripts/precompute.py does, then train from the features alone.
  feats = np.concatenate([np.asarray(pooled_features(ours.encoder, jnp.asarray(audio[i:i + 1]), POOL))
                          for i in range(2)])
  pre = dict(batch)
  del pre["audio"]
  pre["features"] = feats
  assert abs(float(_loss_fn(ours, jax.tree.map(jnp.asarray, pre))) - raw) < 1e-5


def _features_batch(cfg, seed, rows=8, n_audio=2, max_len=40):
  rng = np.random.default_rng(seed)
  exs = []
  for i in range(rows):
    exs.append({"before": rng.integers(3, 90, 3).astype(np.int32),
                "after": rng.integers(3, 90, 2 + i % 3).astype(np.int32),
                "answer": rng.integers(3, 90, 3 + i % 4).astype(np.int32),
                "features": rng.standard_normal((n_audio, cfg.encoder.hidden_size)).astype(np.float32)})
  return prompts.collate(exs, n_audio_tokens=n_audio, max_len=max_len, bos_id=BOS, pad_id=PAD)


def _tx(accum=1):
  sched = trainlib.ScheduleConfig(1e-3, 1e-4, 1e-5, 3, 10, 2)
  return trainlib.make_optimizer(schedule=trainlib.optimizer_schedule(sched, accum))


def _weights(state):
  """The frozen weights as numpy (rng keys left out)."""
  return [np.asarray(v.get_value()) for _, v in nnx.to_flat_state(state)
          if not jax.dtypes.issubdtype(v.get_value().dtype, jax.dtypes.prng_key)]


def _run_steps(mesh_shape, rules, n_steps=2, mode="projection", lora=None, accum=1):
  mesh = sharding.make_mesh(mesh_shape, jax.devices()[:math.prod(mesh_shape)])
  # The model carries the run's activation sharding, as Experiment builds it for the trainer.
  cfg = _with_activations(_configs(lora), sharding.Activations(mesh, rules))
  model = MusiLingo.random(cfg, rngs=nnx.Rngs(params=0, dropout=1))
  graphdef, trainable, frozen = trainlib.split_model(model, mode)
  tx = _tx(accum)
  rep = sharding.replicated(mesh)
  t_sh = sharding.state_shardings(trainable, mesh, rules)
  f_sh = sharding.state_shardings(frozen, mesh, rules)
  o_sh = trainlib.opt_state_shardings(tx, trainable, t_sh, rep)
  trainable = jax.device_put(trainable, t_sh)
  frozen = jax.device_put(frozen, f_sh)
  opt_state = jax.jit(tx.init, out_shardings=o_sh)(trainable)
  step = None
  losses = []
  frozen_before = _weights(frozen)
  for s in range(n_steps):
    batch = sharding.global_batch(_features_batch(cfg, s, rows=8 * accum), mesh)
    if step is None:
      step = trainlib.jit_train_step(
          trainlib.make_train_step(graphdef, tx, accum_steps=accum), trainable_sh=t_sh, opt_sh=o_sh,
          frozen_sh=f_sh, batch_sh={k: v.sharding for k, v in batch.items()}, replicated=rep)
    trainable, opt_state, m = step(trainable, opt_state, frozen, batch, jnp.asarray(s))
    losses.append(float(m["loss"]))
  return losses, trainable, opt_state, frozen, frozen_before


@pytest.fixture(scope="module")
def single_device_run():
  return _run_steps((1, 1, 1), "dp")


@pytest.mark.parametrize("shape,rules", [((8, 1, 1), "dp"), ((2, 4, 1), "fsdp"), ((2, 2, 2), "fsdp_tp")])
def test_sharded_step_equals_one_device(single_device_run, shape, rules):
  if jax.device_count() < 8:
    pytest.skip("needs 8 devices (XLA_FLAGS=--xla_force_host_platform_device_count=8)")
  losses1, t1, *_ = single_device_run
  losses, t, *_ = _run_steps(shape, rules)
  np.testing.assert_allclose(losses, losses1, rtol=1e-5, atol=1e-6)
  for (p, a), (_, b) in zip(nnx.to_flat_state(t), nnx.to_flat_state(t1)):
    np.testing.assert_allclose(np.asarray(a.get_value()), np.asarray(b.get_value()), rtol=1e-5, atol=1e-6,
                               err_msg=str(p))


def _with_activations(cfg, activations):
  return dataclasses.replace(cfg, encoder=dataclasses.replace(cfg.encoder, activations=activations),
                             llm=dataclasses.replace(cfg.llm, activations=activations))


def test_hidden_states_keep_the_batch_split_under_fsdp():
  """A model whose configs carry `sharding.Activations` constrains the LLM's and the encoder's hidden states
  to the batch axes (without it XLA may gather the whole batch onto every chip); one built without adds
  nothing. The constraint is part of the model's graph, so one jitted function traced for both models
  keeps them apart (jit's cache sees it)."""
  if jax.device_count() < 8:
    pytest.skip("needs 8 devices (XLA_FLAGS=--xla_force_host_platform_device_count=8)")
  cfg = _configs()
  mesh = sharding.make_mesh((2, 4, 1))
  plain_model = MusiLingo.random(cfg, rngs=nnx.Rngs(0))
  constrained = MusiLingo.random(_with_activations(cfg, sharding.Activations(mesh, "fsdp")), rngs=nnx.Rngs(0))
  batch = jax.tree.map(jnp.asarray, _features_batch(cfg, 0, rows=8))
  audio = jnp.zeros((8, SAMPLES), jnp.float32)
  fwd = nnx.jit(lambda m, b, a: (m(b), m.encoder(a)))  # one function for both models

  plain = fwd.lower(plain_model, batch, audio).as_text()
  assert "sharding_constraint" not in plain
  text = fwd.lower(constrained, batch, audio).as_text()
  n_constraints = text.count("sharding_constraint")
  # one per LLM layer + its input, one per encoder layer + its input, one per conv layer
  want = (cfg.llm.num_hidden_layers + 1) + (cfg.encoder.num_hidden_layers + 1) + len(cfg.encoder.conv_dim)
  assert n_constraints == want, (n_constraints, want)
  assert text.count('[{"data", "fsdp"}, {}, {}]') == want
  assert "sharding_constraint" not in fwd.lower(plain_model, batch, audio).as_text()  # not a stale trace
  # config.mesh.constrain_activations=False: the run's models carry none.
  c = cfglib.base_config()
  c.mesh.rules = "fsdp"
  assert experiment.activations_of(c, mesh) == sharding.Activations(mesh, "fsdp")
  c.mesh.constrain_activations = False
  assert experiment.activations_of(c, mesh) is None


def test_frozen_unchanged_and_no_optimizer_state_for_it(single_device_run):
  losses, trainable, opt_state, frozen, frozen_before = single_device_run
  paths = {".".join(map(str, p)) for p, _ in nnx.to_flat_state(trainable)}
  assert paths == {"llama_proj.kernel", "llama_proj.bias"}
  for a, b in zip(_weights(frozen), frozen_before):
    np.testing.assert_array_equal(a, b)
  n_proj = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(trainable))
  n_opt = sum(int(np.prod(np.shape(x))) for x in jax.tree.leaves(opt_state))
  assert n_opt <= 2 * n_proj + 8, "the optimizer holds state beyond the projection's mu and nu"
  assert losses[1] < losses[0] + 1.0  # it ran and stayed finite
  assert all(np.isfinite(losses))


def test_lora_starts_at_base_model_and_merges():
  cfg_base, cfg_lora = _configs(), _configs(layers.LoRAConfig(rank=4, alpha=8.0, target_modules=("q_proj", "v_proj")))
  base = MusiLingo.random(cfg_base, rngs=nnx.Rngs(0))
  adapted = MusiLingo.random(cfg_lora, rngs=nnx.Rngs(0))
  # Same base weights: copy them over by path (the LoRA leaves are extra).
  base_state = nnx.state(base, nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam)))
  nnx.update(adapted, base_state)
  batch = jax.tree.map(jnp.asarray, _features_batch(cfg_base, 0))
  np.testing.assert_array_equal(np.asarray(base(batch)), np.asarray(adapted(batch)))
  # Train B away from zero, then merging A B * scale into the kernels gives the same logits.
  for path, var in nnx.to_flat_state(nnx.state(adapted, nnx.LoRAParam)):
    if path[-1] == "lora_b":
      var.set_value(0.1 * jax.random.normal(jax.random.key(len(path)), var.get_value().shape))
  adapted.eval()
  unmerged = np.asarray(adapted(batch))
  for path, module in adapted.iter_modules():
    if isinstance(module, layers.Linear) and module.lora is not None:
      module.kernel.set_value(module.merged_kernel())
      module.lora_b.set_value(jnp.zeros_like(module.lora_b[...]))
  np.testing.assert_allclose(np.asarray(adapted(batch)), unmerged, rtol=1e-5, atol=1e-5)
  assert not np.allclose(unmerged, np.asarray(base(batch)), atol=1e-4)


def test_lora_mode_trains_only_projection_and_adapters():
  lora = layers.LoRAConfig(rank=2, alpha=4.0, target_modules=("q_proj",))
  losses, trainable, opt_state, frozen, frozen_before = _run_steps((1, 1, 1), "dp", mode="projection+lora",
                                                                   lora=lora)
  names = {".".join(map(str, p)) for p, _ in nnx.to_flat_state(trainable)}
  assert {"llama_proj.kernel", "llama_proj.bias"} <= names
  assert all(n.startswith("llama_proj") or n.endswith(("lora_a", "lora_b")) for n in names)
  assert any("q_proj.lora_b" in n for n in names) and not any("k_proj" in n for n in names)
  for a, b in zip(_weights(frozen), frozen_before):
    np.testing.assert_array_equal(a, b)


def test_gradient_accumulation_sums_micro_batch_gradients():
  cfg = _configs()
  model = MusiLingo.random(cfg, rngs=nnx.Rngs(0))
  graphdef, trainable, frozen = trainlib.split_model(model, "projection")
  big = _features_batch(cfg, 5, rows=8)
  micro = trainlib._micro_batches(jax.tree.map(jnp.asarray, big), 2)

  def grads(batch):
    def f(t):
      m = nnx.merge(graphdef, t, frozen)
      return causal_lm_loss(m(batch), batch["labels"])[0]
    return jax.grad(f)(trainable)

  expected = jax.tree.map(jnp.add, grads(jax.tree.map(lambda x: x[0], micro)),
                          grads(jax.tree.map(lambda x: x[1], micro)))
  # One SGD step with lr 1 exposes the gradient the step applied.
  tx = optax.sgd(1.0)
  step = jax.jit(trainlib.make_train_step(graphdef, tx, accum_steps=2, accum_reduce="sum"))
  new, _, _ = step(trainable, tx.init(trainable), frozen, jax.tree.map(jnp.asarray, big), jnp.asarray(0))
  applied = jax.tree.map(lambda a, b: a - b, trainable, new)
  for a, b in zip(jax.tree.leaves(applied), jax.tree.leaves(expected)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)
  step_mean = jax.jit(trainlib.make_train_step(graphdef, tx, accum_steps=2, accum_reduce="mean"))
  new_m, _, _ = step_mean(trainable, tx.init(trainable), frozen, jax.tree.map(jnp.asarray, big), jnp.asarray(0))
  applied_m = jax.tree.map(lambda a, b: a - b, trainable, new_m)
  for a, b in zip(jax.tree.leaves(applied_m), jax.tree.leaves(expected)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b) / 2, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("layout", ["reference", "packed"])
def test_head_at_label_positions_only_gives_the_same_loss_and_gradients(layout):
  """MusiLingo.loss with K >= every row's label count equals the full-logits reference loss (value and
  gradients); K below a row's label count is refused loudly (NaN), never silently wrong."""
  cfg = _configs(lora=layers.LoRAConfig(rank=2, alpha=4.0, dropout=0.0))
  model = MusiLingo.random(cfg, rngs=nnx.Rngs(0))
  graphdef, trainable, frozen = trainlib.split_model(model, "projection+lora")
  rng = np.random.default_rng(3)
  exs = [{"before": rng.integers(3, 90, 3).astype(np.int32),
          "after": rng.integers(3, 90, 2 + i % 3).astype(np.int32),
          "answer": rng.integers(3, 90, 2 + 2 * i).astype(np.int32),   # 2..8 label tokens
          "features": rng.standard_normal((2, cfg.encoder.hidden_size)).astype(np.float32)} for i in range(4)]
  batch = jax.tree.map(jnp.asarray, prompts.collate(exs, n_audio_tokens=2, max_len=32, bos_id=BOS, pad_id=PAD,
                                                     layout=layout))
  # Perturb LoRA's B (zero at init) so its gradients are not trivially equal.
  trainable = jax.tree.map(lambda x: x + 0.01 * jnp.ones_like(x), trainable)

  def loss(t, k):
    return nnx.merge(graphdef, t, frozen).loss(batch, loss_positions=k)

  full, count = loss(trainable, None)
  want = causal_lm_loss(nnx.merge(graphdef, trainable, frozen)(batch), batch["labels"])
  np.testing.assert_allclose(float(full), float(want[0]), rtol=1e-6)
  for k in (8, 12):
    got, got_count = loss(trainable, k)
    assert int(got_count) == int(count) == int((batch["labels"] != -100).sum())
    np.testing.assert_allclose(float(got), float(full), rtol=1e-5)
  g_full = jax.grad(lambda t: loss(t, None)[0])(trainable)
  g_k = jax.grad(lambda t: loss(t, 8)[0])(trainable)
  for a, b in zip(jax.tree.leaves(g_k), jax.tree.leaves(g_full)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-7)
  assert np.isnan(float(loss(trainable, 7)[0]))   # the last row has 8 labels


def test_feature_norm_folds_into_an_equal_plain_projection():
  """The demo's feature standardisation changes what the projection sees; projection_weights folds it into
  one Linear on raw features (what export writes and the torch reference loads) with the same output."""
  cfg = _configs()
  model = MusiLingo.random(cfg, rngs=nnx.Rngs(0))
  rng = np.random.default_rng(1)
  d = cfg.encoder.hidden_size
  feats = jnp.asarray(3.0 + 0.1 * rng.standard_normal((2, 3, d)), jnp.float32)
  plain = model.audio_embeddings({"features": feats})
  mean, std = 3.0 + 0.01 * rng.standard_normal(d), 0.1 + 0.01 * rng.random(d)
  model.set_feature_norm(mean, std)
  normed = model.audio_embeddings({"features": feats})
  assert not np.allclose(np.asarray(normed), np.asarray(plain), atol=1e-2)
  want = model.llama_proj(((feats - mean) / std).astype(jnp.float32))
  np.testing.assert_allclose(np.asarray(normed), np.asarray(want), rtol=1e-5, atol=1e-5)
  kernel, bias = model.projection_weights()
  np.testing.assert_allclose(np.asarray(feats @ kernel + bias), np.asarray(normed), rtol=1e-4, atol=1e-4)
  # Never trainable: not in any mode's trainable state.
  for mode in trainlib.TRAIN_MODES:
    _, trainable, _ = trainlib.split_model(model, mode)
    assert not any("feature_norm" in ".".join(map(str, p)) for p, _ in nnx.to_flat_state(trainable))
  with pytest.raises(ValueError, match="dimensions"):
    model.set_feature_norm(mean[:-1], std[:-1])
  model.set_feature_norm(None, None)
  np.testing.assert_allclose(np.asarray(model.audio_embeddings({"features": feats})), np.asarray(plain))


def test_schedule_equals_reference_formula():
  cfg = trainlib.ScheduleConfig(init_lr=3e-5, min_lr=1e-5, warmup_lr=1e-6, warmup_steps=5000,
                                iters_per_epoch=5000, epochs=6)
  S = 30000

  def ref(g):
    if g < 5000:
      return min(3e-5, 1e-6 + (3e-5 - 1e-6) * g / 5000)
    return 1e-5 + (3e-5 - 1e-5) * 0.5 * (1 + math.cos(math.pi * g / S))

  for g in (0, 1, 2500, 4999, 5000, 12345, 29999):
    np.testing.assert_allclose(float(trainlib.reference_lr(cfg, g)), ref(g), rtol=1e-6)
  sched = trainlib.optimizer_schedule(cfg, accum_steps=16)
  np.testing.assert_allclose(float(sched(3)), ref(3 * 16 + 15), rtol=1e-6)


def test_weight_decay_never_touches_the_bias():
  params = {"kernel": jnp.ones((3, 4)), "bias": jnp.ones((4,))}
  tx = trainlib.make_optimizer(schedule=lambda _: 0.1, weight_decay=0.5)
  zero_grads = jax.tree.map(jnp.zeros_like, params)
  updates, _ = tx.update(zero_grads, tx.init(params), params)
  np.testing.assert_array_equal(np.asarray(updates["bias"]), 0.0)
  np.testing.assert_allclose(np.asarray(updates["kernel"]), -0.1 * 0.5, rtol=1e-6)


def _mixed_examples(cfg, rng, rows):
  """Rows with different question, answer and clip lengths (clips of 1 to 3 audio tokens)."""
  V = cfg.llm.vocab_size
  exs = []
  for i in range(rows):
    n = int(rng.integers(1500, 6500))
    exs.append({"before": rng.integers(3, V, 4).astype(np.int32),
                "after": rng.integers(3, V, int(rng.integers(2, 9))).astype(np.int32),
                "answer": rng.integers(3, V, int(rng.integers(2, 7))).astype(np.int32),
                "clip": rng.standard_normal(n).astype(np.float32)})
  return exs


@pytest.mark.parametrize("accum", [2, 4])
@pytest.mark.parametrize("inputs", ["audio", "features"])
def test_accumulated_micro_batches_match_the_reference_run_one_at_a_time(reference, accum, inputs):
  """batch_size 2, accum_steps 2 and 4: each micro-batch is padded on its own (question padding, audio to its
  longest clip, ceil(T_max / pool) audio tokens for every row) and the summed projection gradient and the
  losses equal a PyTorch reference that runs the micro-batches one at a time, as the reference does."""
  cfg, hub, lm, proj, ours = reference
  rng = np.random.default_rng(11 + accum)
  B, S, max_len = 2, 7000, 48
  exs = _mixed_examples(cfg, rng, B * accum)
  tokens = lambda n: math.ceil(cfg.encoder.feature_lengths(n) / POOL)  # noqa: E731
  if inputs == "features":  # precomputed clip by clip at its own length (what scripts/precompute.py stores)
    for e in exs:
      e["features"] = np.asarray(pooled_features(ours.encoder, jnp.asarray(e["clip"])[None], POOL))[0]

  micro, torch_losses = [], []
  proj.zero_grad()
  for a in range(accum):
    part = exs[a * B:(a + 1) * B]
    rows = []
    for e in part:
      row = {k: e[k] for k in ("before", "after", "answer")}
      row["audio_tokens"] = tokens(len(e["clip"]))
      if inputs == "audio":
        row["audio"] = np.pad(e["clip"], (0, S - len(e["clip"])))
        row["audio_len"] = np.int32(len(e["clip"]))
      else:
        row["features"] = np.pad(e["features"], ((0, 3 - len(e["features"])), (0, 0)))
      rows.append(row)
    mb = prompts.collate(rows, max_len=max_len, bos_id=BOS, pad_id=PAD)
    assert (mb["audio_tokens"] == max(r["audio_tokens"] for r in rows)).all()
    micro.append(mb)
    if inputs == "audio":
      audio, mask = tr.pad_clips([e["clip"] for e in part])
      loss = _torch_reference_loss(hub, lm, proj, audio, part, POOL, audio_mask=mask)
    else:  # the reference's extra tokens of a shorter clip are zero features here (docs: a labelled departure)
      n = int(mb["audio_tokens"][0])
      feats = np.stack([np.pad(e["features"], ((0, n - len(e["features"])), (0, 0))) for e in part])
      loss = _torch_reference_loss(hub, lm, proj, None, part, POOL, features=feats)
    loss.backward()  # gradients add up over the micro-batches (zeroed only after the optimizer step)
    torch_losses.append(loss.item())
  big = jax.tree.map(jnp.asarray, prompts.interleave_micro_batches(micro))

  graphdef, trainable, frozen = trainlib.split_model(ours, "projection")
  tx = optax.sgd(1.0)  # lr 1: the update is the summed gradient
  step = jax.jit(trainlib.make_train_step(graphdef, tx, accum_steps=accum, accum_reduce="sum"))
  new, _, m = step(trainable, tx.init(trainable), frozen, big, jnp.asarray(0))
  np.testing.assert_allclose(float(m["loss"]), np.mean(torch_losses), rtol=1e-5)
  for a in range(accum):  # each micro-batch's own loss, as the step takes it apart
    mb = jax.tree.map(lambda x: x[a::accum], big)
    np.testing.assert_allclose(float(_loss_fn(nnx.merge(graphdef, trainable, frozen), mb)), torch_losses[a],
                               rtol=1e-5)
  applied = jax.tree.map(lambda x, y: x - y, trainable, new)
  np.testing.assert_allclose(np.asarray(applied["llama_proj"]["kernel"].get_value()), proj.weight.grad.numpy().T,
                             rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.asarray(applied["llama_proj"]["bias"].get_value()), proj.bias.grad.numpy(),
                             rtol=1e-5, atol=1e-6)
  proj.zero_grad()

  # Laying out the accumulated batch in one piece (one padding for all rows) is not the reference.
  rows_all = []
  for e in exs:
    row = {k: e[k] for k in ("before", "after", "answer")}
    row["audio_tokens"] = tokens(len(e["clip"]))
    if inputs == "audio":
      row["audio"], row["audio_len"] = np.pad(e["clip"], (0, S - len(e["clip"]))), np.int32(len(e["clip"]))
    else:
      row["features"] = np.pad(e["features"], ((0, 3 - len(e["features"])), (0, 0)))
    rows_all.append(row)
  one = prompts.collate(rows_all, max_len=max_len, bos_id=BOS, pad_id=PAD)
  wrong = jax.tree.map(lambda x: jnp.asarray(x).reshape((accum, B) + x.shape[1:]).swapaxes(0, 1)
                       .reshape((-1,) + x.shape[1:]), one)
  _, _, m_wrong = step(trainable, tx.init(trainable), frozen, wrong, jnp.asarray(0))
  assert abs(float(m_wrong["loss"]) - np.mean(torch_losses)) > 1e-5
