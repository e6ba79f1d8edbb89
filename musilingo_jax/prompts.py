"""The reference's prompt, tokenization and batch layout, in one place (SPEC.md section 2).

Stage 2 (instruction data) wraps the question as `"###Human: {} ###Assistant: "` filled with
`"<Audio><AudioHere></Audio> " + question` and splits at `<AudioHere>`:
  p_before = "###Human: <Audio>", p_after = "</Audio> {question} ###Assistant: ".
Each segment and the answer (`answer + end_sym`, truncated to `max_txt_len` tokens) is tokenized on its
own with no special tokens. The model input is `[BOS] + p_before + audio + p_after + answer`; stage 1
(captions) has no template: `[BOS] + audio + caption + "\\n"`.

Layouts (`collate(layout=...)`):
  reference: p_before and p_after are each right-padded to the batch's longest (pads sit in the middle,
             masked in attention, positions still count them), the answer follows, then end padding up to
             `max_len`. This is the reference's exact loss; end padding changes nothing (causal + masked).
  packed:    every real token contiguous, all padding at the end (no middle pads; each sample's loss
             equals its single-sample loss). Our option, not the reference's.
"""

from __future__ import annotations

import dataclasses
from typing import Protocol, Sequence

import numpy as np

IGNORE = -100
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


def collate(examples: Sequence[dict], *, n_audio_tokens: int, max_len: int, bos_id: int, pad_id: int,
            layout: str = "reference", batch_size: int | None = None) -> dict[str, np.ndarray]:
  """Lays out a batch of `encode_example` outputs into fixed [B, max_len] arrays (DESIGN.md table).

  Other numpy values present in every example (audio, audio_len, features, ...) are stacked as they
  are. With `batch_size`, the batch is filled up with rows marked `valid = 0` that carry no labels.
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

  input_ids = np.full((B, max_len), pad_id, np.int32)
  mask = np.zeros((B, max_len), np.int32)
  labels = np.full((B, max_len), IGNORE, np.int32)
  audio_start = np.zeros((B,), np.int32)
  valid = np.zeros((B,), np.int32)
  for row in range(B):
    ex = examples[row] if row < n else examples[0]
    before, after, answer = (np.asarray(ex[k], np.int32) for k in _TEXT_KEYS)
    if layout == "reference":
      before_slot, after_slot = lb, la
    else:
      before_slot, after_slot = len(before), len(after)
    length = 1 + before_slot + n_audio_tokens + after_slot + len(answer)
    if length > max_len:
      raise ValueError(f"example {ex.get('id', row)!r} needs {length} positions > max_len {max_len}")
    input_ids[row, 0] = bos_id
    mask[row, 0] = 1
    pos = 1
    input_ids[row, pos:pos + len(before)] = before
    mask[row, pos:pos + len(before)] = 1
    pos += before_slot
    audio_start[row] = pos
    mask[row, pos:pos + n_audio_tokens] = 1
    pos += n_audio_tokens
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
      "valid": valid,
  }
  extra = set(examples[0]) - set(_TEXT_KEYS) - {"valid"}
  for key in sorted(extra):
    values = [ex.get(key) for ex in examples]
    if not all(isinstance(v, (np.ndarray, np.number, int, float)) and np.asarray(v).dtype.kind in "biuf"
               for v in values):
      continue  # strings/ids/metadata stay out of the device batch
    arr = np.stack([np.asarray(v) for v in values])
    if B > n:
      arr = np.concatenate([arr, np.repeat(arr[:1], B - n, axis=0)])
    batch[key] = arr
  return batch


def collate_prompts(prompts: Sequence[dict], *, n_audio_tokens: int, bos_id: int, pad_id: int,
                    max_len: int | None = None) -> dict[str, np.ndarray]:
  """Left-padded generation prompts: [pad ... pad, BOS, p_before, audio, p_after].

  positions = cumsum(mask) - 1 (0 on pads), so every row's real tokens sit at 0..n-1 as if alone.
  """
  lengths = [1 + len(p["before"]) + n_audio_tokens + len(p["after"]) for p in prompts]
  L = max_len or max(lengths)
  if max(lengths) > L:
    raise ValueError(f"prompt of {max(lengths)} positions > max_len {L}")
  B = len(prompts)
  input_ids = np.full((B, L), pad_id, np.int32)
  mask = np.zeros((B, L), np.int32)
  audio_start = np.zeros((B,), np.int32)
  for row, (p, length) in enumerate(zip(prompts, lengths)):
    start = L - length
    before, after = np.asarray(p["before"], np.int32), np.asarray(p["after"], np.int32)
    seq = np.concatenate([[bos_id], before, np.full(n_audio_tokens, pad_id), after]).astype(np.int32)
    input_ids[row, start:] = seq
    mask[row, start:] = 1
    audio_start[row] = start + 1 + len(before)
  positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0).astype(np.int32)
  return {"input_ids": input_ids, "attention_mask": mask, "positions": positions,
          "audio_start": audio_start}
