"""The reference's prompt, tokenization and batch layout, in one place (docs/reference.md, Sequence and loss).

Stage 2 (instruction data) wraps the question as `"###Human: {} ###Assistant: "` filled with
`"<Audio><AudioHere></Audio> " + question` and splits at `<AudioHere>`:
  p_before = "###Human: <Audio>", p_after = "</Audio> {question} ###Assistant: ".
Each segment and the answer (`answer + end_sym`, truncated to `max_txt_len` tokens) is tokenized on its
own with no special tokens. The model input is `[BOS] + p_before + audio + p_after + answer`; stage 1
(captions) has no template: `[BOS] + audio + caption + "\\n"`.

Layouts (`collate(layout=...)`), applied to one micro-batch at a time (the reference pads each
micro-batch, never the accumulated batch):
  reference: p_before and p_after are each right-padded to the micro-batch's longest (pads sit in the
             middle, masked in attention, positions still count them); every row gets the micro-batch's
             audio token count (ceil(longest clip's frames / pool), all attended, as the reference's
             collater pads the audio to the longest clip); the answer follows, then end padding up to
             `max_len`. This is the reference's exact loss; end padding changes nothing (causal + masked).
  packed:    every real token contiguous, each row with its own clip's audio token count, all padding at
             the end (no middle pads; each sample's loss equals its single-sample loss). Our option.

Audio tokens are never cut and never overwrite a prompt position: p_after starts right after the row's
audio tokens (`audio_tokens` [B] in the batch says how many); arrays of audio tokens (`features`) may be
longer (a static slot bound), their extra slots are simply not spliced in.
"""

from __future__ import annotations

import dataclasses
from typing import Protocol, Sequence

import numpy as np

IGNORE = -100
STOP_TEXT = "###"  # what ends an answer in the reference's template (its end_sym)
TEMPLATE = "###Human: {} ###Assistant: "
AUDIO_HERE = "<AudioHere>"
INSTRUCTION = "<Audio>" + AUDIO_HERE + "</Audio> {}"
LAYOUTS = ("reference", "packed")


class TokenizerLike(Protocol):
  bos_id: int
  pad_id: int

  def encode(self, text: str) -> list[int]: ...


@dataclasses.dataclass(frozen=True)
class PromptConfig:
  template: bool = True      # False for stage-1 captioning: no instruction wrapper
  end_sym: str = "###"       # "\n" for stage-1 captions
  max_txt_len: int = 160     # answer tokens kept (32 in stage 1)


def prompt_segments(question: str | None, cfg: PromptConfig) -> tuple[str, str]:
  """(p_before, p_after) strings around the audio tokens."""
  if not cfg.template:
    return "", ""
  if question is None:
    raise ValueError("a templated (stage-2) prompt needs a question; got None")
  before, after = TEMPLATE.format(INSTRUCTION.format(question)).split(AUDIO_HERE)
  return before, after


def chat_segments(history: Sequence[tuple[str, str]], question: str, cfg: PromptConfig) -> tuple[str, str]:
  """(p_before, p_after) of a chat's next turn about one clip: turn k's prompt continues turn k-1's,
  `... ###Assistant: ` + previous answer + `###Human: {q} ###Assistant: ` (the answer ends with the "###" the
  model was trained to emit, which opens the next turn). `history`: the earlier (question, answer) turns."""
  (q0, _), rest = (history[0], list(history[1:])) if history else ((question, ""), [])
  before, after = prompt_segments(q0, cfg)
  if history:
    for (_, answer), q in zip(history, [q for q, _ in rest] + [question]):
      after += answer + TEMPLATE.format(q)
  return before, after


def postprocess(ids: Sequence[int], tokenizer, *, keep_special_text: bool = False) -> tuple[str, str]:
  """(raw_text, text) of generated ids as the reference: drop a leading <unk> then a leading <s>, decode, keep
  the text before the first "###" and after the last "Assistant:", strip. raw_text keeps special tokens
  verbatim ("</s>"); `text` skips them unless keep_special_text (the reference's decode kept a final "</s>")."""
  ids = [int(i) for i in ids]
  unk, bos = getattr(tokenizer, "unk_id", None), getattr(tokenizer, "bos_id", None)
  if ids and unk is not None and ids[0] == unk:
    ids = ids[1:]
  if ids and bos is not None and ids[0] == bos:
    ids = ids[1:]
  raw = tokenizer.decode(ids, skip_special_tokens=False)
  shown = raw if keep_special_text else tokenizer.decode(ids, skip_special_tokens=True)
  return raw, shown.split(STOP_TEXT)[0].split("Assistant:")[-1].strip()


