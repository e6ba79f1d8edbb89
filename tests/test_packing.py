"""Packed training rows (layout "packed", several examples per row): each example's loss equals its
single-example loss in the PyTorch reference (1e-5), with features and with raw audio through the encoder;
the LM head at label positions only gives the same loss; the Grain packer fills rows in stream order, loses
no example, and resumes exactly."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from flax import nnx

from musilingo_jax import prompts
from musilingo_jax.models import llama, mert
from musilingo_jax.models.musilingo import MusiLingo, MusiLingoConfig
from musilingo_jax.testing import torch_reference as tr
from test_pipeline import TOKENS, _make, _record, _write

BOS, PAD, POOL = 1, 2, 4


@pytest.fixture(scope="module")
def models():
  cfg = MusiLingoConfig(encoder=mert.MERTConfig.tiny(), llm=llama.LlamaConfig.tiny(num_key_value_heads=2),
                        pool_frames=POOL)
  ours = MusiLingo.random(cfg, rngs=nnx.Rngs(4))
  return ours, tr.TorchMusiLingo.from_ours(ours)


def _examples(n, d_enc, rng, *, audio=False):
  out = []
  for i in range(n):
    ex = {"before": rng.integers(3, 90, 2 + i % 2).astype(np.int32),
          "after": rng.integers(3, 90, 1 + i % 3).astype(np.int32),
          "answer": rng.integers(3, 90, 2 + (3 * i) % 5).astype(np.int32), "valid": 1}
    if audio:
      samples = 1600 + 400 * i                        # tiny MERT: 320 samples per frame -> 5.. frames
      ex["audio"] = np.zeros(3600, np.float32)
      ex["audio"][:samples] = 0.3 * rng.standard_normal(samples)
      ex["audio_len"] = np.int32(samples)
      ex["_samples"] = samples
    else:
      ex["features"] = np.zeros((4, d_enc), np.float32)
      ex["_tokens"] = 1 + i % 4
      ex["features"][:ex["_tokens"]] = rng.standard_normal((ex["_tokens"], d_enc))
    out.append(ex)
  return out


def _per_example_losses(model, batch):
  """{(row, segment): mean CE over that example's answer tokens} from our logits of the packed batch."""
  logits = np.asarray(model(jax.tree.map(jnp.asarray, batch)))[:, :-1]
  labels, seg = batch["labels"][:, 1:], batch["segment_ids"][:, 1:]
  ce = np.asarray(optax.softmax_cross_entropy_with_integer_labels(jnp.asarray(logits),
                                                                  jnp.asarray(np.maximum(labels, 0))))
  out = {}
  for r in range(labels.shape[0]):
    for s in np.unique(seg[r][labels[r] != -100]):
      pick = (labels[r] != -100) & (seg[r] == s)
      out[(r, int(s) - 1)] = ce[r][pick].mean()
  return out


@pytest.mark.parametrize("audio", [False, True], ids=["features", "audio"])
def test_each_example_loss_is_its_single_example_loss(models, audio):
  ours, ref = models
  rng = np.random.default_rng(0)
  exs = _examples(5, ours.cfg.encoder.hidden_size, rng, audio=audio)
  for ex in exs:
    if audio:
      frames = int(ours.cfg.encoder.feature_lengths(ex["_samples"]))
      ex["audio_tokens"] = -(-frames // POOL)
    else:
      ex["audio_tokens"] = ex["_tokens"]
  rows = [[exs[0], exs[1], exs[2]], [exs[3], exs[4]]]
  clean = [[{k: v for k, v in ex.items() if not k.startswith("_")} for ex in row] for row in rows]
  batch = prompts.collate_packed(clean, max_len=64, bos_id=BOS, pad_id=PAD, max_segments=4)
  assert batch["segment_ids"][0].max() == 3 and batch["audio_start"].shape == (2, 4)
  got = _per_example_losses(ours, batch)
  assert sorted(got) == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1)]
  with torch.no_grad():
    for (r, s), loss in got.items():
      ex = rows[r][s]
      if audio:
        want = tr.reference_loss(ref.hub, ref.lm, ref.proj, ex["audio"][None, :ex["_samples"]], [ex], POOL)
      else:
        want = tr.reference_loss(None, ref.lm, ref.proj, None, [ex], POOL,
                                 features=ex["features"][None, :ex["_tokens"]])
      np.testing.assert_allclose(float(loss), float(want), atol=1e-5, rtol=1e-5)
  # The batch loss (mean over every label token), with the LM head at every position or only at labels.
  full, count = ours.loss(jax.tree.map(jnp.asarray, batch))
  at_labels, count_k = ours.loss(jax.tree.map(jnp.asarray, batch), loss_positions=16)
  assert int(count) == int(count_k) == int((batch["labels"] != -100).sum())
  np.testing.assert_allclose(float(at_labels), float(full), rtol=1e-5)


