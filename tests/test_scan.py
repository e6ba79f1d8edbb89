"""Scanned layers (config `scan_layers`): stacked encoder and LLM layers run by nnx.scan give the numbers the
unrolled layers give (outputs, loss, gradients of the projection and LoRA, greedy tokens, every remat
policy), the HF key table stacks and unstacks them bitwise, converted checkpoints load with either setting,
and a sharded step runs under the fsdp rules. Tiny random models, float32."""

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import transformers
from flax import nnx

from musilingo_jax import build, generate, prompts, sharding
from musilingo_jax import config as cfglib
from musilingo_jax import train as trainlib
from musilingo_jax.convert.converted import load_converted, save_params
from musilingo_jax.convert.hf import export_hf_tensors, import_pretrained, iter_lora_adapters, load_hf_tensors
from musilingo_jax.convert.state import path_str
from musilingo_jax.models import layers, llama, mert
from musilingo_jax.models.musilingo import MusiLingo
from tiny_hf import converted_tiny_models

LORA = layers.LoRAConfig(rank=4, alpha=8.0, dropout=0.0, target_modules=("q_proj", "v_proj", "down_proj"))
POOL, BOS, PAD = 3, 1, 2


def _layer_path(stacked: str, i: int) -> str:
  """model.layers.mlp.up_proj.kernel -> model.layers.{i}.mlp.up_proj.kernel (the unrolled spelling)."""
  return re.sub(r"(^|\.)layers\.", rf"\1layers.{i}.", stacked, count=1)


def _flat(module, filt=nnx.Param) -> dict[str, jax.Array]:
  return {path_str(p): v.get_value() for p, v in nnx.to_flat_state(nnx.state(module, filt))}


def _stacked_view(unrolled: dict, stacked_like: dict) -> dict:
  """`unrolled`'s arrays in the stacked layout of `stacked_like` (per-layer arrays stacked)."""
  out = {}
  for path, value in stacked_like.items():
    out[path] = unrolled[path] if path in unrolled else jnp.stack(
        [unrolled[_layer_path(path, i)] for i in range(value.shape[0])])
  return out


def _copy_params(src, dst) -> None:
  """Every nnx.Param of `dst` (LoRA adapters included) from `src`, across the unrolled and stacked layouts."""
  values = {k: jnp.copy(v) for k, v in _stacked_view(_flat(src), _flat(dst)).items()}  # no buffer shared
  state = nnx.state(dst, nnx.Param)
  nnx.update(dst, nnx.from_flat_state([(p, v.replace(values[path_str(p)])) for p, v in nnx.to_flat_state(state)]))


def _assert_same(a: dict, b: dict, **tol):
  assert sorted(a) == sorted(b)
  for k in a:
    if tol:
      np.testing.assert_allclose(np.asarray(a[k]), np.asarray(b[k]), err_msg=k, **tol)
    else:
      np.testing.assert_array_equal(np.asarray(a[k]), np.asarray(b[k]), err_msg=k)


# ---- models ---------------------------------------------------------------------------------------

def test_stacked_parameters_carry_a_replicated_layer_axis():
  cfg = llama.LlamaConfig.tiny(scan_layers=True)
  m = nnx.eval_shape(lambda: llama.Llama(cfg, rngs=nnx.Rngs(0), lora=LORA))
  state = nnx.state(m, nnx.Param)
  names = {path_str(p): v.get_metadata()["out_sharding"] for p, v in nnx.to_flat_state(state)}
  assert names["model.layers.self_attn.q_proj.kernel"] == (sharding.LAYERS, "embed", "heads")
  assert names["model.layers.self_attn.q_proj.lora_a"] == (sharding.LAYERS, "embed", None)
  assert _flat(m)["model.layers.mlp.up_proj.kernel"].shape == (2, 64, 128)
  mesh = sharding.make_mesh((1, 8, 1))
  spec = {path_str(p): s.get_value().spec for p, s in nnx.to_flat_state(sharding.state_shardings(state, mesh, "fsdp"))}
  assert spec["model.layers.mlp.up_proj.kernel"] == jax.sharding.PartitionSpec(None, "fsdp", None)
  with pytest.raises(Exception, match="remat"):
    llama.LlamaConfig.tiny(remat="sometimes")
  with pytest.raises(ValueError, match="remat"):
    mert.MERTConfig.tiny(remat="sometimes")