def _ids(tok: TokenizerLike, text: str) -> np.ndarray:
  return np.asarray(tok.encode(text) if text else [], np.int32)


def encode_example(tok: TokenizerLike, question: str | None, answer: str,
                   cfg: PromptConfig) -> dict[str, np.ndarray]:
  """Token ids of the three text segments of one training example (no padding, no BOS)."""
  before, after = prompt_segments(question, cfg)
  answer_ids = _ids(tok, answer + cfg.end_sym)[: cfg.max_txt_len]
  return {"before": _ids(tok, before), "after": _ids(tok, after), "answer": answer_ids}


def encode_prompt(tok: TokenizerLike, question: str | None, cfg: PromptConfig) -> dict[str, np.ndarray]:
  """Token ids of a generation prompt (the same segments, no answer)."""
  before, after = prompt_segments(question, cfg)
  return {"before": _ids(tok, before), "after": _ids(tok, after)}


_TEXT_KEYS = ("before", "after", "answer")


def audio_token_counts(examples: Sequence[dict], n_audio_tokens: int | None, layout: str) -> list[int]:
  """Attended audio tokens per row: each example's own count (`ex["audio_tokens"]`, else `n_audio_tokens`);
  in the reference layout every row gets the micro-batch's largest (its audio is padded to the longest)."""
  own = []
  for i, ex in enumerate(examples):
    n = ex.get("audio_tokens", n_audio_tokens)
    if n is None:
      raise ValueError(f"example {ex.get('id', i)!r} has no audio_tokens and collate got no n_audio_tokens")
    own.append(int(n))
  if layout == "reference":
    return [max(own)] * len(own)
  return own


def collate(examples: Sequence[dict], *, max_len: int, bos_id: int, pad_id: int, n_audio_tokens: int | None = None,
            layout: str = "reference", batch_size: int | None = None) -> dict[str, np.ndarray]:
  """Lays out ONE micro-batch of `encode_example` outputs into fixed [B, max_len] arrays (DESIGN.md table).

  Each example's audio token count is `ex["audio_tokens"]` (else `n_audio_tokens`); see the module
  docstring for how the layouts use it. Other numpy values present in every example (audio, audio_len,
  features, ...) are stacked as they are. With `batch_size`, the batch is filled up with rows marked
  `valid = 0` that carry no labels. The reference layout also sets `audio_pad_len` [B]: the micro-batch's
  longest `audio_len` (the length the reference's collater pads the audio to), when examples have one.
  """
  if layout not in LAYOUTS:
    raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
  if not examples:
    raise ValueError("collate needs at least one example")
  n = len(examples)
  B = batch_size or n
  if n > B:
    raise ValueError(f"{n} examples do not fit batch_size {B}")
  lb = max(len(e["before"]) for e in examples)
  la = max(len(e["after"]) for e in examples)
  counts = audio_token_counts(examples, n_audio_tokens, layout)

  input_ids = np.full((B, max_len), pad_id, np.int32)
  mask = np.zeros((B, max_len), np.int32)
  labels = np.full((B, max_len), IGNORE, np.int32)
  audio_start = np.zeros((B,), np.int32)
  audio_tokens = np.zeros((B,), np.int32)
  valid = np.zeros((B,), np.int32)
  for row in range(B):
    src = row if row < n else 0
    ex = examples[src]
    n_audio = counts[src]
    before, after, answer = (np.asarray(ex[k], np.int32) for k in _TEXT_KEYS)
    if layout == "reference":
      before_slot, after_slot = lb, la
    else:
      before_slot, after_slot = len(before), len(after)
    length = 1 + before_slot + n_audio + after_slot + len(answer)
    if length > max_len:
      raise ValueError(f"example {ex.get('id', row)!r} needs {length} positions > max_len {max_len}")
    input_ids[row, 0] = bos_id
    mask[row, 0] = 1
    pos = 1
    input_ids[row, pos:pos + len(before)] = before
    mask[row, pos:pos + len(before)] = 1
    pos += before_slot
    audio_start[row] = pos
    audio_tokens[row] = n_audio
    mask[row, pos:pos + n_audio] = 1
    pos += n_audio
    input_ids[row, pos:pos + len(after)] = after
    mask[row, pos:pos + len(after)] = 1
    pos += after_slot
    input_ids[row, pos:pos + len(answer)] = answer
    mask[row, pos:pos + len(answer)] = 1
    is_valid = row < n and int(ex.get("valid", 1)) == 1
    if is_valid:
      # The reference masks answer tokens equal to the pad id (= eos) as well.
      labels[row, pos:pos + len(answer)] = np.where(answer == pad_id, IGNORE, answer)
    valid[row] = int(is_valid)

  batch = {
      "input_ids": input_ids,
      "attention_mask": mask,
      "labels": labels,
      "positions": np.broadcast_to(np.arange(max_len, dtype=np.int32), (B, max_len)).copy(),
      "audio_start": audio_start,
      "audio_tokens": audio_tokens,
      "valid": valid,
  }
  extra = set(examples[0]) - set(_TEXT_KEYS) - {"valid", "audio_tokens"}
  for key in sorted(extra):
    values = [ex.get(key) for ex in examples]
    if not all(isinstance(v, (np.ndarray, np.number, int, float)) and np.asarray(v).dtype.kind in "biuf"
               for v in values):
      continue  # strings/ids/metadata stay out of the device batch
    arr = np.stack([np.asarray(v) for v in values])
    if B > n:
      arr = np.concatenate([arr, np.repeat(arr[:1], B - n, axis=0)])
    batch[key] = arr
  if "audio_len" in batch:
    lengths = batch["audio_len"].astype(np.int32)
    batch["audio_pad_len"] = (np.full((B,), lengths.max(), np.int32) if layout == "reference" else lengths)
  return batch


