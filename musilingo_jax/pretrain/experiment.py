"""`PretrainExperiment`: the `Experiment` that `trainer.run` drives when `config.task = "mert_pretrain"`.

The same loop, step, optimizer, shardings, checkpoints, resume, logs and SIGTERM / NaN handling as the
MusiLingo training (trainer.py, train.py); only what is set up differs:

  model     `MERTPretrainer`: the MERT encoder of config.model.encoder_preset (initialised from config.seed, or
            config.model.encoder_init's pretrained directory) + `MERTPretrainHeads` sized by the targets
  data      `PretrainData` over the prepared targets (`demo.ensure_targets` prepares them on first use)
  trainable config.train.trainable = "all": every parameter of the encoder and the heads
  loss      `MERTPretrainer.loss` (masked prediction + CQT + feature penalty), through train.make_train_step
  evals     the eval loss (masked frames of the validation clips, fixed masks), its terms (cross-entropy and
            accuracy per codebook, CQT error, feature penalty) and the linear probe of pretrain/probe.py
            (config.pretrain.probe) with `train_minutes`, the wall time of this process since the step-0
            eval (or since set-up) without the evals: probe accuracy against pretraining minutes is the
            eval rows of metrics.jsonl (the step-0 row, config.eval_at_start, is the random encoder; a
            resumed process restarts the clock)

`save_encoder` writes the encoder as a converted directory (params/encoder + encoder_config.json +
meta.json, what `load_converted`, `records.load_encoder` and config.model.encoder_init read); `export_hf`
as a transformers HubertModel directory.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh

from musilingo_jax import build, sharding, storage
from musilingo_jax.convert import converted
from musilingo_jax.experiment import Experiment, activations_of
from musilingo_jax.models import mert
from musilingo_jax.models.mert import MERT
from musilingo_jax.pretrain import demo as demo_lib
from musilingo_jax.pretrain import targets as targets_lib
from musilingo_jax.pretrain.data import PretrainData
from musilingo_jax.pretrain.model import MERTPretrainer, MERTPretrainHeads, PretrainConfig
from musilingo_jax.pretrain.probe import ProbeSet


def pretrain_config(c, meta: dict) -> PretrainConfig:
  p = c.pretrain
  return PretrainConfig(codebook_sizes=tuple(int(k) for k in meta["codebook_sizes"]), cqt_bins=int(meta["cqt_bins"]),
                        final_dim=int(p.final_dim), logit_temp=float(p.logit_temp), mask_prob=float(p.mask_prob),
                        mask_length=int(p.mask_length), mask_min=int(p.mask_min), cqt_weight=float(p.cqt_weight),
                        feature_pen_weight=float(p.feature_pen_weight),
                        feature_grad_mult=float(p.feature_grad_mult),
                        nomask_weight=float(p.get("nomask_weight", 0.0)))


def build_encoder(c, *, mesh=None, rules=None, activations=None) -> tuple[MERT, dict]:
  """(the encoder to pretrain, where it came from): random from config.seed, or config.model.encoder_init's
  directory (continue pretraining a converted or pretrained MERT)."""
  init = c.model.get("encoder_init", "random")
  if init in ("random", "pretrain_demo"):
    if init == "pretrain_demo":
      raise ValueError("config.model.encoder_init = 'pretrain_demo' is the demo's finished encoder; to continue "
                       "pretraining it give its directory")
    enc = build.init_random(MERT, build.preset_encoder_config(c, activations=activations), c.seed, mesh, rules)
    return enc, {"encoder": f"random {c.model.encoder_preset} (seed {c.seed})"}
  enc_overrides, _ = build.model_overrides(c, activations)
  (enc,), _ = converted.load_converted(init, (mert.HF_KIND,), mesh=mesh, sharding_rules=rules,
                                       config_overrides={"encoder": enc_overrides})
  if enc is None:
    raise ValueError(f"config.model.encoder_init = {init!r}: no params/encoder there")
  return enc, {"encoder": f"pretrained {os.path.abspath(init) if '://' not in init else init}"}


def _on_process_0_then_all(fn):
  """fn() on process 0 first (it may write), then on the others (they read what it wrote)."""
  if jax.process_count() == 1:
    return fn()
  from jax.experimental import multihost_utils
  out = fn() if jax.process_index() == 0 else None
  multihost_utils.sync_global_devices("pretrain targets")
  return out if jax.process_index() == 0 else fn()


@dataclasses.dataclass
class PretrainExperiment(Experiment):
  probe: ProbeSet | None = None
  targets_dir: str = ""
  _clock: dict = dataclasses.field(default_factory=dict)

  @classmethod
  def from_config(cls, c, mesh: Mesh | None = None, *, model=None, tokenizer=None, abstract: bool = False,
                  data: bool = True) -> "PretrainExperiment":
    if abstract or model is not None:
      raise ValueError("pretraining builds its own model from the config (no abstract / given model)")
    mesh = sharding.make_mesh(c.mesh.shape) if mesh is None else mesh
    acts = activations_of(c, mesh)
    enc_cfg = build.preset_encoder_config(c)
    progress = jax.process_index() == 0
    tdir = _on_process_0_then_all(lambda: demo_lib.ensure_targets(c, enc_cfg, progress=progress))
    meta = targets_lib.read_meta(tdir)
    encoder, frozen_ref = build_encoder(c, mesh=mesh, rules=c.mesh.rules, activations=acts)
    pcfg = pretrain_config(c, meta)
    heads = build.init_random(MERTPretrainHeads, pcfg, c.seed + 11, mesh, c.mesh.rules,
                              hidden_size=encoder.cfg.hidden_size)
    model = MERTPretrainer(encoder, heads, rngs=nnx.Rngs(dropout=c.seed + 13))
    frozen_ref = {**frozen_ref, "targets": os.fspath(tdir)}
    run_data = PretrainData(c, tdir, encoder.cfg) if data else None
    exp = cls(c=c, mesh=mesh, model=model, tokenizer=None, frozen_ref=frozen_ref, data=run_data,
              targets_dir=os.fspath(tdir))
    if c.pretrain.probe and data:
      exp.probe = ProbeSet(demo_lib.qa_set_dir(c.pretrain.demo_set), seconds=float(c.pretrain.probe_seconds))
    exp._split()
    exp._clock.update(start=time.perf_counter(), excluded=0.0)
    return exp

  # ---- what the trainer asks besides the step ----------------------------------------------------

  def step_cost(self, gbatch: dict) -> tuple[float, int]:
    """(FLOPs of one step, encoder frames per step): forward everywhere, backward (x2) where gradients flow
    (the conv stack only with feature_grad_mult > 0), attention counted in full."""
    cfg, pcfg = self.model.encoder.cfg, self.model.cfg
    b, s = gbatch["audio"].shape
    conv, n, c_in = 0.0, s, 1
    for k, st, c_out in zip(cfg.conv_kernel, cfg.conv_stride, cfg.conv_dim):
      n = (n - k) // st + 1
      conv += 2.0 * n * k * c_in * c_out
      c_in = c_out
    t, d = n, cfg.hidden_size
    layer = 2.0 * t * (4 * d * d + 2 * d * cfg.intermediate_size) + 4.0 * t * t * d
    rest = (2.0 * t * c_in * d + 2.0 * t * d * (d // cfg.num_conv_pos_embedding_groups) * cfg.num_conv_pos_embeddings
            + cfg.num_hidden_layers * layer
            + 2.0 * t * d * (pcfg.final_dim * len(pcfg.codebook_sizes) + pcfg.cqt_bins))
    flops = b * (3.0 * rest + conv * (3.0 if pcfg.feature_grad_mult > 0 else 1.0))
    return flops, int(b * t)

  def eval_step(self) -> Any:
    """Jitted (trainable, frozen, batch) -> (loss summed over masked frames, their count, every other loss term
    and metric summed the same way): the trainer's eval averages them all from one forward pass."""
    graphdef = self.eval_graphdef

    def step(trainable, frozen, batch):
      terms = nnx.merge(graphdef, trainable, frozen).terms(batch)
      n = terms["count"]
      return terms["loss"] * n, n, {k: v * n for k, v in terms.items() if k not in ("loss", "count")}
    return jax.jit(step)

  def extra_eval_metrics(self, trainable, step: int) -> dict[str, float]:
    """The linear probe and the minutes trained (without evals); the loss terms come with the eval loss
    (`eval_step`)."""
    t0 = time.perf_counter()
    model = self.merged(trainable)
    out: dict[str, float] = {}
    if self.probe is not None:
      acc = self.probe.evaluate(model.encoder)
      out.update({f"probe_{k}": v for k, v in acc.items()})
    now = time.perf_counter()
    self._clock["excluded"] += now - t0
    out["train_minutes"] = (now - self._clock["start"] - self._clock["excluded"]) / 60.0
    if step == 0:  # the step-0 eval (config.eval_at_start): the clock starts after it
      self._clock.update(start=now, excluded=0.0)
      out["train_minutes"] = 0.0
    return out


