"""The real SmolLM2-135M-Instruct GGUF (Q4_1, LLaMA architecture) against transformers' own GGUF loader.

Our reader dequantizes with gguf.quants and undoes llama.cpp's q/k row permutation; transformers'
AutoModelForCausalLM.from_pretrained(dir, gguf_file=...) does the same independently. The weights must be
identical, the logits on a real prompt within 1e-4 (float32) and 20 greedy tokens the same.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from musilingo_jax import assets
from musilingo_jax.convert.hf import export_hf_tensors, import_pretrained
from musilingo_jax.models import llama
from musilingo_jax.tokenizer import Tokenizer, copy_tokenizer

PROMPT = ("<|im_start|>user\nDescribe the sound of a piano in one sentence.<|im_end|>\n"
          "<|im_start|>assistant\n")


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
  """On a small shared CPU, torch's thread pool spin-waits against JAX's: one thread is several times faster."""
  n = torch.get_num_threads()
  torch.set_num_threads(1)
  yield
  torch.set_num_threads(n)


@pytest.fixture(scope="module")
def gguf_path():
  try:
    return assets.smollm2_gguf_path()
  except assets.AssetUnavailable as e:
    pytest.skip(str(e))


@pytest.fixture(scope="module")
def ours(gguf_path):
  return import_pretrained(llama.HF_KIND, gguf_path, dtype="float32")


@pytest.fixture(scope="module")
def ref(gguf_path):
  try:
    model = transformers.AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name,
                                                              dtype=torch.float32)
  except ValueError as e:  # transformers needs `accelerate` to load a GGUF
    if "accelerate" in str(e):
      pytest.skip(f"transformers GGUF loading: {e}")
    raise
  return model.eval()


@pytest.fixture(scope="module")
def prompt_ids(gguf_path):
  ids = Tokenizer.from_gguf(gguf_path).encode(PROMPT)
  assert ids[0] == 1  # <|im_start|> is one special token
  return ids


def test_config(ours):
  _, cfg = ours
  assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size) == (30, 576, 1536)
  assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (9, 3, 64)
  assert cfg.vocab_size == 49152 and cfg.tie_word_embeddings and cfg.rope_theta == 100000.0


def test_weights_equal_transformers(ours, ref):
  model, _ = ours
  theirs = ref.state_dict()
  hf = export_hf_tensors(model, llama.HF_KEY_RULES)
  assert set(hf) == set(theirs) - {"lm_head.weight"}  # tied: transformers lists the shared tensor twice
  for k, v in hf.items():
    assert np.array_equal(v, theirs[k].numpy()), k  # max diff 0


def test_logits_on_sentence(ours, ref, prompt_ids):
  model, _ = ours
  graphdef, state = nnx.split(model)
  logits = jax.jit(lambda s, ids: nnx.merge(graphdef, s)(ids)[0])(state, jnp.asarray([prompt_ids], jnp.int32))
  with torch.no_grad():
    theirs = ref(torch.tensor([prompt_ids])).logits.numpy()
  np.testing.assert_allclose(np.asarray(logits), theirs, atol=1e-4)


def test_greedy_tokens(ours, ref, prompt_ids):
  """One jitted KV-cache step (T = 1) feeds the prompt and makes 20 greedy tokens: a single compile."""
  model, _ = ours
  graphdef, state = nnx.split(model)

  @jax.jit
  def step(state, token, cache, index):  # token [1, 1]
    logits, cache = nnx.merge(graphdef, state)(token, cache=cache, cache_index=index)
    return logits[0, -1], cache

  n, n_new = len(prompt_ids), 20
  cache = model.init_cache(1, n + n_new)
  tokens = []
  for i in range(n + n_new - 1):
    token = prompt_ids[i] if i < n else tokens[-1]
    logits, cache = step(state, jnp.asarray([[token]], jnp.int32), cache, jnp.int32(i))
    if i >= n - 1:
      tokens.append(int(np.argmax(logits)))

  with torch.no_grad():
    seq = torch.tensor([prompt_ids])
    for _ in range(n_new):  # plain greedy, no stopping rule on either side
      seq = torch.cat([seq, ref(seq).logits[:, -1:].argmax(-1)], dim=1)
  assert tokens == seq[0, n:].tolist()
  text = Tokenizer.from_gguf(assets.smollm2_gguf_path()).decode(tokens)
  assert len(text.split()) >= 8, text  # fluent English, not noise


def test_gguf_tokenizer_carried_along(tmp_path, gguf_path, prompt_ids):
  """copy_tokenizer (convert_hf.py's OUT/tokenizer) copies a GGUF's own tokenizer; it reads back to the same ids."""
  assert copy_tokenizer(gguf_path, tmp_path / "tokenizer") is not None
  tok = Tokenizer.from_dir(tmp_path / "tokenizer")
  assert tok.encode(PROMPT) == prompt_ids and tok.eos_id == 2
