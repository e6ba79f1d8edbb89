"""One experiment setup: a config (and a mesh) -> everything a train step needs.

`Experiment.from_config(c, mesh)` builds the MusiLingo from whichever source the config names (a converted
checkpoint, a GGUF, random presets; `build.build_model` applies every `config.model` field on each), gives
its encoder and LLM the run's activation sharding (`sharding.Activations` in their configs, unless
`config.mesh.constrain_activations` is off), prepares the data (which may attach feature statistics to the
model), splits it into trainable and frozen state, and holds the optimizer, the shardings and the factories
of the jitted steps. The trainer, the AOT compiler (`abstract=True`: nothing of model size is allocated),
the benchmarks and the GPU check all start here; nothing else builds a step.

Data flow (docs/DESIGN.md): records -> `Data` batches -> `train_step` (encoder or features -> pooled tokens
-> projection -> splice -> LLM -> loss -> optimizer) -> the trainer's checkpoints.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh

from musilingo_jax import build, sharding
from musilingo_jax import config as cfglib
from musilingo_jax import train as trainlib
from musilingo_jax.models.musilingo import MusiLingo


@dataclasses.dataclass
class Experiment:
  c: Any                      # the run's ml_collections config
  mesh: Mesh
  model: MusiLingo            # train mode; its variables are the ones `trainable` / `frozen` split
  tokenizer: Any              # None for random presets without a tokenizer (AOT, benchmarks)
  frozen_ref: dict            # where the frozen weights came from (checkpoints reference, never copy them)
  data: build.Data | None
  graphdef: Any = None        # train-mode graph
  eval_graphdef: Any = None   # eval-mode graph (no dropout, no SpecAugment)
  trainable: nnx.State = None
  frozen: nnx.State = None
  tx: optax.GradientTransformation = None
  schedule: Callable = None   # optimizer step -> learning rate
  trainable_sh: Any = None
  frozen_sh: Any = None
  opt_sh: Any = None
  replicated: Any = None

  @classmethod
  def from_config(cls, c, mesh: Mesh | None = None, *, model: MusiLingo | None = None, tokenizer=None,
                  abstract: bool = False, data: bool = True) -> "Experiment":
    """The run of config `c` on `mesh` (default: `config.mesh.shape` over all devices).

    model: an already built MusiLingo to use instead of building one from `c` (benchmarks at shapes no
    preset has); `tokenizer` then goes with it. abstract: build with `nnx.eval_shape` (AOT compilation:
    ShapeDtypeStruct leaves, no data). data: build the run's `Data` (needs a tokenizer and records, or the
    demo set); off for compile-only and benchmark setups."""
    mesh = sharding.make_mesh(c.mesh.shape) if mesh is None else mesh
    frozen_ref: dict = {"model": "given"}
    if model is None:
      model, tokenizer, frozen_ref = build.build_model(
          c, mesh=mesh, rules=c.mesh.rules, abstract=abstract, activations=activations_of(c, mesh))
    run_data = build.build_data(c, tokenizer, model) if (data and not abstract) else None
    exp = cls(c=c, mesh=mesh, model=model, tokenizer=tokenizer, frozen_ref=frozen_ref, data=run_data)
    exp._split()
    return exp

  # ---- setup -------------------------------------------------------------------------------------

  @property
  def rules(self):
    return self.c.mesh.rules

  @property
  def loss_positions(self) -> int | None:
    return cfglib.loss_positions(self.c)

  def _split(self) -> None:
    c, model = self.c, self.model
    model.eval()
    self.eval_graphdef, _, _ = trainlib.split_model(model, c.train.trainable)
    model.train()
    self.graphdef, self.trainable, self.frozen = trainlib.split_model(model, c.train.trainable)
    self.tx, self.schedule = trainlib.optimizer_from_config(c)
    self.replicated = sharding.replicated(self.mesh)
    self.trainable_sh = sharding.state_shardings(self.trainable, self.mesh, self.rules)
    self.frozen_sh = sharding.state_shardings(self.frozen, self.mesh, self.rules)
    self.opt_sh = trainlib.opt_state_shardings(self.tx, self.trainable, self.trainable_sh, self.replicated)

  def init_state(self) -> tuple[nnx.State, Any]:
    """(a copy of trainable placed on its shardings, a fresh optimizer state): the step donates both, so
    the model's own arrays stay alive."""
    trainable = jax.device_put(jax.tree.map(jnp.copy, self.trainable), self.trainable_sh)
    return trainable, jax.jit(self.tx.init, out_shardings=self.opt_sh)(trainable)

  def merged(self, trainable: nnx.State, *, train: bool = False) -> MusiLingo:
    """A MusiLingo of these trainable values and the frozen state (eval mode unless `train`)."""
    return nnx.merge(self.graphdef if train else self.eval_graphdef, trainable, self.frozen)

  # ---- steps -------------------------------------------------------------------------------------

  def batch_shardings(self, batch: dict) -> dict:
    """Leading (batch) dimension over data x fsdp for every key of `batch` (arrays or (shape, dtype))."""
    def ndim(v):
      return len(v[0]) if isinstance(v, tuple) else np.ndim(v)
    return {k: sharding.batch_sharding(self.mesh, ndim(v)) for k, v in batch.items()}

  def train_step(self, batch_sh: dict, *, carry_grads: bool = False) -> Callable:
    """The jitted step (trainable, opt_state, frozen, batch, step[, carried]) -> (trainable, opt_state,
    metrics): accumulation, reduction, dropout seed and head positions from the config; trainable and
    optimizer state donated; explicit in/out shardings."""
    c = self.c
    fn = trainlib.make_train_step(self.graphdef, self.tx, accum_steps=c.train.accum_steps,
                                  accum_reduce=c.train.accum_reduce, dropout_seed=c.seed,
                                  loss_positions=self.loss_positions, carry_grads=carry_grads)
    return trainlib.jit_train_step(fn, trainable_sh=self.trainable_sh, opt_sh=self.opt_sh,
                                   frozen_sh=self.frozen_sh, batch_sh=batch_sh, replicated=self.replicated,
                                   carry_grads=carry_grads)

  def grad_step(self, n_micro: int) -> Callable:
    """Jitted (trainable, frozen, batch, rng_base) -> (summed gradients, metrics) over n_micro micro-batches
    (the reference's epoch-leftover micro-batches, `train.EpochCarry`)."""
    fn = trainlib.make_grad_step(self.graphdef, n_micro=n_micro, dropout_seed=self.c.seed,
                                 loss_positions=self.loss_positions)
    return jax.jit(fn, out_shardings=(self.trainable_sh, self.replicated))

  def eval_step(self) -> Callable:
    """Jitted (trainable, frozen, batch) -> (loss summed over label tokens, token count)."""
    return jax.jit(trainlib.make_eval_step(self.eval_graphdef, loss_positions=self.loss_positions))

  def abstract_args(self, batch_shapes: dict[str, tuple[tuple[int, ...], Any]]) -> tuple:
    """ShapeDtypeStructs with shardings for (trainable, opt_state, frozen, batch, step): what
    `train_step(...).lower(*args)` compiles for, without allocating anything."""
    def structs(abstract, shardings):
      return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
    batch_sh = self.batch_shardings(batch_shapes)
    opt_abstract = jax.eval_shape(self.tx.init, self.trainable)
    return (structs(self.trainable, self.trainable_sh), structs(opt_abstract, self.opt_sh),
            structs(self.frozen, self.frozen_sh),
            {k: jax.ShapeDtypeStruct(s, d, sharding=batch_sh[k]) for k, (s, d) in batch_shapes.items()},
            jax.ShapeDtypeStruct((), jnp.int32, sharding=self.replicated))

  def step_flops(self, rows: int, seq_len: int, n_audio_tokens: int, *, encoder_frames: int = 0) -> float:
    return step_flops(self.model, rows, seq_len, n_audio_tokens, trainable_mode=self.c.train.trainable,
                      encoder_frames=encoder_frames, head_positions=self.loss_positions)

  # ---- what the trainer asks besides the step (pretrain/experiment.py answers them for pretraining) ----

  def step_cost(self, gbatch: dict) -> tuple[float, int]:
    """(FLOPs of one step on this global batch, the tokens it counts for tokens_per_s): the batch's rows x
    positions (`step_flops`, with the encoder's frames when raw audio goes through it in the step)."""
    frames = self.model.cfg.encoder.feature_lengths(gbatch["audio"].shape[-1]) if "audio" in gbatch else 0
    rows, seq_len = gbatch["input_ids"].shape[:2]
    flops = self.step_flops(rows, seq_len, self.data.slots.tokens, encoder_frames=int(frames))
    return flops, int(np.prod(gbatch["input_ids"].shape))

  def extra_eval_metrics(self, trainable: nnx.State, step: int) -> dict[str, float]:
    """Metrics beside the eval loss at the eval after `step` steps: generation metrics on
    config.eval.generate_samples held-out examples (none when 0)."""
    del step
    n = self.c.eval.generate_samples
    return self.data.generation_metrics(self.merged(trainable), n) if n else {}


