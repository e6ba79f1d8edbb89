"""Generation for MusiLingo: one jitted prefill, then a KV-cache decode loop inside `jax.lax.while_loop`.

The reference (MusiLingo's qa.py; docs/reference_details.md) samples with temperature 0.1, top_p 0.5, one beam, at
most 300 new tokens, repetition penalty 1.0 (a no-op, so not implemented), and transformers' default top_k 50
(it rarely binds at T = 0.1, top_p 0.5). It stops when the output ends with [835] or [2277, 29937] (both
spell "###" in the LLaMA vocabulary) or on EOS. Two answer strings come out of each row: `text` (clean:
drop a leading <unk>/<s>, decode without special tokens, keep the text before the first "###", after the
last "Assistant:", strip) and `reference_text` (exactly what the reference scores: `reference_answer`).

Layout of one call (prompts from `prompts.collate_prompts`: left-padded, positions = cumsum(mask) - 1):
  slots 0..L-1          the prompt (pads masked), written by one prefill call;
  slots L..L+N-1        the N = max_new_tokens generated tokens, one per loop step;
  position of new i     = the row's last prompt position + 1 + i (each row continues its own count).
The cache holds L + N slots; the loop stops as soon as every row has hit a stop sequence or EOS, and a
finished row feeds pad tokens that nothing reads. One compilation per (batch, prompt length, N, greedy,
top_k, streaming or not); temperature, top_p, stop ids and the seed are traced.

Streaming (`on_step` / `on_tokens`, `Chat.ask_stream`, `Stream`) is the same loop: with `stream=True` each step
also hands its tokens to the host (`jax.debug.callback`, once per step, with the tokens replicated), so the
ids are those of the call without streaming; the answer text shown while decoding is `answer_so_far`.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import queue
import threading
from typing import Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from musilingo_jax import prompts
from musilingo_jax.data import audio as audio_lib
from musilingo_jax.models.llama import Llama
from musilingo_jax.models.musilingo import MusiLingo

# The reference's stop ids (LLaMA vocabulary): "###" after a space, and "###" glued to a word.
REFERENCE_STOP_SEQUENCES: tuple[tuple[int, ...], ...] = ((835,), (2277, 29937))
STOP_TEXT = prompts.STOP_TEXT
DEFAULT_TOP_K = 50  # transformers' GenerationConfig default, which the reference ran with
_BATCH_KEYS = ("input_ids", "attention_mask", "positions", "audio_start", "audio", "features", "inputs_embeds")


@dataclasses.dataclass(frozen=True)
class GenerationResult:
  token_ids: list[int]  # generated ids, up to and including the stop sequence / EOS that ended the row
  text: str             # the answer, post-processed as the reference
  raw_text: str         # the decoded ids before post-processing (special tokens verbatim)
  reference_text: str = ""  # the answer string the reference computes from these ids (`reference_answer`)


# ---- stop sequences --------------------------------------------------------------------------------

def stop_sequences_for(tokenizer, text: str = STOP_TEXT) -> tuple[tuple[int, ...], ...]:
  """The id sequences that spell `text` at the end of generated output, for this tokenizer.

  Encodes `text` alone, after a word ("x###") and after a word and a space ("x ###"), and keeps the ids
  after the context's own ids. For the LLaMA SentencePiece vocabulary this gives the reference's
  ((835,), (2277, 29937)); a byte-level BPE vocabulary gives its own spellings.
  """
  found: list[tuple[int, ...]] = []
  for context in ("", "x", "x "):
    prefix = list(tokenizer.encode(context)) if context else []
    ids = list(tokenizer.encode(context + text))
    if ids[:len(prefix)] != prefix or len(ids) == len(prefix):
      continue  # the text merged into the context: no clean suffix here
    seq = tuple(int(i) for i in ids[len(prefix):])
    if seq not in found:
      found.append(seq)
  if not found:
    raise ValueError(f"could not derive stop ids for {text!r} from tokenizer {tokenizer!r}")
  return tuple(found)


def stop_table(stop_sequences: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray]:
  """Stop sequences -> (table [K, M] int32, right-aligned, -1 = any token; lengths [K] int32).

  K and M are padded up to multiples of 4 (padding rows have a length no step reaches), so changing the
  stop ids rarely changes the compiled shapes.
  """
  seqs = [tuple(int(i) for i in s) for s in stop_sequences]
  if any(len(s) == 0 for s in seqs):
    raise ValueError(f"empty stop sequence in {stop_sequences!r}")
  k, m = _round_up(len(seqs)), _round_up(max((len(s) for s in seqs), default=1))
  table = np.full((k, m), -1, np.int32)
  lengths = np.full((k,), np.iinfo(np.int32).max, np.int32)
  for i, s in enumerate(seqs):
    table[i, m - len(s):] = s
    lengths[i] = len(s)
  return table, lengths


def _round_up(n: int, multiple: int = 4) -> int:
  return max(multiple, -(-n // multiple) * multiple)


def stop_hit(tokens: jax.Array, n: jax.Array, table: jax.Array, lengths: jax.Array) -> jax.Array:
  """Whether each row of tokens [B, N] (generated so far) ends with a stop sequence at index n: [B] bool."""
  m = table.shape[1]
  idx = n - m + 1 + jnp.arange(m)  # [M]
  window = jnp.take(tokens, jnp.clip(idx, 0, tokens.shape[1] - 1), axis=1)  # [B, M]
  ok = (table[None] < 0) | (window[:, None, :] == table[None])  # [B, K, M]
  match = ok.all(-1) & (lengths <= n + 1)[None]  # [B, K]
  return match.any(-1)


# ---- sampling --------------------------------------------------------------------------------------

def _candidates(logits: jax.Array, temperature, top_k: int | None, top_p) -> tuple[jax.Array, jax.Array]:
  """transformers' warpers in their order (temperature, top-k, top-p) over logits [B, V].

  Returns (filtered logits [B, K] sorted descending, -inf where removed; their token ids [B, K]), with
  K = top_k (or V). Top-p keeps a token iff the probability mass ranked above it is < top_p: the smallest
  set whose mass reaches top_p (the most likely token always stays).
  """
  logits = logits.astype(jnp.float32) / temperature
  k = logits.shape[-1] if top_k is None else min(top_k, logits.shape[-1])
  values, ids = jax.lax.top_k(logits, k)  # [B, K] descending
  probs = jax.nn.softmax(values, axis=-1)
  mass_above = jnp.cumsum(probs, axis=-1) - probs
  keep = (mass_above < top_p).at[:, 0].set(True)
  return jnp.where(keep, values, -jnp.inf), ids


def top_p_mask(logits: jax.Array, top_p: float, top_k: int | None = None, temperature: float = 1.0) -> jax.Array:
  """[B, V] bool: the tokens that sampling may pick (for tests and inspection)."""
  values, ids = _candidates(logits, temperature, top_k, top_p)
  mask = jnp.zeros(logits.shape, bool)
  return jax.vmap(lambda m, i, v: m.at[i].set(v > -jnp.inf))(mask, ids, values)


def _choose(logits: jax.Array, key: jax.Array, *, greedy: bool, temperature, top_k, top_p) -> jax.Array:
  if greedy:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  values, ids = _candidates(logits, temperature, top_k, top_p)
  pick = jax.random.categorical(key, values, axis=-1)  # [B]
  return jnp.take_along_axis(ids, pick[:, None], axis=-1)[:, 0].astype(jnp.int32)


# ---- the jitted prefill + decode -------------------------------------------------------------------

def _prompt_embeddings(model, batch: dict) -> tuple[Llama, jax.Array]:
  if isinstance(model, MusiLingo):
    return model.llm, model.input_embeddings(batch)
  if "inputs_embeds" in batch:
    return model, batch["inputs_embeds"]
  return model, model.embed(batch["input_ids"])


# Streaming: the host functions that receive each step's tokens, by the id the jitted loop carries (traced, so a
# new receiver does not recompile). One module-level callback looks the receiver up.
_STEP_SINKS: dict[int, Callable] = {}
_SINK_IDS = itertools.count(1)


def _to_sink(sink, n, tokens, live) -> None:
  """Host side of the loop's per-step callback: sink id, step n, tokens [B], live [B] (rows still decoding
  before this step, whose token is real)."""
  receiver = _STEP_SINKS.get(int(sink))
  if receiver is not None:
    receiver(int(n), np.asarray(tokens), np.asarray(live))


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "greedy", "top_k", "return_logits",
                                             "stream"))
def _generate_jit(state, batch, key, temperature, top_p, table, lengths, eos_ids, pad_id, sink, *, graphdef,
                  max_new_tokens: int, greedy: bool, top_k: int | None, return_logits: bool, stream: bool = False):
  llm, embeds = _prompt_embeddings(nnx.merge(graphdef, state), batch)
  mask, positions = batch["attention_mask"], batch["positions"]
  B, L = mask.shape
  N = max_new_tokens
  # Every generated slot is valid; causality keeps a query from seeing later slots.
  kv_mask = jnp.concatenate([mask.astype(jnp.int32), jnp.ones((B, N), jnp.int32)], axis=1)  # [B, L + N]
  cache = llm.init_cache(B, L + N)
  h, cache = llm.final_hidden(inputs_embeds=embeds, attention_mask=kv_mask, positions=positions, cache=cache,
                              cache_index=0)
  logits = llm.lm_logits(h[:, -1:])[:, 0]  # [B, V]: the last prompt slot is real (left padding)
  next_pos = positions[:, -1] + 1  # [B]
  choose = functools.partial(_choose, greedy=greedy, temperature=temperature, top_k=top_k, top_p=top_p)

  def ended(tokens, tok, n):
    return stop_hit(tokens, n, table, lengths) | (tok[:, None] == eos_ids[None]).any(-1)

  key, sub = jax.random.split(key)
  tok = choose(logits, sub)
  tokens = jnp.full((B, N), pad_id, jnp.int32).at[:, 0].set(tok)
  done = ended(tokens, tok, 0)
  if stream:
    jax.debug.callback(_to_sink, sink, jnp.int32(0), tok, jnp.ones((B,), bool))
  state0 = dict(n=jnp.int32(1), tokens=tokens, done=done, n_out=jnp.where(done, 1, N).astype(jnp.int32),
                cache=cache, key=key)
  if return_logits:
    state0["logits"] = jnp.zeros((B, N, logits.shape[-1]), jnp.float32).at[:, 0].set(logits)

  def cond(s):
    return (s["n"] < N) & ~s["done"].all()

  def body(s):
    n = s["n"]
    prev = jax.lax.dynamic_index_in_dim(s["tokens"], n - 1, axis=1, keepdims=True)  # [B, 1]
    h, cache = llm.final_hidden(inputs_embeds=llm.embed(prev), attention_mask=kv_mask,
                                positions=(next_pos + n - 1)[:, None], cache=s["cache"], cache_index=L + n - 1)
    logits = llm.lm_logits(h)[:, 0]
    key, sub = jax.random.split(s["key"])
    tok = jnp.where(s["done"], pad_id, choose(logits, sub))
    if stream:
      jax.debug.callback(_to_sink, sink, n, tok, ~s["done"])
    tokens = jax.lax.dynamic_update_index_in_dim(s["tokens"], tok, n, axis=1)
    hit = ~s["done"] & ended(tokens, tok, n)
    out = dict(n=n + 1, tokens=tokens, done=s["done"] | hit, n_out=jnp.where(hit, n + 1, s["n_out"]),
               cache=cache, key=key)
    if return_logits:
      out["logits"] = jax.lax.dynamic_update_index_in_dim(s["logits"], logits, n, axis=1)
    return out

  s = jax.lax.while_loop(cond, body, state0)
  return s["tokens"], s["n_out"], s.get("logits")


def generate_ids(model: MusiLingo | Llama, batch: dict, *, max_new_tokens: int = 300, greedy: bool = False,
                 temperature: float = 0.1, top_p: float = 0.5, top_k: int | None = DEFAULT_TOP_K,
                 stop_sequences: Sequence[Sequence[int]] = REFERENCE_STOP_SEQUENCES,
                 eos_ids: Sequence[int] = (2,), pad_id: int = 0, seed: int = 0,
                 return_logits: bool = False,
                 on_step: Callable[[int, np.ndarray, np.ndarray], None] | None = None,
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
  """Token-level generation: (tokens [B, N] int32 padded with pad_id, lengths [B], step logits [B, N, V] or None).

  `model` is a MusiLingo (batch from `prompts.collate_prompts` plus "features" or "audio") or a bare Llama
  (batch with "input_ids" or "inputs_embeds", plus "attention_mask" and "positions"). Prompts must be
  left-padded: every row's last prompt slot is a real token. Row i's output is tokens[i, :lengths[i]].

  on_step(n, tokens [B] int32, live [B] bool), when given, is called on the host while the loop runs, once per
  decode step n = 0, 1, ... in order: row i's token of step n is real iff live[i] (a finished row's is pad).
  It runs on a JAX callback thread: keep it short (hand the ids to a queue); an exception in it fails the call.
  The ids are the same as without it (the loop is the same; it compiles once more, streaming being static).
  """
  if max_new_tokens < 1:
    raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
  if not greedy and not (temperature > 0 and 0 < top_p <= 1):
    raise ValueError(f"sampling needs temperature > 0 and 0 < top_p <= 1 (got {temperature}, {top_p}); "
                     "use greedy=True for argmax decoding")
  mask = np.asarray(batch["attention_mask"])
  if not mask[:, -1].all():
    raise ValueError("generation prompts must be left-padded (attention_mask[:, -1] all 1): "
                     "build them with prompts.collate_prompts")
  arrays = {k: jnp.asarray(batch[k]) for k in _BATCH_KEYS if k in batch}
  if "positions" not in arrays:
    arrays["positions"] = jnp.asarray(np.maximum(np.cumsum(mask, axis=1) - 1, 0).astype(np.int32))
  table, lengths = stop_table(stop_sequences)
  eos = np.full((_round_up(len(eos_ids)),), -1, np.int32)  # -1 never matches a token
  eos[:len(eos_ids)] = list(eos_ids)
  graphdef, state = nnx.split(model)
  sink = 0
  if on_step is not None:
    sink = next(_SINK_IDS)
    _STEP_SINKS[sink] = _InOrder(on_step)
  try:
    tokens, n_out, logits = _generate_jit(
        state, arrays, jax.random.key(seed), jnp.float32(temperature), jnp.float32(top_p), jnp.asarray(table),
        jnp.asarray(lengths), jnp.asarray(eos, jnp.int32), jnp.int32(pad_id), jnp.int32(sink),
        graphdef=graphdef, max_new_tokens=int(max_new_tokens), greedy=bool(greedy),
        top_k=None if top_k is None or top_k <= 0 else int(top_k), return_logits=return_logits,
        stream=on_step is not None)
    tokens, n_out = np.asarray(tokens), np.asarray(n_out)
    if sink:
      jax.effects_barrier()  # every step's callback has run
  finally:
    _STEP_SINKS.pop(sink, None)
  return tokens, n_out, None if logits is None else np.asarray(logits)


class _InOrder:
  """Hands on_step its steps in order 0, 1, ... (unordered JAX callbacks may in principle arrive out of order;
  ordered ones are not allowed over several devices)."""

  def __init__(self, on_step):
    self.on_step, self.next, self.waiting, self.lock = on_step, 0, {}, threading.Lock()

  def __call__(self, n: int, tokens: np.ndarray, live: np.ndarray) -> None:
    with self.lock:
      self.waiting[n] = (tokens, live)
      while self.next in self.waiting:
        self.on_step(self.next, *self.waiting.pop(self.next))
        self.next += 1


# ---- post-processing and the text API ----------------------------------------------------------------

postprocess = prompts.postprocess  # (raw_text, text) of generated ids, as the reference (prompts.py)


# transformers' LlamaConfig default bos_token_id: the id generate() starts from when given inputs_embeds.
REFERENCE_START_ID = 1


def _llama_428_tokens_to_string(tokens: Sequence[str], specials: set, sp) -> str:
  """transformers 4.28.0 `LlamaTokenizer.convert_tokens_to_string`, line for line: a special token is written
  verbatim, preceded by one space unless it is the first token or follows another special token; the text
  between special tokens is decoded by SentencePiece; nothing is stripped."""
  out, run, prev_special = "", [], False
  for i, tok in enumerate(tokens):
    if tok in specials:
      if not prev_special and i != 0:
        out += " "
      out += sp.decode_pieces(run) + tok
      prev_special, run = True, []
    else:
      run.append(tok)
      prev_special = False
  return out + sp.decode_pieces(run)


def reference_decode(ids: Sequence[int], tokenizer, *, clean_up_tokenization_spaces: bool = False) -> str:
  """`tokenizer.decode(ids)` as the reference's slow `LlamaTokenizer` computes it under transformers 4.28.0
  (skip_special_tokens=False). Special tokens are the BOS/EOS/UNK strings the tokenizer files name (pad is
  EOS: the reference sets it so); tokens past the SentencePiece vocabulary (added_tokens.json) are separate
  pieces joined to the rest by one space. The LlamaTokenizer default does no clean-up of spaces before
  punctuation. Tokenizers without a SentencePiece model decode with `skip_special_tokens=False`."""
  ids = [int(i) for i in ids]
  sp = getattr(tokenizer, "_sp", None)
  if sp is None:
    return tokenizer.decode(ids, skip_special_tokens=False)
  specials = {tokenizer.id_to_piece(i) for i in (tokenizer.bos_id, tokenizer.eos_id, tokenizer.unk_id)
              if i is not None}
  added = getattr(tokenizer, "_added_by_id", {})
  texts, run = [], []
  for i in ids:
    if i in added:
      if run:
        texts.append(_llama_428_tokens_to_string(run, specials, sp))
        run = []
      texts.append(added[i])
    else:
      run.append(tokenizer.id_to_piece(i))
  if run:
    texts.append(_llama_428_tokens_to_string(run, specials, sp))
  text = " ".join(texts)
  if clean_up_tokenization_spaces:  # transformers' PreTrainedTokenizerBase.clean_up_tokenization
    for a, b in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                 (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
      text = text.replace(a, b)
  return text


def reference_answer(ids: Sequence[int], tokenizer, *, start_id: int = REFERENCE_START_ID,
                     clean_up_tokenization_spaces: bool = False) -> str:
  """The answer string the reference's evaluation scores, from our generated `ids` (docs/reference_details.md).

  transformers 4.28's generate() from inputs_embeds returns [start_id] + the generated ids, where start_id
  is the model config's BOS (1 for LLaMA/Vicuna; 0 in some early conversions). The reference then drops a
  first id 0, then a first id 1 (the literal ids), decodes with special tokens kept (`reference_decode`:
  an answer that ended on EOS ends in "</s>"), keeps the text before the first "###" and after the last
  "Assistant:", and strips. So with start_id 1 no generated token is ever dropped: a generated leading
  <unk> or <s> stays in the answer as text."""
  full = [int(start_id)] + [int(i) for i in ids]
  if full and full[0] == 0:
    full = full[1:]
  if full and full[0] == 1:
    full = full[1:]
  text = reference_decode(full, tokenizer, clean_up_tokenization_spaces=clean_up_tokenization_spaces)
  return text.split(STOP_TEXT)[0].split("Assistant:")[-1].strip()


def generate(model: MusiLingo | Llama, batch: dict, *, tokenizer, max_new_tokens: int = 300, greedy: bool = False,
             temperature: float = 0.1, top_p: float = 0.5, top_k: int | None = DEFAULT_TOP_K,
             stop_sequences: Sequence[Sequence[int]] | None = None, eos_ids: Sequence[int] | None = None,
             seed: int = 0, keep_special_text: bool = False, reference_start_id: int = REFERENCE_START_ID,
             on_tokens: Callable[[list[list[int]]], None] | None = None) -> list[GenerationResult]:
  """Answers for a batch of prompts (see `generate_ids`), post-processed as the reference.

  stop_sequences: None derives them from the tokenizer (`stop_sequences_for`: the reference's
  ((835,), (2277, 29937)) for LLaMA); () disables them. eos_ids: None = (tokenizer.eos_id,); () disables.
  Each result's `text` is the clean answer (special tokens skipped); `reference_text` is the string the
  reference would score (`reference_answer` with start_id=reference_start_id).
  on_tokens(rows), when given, is called after each decode step with every row's ids so far (rows[i] grows by
  one id while row i decodes; at the end it is results[i].token_ids); see generate_ids' on_step.
  """
  if stop_sequences is None:
    stop_sequences = stop_sequences_for(tokenizer)
  if eos_ids is None:
    eos_ids = (tokenizer.eos_id,)
  rows: list[list[int]] = [[] for _ in range(np.asarray(batch["attention_mask"]).shape[0])]

  def collect(n, toks, live):  # on_step -> on_tokens: each live row's ids grow by its token
    for i in np.flatnonzero(live):
      rows[i].append(int(toks[i]))
    on_tokens(rows)
  tokens, lengths, _ = generate_ids(model, batch, max_new_tokens=max_new_tokens, greedy=greedy,
                                    temperature=temperature, top_p=top_p, top_k=top_k,
                                    stop_sequences=stop_sequences, eos_ids=eos_ids, pad_id=tokenizer.pad_id,
                                    seed=seed, on_step=None if on_tokens is None else collect)
  results = []
  for row, n in zip(tokens, lengths):
    ids = row[:n].tolist()
    raw, text = postprocess(ids, tokenizer, keep_special_text=keep_special_text)
    results.append(GenerationResult(token_ids=ids, text=text, raw_text=raw,
                                    reference_text=reference_answer(ids, tokenizer, start_id=reference_start_id)))
  return results


def prompt_batch(tokenizer, questions: Sequence[str | None], *, n_audio_tokens: int,
                 prompt_cfg: prompts.PromptConfig = prompts.PromptConfig(), max_len: int | None = None) -> dict:
  """Left-padded prompt arrays for `questions` (add "features" or "audio" before calling `generate`)."""
  encoded = [prompts.encode_prompt(tokenizer, q, prompt_cfg) for q in questions]
  return prompts.collate_prompts(encoded, n_audio_tokens=n_audio_tokens, bos_id=tokenizer.bos_id,
                                 pad_id=tokenizer.pad_id, max_len=max_len)


def audio_features(model: MusiLingo, audio, *, normalize: bool = False) -> np.ndarray:
  """One clip's pooled encoder features [T', D_enc] (float32) from 24 kHz mono audio [S]. normalize: first
  standardise the clip as MERT's feature extractor does with do_normalize (zero mean, unit variance), which
  a run trained on MusicInstruct / MusicCaps clips heard (`build.audio_normalize`)."""
  if normalize:
    audio = audio_lib.extractor_input(np.asarray(audio, np.float32), do_normalize=True)
  f = nnx.jit(lambda m, a: m.audio_features({"audio": a}))(model, jnp.asarray(audio, jnp.float32)[None])
  return np.asarray(f[0])


class Chat:
  """Multi-turn questions about one clip, in the reference template.

  Turn k's prompt continues turn k-1's: `... ###Assistant: ` + previous answer + `###Human: {q} ###Assistant: `
  (the answer ends with the "###" the model was trained to emit, which opens the next turn). The audio is
  encoded once; each turn is one `generate` call with seed + turn.

  prompt_bucket: left-pad each turn's prompt to a multiple of this many positions (None: its own length).
  The decode loop compiles once per prompt length, and a chat's prompt grows every turn: with buckets the
  turns (and clips of other lengths) reuse one compilation per bucket (the web demo uses 64). The pads are
  masked and positions count real tokens only, so the answer is the same up to float rounding.
  """

  def __init__(self, model: MusiLingo, tokenizer, *, features=None, audio=None, normalize_audio: bool = False,
               prompt_cfg: prompts.PromptConfig = prompts.PromptConfig(), seed: int = 0,
               prompt_bucket: int | None = None, **gen_kwargs):
    if (features is None) == (audio is None):
      raise ValueError("give exactly one of features [T', D_enc] or audio [S] (24 kHz mono)")
    if not prompt_cfg.template:
      raise ValueError("chat needs the instruction template (PromptConfig(template=True))")
    if features is None:
      features = audio_features(model, audio, normalize=normalize_audio)
    self.model, self.tokenizer, self.prompt_cfg = model, tokenizer, prompt_cfg
    self.features = np.asarray(features, np.float32)  # [T', D_enc]
    self.seed, self.gen_kwargs, self.prompt_bucket = seed, gen_kwargs, prompt_bucket
    self.history: list[tuple[str, str]] = []  # (question, answer)

  def prompt_segments(self, question: str) -> tuple[str, str]:
    """(p_before, p_after) text for the next turn (prompts.chat_segments)."""
    return prompts.chat_segments(self.history, question, self.prompt_cfg)

  def ask(self, question: str, *, on_tokens: Callable[[list[int]], None] | None = None) -> GenerationResult:
    """The answer to `question` (appended to the history). on_tokens(ids so far), when given, is called after
    each decode step (see `generate`); `ask_stream` turns it into text."""
    before, after = self.prompt_segments(question)
    enc = {"before": np.asarray(self.tokenizer.encode(before), np.int32),
           "after": np.asarray(self.tokenizer.encode(after), np.int32)}
    max_len = None
    if self.prompt_bucket:
      length = 1 + len(enc["before"]) + self.features.shape[0] + len(enc["after"])
      max_len = _round_up(length, self.prompt_bucket)
    batch = prompts.collate_prompts([enc], n_audio_tokens=self.features.shape[0], bos_id=self.tokenizer.bos_id,
                                    pad_id=self.tokenizer.pad_id, max_len=max_len)
    batch["features"] = self.features[None]
    result = generate(self.model, batch, tokenizer=self.tokenizer, seed=self.seed + len(self.history),
                      on_tokens=None if on_tokens is None else (lambda rows: on_tokens(rows[0])),
                      **self.gen_kwargs)[0]
    self.history.append((question, result.text))
    return result

  def ask_stream(self, question: str) -> Stream:
    """`ask(question)` in a worker thread: iterate the returned Stream for the answer so far while it is
    generated; afterwards its `result` is what `ask` returns (and the turn is in the history)."""
    return Stream(lambda on_tokens: self.ask(question, on_tokens=on_tokens), self.tokenizer)

  def reset(self) -> None:
    self.history.clear()


# ---- streaming text -----------------------------------------------------------------------------------

# Text that the reference's post-processing cuts at, so a trailing beginning of it is held back while decoding.
_CUT_TEXTS = (STOP_TEXT, "Assistant:")


def answer_so_far(ids: Sequence[int], tokenizer) -> str:
  """The answer text to show for the ids generated so far: `postprocess`'s clean text, less the trailing
  characters that the next tokens may still change: the beginning of a "###" (the stop text, cut from the
  answer when it completes) or of an "Assistant:", replacement characters (a UTF-8 character whose bytes
  have not all come) and whitespace (stripped from the answer). The text of the finished ids is the
  answer itself: a shown text is a prefix of the final one unless the model writes "Assistant:" later on
  (the answer is then what follows it, as the reference post-processes)."""
  text = postprocess(ids, tokenizer)[1]
  while True:
    trimmed = text.rstrip().rstrip("\ufffd")
    for cut in _CUT_TEXTS:
      for k in range(min(len(cut) - 1, len(trimmed)), 0, -1):
        if trimmed.endswith(cut[:k]):
          trimmed = trimmed[:-k]
          break
    if trimmed == text:
      return text
    text = trimmed


class Stream:
  """The answer of one generation, as it is decoded. `run(on_tokens)` (e.g. `lambda cb: chat.ask(q,
  on_tokens=cb)`) runs in a worker thread as soon as the Stream is made; iterating yields the answer so far
  (`answer_so_far`) after each step that changes it (every step is read, however slow the reader: the
  snapshots do not depend on timing), and last the final answer (`result.text`, always yielded at least
  once). After the iteration `result` is run's GenerationResult; an exception in run is raised by the
  iteration. Snapshots are cumulative: the UI replaces the message with each; `pieces()` gives what each
  adds (they join to the answer when every snapshot extends the one before)."""

  def __init__(self, run: Callable[[Callable[[list[int]], None]], GenerationResult], tokenizer):
    self.tokenizer = tokenizer
    self.result: GenerationResult | None = None
    self._updates: queue.Queue = queue.Queue()
    self._thread = threading.Thread(target=self._work, args=(run,), name="musilingo-generate", daemon=True)
    self._thread.start()

  def _work(self, run) -> None:
    try:
      result = run(lambda ids: self._updates.put(("ids", list(ids))))
    except BaseException as e:  # noqa: BLE001 - handed to the iterating thread
      self._updates.put(("error", e))
    else:
      self._updates.put(("done", result))

  def __iter__(self) -> Iterator[str]:
    shown = None
    while True:
      kind, value = self._updates.get()
      if kind == "error":
        raise value
      if kind == "done":
        self.result = value
        if shown != value.text:
          yield value.text
        return
      text = answer_so_far(value, self.tokenizer)
      if text != shown and (text or shown is not None):
        shown = text
        yield text

  def pieces(self) -> Iterator[str]:
    """The text each snapshot adds to the one before (a snapshot that does not extend it restarts: its whole
    text)."""
    before = ""
    for text in self:
      yield text[len(before):] if text.startswith(before) else text
      before = text
