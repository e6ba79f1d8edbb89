"""Generation: parity with transformers' greedy generate, cache vs full forward, padding, stops, sampling."""

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

from musilingo_jax import generate as gen, prompts
from musilingo_jax.convert.hf import load_hf_tensors
from musilingo_jax.models import llama
from musilingo_jax.models.llama import LlamaConfig
from musilingo_jax.models.mert import MERTConfig
from musilingo_jax.models.musilingo import MusiLingo, MusiLingoConfig

N_AUDIO, D_ENC = 2, 32
NO_STOP = dict(stop_sequences=(), eos_ids=())
N_NEW = 32  # one decode length everywhere: fewer compilations


@functools.cache
def models():
  """(ours: a tiny MusiLingo whose LLM carries the HF model's weights, hf: LlamaForCausalLM)."""
  cfg = LlamaConfig.tiny(num_key_value_heads=2, max_position_embeddings=128)
  torch.manual_seed(0)
  hc = transformers.LlamaConfig(**{**cfg.to_hf_config(), "initializer_range": 0.1})
  hc._attn_implementation = "eager"
  hf = transformers.LlamaForCausalLM(hc).eval()
  hf.generation_config.eos_token_id = None
  hf.generation_config.pad_token_id = 0
  # Built abstractly and filled from numpy: eager random init compiles one op per shape (slow on 2 cores).
  # The encoder is never run (prompts carry features); the LLM gets the HF weights below.
  abstract = nnx.eval_shape(lambda: MusiLingo.random(MusiLingoConfig(encoder=MERTConfig.tiny(), llm=cfg, pool_frames=4),
                                              rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(abstract)
  rng = np.random.default_rng(0)
  state = jax.tree.map(lambda x: jnp.asarray((0.2 * rng.normal(size=x.shape)).astype(x.dtype)), state)
  ours = nnx.merge(graphdef, state)
  tensors = {k: v.detach().numpy() for k, v in hf.state_dict().items()}
  load_hf_tensors(ours.llm, llama.HF_KEY_RULES, tensors, ignore=llama.hf_ignore_keys(cfg))
  return ours, hf


def prompt(lengths=((3, 5), (6, 4)), seed=0) -> dict:
  """A left-padded batch of prompts (random text ids, N_AUDIO audio slots, random features)."""
  rng = np.random.default_rng(seed)
  enc = [{"before": rng.integers(3, 101, nb), "after": rng.integers(3, 101, na)} for nb, na in lengths]
  batch = prompts.collate_prompts(enc, n_audio_tokens=N_AUDIO, bos_id=1, pad_id=0)
  batch["features"] = rng.normal(size=(len(lengths), N_AUDIO, D_ENC)).astype(np.float32)
  return batch


def rows(batch: dict, i: int) -> dict:
  """Row i alone, its left padding removed."""
  keep = batch["attention_mask"][i].astype(bool)
  one = {k: v[i:i + 1] for k, v in batch.items()}
  for k in ("input_ids", "attention_mask", "positions"):
    one[k] = one[k][:, keep]
  one["audio_start"] = one["audio_start"] - (~keep).sum()
  return one


def test_greedy_matches_transformers_generate():
  ours, hf = models()
  batch = rows(prompt(), 1)  # the longer row alone (shares its compilation with the padding test)
  embeds = np.asarray(nnx.jit(lambda m, b: m.input_embeddings(b))(ours, {k: jnp.asarray(v) for k, v in batch.items()}))
  tokens, lengths, _ = gen.generate_ids(ours, batch, max_new_tokens=N_NEW, greedy=True, **NO_STOP)
  with torch.no_grad():
    ref = hf.generate(inputs_embeds=torch.tensor(embeds), attention_mask=torch.tensor(batch["attention_mask"]),
                      max_new_tokens=N_NEW, do_sample=False)
  assert lengths.tolist() == [N_NEW]
  assert len(set(tokens[0].tolist())) > 3  # a non-degenerate sequence
  np.testing.assert_array_equal(tokens, ref.numpy())


def test_cached_decode_logits_equal_full_forward():
  ours, _ = models()
  batch = prompt()  # rows of different lengths: row 0 is left-padded
  n = 8
  tokens, _, step_logits = gen.generate_ids(ours, batch, max_new_tokens=n, greedy=True, return_logits=True, **NO_STOP)
  # Full, uncached forward over prompt + generated tokens, positions continuing each row's own count.
  b = {k: jnp.asarray(v) for k, v in batch.items()}
  embeds = jnp.concatenate([ours.input_embeddings(b), ours.llm.embed(jnp.asarray(tokens))], axis=1)
  mask = np.concatenate([batch["attention_mask"], np.ones_like(tokens)], axis=1)
  positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
  full, _ = ours.llm(inputs_embeds=embeds, attention_mask=jnp.asarray(mask), positions=jnp.asarray(positions))
  L = batch["input_ids"].shape[1]
  np.testing.assert_allclose(step_logits, np.asarray(full)[:, L - 1:L - 1 + n], atol=1e-4, rtol=0)
  np.testing.assert_array_equal(tokens, step_logits.argmax(-1))


def test_left_padded_batch_equals_rows_alone():
  ours, _ = models()
  batch = prompt()
  assert batch["attention_mask"][0, 0] == 0  # row 0 is left-padded
  together, _, _ = gen.generate_ids(ours, batch, max_new_tokens=N_NEW, greedy=True, **NO_STOP)
  for i in range(2):
    alone, _, _ = gen.generate_ids(ours, rows(batch, i), max_new_tokens=N_NEW, greedy=True, **NO_STOP)
    np.testing.assert_array_equal(together[i], alone[0])


def test_stop_hit_on_id_sequences():
  table, lengths = gen.stop_table(gen.REFERENCE_STOP_SEQUENCES)
  assert table[:2, -2:].tolist() == [[-1, 835], [2277, 29937]] and lengths[:2].tolist() == [1, 2]
  assert (table[:, :-2] == -1).all() and (table[2:] == -1).all()
  seqs = np.array([[5, 6, 835, 0], [5, 2277, 29937, 0], [29937, 2277, 7, 0], [2277, 5, 29937, 0]])
  hits = [np.asarray(gen.stop_hit(jnp.asarray(seqs), jnp.int32(n), table, lengths)).tolist() for n in range(3)]
  assert hits == [[False, False, False, False], [False, False, False, False], [True, True, False, False]]
  # A 2-token sequence cannot match at index 0 (nothing before it); a 1-token one can.
  first = np.array([[29937, 0], [835, 0]])
  assert np.asarray(gen.stop_hit(jnp.asarray(first), jnp.int32(0), table, lengths)).tolist() == [False, True]
  empty_table, empty_lengths = gen.stop_table(())
  assert not np.asarray(gen.stop_hit(jnp.asarray(seqs), jnp.int32(2), empty_table, empty_lengths)).any()


def _first_end(row, seq) -> int:
  """Length of row up to and including the first occurrence of seq."""
  row, k = list(row), len(seq)
  return next(i + k for i in range(len(row) - k + 1) if tuple(row[i:i + k]) == tuple(seq))


def test_stop_sequences_and_eos_stop_generation():
  ours, _ = models()
  batch = prompt()
  free, _, _ = gen.generate_ids(ours, batch, max_new_tokens=N_NEW, greedy=True, **NO_STOP)
  # Stop on a 2-token sequence that row 0 produces at steps 5-6; row 1 stops wherever it produces it, if ever.
  seq = tuple(free[0, 5:7].tolist())
  tokens, lengths, _ = gen.generate_ids(ours, batch, max_new_tokens=N_NEW, greedy=True, stop_sequences=(seq,),
                                        eos_ids=(), pad_id=0)
  for i in range(2):
    want = _first_end(free[i], seq) if any(tuple(free[i, j:j + 2]) == seq for j in range(N_NEW - 1)) else N_NEW
    assert lengths[i] == want
    np.testing.assert_array_equal(tokens[i, :want], free[i, :want])
    assert (tokens[i, want:] == 0).all()  # padded after the stop
  # EOS stops too (kept in the output, as the reference keeps it).
  eos = int(free[1, 3])
  tokens, lengths, _ = gen.generate_ids(ours, batch, max_new_tokens=N_NEW, greedy=True, stop_sequences=(),
                                        eos_ids=(eos,))
  assert lengths[1] == _first_end(free[1], (eos,)) and tokens[1, lengths[1] - 1] == eos


class WordTokenizer:
  """id i <-> "w{i}"; a few ids spell template words. bos 1, eos 2, unk 0, pad = eos."""
  bos_id, eos_id, pad_id, unk_id = 1, 2, 2, 0
  words = {0: "<unk>", 1: "<s>", 2: "</s>", 3: "###", 4: "Assistant:", 5: "##", 6: "#", 7: "x"}

  def encode(self, text):
    inv = {w: i for i, w in self.words.items()}
    out = []
    for w in text.split():
      glued = w.endswith("###") and w != "###"  # "x###" -> x, ##, # (as SentencePiece spells it)
      w = w[:-3] if glued else w
      out.append(inv[w] if w in inv else int(w[1:]))
      out += [5, 6] if glued else []
    return out

  def decode(self, ids, skip_special_tokens=True):
    words = [self.words.get(i, f"w{i}") for i in ids if not (skip_special_tokens and i in (0, 1, 2))]
    return " ".join(words).replace("## #", "###")


def test_stop_sequences_for_tokenizers():
  assert gen.stop_sequences_for(WordTokenizer()) == ((3,), (5, 6))
  from musilingo_jax import assets
  from musilingo_jax.tokenizer import Tokenizer
  try:
    tok = Tokenizer.from_dir(assets.llama_tokenizer_dir())
  except assets.AssetUnavailable as e:
    pytest.skip(str(e))
  assert gen.stop_sequences_for(tok) == gen.REFERENCE_STOP_SEQUENCES


def test_postprocess_as_reference():
  tok = WordTokenizer()
  raw, text = gen.postprocess([0, 1, 10, 4, 11, 12, 5, 6, 13, 2], tok)
  assert raw == "w10 Assistant: w11 w12 ### w13 </s>"
  assert text == "w11 w12"
  assert gen.postprocess([11, 2], tok) == ("w11 </s>", "w11")
  assert gen.postprocess([11, 2], tok, keep_special_text=True)[1] == "w11 </s>"


def _llama_tokenizer():
  from musilingo_jax import assets
  from musilingo_jax.tokenizer import Tokenizer
  try:
    return Tokenizer.from_dir(assets.llama_tokenizer_dir())
  except assets.AssetUnavailable as e:
    pytest.skip(str(e))


# What the reference's qa.py answer() returns for generate() output [start] + ids, computed with the real
# LLaMA tokenizer under transformers 4.28.0 (the reference's pin; slow LlamaTokenizer, pad = eos).
# (ids as text, start 1 -> answer, start 0 -> answer); ids: [0] <unk>, [1] <s>, [2] </s>, 835 / 2277 29937 "###".
REFERENCE_ANSWERS = [
    ([739, 338, 263, 11210, 29889, 2], "It is a guitar.</s>", "It is a guitar.</s>"),
    ([0, 739, 338, 263, 11210, 29889, 2], "<unk> It is a guitar.</s>", "<unk> It is a guitar.</s>"),
    ([1, 319, 5232, 11914, 8424, 835], "<s>A slow piano piece", "A slow piano piece"),
    ([0, 1, 29258, 29892, 5172, 11413, 2], "<unk><s> Bright, fast tempo</s>", "<unk><s> Bright, fast tempo</s>"),
    ([4007, 22137, 29901, 263, 11914, 29892, 306, 1348, 2], "a piano, I think</s>", "a piano, I think</s>"),
    ([512, 315, 4655, 2277, 29937], "In C major", "In C major"),
    ([21772, 2, 29871, 769, 901, 835], "Sad</s> then more", "Sad</s> then more"),
]


def test_reference_answer_is_what_the_reference_scores():
  tok = _llama_tokenizer()
  for ids, start1, start0 in REFERENCE_ANSWERS:
    assert gen.reference_answer(ids, tok) == start1, ids
    assert gen.reference_answer(ids, tok, start_id=0) == start0, ids
  # The clean answer (corrected metrics) drops a leading <unk>/<s> and every special token.
  assert gen.postprocess(REFERENCE_ANSWERS[0][0], tok)[1] == "It is a guitar."
  assert gen.postprocess(REFERENCE_ANSWERS[3][0], tok)[1] == "Bright, fast tempo"
  assert gen.postprocess(REFERENCE_ANSWERS[2][0], tok)[1] == "A slow piano piece"


def test_reference_decode_follows_the_tokenizer_files(tmp_path):
  """Old Vicuna-v0 files name </s> for BOS, EOS and UNK: then only "</s>" is special to transformers 4.28
  and <unk>/<s> decode through SentencePiece; an added token is its own piece, joined by spaces."""
  import shutil
  from musilingo_jax.tokenizer import Tokenizer
  src = _llama_tokenizer()
  v0 = tmp_path / "v0"
  v0.mkdir()
  (v0 / "tokenizer.model").write_bytes(src._sp.serialized_model_proto())
  names = json.dumps({"bos_token": "</s>", "eos_token": "</s>", "unk_token": "</s>"})
  (v0 / "special_tokens_map.json").write_text(names)
  (v0 / "tokenizer_config.json").write_text(names)
  tok = Tokenizer.from_dir(v0)
  # Expected strings: transformers 4.28.0 LlamaTokenizer.decode on the same files.
  assert gen.reference_decode([0, 1, 29258, 29892, 5172, 11413, 2], tok) == "  \u2047  Bright, fast tempo</s>"
  assert gen.reference_decode([1, 319, 5232, 11914, 8424, 2], tok) == " A slow piano piece</s>"
  added = tmp_path / "added"
  shutil.copytree(v0, added)
  names = json.dumps({"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"})
  (added / "special_tokens_map.json").write_text(names)
  (added / "tokenizer_config.json").write_text(names)
  (added / "added_tokens.json").write_text(json.dumps({"[PAD]": 32000}))
  tok = Tokenizer.from_dir(added)
  assert gen.reference_decode([739, 338, 32000, 263, 4023, 29886, 2], tok) == "It is [PAD]  a harp</s>"


def test_generate_end_to_end_text():
  ours, _ = models()
  batch = prompt()
  free, _, _ = gen.generate_ids(ours, batch, max_new_tokens=N_NEW, greedy=True, **NO_STOP)
  stop = int(free[0, 4])
  results = gen.generate(ours, batch, tokenizer=WordTokenizer(), max_new_tokens=N_NEW, greedy=True,
                         stop_sequences=((stop,),), eos_ids=())
  assert results[0].token_ids == free[0, :5].tolist()
  assert (results[0].raw_text, results[0].text) == gen.postprocess(free[0, :5], WordTokenizer())
  assert results[0].reference_text == gen.reference_answer(free[0, :5], WordTokenizer())


def test_sampling_is_seeded():
  ours, _ = models()
  batch = prompt()
  kw = dict(max_new_tokens=N_NEW, temperature=5.0, top_p=1.0, top_k=None, **NO_STOP)
  a = gen.generate_ids(ours, batch, seed=0, **kw)[0]
  b = gen.generate_ids(ours, batch, seed=0, **kw)[0]
  c = gen.generate_ids(ours, batch, seed=1, **kw)[0]
  np.testing.assert_array_equal(a, b)
  assert (a != c).any()
  # The decode loop compiles once per shape: other seeds, temperatures and stop ids reuse it.
  size = gen._generate_jit._cache_size()
  gen.generate_ids(ours, batch, seed=7, **{**kw, "temperature": 2.0, "top_p": 0.9})
  assert gen._generate_jit._cache_size() == size


def test_top_p_keeps_smallest_nucleus():
  probs = np.array([[0.05, 0.45, 0.15, 0.35], [0.7, 0.12, 0.1, 0.08]], np.float32)
  logits = jnp.log(jnp.asarray(probs))
  got = lambda p, k=None: np.asarray(gen.top_p_mask(logits, p, top_k=k)).tolist()  # noqa: E731
  assert got(0.5) == [[False, True, False, True], [True, False, False, False]]  # 0.45 < 0.5 -> add 0.35
  assert got(0.4) == [[False, True, False, False], [True, False, False, False]]
  assert got(0.9) == [[False, True, True, True], [True, True, True, False]]  # 0.8 < 0.9; 0.92 is not
  assert got(1.0, k=2)[0] == [False, True, False, True]
  # Same set as transformers' warpers (temperature, then top-k, then top-p) on random distributions.
  rng = np.random.default_rng(0)
  x = rng.normal(size=(6, 40)).astype(np.float32) * 3
  for temp, k, p in ((1.0, None, 0.5), (0.1, 50, 0.5), (0.7, 5, 0.9), (2.0, None, 0.3)):
    scores = torch.tensor(x) / temp
    if k is not None:
      scores = TopKLogitsWarper(k)(None, scores)
    ref = torch.isfinite(TopPLogitsWarper(p)(None, scores)).numpy()
    np.testing.assert_array_equal(np.asarray(gen.top_p_mask(jnp.asarray(x), p, top_k=k, temperature=temp)), ref)


def test_chat_prompt_appends_turns():
  chat = gen.Chat(None, WordTokenizer(), features=np.zeros((N_AUDIO, D_ENC), np.float32))
  assert chat.prompt_segments("q1") == ("###Human: <Audio>", "</Audio> q1 ###Assistant: ")
  chat.history += [("q1", "a1"), ("q2", "a2")]
  assert chat.prompt_segments("q3")[1] == ("</Audio> q1 ###Assistant: a1###Human: q2 ###Assistant: "
                                           "a2###Human: q3 ###Assistant: ")


def test_rejects_right_padded_prompts():
  ours, _ = models()
  batch = prompt()
  batch = {k: (v[:, ::-1].copy() if k == "attention_mask" else v) for k, v in batch.items()}
  with pytest.raises(ValueError, match="left-padded"):
    gen.generate_ids(ours, batch, max_new_tokens=4, greedy=True)


def test_streaming_steps_are_the_decode_ids():
  """on_step sees every decode step in order with the ids the call returns (the same loop), greedy or sampled;
  generate's on_tokens grows each row to its token_ids."""
  ours, _ = models()
  batch = prompt()
  greedy = None
  for kw in (dict(greedy=True), dict(temperature=5.0, top_p=1.0, top_k=None, seed=3)):
    plain, lengths, _ = gen.generate_ids(ours, batch, max_new_tokens=N_NEW, **kw, **NO_STOP)
    steps = []
    streamed, lengths2, _ = gen.generate_ids(ours, batch, max_new_tokens=N_NEW, **kw, **NO_STOP,
                                             on_step=lambda n, t, live: steps.append((n, t.copy(), live.copy())))
    np.testing.assert_array_equal(plain, streamed)
    np.testing.assert_array_equal(lengths, lengths2)
    assert [n for n, _, _ in steps] == list(range(N_NEW))
    np.testing.assert_array_equal(np.stack([t for _, t, _ in steps], axis=1), plain)
    greedy = plain if greedy is None else greedy
  stop = int(greedy[0, 4])  # row 0 stops after (at most) 5 tokens
  seen = []
  results = gen.generate(ours, batch, tokenizer=WordTokenizer(), max_new_tokens=N_NEW, greedy=True,
                         stop_sequences=((stop,),), eos_ids=(), on_tokens=lambda rows: seen.append(
                             [list(r) for r in rows]))
  final = [r.token_ids for r in results]
  assert seen[-1] == final and len(final[0]) <= 5
  for k, rows in enumerate(seen):  # one id more per step while a row decodes
    assert [len(r) for r in rows] == [min(k + 1, len(f)) for f in final]


def test_answer_so_far_holds_back_what_may_change():
  tok = WordTokenizer()
  assert gen.answer_so_far([10, 11], tok) == "w10 w11"
  assert gen.answer_so_far([10, 11, 6], tok) == "w10 w11"   # "#": maybe the start of "###"
  assert gen.answer_so_far([10, 5], tok) == "w10"           # "##"
  assert gen.answer_so_far([10, 3, 12], tok) == "w10"       # "###" ends the answer
  assert gen.answer_so_far([10, 7], tok) == "w10 x"
  assert gen.answer_so_far([], tok) == ""
  final = gen.GenerationResult(token_ids=[10, 11, 12, 6], text="w10 w11 w12 #", raw_text="w10 w11 w12 #")

  def run(on_tokens):
    for ids in ([10], [10, 11], [10, 11, 6], [10, 11, 12], [10, 11, 12, 6]):
      on_tokens(ids)
    return final
  stream = gen.Stream(run, tok)
  # One text per change, whatever the timing; held-back text comes with the final answer.
  assert list(stream) == ["w10", "w10 w11", "w10 w11 w12", "w10 w11 w12 #"] and stream.result is final
  # The last text is the answer even when the ids' text was held back; the pieces join to it.
  held = gen.GenerationResult(token_ids=[10, 11, 6], text="w10 w11 #", raw_text="w10 w11 #")
  run = lambda on_tokens: (on_tokens([10]), on_tokens([10, 11, 6]), held)[-1]  # noqa: E731
  assert list(gen.Stream(run, tok))[-1] == held.text
  assert "".join(gen.Stream(run, tok).pieces()) == held.text
  with pytest.raises(ZeroDivisionError):
    list(gen.Stream(lambda on_tokens: 1 / 0, tok))