def _llama_pair(**kw):
  cfg = llama.LlamaConfig.tiny(num_key_value_heads=2, **kw)
  unrolled = llama.Llama(cfg, rngs=nnx.Rngs(0))
  scanned = llama.Llama(dataclasses.replace(cfg, scan_layers=True), rngs=nnx.Rngs(1))
  load_hf_tensors(scanned, llama.HF_KEY_RULES, export_hf_tensors(unrolled, llama.HF_KEY_RULES))
  return unrolled, scanned


def test_llama_scan_equals_unrolled_with_and_without_cache():
  unrolled, scanned = _llama_pair()
  ids = jnp.asarray(np.random.default_rng(0).integers(0, 101, (2, 7)), jnp.int32)
  mask = jnp.ones((2, 7), jnp.int32).at[1, :2].set(0)

  def run(model):
    full, _ = model(ids, attention_mask=mask)
    cache = model.init_cache(2, 10)
    kv = jnp.concatenate([mask, jnp.ones((2, 3), jnp.int32)], 1)
    pre, cache = model(ids, attention_mask=kv, cache=cache, cache_index=0)
    step, cache = model(ids[:, -1:], attention_mask=kv, cache=cache, cache_index=7)
    return full, pre, step, cache

  (f1, p1, s1, c1), (f2, p2, s2, c2) = nnx.jit(run)(unrolled), nnx.jit(run)(scanned)
  for a, b in ((f1, f2), (p1, p2), (s1, s2)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6, rtol=0)
  assert c2["k"].shape == (2, 2, 10, 2, 16) and llama.cache_axes(scanned.cfg)[0] == sharding.LAYERS
  np.testing.assert_allclose(np.asarray(c2["k"]), np.stack([np.asarray(c["k"]) for c in c1]), atol=1e-6)


def test_greedy_generation_gives_the_same_tokens():
  unrolled, scanned = _llama_pair()
  rng = np.random.default_rng(1)
  ids = rng.integers(3, 101, (2, 6)).astype(np.int32)
  mask = np.ones((2, 6), np.int32)
  mask[0, :2] = 0  # left padding
  batch = {"input_ids": ids, "attention_mask": mask}
  out = [generate.generate_ids(m, batch, max_new_tokens=8, greedy=True, eos_ids=(0,), stop_sequences=((0,),))
         for m in (unrolled, scanned)]
  np.testing.assert_array_equal(out[0][0], out[1][0])
  np.testing.assert_array_equal(out[0][1], out[1][1])


@pytest.mark.parametrize("pre_ln", [True, False])
def test_mert_scan_equals_unrolled(pre_ln):
  cfg = mert.MERTConfig.tiny(do_stable_layer_norm=pre_ln)
  unrolled = mert.MERT(cfg, rngs=nnx.Rngs(0))
  scanned = mert.MERT(dataclasses.replace(cfg, scan_layers=True, remat="full"), rngs=nnx.Rngs(1))
  load_hf_tensors(scanned, mert.HF_KEY_RULES, export_hf_tensors(unrolled, mert.HF_KEY_RULES))
  audio = jnp.asarray(np.random.default_rng(0).standard_normal((2, 2400)), jnp.float32)
  mask = jnp.arange(2400)[None, :] < jnp.asarray([[2400], [1500]])
  a, b = (nnx.jit(lambda m: m(audio, attention_mask=mask))(m) for m in (unrolled, scanned))
  assert len(a) == len(b) == 3
  for x, y in zip(a, b):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-5, rtol=0)


def test_scanned_lora_dropout_is_reseeded_and_off_in_eval():
  """Stacked layers own no RNG streams: their LoRA dropout keys come from the LLM's one stream, which
  nnx.reseed seeds (as training does each step): same seed, same masks; eval mode draws nothing."""
  lora = dataclasses.replace(LORA, dropout=0.5)
  m = llama.Llama(llama.LlamaConfig.tiny(scan_layers=True), rngs=nnx.Rngs(params=0, dropout=1), lora=lora)
  assert [path_str(p) for p, _ in nnx.to_flat_state(nnx.state(m, nnx.RngState))] == [
      "dropout_rngs.count", "dropout_rngs.key"]
  for _, node in nnx.iter_graph(m):
    if getattr(node, "lora_b", None) is not None:
      node.lora_b.set_value(jnp.ones_like(node.lora_b.get_value()))
  f = nnx.jit(lambda m, ids: m(ids)[0])
  ids = jnp.ones((1, 4), jnp.int32)
  runs = []
  for seed in (3, 3, 4):
    nnx.reseed(m, dropout=jax.random.key(seed))
    runs.append(np.asarray(f(m, ids)))
  assert np.array_equal(runs[0], runs[1]) and not np.array_equal(runs[0], runs[2])
  m.eval()
  count = int(m.dropout_rngs.count.get_value())
  assert np.array_equal(np.asarray(f(m, ids)), np.asarray(f(m, ids)))
  assert int(m.dropout_rngs.count.get_value()) == count


