"""Audio tokens come from the clips, as the reference counts them: MusicQA's 372,000-sample crop is taken at
each file's own rate, so one data set holds clips of 6 (16 kHz), 4 (24 kHz) and 2 (44.1 / 48 kHz) tokens.
Each micro-batch attends its longest clip's count; the bound of the static shapes comes from the precompute
report; nothing is cut and nothing overwrites a prompt position; a config that disagrees is refused."""

import json
import zlib

import jax.numpy as jnp
import numpy as np
import pytest
import soundfile as sf
from flax import nnx

from musilingo_jax import build, prompts
from musilingo_jax import config as cfglib
from musilingo_jax.data import pipeline, records
from musilingo_jax.models import llama, mert
from musilingo_jax.models.musilingo import MusiLingo, MusiLingoConfig, pooled_features

RATES = (16_000, 24_000, 44_100, 48_000)
WANT = {16_000: 6, 24_000: 4, 44_100: 2, 48_000: 2}  # ceil(frames(372,000 native samples at 24 kHz) / 325)


class WordTokenizer:
  bos_id, eos_id, pad_id = 1, 2, 2

  def encode(self, text):
    return [3 + zlib.crc32(w.encode()) % 200 for w in text.split()]


TOK = WordTokenizer()
CFG = prompts.PromptConfig(max_txt_len=16)


@pytest.fixture(scope="module")
def musicqa(tmp_path_factory):
  """A MusicQA-layout set: one 25 s clip per rate, and its precomputed records (audio + tiny-MERT features)."""
  root = tmp_path_factory.mktemp("mqa")
  (root / "MusicQA" / "audios").mkdir(parents=True)
  entries = []
  rng = np.random.default_rng(0)
  for i, rate in enumerate(RATES):
    name = f"{i:06d}.wav"
    sf.write(root / "MusicQA" / "audios" / name, 0.1 * rng.standard_normal(25 * rate).astype(np.float32), rate)
    entries.append({"audio_name": name, "conversation": [
        {"from": "human", "value": f"what is the rate of clip {i} ?" + " please" * i},
        {"from": "gpt", "value": f"it is {rate} hertz"}]})
  (root / "MusicQA" / "FinetuneMusicQA.json").write_text(json.dumps(entries))
  enc_cfg = mert.MERTConfig.tiny()
  encoder = mert.MERT(enc_cfg, rngs=nnx.Rngs(0))
  out = root / "records"
  report = records.precompute(records.PrecomputeConfig(
      dataset="musicqa", data_dir=str(root), split="Finetune", out_dir=str(out), features="also",
      features_dtype="float32", pool_frames=325, workers=1, crop="start", progress=False),
      records.make_encoder_fn(encoder, 325))
  assert report["written"] == 4
  return out, enc_cfg, encoder


def _config(**data):
  c = cfglib.base_config()
  c.data.train_split, c.data.eval_split = "Finetune", "Eval"
  for k, v in data.items():
    c.data[k] = v
  return c