def test_packer_fills_rows_in_order_and_loses_nothing(tmp_path):
  blobs = [_record(i) for i in range(23)]
  files = [_write(tmp_path / "train-00000-of-00001.array_record", blobs)]
  packed = list(_make(files, batch_size=1, shuffle=False, num_epochs=1, layout="packed", max_len=40,
                      pack_segments=3, pack_labels=20))
  one = list(_make(files, batch_size=1, shuffle=False, num_epochs=1, layout="packed", max_len=40))
  answers = lambda b: [tuple(row[row != -100]) for row in b["labels"]]  # noqa: E731
  singles = [a for b in one for a in answers(b)]
  got = []
  for b in packed:
    (row_labels,), (seg,) = b["labels"], b["segment_ids"]
    n_seg = seg.max()
    assert 1 <= n_seg <= 3 and (row_labels != -100).sum() <= 20
    assert (seg[:np.count_nonzero(seg)] > 0).all() and (seg[np.count_nonzero(seg):] == 0).all()  # pads at end
    for s in range(1, n_seg + 1):
      got.append(tuple(row_labels[(seg == s) & (row_labels != -100)]))
    # positions restart at 0 for every example
    starts = np.flatnonzero(np.diff(np.concatenate([[0], seg])) != 0)
    assert all(b["positions"][0][i] == 0 for i in starts if seg[i] > 0)
  assert got == singles and len(packed) < len(one)   # every example, in order, in fewer rows


def test_packer_resumes_exactly(tmp_path):
  blobs = [_record(i) for i in range(30)]
  files = [_write(tmp_path / "train-00000-of-00001.array_record", blobs)]
  kw = dict(batch_size=2, shuffle=True, num_epochs=None, layout="packed", max_len=40, pack_segments=4,
            pack_labels=24)
  it = _make(files, **kw)
  for _ in range(3):
    next(it)
  state = it.get_state()
  want = [next(it) for _ in range(4)]
  again = _make(files, **kw)
  again.set_state(state)
  for a, b in zip(want, [next(again) for _ in range(4)]):
    assert sorted(a) == sorted(b) and all(np.array_equal(a[k], b[k]) for k in a)


def test_packed_batches_carry_features_per_example_slot(tmp_path):
  """Features records through the packer: [B, K, slots, D] features and [B, K] audio token counts."""
  blobs = [_record(i, features=True) for i in range(12)]
  files = [_write(tmp_path / "train-00000-of-00001.array_record", blobs)]
  (b, *_) = list(_make(files, batch_size=2, shuffle=False, num_epochs=1, layout="packed", max_len=40,
                       use_features=True, pack_segments=3, pack_labels=24, tokens_of_samples=TOKENS))
  assert b["features"].shape[:2] == (2, 3) and b["audio_tokens"].shape == (2, 3)
  for r in range(2):  # a used slot attends its clip's rows of features, an empty slot none
    used = b["segment_ids"][r].max()
    assert (b["audio_tokens"][r, :used] > 0).all() and (b["audio_tokens"][r, used:] == 0).all()
    assert not b["features"][r, used:].any()


def test_packed_rows_split_into_micro_batches_as_the_step_takes_them(tmp_path):
  """Packed rows (several examples each) with accum_steps=2: micro-batch a is rows a, a+2, ... of the global
  batch (the train step's interleaving) and holds the same rows, in the same order, as a run without
  accumulation reads them; nothing is lost or repeated over an epoch."""
  blobs = [_record(i) for i in range(26)]
  files = [_write(tmp_path / "train-00000-of-00001.array_record", blobs)]
  kw = dict(batch_size=4, shuffle=False, num_epochs=1, layout="packed", max_len=40, pack_segments=3,
            pack_labels=20)
  accum = list(_make(files, accum_steps=2, **kw))
  flat = list(_make(files, accum_steps=1, **kw))
  assert len(accum) == len(flat) >= 2
  for big, one in zip(accum, flat):
    assert big.keys() == one.keys()
    for k in big:
      for a in range(2):
        np.testing.assert_array_equal(big[k][a::2], one[k][2 * a:2 * a + 2], err_msg=k)
  assert max(b["segment_ids"].max() for b in accum) > 1   # rows really hold several examples