# ---- loss and gradients ---------------------------------------------------------------------------

def _batch(rows=4, n_audio=2, max_len=24, d_enc=32, seed=0):
  rng = np.random.default_rng(seed)
  exs = [{"before": rng.integers(3, 90, 3).astype(np.int32), "after": rng.integers(3, 90, 2 + i % 2).astype(np.int32),
          "answer": rng.integers(3, 90, 3 + i % 3).astype(np.int32),
          "features": rng.standard_normal((n_audio, d_enc)).astype(np.float32)} for i in range(rows)]
  return prompts.collate(exs, n_audio_tokens=n_audio, max_len=max_len, bos_id=BOS, pad_id=PAD)


def _musilingo(scan: bool, remat: str = "none", activations=None, seed=0, lora=LORA) -> MusiLingo:
  enc = mert.MERTConfig.tiny(scan_layers=scan, remat=remat, activations=activations)
  llm = llama.LlamaConfig.tiny(num_key_value_heads=2, scan_layers=scan, remat=remat, activations=activations)
  rngs = nnx.Rngs(params=seed, dropout=seed + 1)
  model = MusiLingo(mert.MERT(enc, rngs=rngs), llama.Llama(llm, rngs=rngs, lora=lora),
                    layers.torch_linear(32, 64, rngs=rngs), pool_frames=POOL)
  return model


def _reference_model(lora=LORA) -> MusiLingo:
  """Unrolled, with random LoRA B (zero at init would leave A's gradients zero)."""
  model = _musilingo(False, lora=lora)
  for path, node in nnx.iter_graph(model):
    if getattr(node, "lora_b", None) is not None:
      key = jax.random.key(len(path_str(path)))
      node.lora_b.set_value(0.1 * jax.random.normal(key, node.lora_b.get_value().shape))
  return model


def _loss_and_grads(model, batch):
  filt = trainlib.trainable_filter("projection+lora")

  @nnx.jit
  def f(model, batch):
    return nnx.value_and_grad(lambda m: m.loss(batch, loss_positions=8)[0], argnums=nnx.DiffState(0, filt))(model)
  loss, grads = f(model, batch)
  return float(loss), {path_str(p): v.get_value() for p, v in nnx.to_flat_state(grads)}


@pytest.fixture(scope="module")
def reference():
  ref = _reference_model()
  batch = jax.tree.map(jnp.asarray, _batch())
  return (ref, batch, *_loss_and_grads(ref, batch))


@pytest.mark.parametrize("scan,remat", [(True, "none"), (True, "dots_saveable"), (False, "nothing_saveable")])
def test_loss_and_projection_lora_grads_match(reference, scan, remat):
  ref, batch, loss_ref, grads_ref = reference
  model = _musilingo(scan, remat, seed=5)
  _copy_params(ref, model)
  loss, grads = _loss_and_grads(model, batch)
  assert abs(loss - loss_ref) < 1e-6 and np.isfinite(loss)
  assert any("lora_a" in k for k in grads) and any("llama_proj" in k for k in grads)
  _assert_same(grads, _stacked_view(grads_ref, grads), atol=1e-6, rtol=1e-5)
  assert float(jnp.abs(grads["llm.model.layers.self_attn.q_proj.lora_a" if scan else
                            "llm.model.layers.0.self_attn.q_proj.lora_a"]).max()) > 0
  # The PEFT view of the adapters is the same, layer by layer.
  a = {k: (x, y) for k, x, y in iter_lora_adapters(ref.llm, llama.HF_KEY_RULES)}
  b = {k: (x, y) for k, x, y in iter_lora_adapters(model.llm, llama.HF_KEY_RULES)}
  assert sorted(a) == sorted(b) and "model.layers.1.mlp.down_proj.weight" in a
  for k in a:
    np.testing.assert_array_equal(a[k][0], b[k][0])
    np.testing.assert_array_equal(a[k][1], b[k][1])


