"""MERT-style pretraining (musilingo_jax/pretrain): span-mask statistics against their exact expectation, the loss
of a tiny encoder against the same loss computed by hand in numpy, the targets' frame alignment and k-means,
bitwise resume of a pretraining run (the smoke preset, real subprocesses), and the pretrained encoder
exported as a transformers HubertModel directory with the same hidden states."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from musilingo_jax.models.mert import MERT, MERTConfig, time_mask_indices
from musilingo_jax.pretrain import targets as targets_lib
from musilingo_jax.pretrain.model import MERTPretrainer, MERTPretrainHeads, PretrainConfig, grad_multiply

ROOT = Path(__file__).resolve().parents[1]
PRETRAIN = [sys.executable, str(ROOT / "scripts" / "pretrain_encoder.py"), "--config",
            str(ROOT / "configs" / "mert_pretrain.py") + ":smoke"]


# ---------------------------------------------------------------------------------------- masking

def expected_mask_fraction(n: int, total: int, p: float, span: int, min_masks: int) -> float:
  """E[fraction of a row's n valid frames masked] under time_mask_indices' rule: num = floor(p n / L + u),
  u ~ U[0, 1), at least min_masks, capped; num distinct starts uniform over the N = n - L + 1 positions; frame
  t is masked unless no start covers it: P = 1 - C(N - k_t, num) / C(N, num), k_t = starts covering t."""
  x = p * n / span
  lo = math.floor(x)
  out = 0.0
  for num, weight in ((lo, 1 - (x - lo)), (lo + 1, x - lo)):
    if weight == 0:
      continue
    num = max(num, min_masks)
    if num * span > total:
      num = total // span
    starts = n - span + 1
    num = min(num, max(starts, 0))
    masked = 0.0
    for t in range(n):
      k = min(t, starts - 1) - max(0, t - span + 1) + 1
      masked += 1 - math.comb(starts - k, num) / math.comb(starts, num)
    out += weight * masked / n
  return out


def test_span_mask_statistics():
  lengths = jnp.asarray([200, 120, 37, 6])
  total, p, span = 200, 0.8, 5
  draw = jax.jit(jax.vmap(lambda k: time_mask_indices(k, lengths, total, mask_prob=p, mask_length=span,
                                                      min_masks=2)))
  masks = np.asarray(draw(jax.random.split(jax.random.key(0), 2000)))   # [draws, B, T]
  for b, n in enumerate(np.asarray(lengths)):
    assert not masks[:, b, n:].any()                         # spans stay inside the valid frames
    got = masks[:, b, :n].mean()
    want = expected_mask_fraction(int(n), total, p, span, 2)
    assert abs(got - want) < 0.01, (n, got, want)
    for m in masks[:200, b, :n]:                             # every masked run is at least one span long
      edges = np.diff(np.concatenate([[0], m.astype(np.int8), [0]]))
      runs = np.flatnonzero(edges == -1) - np.flatnonzero(edges == 1)
      assert len(runs) and runs.min() >= span
  assert 0.55 < masks[:, 0, :200].mean() < 0.62              # MERT's setting masks about 60 % of the frames


# ---------------------------------------------------------------------------------------- the loss

def _tiny():
  """A tiny encoder + heads with numpy-random weights (initialising through jax.random costs ~15 s of XLA
  compilation on CPU; the loss test needs any weights, not the initialisers')."""
  def make():
    enc = MERT(MERTConfig.tiny(), rngs=nnx.Rngs(0))
    cfg = PretrainConfig(codebook_sizes=(5, 3), cqt_bins=4, final_dim=6, mask_prob=0.8, mask_length=2,
                         cqt_weight=0.7, feature_pen_weight=3.0, feature_grad_mult=0.1)
    heads = MERTPretrainHeads(cfg, hidden_size=enc.cfg.hidden_size, rngs=nnx.Rngs(1))
    return MERTPretrainer(enc, heads, rngs=nnx.Rngs(dropout=2))
  graphdef, params, rest = nnx.split(nnx.eval_shape(make), nnx.Param, ...)
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda x: jnp.asarray(rng.standard_normal(x.shape).astype(x.dtype) * 0.3), params)
  rest = jax.tree.map(lambda x: jax.random.key(0) if jnp.issubdtype(x.dtype, jax.dtypes.prng_key)
                      else jnp.zeros(x.shape, x.dtype), rest)
  return nnx.merge(graphdef, params, rest)


def _batch(model, rng):
  s = 4000
  t = int(model.encoder.cfg.feature_lengths(s))
  audio_len = np.asarray([s, 3000], np.int32)
  codes = np.stack([rng.integers(0, 5, (2, t)), rng.integers(0, 3, (2, t))], 1).astype(np.int32)
  codes[1, 1, 3] = -1  # a frame without a target in codebook 1
  return {"audio": rng.standard_normal((2, s)).astype(np.float32) * 0.1, "audio_len": audio_len,
          "codes": codes, "cqt": rng.standard_normal((2, t, 4)).astype(np.float32)}, t


def test_loss_against_a_hand_computed_value():
  model = _tiny()
  rng = np.random.default_rng(0)
  batch, t = _batch(model, rng)
  valid = np.arange(t)[None, :] < np.asarray(model.encoder.feature_lengths(batch["audio_len"]))[:, None]
  mask = np.zeros((2, t), bool)
  mask[0, 2:6] = mask[0, 9:11] = mask[1, 1:5] = True
  mask[1, t - 2:] = True  # past row 1's valid frames: not counted
  sel = mask & valid
  attn = np.arange(batch["audio"].shape[1])[None, :] < batch["audio_len"][:, None]

  @nnx.jit
  def run(m, b, mask, sel, attn):  # the model's terms, and the encoder outputs the hand computation starts from
    feats = m.encoder.extract_features(b["audio"], pad_samples=b["audio_len"])
    h = m.encoder.encode_features(feats, attn, mask_time_indices=sel)[-1]
    return m.terms(b, mask=mask), feats, h
  terms, feats, h = run(model, {k: jnp.asarray(v) for k, v in batch.items()}, jnp.asarray(mask), jnp.asarray(sel),
                        jnp.asarray(attn))
  feats, h = np.asarray(feats), np.asarray(h)

  # By hand, in numpy: the feature penalty, cosine logits / 0.1 per codebook, cross-entropy and CQT error over
  # the masked valid frames, weighted as the config says.
  heads = model.heads
  pen = (np.square(feats).mean(-1) * valid).sum() / valid.sum()
  proj = h @ np.asarray(heads.final_proj.kernel[...]) + np.asarray(heads.final_proj.bias[...])
  embs = np.asarray(heads.label_embs[...])
  loss, lo = 3.0 * pen, 0
  for i, k in enumerate((5, 3)):
    p = proj[..., 6 * i:6 * (i + 1)]
    e = embs[lo:lo + k]
    lo += k
    logits = (p / np.linalg.norm(p, axis=-1, keepdims=True)) @ (e / np.linalg.norm(e, axis=-1, keepdims=True)).T / 0.1
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    target = batch["codes"][:, i]
    use = sel & (target >= 0)
    ce = -np.take_along_axis(logp, np.maximum(target, 0)[..., None], -1)[..., 0]
    np.testing.assert_allclose(float(terms[f"ce_{i}"]), ce[use].mean(), rtol=1e-5)
    loss += ce[use].mean()
  cqt = h @ np.asarray(heads.cqt_proj.kernel[...]) + np.asarray(heads.cqt_proj.bias[...])
  mse = np.square(cqt - batch["cqt"]).mean(-1)[sel].mean()
  loss += 0.7 * mse
  np.testing.assert_allclose(float(terms["features_pen"]), pen, rtol=1e-5)
  np.testing.assert_allclose(float(terms["cqt_mse"]), mse, rtol=1e-5)
  np.testing.assert_allclose(float(terms["loss"]), loss, rtol=1e-5)
  assert int(terms["count"]) == sel.sum() == 10


def test_grad_multiply():
  """fairseq's GradMultiply (MERT's feature_grad_mult): identity forward, gradient scaled (0: stopped)."""
  x = jnp.asarray([1.5, -2.0])
  for scale in (1.0, 0.1, 0.0):
    y = grad_multiply(x, scale)
    np.testing.assert_allclose(y, x, rtol=1e-7)
    g = jax.grad(lambda v: jnp.sum(grad_multiply(v, scale) ** 2))(x)
    np.testing.assert_allclose(g, 2 * x * scale, rtol=1e-6)


# ---------------------------------------------------------------------------------------- targets

def test_targets_at_the_encoder_frame_rate_and_kmeans():
  enc_cfg = MERTConfig.tiny()
  cfg = targets_lib.TargetConfig(features=("logmel", "mfcc", "chroma"), cqt_bins=84)
  assert targets_lib.frame_geometry(enc_cfg) == (320, 400)
  sr = 24_000
  for n in (sr, sr + 123, 3 * sr):
    audio = np.sin(2 * np.pi * 440 * np.arange(n) / sr).astype(np.float32)
    feats = targets_lib.frame_features(audio, cfg, enc_cfg)
    t = int(enc_cfg.feature_lengths(n))
    assert {k: v.shape for k, v in feats.items()} == {"logmel": (t, 64), "mfcc": (t, 39), "chroma": (t, 12),
                                                      "cqt": (t, 84)}
    assert np.all(feats["chroma"][2:-2].argmax(-1) == 9)   # A
  # a click at sample 320 * 40 + 200, the centre of encoder frame 40, is loudest in target frame 40
  audio = np.zeros(2 * sr, np.float32)
  audio[320 * 40 + 200] = 1.0
  energy = targets_lib.frame_features(audio, cfg, enc_cfg)["logmel"].mean(-1)
  assert np.argmax(energy) == 40
  # k-means: deterministic, recovers well separated clusters
  rng = np.random.default_rng(0)
  centers = rng.standard_normal((4, 3)) * 10
  x = (centers[rng.integers(0, 4, 400)] + rng.standard_normal((400, 3)) * 0.1).astype(np.float32)
  a, b = targets_lib.kmeans(x, 4, seed=3), targets_lib.kmeans(x, 4, seed=3)
  np.testing.assert_array_equal(a, b)
  assert np.abs(np.sort(a[:, 0]) - np.sort(centers[:, 0])).max() < 0.1


# ---------------------------------------------------------------------------------------- runs

def _env():
  env = dict(os.environ)
  env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=1"
  env["HF_HUB_OFFLINE"] = "1"
  return env


FAST = ["--config.pretrain.probe=False", "--config.eval_at_start=False", "--config.eval_every=100",
        "--config.pretrain.export_hf=False"]


def _pretrain(workdir, *args, cache=None):
  """scripts/pretrain_encoder.py (smoke preset) in a subprocess; `cache`: a persistent compilation cache the
  runs share (the tiny model's initialisation and step compile once)."""
  cache = ["--config.compilation_cache=" + str(cache)] if cache else []
  proc = subprocess.run(PRETRAIN + ["--workdir", str(workdir)] + cache + list(args), env=_env(),
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
  return proc


def _trainable(workdir, step):
  import orbax.checkpoint as ocp
  with ocp.StandardCheckpointer() as ckptr:
    tree = ckptr.restore((Path(workdir) / "checkpoints" / str(step) / "trainable").absolute())
  return {"/".join(str(getattr(k, "key", k)) for k in path): np.asarray(v)
          for path, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
  """The smoke preset end to end: targets, step-0 eval with the probe, 4 steps, the encoder written out."""
  workdir = tmp_path_factory.mktemp("pretrain")
  return workdir, _pretrain(workdir, cache=compile_cache(tmp_path_factory))


_CACHE = []


def compile_cache(tmp_path_factory):
  if not _CACHE:
    _CACHE.append(tmp_path_factory.mktemp("xla_cache"))
  return _CACHE[0]


def test_smoke_run_writes_the_encoder_and_the_probe_curve(smoke_run):
  workdir, proc = smoke_run
  rows = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
  evals = [r for r in rows if r["split"] == "eval"]
  assert [r["step"] for r in evals] == [0, 4] and evals[0]["train_minutes"] == 0.0
  assert {"probe_instrument", "probe_key", "probe_tempo_class", "ce_0", "ce_1", "cqt_mse"} <= set(evals[-1])
  curve = json.loads((workdir / "probe.json").read_text())["curve"]
  assert [r["step"] for r in curve] == [0, 4]
  assert (workdir / "encoder" / "meta.json").is_file() and "linear probe" in proc.stdout


def test_pretraining_resume_is_bitwise(smoke_run, tmp_path, tmp_path_factory):
  """2 steps, then the same command resumes to 4: the parameters and losses equal the uninterrupted smoke
  run's (masks, crops and the data order are all restored; its evals and probes change no training state)."""
  ref, _ = smoke_run
  run = tmp_path / "run"
  cache = compile_cache(tmp_path_factory)
  _pretrain(run, *FAST, "--config.train.num_steps=2", cache=cache)
  proc = _pretrain(run, *FAST, cache=cache)
  assert "resumed from" in proc.stdout
  a, b = _trainable(ref, 4), _trainable(run, 4)
  assert a.keys() == b.keys() and len(a) > 40
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)
  losses = lambda w: {r["step"]: r["loss"] for r in map(json.loads, (w / "metrics.jsonl").read_text().splitlines())
                      if r["split"] == "train"}
  assert losses(ref)[3] == losses(run)[3] and losses(ref)[4] == losses(run)[4]


def test_pretrained_encoder_converts_to_hubert_with_parity(smoke_run):
  import torch
  import transformers
  from musilingo_jax.convert.converted import load_converted
  from musilingo_jax.models import mert
  workdir, _ = smoke_run
  (ours,), _ = load_converted(workdir / "encoder", (mert.HF_KIND,), dtype="float32")
  hub = transformers.HubertModel.from_pretrained(workdir / "encoder_hf").eval()
  audio = np.random.default_rng(0).standard_normal((2, 8000)).astype(np.float32) * 0.1
  with torch.no_grad():
    ref = hub(torch.from_numpy(audio), output_hidden_states=True)
  states = ours(jnp.asarray(audio))
  assert len(states) == len(ref.hidden_states)
  for a, b in zip(states[:-1], ref.hidden_states[:-1]):
    np.testing.assert_allclose(np.asarray(a), b.numpy(), atol=1e-4, rtol=1e-4)
  np.testing.assert_allclose(np.asarray(states[-1]), ref.last_hidden_state.numpy(), atol=1e-4, rtol=1e-4)
  # the trained weights, not a fresh init: the exported tensors equal the run's last checkpoint
  trained = _trainable(workdir, 4)
  kernel = trained["encoder/feature_projection/projection/kernel"]
  np.testing.assert_array_equal(np.asarray(ours.feature_projection.projection.kernel[...]), kernel)


def test_a_pretrained_encoder_is_the_demo_encoder(smoke_run):
  """config.model.encoder_init = a pretraining's WORKDIR/encoder: build uses those weights (the config's dtypes
  and overrides applied), records it in frozen_ref, and keys the demo's feature records by it."""
  from musilingo_jax import build
  from musilingo_jax import config as cfglib
  workdir, _ = smoke_run
  c = cfglib.demo_config(cfglib.base_config(), smoke=True)
  c.model.encoder_preset = "tiny"
  random_enc, random_ref = build.init_encoder(c)
  c.model.encoder_init = str(workdir / "encoder")
  cfglib.validate(c, need_data=False)
  enc, ref = build.init_encoder(c)
  assert ref.startswith("pretrained ") and random_ref.startswith("random ")
  kernel = _trainable(workdir, 4)["encoder/feature_projection/projection/kernel"]
  np.testing.assert_array_equal(np.asarray(enc.feature_projection.projection.kernel[...]), kernel)
  assert enc.cfg == random_enc.cfg   # the same architecture and run settings, other weights
  model = build._EncoderConfigOnly(enc.cfg)
  keyed = build.demo_dirs(c, model)[1]
  c.model.encoder_init = "random"
  assert build.demo_dirs(c, model)[1] != keyed
  c.model.encoder_init = str(workdir / "nowhere")
  with pytest.raises(cfglib.ConfigError, match="config.model.encoder_init"):
    cfglib.validate(c, need_data=False)