def activations_of(c, mesh: Mesh) -> sharding.Activations | None:
  """The activation sharding a run's models carry (config.mesh.constrain_activations, default on)."""
  if not c.mesh.get("constrain_activations", True):
    return None
  return sharding.Activations(mesh, c.mesh.rules)


def _count(module, filt) -> int:
  return sum(int(math.prod(v.get_value().shape)) for _, v in nnx.to_flat_state(nnx.state(module, filt)))


def step_flops(model, rows: int, seq_len: int, n_audio_tokens: int, *, trainable_mode: str,
               encoder_frames: int = 0, head_positions: int | None = None) -> float:
  """FLOPs one step must do, not 6N (most of the model is frozen): per token the frozen LLM's matmuls
  forward (2N) and their activation gradients backward (2N; frozen weights get no weight gradients),
  attention (QK^T and AV: forward, and twice that backward), weight gradients only for trainable leaves
  (projection per audio token; LoRA/all per token), and the encoder's forward when it runs in the step.
  The LM head runs at `head_positions` per row when the loss computes logits only there
  (config.train.head_at_labels), else at every position. Counts the full (unmasked) attention matrix,
  which is what the kernels compute."""
  cfg = model.cfg.llm
  base = nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam))
  head = cfg.vocab_size * cfg.hidden_size
  n_body = _count(model.llm, base) - head  # the lookup is no matmul
  if not cfg.tie_word_embeddings:
    n_body -= head                          # the untied lm_head is counted apart
  attn_fwd = 4 * cfg.num_hidden_layers * seq_len * cfg.num_attention_heads * cfg.head_dim
  tokens = rows * seq_len
  head_tokens = rows * min(seq_len, head_positions or seq_len)
  flops = tokens * (4 * n_body + 3 * attn_fwd) + head_tokens * 4 * head
  d_enc, d_llm = model.cfg.encoder.hidden_size, cfg.hidden_size
  flops += 6 * d_enc * d_llm * rows * n_audio_tokens
  if trainable_mode == "projection+lora":
    flops += 2 * _count(model.llm, nnx.LoRAParam) * tokens
  elif trainable_mode == "all":
    flops += 2 * (n_body * tokens + head * head_tokens)
  if encoder_frames:
    n_enc = _count(model.encoder.encoder, nnx.Param)
    flops += 2 * n_enc * encoder_frames * rows
  return float(flops)