@pytest.mark.parametrize("mode", ["projection", "projection+lora"])
def test_sharded_fsdp_train_step_with_scan_equals_one_device_unrolled(mode):
  """One train step on 8 CPU devices under the fsdp rules (mesh 2 x 4, activation constraints in the scanned
  bodies) gives the loss and new trainables of the unrolled model's step on one device."""
  if jax.device_count() < 8:
    pytest.skip("needs 8 devices (XLA_FLAGS=--xla_force_host_platform_device_count=8)")
  lora = LORA if mode == "projection+lora" else None  # as build.lora_config: adapters only when they train
  ref = _reference_model(lora)
  batch_np = _batch(rows=8)
  mesh = sharding.make_mesh((2, 4, 1))
  model = _musilingo(True, "full", activations=sharding.Activations(mesh, "fsdp"), seed=5, lora=lora)
  _copy_params(ref, model)
  sched = trainlib.ScheduleConfig(1e-3, 1e-4, 1e-5, 3, 10, 2)
  tx = trainlib.make_optimizer(schedule=trainlib.optimizer_schedule(sched, 1))

  def one_step(model, mesh, rules):
    graphdef, trainable, frozen = trainlib.split_model(model, mode)
    rep = sharding.replicated(mesh)
    t_sh, f_sh = sharding.state_shardings(trainable, mesh, rules), sharding.state_shardings(frozen, mesh, rules)
    o_sh = trainlib.opt_state_shardings(tx, trainable, t_sh, rep)
    trainable, frozen = jax.device_put(trainable, t_sh), jax.device_put(frozen, f_sh)
    opt_state = jax.jit(tx.init, out_shardings=o_sh)(trainable)
    batch = sharding.global_batch(batch_np, mesh)
    step = trainlib.jit_train_step(trainlib.make_train_step(graphdef, tx, loss_positions=8), trainable_sh=t_sh,
                                   opt_sh=o_sh, frozen_sh=f_sh, batch_sh={k: v.sharding for k, v in batch.items()},
                                   replicated=rep)
    args = (trainable, opt_state, frozen, batch, jnp.asarray(0))
    text = step.lower(*args).as_text()
    trainable, _, metrics = step(*args)
    return float(metrics["loss"]), {path_str(p): v.get_value() for p, v in nnx.to_flat_state(trainable)}, text

  loss_ref, t_ref, _ = one_step(ref, sharding.make_mesh((1, 1, 1), jax.devices()[:1]), "dp")
  loss, t, text = one_step(model, mesh, "fsdp")
  assert abs(loss - loss_ref) < 1e-5
  _assert_same(t, _stacked_view(t_ref, t), atol=1e-6, rtol=1e-5)
  if mode == "projection+lora":
    assert t["llm.model.layers.self_attn.q_proj.lora_a"].sharding.spec[:2] == (None, "fsdp")
  # The layers run in loops (one per scanned stack, forward and backward), with the batch constraint inside.
  assert "stablehlo.while" in text and '[{"data", "fsdp"}, {}, {}]' in text


# ---- conversion -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory):
  return converted_tiny_models(tmp_path_factory.mktemp("scan"))


def test_hf_import_export_round_trip_is_bitwise(tiny_root):
  hf = {k: v.numpy() for k, v in transformers.LlamaForCausalLM.from_pretrained(tiny_root / "llm").state_dict().items()}
  scanned, cfg = import_pretrained(llama.HF_KIND, tiny_root / "llm", config_overrides={"scan_layers": True})
  unrolled, _ = import_pretrained(llama.HF_KIND, tiny_root / "llm")
  assert cfg.scan_layers and _flat(scanned)["model.layers.self_attn.k_proj.kernel"].shape[0] == 2
  out = export_hf_tensors(scanned, llama.HF_KEY_RULES)
  assert sorted(out) == sorted(hf)
  for k in hf:
    assert out[k].dtype == hf[k].dtype and np.array_equal(out[k], hf[k]), k
  _assert_same(_flat(scanned), _stacked_view(_flat(unrolled), _flat(scanned)))
  # The encoder: a scanned import exports what the unrolled one does, and holds the same numbers.
  enc_s, _ = import_pretrained(mert.HF_KIND, tiny_root / "encoder", config_overrides={"scan_layers": True})
  enc_u, _ = import_pretrained(mert.HF_KIND, tiny_root / "encoder")
  _assert_same(export_hf_tensors(enc_s, mert.HF_KEY_RULES), export_hf_tensors(enc_u, mert.HF_KEY_RULES))
  _assert_same(_flat(enc_s), _stacked_view(_flat(enc_u), _flat(enc_s)))


