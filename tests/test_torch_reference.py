"""musilingo_jax.testing.torch_reference against our model: weights copied ours -> torch give the same loss (raw audio
and precomputed features), and the eager reference step (AdamW on the projection + LoRA adapters) takes the
same steps as our jitted step. This is what makes the benchmark's step comparison like for like."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import torch
from flax import nnx

from musilingo_jax import prompts
from musilingo_jax.testing import torch_reference as tr
from musilingo_jax import train as trainlib
from musilingo_jax.models import layers, llama, mert
from musilingo_jax.models.musilingo import MusiLingo, MusiLingoConfig, causal_lm_loss

POOL = 7


def _exs(rng, vocab, rows=3, d_enc=None, n_audio=2):
  exs = []
  for i in range(rows):
    ex = {"before": rng.integers(3, vocab, 3 + i % 2), "after": rng.integers(3, vocab, 2 + i),
          "answer": rng.integers(3, vocab, 4 - i % 3)}
    if d_enc:
      ex["features"] = rng.standard_normal((n_audio, d_enc)).astype(np.float32)
    exs.append(ex)
  return exs


def _batch(exs, n_audio):
  return prompts.collate(exs, n_audio_tokens=n_audio, max_len=tr.sequence_length(exs, n_audio), bos_id=tr.BOS,
                         pad_id=tr.PAD)


def test_weights_copied_to_torch_give_our_loss_both_ways_in():
  cfg = MusiLingoConfig(encoder=mert.MERTConfig.tiny(), llm=llama.LlamaConfig.tiny(num_key_value_heads=2,
                                                                                     tie_word_embeddings=True),
                        pool_frames=POOL)
  ours = MusiLingo.random(cfg, rngs=nnx.Rngs(3))
  ref = tr.TorchMusiLingo.from_ours(ours)
  rng = np.random.default_rng(0)
  samples = 4000
  n_audio = math.ceil(cfg.encoder.feature_lengths(samples) / POOL)
  audio = rng.standard_normal((3, samples)).astype(np.float32)
  exs = _exs(rng, cfg.llm.vocab_size, n_audio=n_audio)
  batch = _batch(exs, n_audio)
  with torch.no_grad():
    want = float(tr.reference_loss(ref.hub, ref.lm, ref.proj, audio, exs, POOL))
    feats = tr.encode_audio(ref.hub, audio, POOL)
    want_f = float(tr.reference_loss(None, ref.lm, ref.proj, None, exs, POOL, features=feats))
  got = float(causal_lm_loss(ours({**jax.tree.map(jnp.asarray, batch), "audio": jnp.asarray(audio)}),
                             jnp.asarray(batch["labels"]))[0])
  got_f = float(causal_lm_loss(ours({**jax.tree.map(jnp.asarray, batch), "features": jnp.asarray(feats.numpy())}),
                               jnp.asarray(batch["labels"]))[0])
  np.testing.assert_allclose(got, want, rtol=1e-4)
  np.testing.assert_allclose(got_f, want_f, rtol=1e-4)
  np.testing.assert_allclose(want_f, want, rtol=1e-5)


def test_eager_reference_step_takes_our_steps_with_lora():
  lora = layers.LoRAConfig(rank=2, alpha=4.0, dropout=0.0, target_modules=("q_proj", "v_proj", "down_proj"))
  cfg = MusiLingoConfig(encoder=mert.MERTConfig.tiny(), llm=llama.LlamaConfig.tiny(), pool_frames=POOL, lora=lora)
  ours = MusiLingo.random(cfg, rngs=nnx.Rngs(params=5, dropout=6))
  for path, var in nnx.to_flat_state(nnx.state(ours, nnx.LoRAParam)):  # B away from zero: adapters matter
    if path[-1] == "lora_b":
      var.set_value(0.1 * jax.random.normal(jax.random.key(len(path)), var.get_value().shape))
  ref = tr.TorchMusiLingo.from_ours(ours, with_encoder=False)  # base kernels; adapters added next
  params = tr.add_lora(ref.lm, rank=lora.rank, alpha=lora.alpha, target_modules=lora.target_modules)
  assert tr.copy_lora_from_ours(ours, ref.lm) == 3 * cfg.llm.num_hidden_layers
  lr = 1e-2
  torch_step = tr.TorchTrainStep(ref, lora_params=params, lr=lr)

  graphdef, trainable, frozen = trainlib.split_model(ours, "projection+lora")
  assert torch_step.num_trainable() == sum(int(np.prod(x.shape)) for x in jax.tree.leaves(trainable))
  tx = trainlib.make_optimizer(schedule=lambda _: lr)
  step = jax.jit(trainlib.make_train_step(graphdef, tx))
  opt_state = tx.init(trainable)
  rng = np.random.default_rng(1)
  for s in range(2):
    exs = _exs(rng, cfg.llm.vocab_size, d_enc=cfg.encoder.hidden_size)
    batch = _batch(exs, 2)
    trainable, opt_state, m = step(trainable, opt_state, frozen, jax.tree.map(jnp.asarray, batch), jnp.asarray(s))
    want = torch_step(exs, features=np.stack([e["features"] for e in exs]))
    np.testing.assert_allclose(float(m["loss"]), want, rtol=1e-5)
  np.testing.assert_allclose(np.asarray(trainable["llama_proj"]["kernel"].get_value()),
                             ref.proj.weight.detach().numpy().T, rtol=1e-4, atol=1e-6)
  q = ref.lm.model.layers[1].self_attn.q_proj
  ours_q = trainable["llm"]["model"]["layers"][1]["self_attn"]["q_proj"]
  np.testing.assert_allclose(np.asarray(ours_q["lora_b"].get_value()), q.lora_b.detach().numpy(), rtol=1e-4, atol=1e-6)



def test_product_code_never_imports_the_testing_package():
  """musilingo_jax.testing (torch_reference imports torch and transformers) is for tests and benchmarks only:
  no module of musilingo_jax outside musilingo_jax/testing/ imports it, at module level or in a function."""
  import ast
  from pathlib import Path
  pkg = Path(__file__).resolve().parents[1] / "musilingo_jax"
  bad = []
  for path in sorted(pkg.rglob("*.py")):
    if path.parent.name == "testing" and path.parent.parent == pkg:
      continue
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
      names = ([a.name for a in node.names] if isinstance(node, ast.Import)
               else [f"{node.module}.{a.name}" for a in node.names] if isinstance(node, ast.ImportFrom) and node.module
               else [])
      if any(n == "musilingo_jax.testing" or n.startswith("musilingo_jax.testing.") or n.endswith(".torch_reference")
             for n in names):
        bad.append(f"{path.relative_to(pkg.parent)}:{node.lineno}")
  assert not bad, f"product modules import musilingo_jax.testing: {bad}"