# ---------------------------------------------------------------------------------------- outputs

def save_encoder(encoder: MERT, out_dir, *, source: dict | None = None) -> str:
  """The encoder as a converted directory (convert/converted.py's format, encoder only), written into a
  temporary folder and renamed into place (local), or with meta.json last (gs://)."""
  out = storage.path(out_dir)
  remote = storage.is_remote(out)
  tmp = out if remote else out.parent / f".{out.name}.tmp-{os.getpid()}"
  if not remote and tmp.exists():
    shutil.rmtree(tmp)
  storage.makedirs(tmp)
  converted.save_params(tmp / "params" / mert.HF_KIND.name, encoder, mert.HF_KIND.rules)
  storage.write_atomic(tmp / f"{mert.HF_KIND.name}_config.json",
                       json.dumps(encoder.cfg.to_hf_config(), indent=2) + "\n")
  meta = {"format": converted.FORMAT, "dtype": jnp.dtype(encoder.cfg.param_dtype).name,
          "sources": {mert.HF_KIND.name: "MERT-style pretraining (musilingo_jax.pretrain)"}, **(source or {})}
  storage.write_atomic(tmp / "meta.json", json.dumps(meta, indent=2) + "\n")
  if not remote:
    if out.exists():
      shutil.rmtree(out)
    os.replace(tmp, out)
  return os.fspath(out)


def export_hf(encoder: MERT, out_dir) -> str:
  """The encoder as a transformers HubertModel directory (config.json + model.safetensors)."""
  from musilingo_jax.convert import hf
  return os.fspath(hf.export_pretrained(mert.HF_KIND, encoder, out_dir, dtype="float32"))


def probe_curve(workdir) -> list[dict]:
  """The eval rows of a pretraining run's metrics.jsonl (step, minutes, loss, probe accuracies), in order; a
  step logged twice (a resumed run) keeps its last row."""
  path = storage.path(workdir) / "metrics.jsonl"
  rows: dict[int, dict] = {}
  if path.is_file():
    for line in path.read_text().splitlines():
      r = json.loads(line)
      if r.get("split") == "eval":
        rows[int(r["step"])] = {k: v for k, v in r.items() if k != "split"}
  return [rows[s] for s in sorted(rows)]