def test_slot_bound_comes_from_the_records_and_a_smaller_config_is_refused(musicqa):
  out, enc_cfg, _ = musicqa
  for use_features in (False, True):
    slots = build.audio_slots(_config(use_features=use_features), enc_cfg, out)
    assert slots.tokens == 6
    assert slots.samples == (None if use_features else 372_000 * 24_000 // 16_000)
  assert build.audio_slots(_config(n_audio_tokens=8), enc_cfg, out).tokens == 8  # wider is only a bigger shape
  with pytest.raises(cfglib.ConfigError, match=r"config.data.n_audio_tokens = 4 is below the records' 6 tokens"
                                               r".*Finetune-report.json.*558000 samples = 23.25 s"):
    build.audio_slots(_config(n_audio_tokens=4, use_features=False), enc_cfg, out)
  c = _config()
  c.model.pool_frames = 125
  with pytest.raises(cfglib.ConfigError, match="config.model.pool_frames = 125.*pooled over 325"):
    build.audio_slots(c, enc_cfg, out)
  with pytest.raises(cfglib.ConfigError, match="no precompute report"):
    build.audio_slots(_config(), enc_cfg, out / "nowhere")


@pytest.mark.parametrize("use_features", [False, True])
def test_each_micro_batch_attends_its_longest_clips_tokens(musicqa, use_features):
  out, enc_cfg, _ = musicqa
  slots = build.audio_slots(_config(use_features=use_features), enc_cfg, out)
  tokens = lambda n: build.audio_token_count(enc_cfg, 325, n)  # noqa: E731
  kw = dict(tokenizer=TOK, prompt_cfg=CFG, seed=0, shuffle=False, num_epochs=1, audio_slots=slots.tokens,
            audio_samples=slots.samples, max_len=64, use_features=use_features, process_index=0,
            process_count=1, tokens_of_samples=tokens)
  files = records.shard_files(out, "Finetune")
  (packed,) = list(pipeline.make_dataset(files, batch_size=4, layout="packed", **kw))
  assert packed["audio_tokens"].tolist() == [WANT[r] for r in RATES]
  # Two micro-batches of two (accum 2): [16 kHz, 24 kHz] attend 6 tokens each, [44.1, 48 kHz] 2 each.
  (ref,) = list(pipeline.make_dataset(files, batch_size=4, accum_steps=2, layout="reference", **kw))
  assert ref["audio_tokens"].tolist() == [6, 2, 6, 2]  # rows b * accum + a
  for batch in (packed, ref):
    for r, rate in enumerate(RATES):
      i = RATES.index(rate)
      ex = prompts.encode_example(TOK, f"what is the rate of clip {i} ?" + " please" * i, f"it is {rate} hertz", CFG)
      row = {0: 0, 1: 2, 2: 1, 3: 3}[r] if batch is ref else r  # ref rows interleave the micro-batches
      start, n = int(batch["audio_start"][row]), int(batch["audio_tokens"][row])
      ids, mask = batch["input_ids"][row], batch["attention_mask"][row]
      assert ids[start - len(ex["before"]):start].tolist() == ex["before"].tolist()
      assert mask[start:start + n].all()            # every audio token attended
      after = ids[start + n:][mask[start + n:] == 1][:len(ex["after"])]
      assert after.tolist() == ex["after"].tolist()  # the prompt continues right after the audio tokens
      if use_features:
        assert (np.abs(batch["features"][row, :WANT[rate]]).sum(-1) > 0).all()  # the clip's own tokens
        assert not batch["features"][row, WANT[rate]:].any()                     # slots past it: zero


def test_spliced_audio_never_overwrites_a_prompt_position(musicqa):
  out, enc_cfg, encoder = musicqa
  llm = llama.Llama(llama.LlamaConfig.tiny(), rngs=nnx.Rngs(1))
  model = MusiLingo.random(MusiLingoConfig(encoder=enc_cfg, llm=llm.cfg, pool_frames=325), rngs=nnx.Rngs(2))
  model.encoder, model.llm = encoder, llm
  slots = build.audio_slots(_config(), enc_cfg, out)
  files = records.shard_files(out, "Finetune")
  (b,) = list(pipeline.make_dataset(files, tokenizer=TOK, prompt_cfg=CFG, batch_size=4, shuffle=False, num_epochs=1,
                                    audio_slots=slots.tokens, max_len=64, use_features=True, layout="packed",
                                    process_index=0, process_count=1))
  batch = {k: jnp.asarray(v) for k, v in b.items()}
  spliced = np.asarray(model.input_embeddings(batch))
  plain = np.asarray(model.llm.embed(batch["input_ids"]))
  audio = np.asarray(model.audio_embeddings(batch))
  for r in range(4):
    start, n = int(b["audio_start"][r]), int(b["audio_tokens"][r])
    np.testing.assert_array_equal(spliced[r, :start], plain[r, :start])
    np.testing.assert_allclose(spliced[r, start:start + n], audio[r, :n], rtol=1e-6)
    np.testing.assert_array_equal(spliced[r, start + n:], plain[r, start + n:])


def test_raw_audio_in_a_static_shape_equals_the_micro_batch_padded_to_its_longest(musicqa):
  """The encoder in the step sees audio padded to the slot bound; with audio_len / audio_pad_len its tokens
  equal those of the batch padded only to its longest clip (GroupNorm statistics, mask, pooling)."""
  out, enc_cfg, encoder = musicqa
  rng = np.random.default_rng(1)
  clips = [rng.standard_normal(n).astype(np.float32) for n in (30_000, 21_000)]
  exact = np.zeros((2, 30_000), np.float32)
  for i, c in enumerate(clips):
    exact[i, :len(c)] = c
  lens = jnp.asarray([30_000, 21_000])
  want = pooled_features(encoder, jnp.asarray(exact), 40, lens, jnp.full((2,), 30_000))
  wide = np.pad(exact, ((0, 0), (0, 9_000)))
  got = pooled_features(encoder, jnp.asarray(wide), 40, lens, jnp.full((2,), 30_000))
  n = want.shape[1]
  np.testing.assert_allclose(np.asarray(got[:, :n]), np.asarray(want), rtol=2e-5, atol=2e-6)
  assert not np.asarray(got[:, n:]).any()