def example_positions(ex: dict) -> int:
  """Positions one example takes in a row: BOS + p_before + its audio tokens + p_after + answer."""
  return 1 + len(ex["before"]) + int(ex["audio_tokens"]) + len(ex["after"]) + len(ex["answer"])


def collate_packed(rows: Sequence[Sequence[dict]], *, max_len: int, bos_id: int, pad_id: int, max_segments: int,
                   batch_size: int | None = None) -> dict[str, np.ndarray]:
  """Packed rows: each row holds up to `max_segments` examples one after another, each laid out as alone
  (`[BOS] + p_before + audio + p_after + answer`, positions from 0), then end padding.

  Per row: `segment_ids` [B, L] (example k of the row is k + 1, padding 0; attention is block-diagonal
  causal), `positions` restarting at 0 per example, labels on each answer; per example slot:
  `audio_start` / `audio_tokens` [B, K] (an empty slot has 0 tokens) and the numpy arrays the examples carry
  (features [slots, D] -> [B, K, slots, D], audio [S] -> [B, K, S], audio_len -> [B, K]), zero for empty
  slots. So every example's loss terms are exactly its single-example ones. Rows past len(rows) (up to
  `batch_size`) are empty, `valid` 0."""
  if not rows:
    raise ValueError("collate_packed needs at least one row")
  B, K = batch_size or len(rows), max_segments
  if len(rows) > B:
    raise ValueError(f"{len(rows)} rows do not fit batch_size {B}")
  input_ids = np.full((B, max_len), pad_id, np.int32)
  mask = np.zeros((B, max_len), np.int32)
  labels = np.full((B, max_len), IGNORE, np.int32)
  positions = np.zeros((B, max_len), np.int32)
  segment_ids = np.zeros((B, max_len), np.int32)
  audio_start = np.zeros((B, K), np.int32)
  audio_tokens = np.zeros((B, K), np.int32)
  valid = np.zeros((B,), np.int32)
  template = next((ex for row in rows for ex in row), None)
  extra = {}
  if template is not None:
    for key in sorted(set(template) - set(_TEXT_KEYS) - {"valid", "audio_tokens"}):
      v = template[key]
      if isinstance(v, (np.ndarray, np.number, int, float)) and np.asarray(v).dtype.kind in "biuf":
        v = np.asarray(v)
        extra[key] = np.zeros((B, K) + v.shape, v.dtype)
  for r, row in enumerate(rows):
    if len(row) > K:
      raise ValueError(f"row {r} holds {len(row)} examples > max_segments {K}")
    pos = 0
    for k, ex in enumerate(row):
      before, after, answer = (np.asarray(ex[key], np.int32) for key in _TEXT_KEYS)
      n_audio = int(ex["audio_tokens"])
      n = example_positions(ex)
      if pos + n > max_len:
        raise ValueError(f"row {r}: example {ex.get('id', k)!r} ends at {pos + n} > max_len {max_len}")
      seq = np.concatenate([[bos_id], before, np.full(n_audio, pad_id), after, answer]).astype(np.int32)
      input_ids[r, pos:pos + n] = seq
      mask[r, pos:pos + n] = 1
      positions[r, pos:pos + n] = np.arange(n)
      segment_ids[r, pos:pos + n] = k + 1
      audio_start[r, k] = pos + 1 + len(before)
      audio_tokens[r, k] = n_audio
      if int(ex.get("valid", 1)) == 1:
        a0 = pos + n - len(answer)
        labels[r, a0:pos + n] = np.where(answer == pad_id, IGNORE, answer)
        valid[r] = 1
      for key, arr in extra.items():
        arr[r, k] = np.asarray(ex[key])
      pos += n
  return {"input_ids": input_ids, "attention_mask": mask, "labels": labels, "positions": positions,
          "segment_ids": segment_ids, "audio_start": audio_start, "audio_tokens": audio_tokens, "valid": valid,
          **extra}