def test_converted_checkpoint_loads_scanned_or_unrolled(tiny_root, tmp_path):
  """converted/ stores the per-layer layout; loading stacks it when scan_layers is on (also straight onto an
  fsdp mesh), and a scanned model saved back stores the same per-layer layout."""
  kinds = (mert.HF_KIND, llama.HF_KIND)
  scan = {"encoder": {"scan_layers": True}, "llm": {"scan_layers": True}}
  (enc_u, llm_u), _ = load_converted(tiny_root / "converted", kinds)
  (enc_s, llm_s), meta = load_converted(tiny_root / "converted", kinds, config_overrides=scan)
  assert meta["llm_config"].scan_layers and not llm_u.cfg.scan_layers
  for u, s in ((enc_u, enc_s), (llm_u, llm_s)):
    _assert_same(_flat(s), _stacked_view(_flat(u), _flat(s)))
  mesh = sharding.make_mesh((1, -1, 1))
  (llm_m,), _ = load_converted(tiny_root / "converted", (llama.HF_KIND,), mesh=mesh, sharding_rules="fsdp",
                               config_overrides={"llm": {"scan_layers": True}}, model_kwargs={"llm": {"lora": LORA}})
  kernel = llm_m.model.layers.mlp.up_proj.kernel.get_value()
  assert kernel.shape == (2, 64, 128) and kernel.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", None)
  assert llm_m.model.layers.self_attn.q_proj.lora_a.get_value().shape == (2, 64, 4)
  _assert_same(_flat(llm_m, nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam))), _flat(llm_s))
  # Saved from the scanned model: the per-layer layout again, loading either way.
  out = tmp_path / "resaved"
  save_params(out / "params" / "llm", llm_s, llama.HF_KEY_RULES)
  (out / "llm_config.json").write_text((tiny_root / "converted" / "llm_config.json").read_text())
  (again_u,), _ = load_converted(out, (llama.HF_KIND,))
  (again_s,), _ = load_converted(out, (llama.HF_KIND,), config_overrides={"llm": {"scan_layers": True}})
  _assert_same(_flat(again_u), _flat(llm_u))
  _assert_same(_flat(again_s), _flat(llm_s))
  with pytest.raises(ValueError, match="rules="):
    save_params(tmp_path / "no_rules", llm_s)


# ---- config -----------------------------------------------------------------------------------------

def test_config_fields_reach_both_models():
  from musilingo_jax.configs import finetune, lora, pretrain
  assert cfglib.base_config().model.scan_layers is False and cfglib.base_config().model.remat == "none"
  for c in (finetune.get_config("musicqa"), lora.get_config("musicinstruct"), pretrain.get_config("")):
    assert c.model.scan_layers is True and (c.model.encoder_preset, c.model.llm_preset) == ("mert_v1_330m",
                                                                                           "vicuna_7b")
  assert finetune.get_config("smoke").model.scan_layers is False
  c = cfglib.base_config()
  c.model.encoder_preset = c.model.llm_preset = "tiny"
  c.model.scan_layers, c.model.remat = True, "dots_saveable"
  enc, llm = build.model_overrides(c)
  assert enc["scan_layers"] is llm["scan_layers"] is True and enc["remat"] == llm["remat"] == "dots_saveable"
  m = build.init_random(llama.Llama, build.preset_llm_config(c), 0, abstract=True)
  assert m.cfg.scan_layers and m.cfg.remat == "dots_saveable" and m.model.layers.mlp.up_proj.kernel.shape[0] == 2
  c.model.remat = "most"
  with pytest.raises(cfglib.ConfigError, match="model.remat"):
    cfglib.validate(c, need_data=False)