def interleave_micro_batches(micro: Sequence[dict]) -> dict[str, np.ndarray]:
  """A micro-batches of B rows -> one [A*B] batch where micro-batch a is rows b*A + a (the order the train
  step's `_micro_batches` takes them apart in, which keeps every micro-batch split over the batch shards)."""
  if len(micro) == 1:
    return dict(micro[0])
  keys = micro[0].keys()
  out = {}
  for k in keys:
    stacked = np.stack([m[k] for m in micro], axis=1)  # [B, A, ...]
    out[k] = stacked.reshape((-1,) + stacked.shape[2:])
  return out


def collate_prompts(prompts: Sequence[dict], *, bos_id: int, pad_id: int, n_audio_tokens: int | Sequence[int],
                    max_len: int | None = None) -> dict[str, np.ndarray]:
  """Left-padded generation prompts: [pad ... pad, BOS, p_before, audio, p_after].

  n_audio_tokens: one count for all rows, or each row's own (its clip's tokens; generation runs each
  clip as if alone). positions = cumsum(mask) - 1 (0 on pads), so every row's real tokens sit at 0..n-1.
  """
  counts = ([int(n_audio_tokens)] * len(prompts) if np.ndim(n_audio_tokens) == 0
            else [int(n) for n in n_audio_tokens])
  if len(counts) != len(prompts):
    raise ValueError(f"{len(counts)} audio token counts for {len(prompts)} prompts")
  lengths = [1 + len(p["before"]) + n + len(p["after"]) for p, n in zip(prompts, counts)]
  L = max_len or max(lengths)
  if max(lengths) > L:
    raise ValueError(f"prompt of {max(lengths)} positions > max_len {L}")
  B = len(prompts)
  input_ids = np.full((B, L), pad_id, np.int32)
  mask = np.zeros((B, L), np.int32)
  audio_start = np.zeros((B,), np.int32)
  for row, (p, length, n) in enumerate(zip(prompts, lengths, counts)):
    start = L - length
    before, after = np.asarray(p["before"], np.int32), np.asarray(p["after"], np.int32)
    seq = np.concatenate([[bos_id], before, np.full(n, pad_id), after]).astype(np.int32)
    input_ids[row, start:] = seq
    mask[row, start:] = 1
    audio_start[row] = start + 1 + len(before)
  positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0).astype(np.int32)
  return {"input_ids": input_ids, "attention_mask": mask, "positions": positions,
          "audio_start": audio_start, "audio_tokens": np.asarray(counts, np.int32)}
