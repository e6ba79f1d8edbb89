"""Ahead-of-time compilation of the real train step for Cloud TPU topologies, from a CPU-only machine.

With libtpu installed (`pip install "jax[tpu]"`), `jax.experimental.topologies.get_topology_desc` describes
a TPU slice (or several) without any TPU present; a Mesh over its devices plus `jax.ShapeDtypeStruct`s that
carry NamedShardings is enough to `lower(...).compile()` the step exactly as a pod would run it (MaxText's
train_compile.py idea). Nothing of model size is allocated: `Experiment.from_config(c, mesh, abstract=True)`
builds the model with `nnx.eval_shape` and gives the same split, shardings, optimizer and jitted step the
trainer runs.

The compiled executable reports per-chip memory (`memory_analysis`) and FLOPs/bytes (`cost_analysis`); if the
step does not fit in a chip's HBM the TPU compiler refuses it and lists the largest allocations, which we
pass on. libtpu warns that it found no TPU; that is expected here.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import math
import os
import re
import time
from typing import Any

import jax
import jax.numpy as jnp

from musilingo_jax import build, sharding
from musilingo_jax import config as cfglib
from musilingo_jax.experiment import Experiment

GiB = 2 ** 30


@dataclasses.dataclass(frozen=True)
class Chip:
  """Per-chip figures used for the fit verdict and the roofline (Cloud TPU docs, v5e and v5p pages)."""
  name: str
  hbm_bytes: int
  peak_bf16_flops: float   # FLOP/s
  hbm_bandwidth: float     # bytes/s


# Keyed by jax's device_kind. v5e: 197 TFLOP/s bf16, 16 GiB HBM2 at 819 GB/s; v5p: 459 TFLOP/s bf16,
# 95 GB HBM2e at 2765 GB/s (cloud.google.com/tpu/docs/v5e and /v5p). hbm_bytes is what the TPU compiler
# (libtpu 0.0.42) lets a program use: "exceeds available HBM (15.75G)" on v5e, "(95.74G)" on v5p.
CHIPS = {
    "TPU v5 lite": Chip("v5e", int(15.75 * GiB), 197e12, 819e9),
    "TPU v5": Chip("v5p", int(95.74 * GiB), 459e12, 2765e9),
}

# Raw-audio window per dataset when the encoder runs in the step (seconds at 24 kHz; docs/reference.md, Data).
# The longest clip a dataset yields at 24 kHz (no records at hand here): the native-rate windows at the
# lowest common rate (MusicQA: 372,000 samples of a 16 kHz file; MSD previews: 732,000 at 22.05 kHz).
AUDIO_SECONDS = {"lp-musiccaps-msd": 732_000 / 22_050, "musicqa": 372_000 / 16_000, "musicinstruct": 10.0,
                 "musiccaps": 10.0, "demo": 10.0}


class LibtpuMissing(RuntimeError):
  pass


def topology_devices(topology: str, num_slices: int = 1) -> list:
  """The devices of a Cloud TPU topology such as "v5e:4x4" or "v5p:2x2x2" (num_slices > 1: multi-slice)."""
  try:
    import libtpu  # noqa: F401
  except ImportError as e:
    raise LibtpuMissing('AOT compilation for TPU needs libtpu: pip install "jax[tpu]==' + jax.__version__
                        + '" (it runs on a CPU-only machine)') from e
  # libtpu takes /tmp/libtpu_lockfile for the process that loads it; any other jax process (on a machine
  # with libtpu installed and JAX_PLATFORMS unset) may hold it. A topology description uses no TPU.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  from jax.experimental import topologies
  kwargs = {"num_slices": num_slices} if num_slices > 1 else {}
  desc = topologies.get_topology_desc(platform="tpu", topology_name=topology, **kwargs)
  devices = list(desc.devices)
  # Slice-major order, so the outer ("data") mesh axis is the one that crosses slices (DCN).
  return sorted(devices, key=lambda d: (getattr(d, "slice_index", 0) or 0, d.id))


def chip_of(devices) -> Chip | None:
  return CHIPS.get(devices[0].device_kind)


def audio_samples(c) -> int:
  return int(round(AUDIO_SECONDS.get(c.data.dataset, 10.0) * 24_000))


def audio_slots(c, encoder_cfg) -> int:
  """config.data.n_audio_tokens, or (0) the tokens of the dataset's longest clip (`AUDIO_SECONDS`)."""
  if c.data.n_audio_tokens:
    return int(c.data.n_audio_tokens)
  return build.audio_token_count(encoder_cfg, c.model.pool_frames, audio_samples(c))


def batch_shapes(c, encoder_cfg) -> dict[str, tuple[tuple[int, ...], Any]]:
  """The DESIGN.md batch (global rows = batch_size * accum_steps) as {key: (shape, dtype)}."""
  rows, L = c.train.batch_size * c.train.accum_steps, c.data.max_len
  out = {k: ((rows, L), jnp.int32) for k in ("input_ids", "attention_mask", "labels", "positions")}
  # Packed rows (prompts.collate_packed): segment ids, and K example slots per row for the audio arrays.
  slots = (rows, int(c.data.pack_segments)) if cfglib.packs_rows(c) else (rows,)
  if cfglib.packs_rows(c):
    out["segment_ids"] = ((rows, L), jnp.int32)
  for k in ("audio_start", "audio_tokens"):
    out[k] = (slots, jnp.int32)
  out["valid"] = ((rows,), jnp.int32)
  if c.data.use_features:
    out["features"] = (slots + (audio_slots(c, encoder_cfg), encoder_cfg.hidden_size), jnp.float32)
  else:
    out["audio"] = (slots + (audio_samples(c),), jnp.float32)
    out["audio_len"] = (slots, jnp.int32)
    if not cfglib.packs_rows(c):
      out["audio_pad_len"] = ((rows,), jnp.int32)
  return out


def _per_chip_bytes(structs) -> int:
  """Bytes of one chip's shard of every leaf (the largest shard, for uneven splits)."""
  total = 0
  for s in jax.tree.leaves(structs):
    shape = s.sharding.shard_shape(s.shape) if s.sharding is not None else s.shape
    total += math.prod(shape) * _itemsize(s.dtype)
  return total


def _itemsize(dtype) -> int:
  if jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
    return 8  # threefry key data: 2 x uint32
  return jnp.dtype(dtype).itemsize


def _global_bytes(structs) -> int:
  return sum(math.prod(s.shape) * _itemsize(s.dtype) for s in jax.tree.leaves(structs))


@dataclasses.dataclass
class AotResult:
  topology: str
  num_slices: int
  chips: int
  chip: str
  mesh: dict[str, int]
  rules: str
  trainable_mode: str
  inputs: str                  # "features" | "audio"
  batch_size: int              # global micro-batch rows
  accum_steps: int
  rows_per_shard: float        # micro-batch rows per data x fsdp shard
  seq_len: int
  hbm_bytes: int | None
  scan_layers: bool | None = None  # config.model.scan_layers (None: a result saved before the field existed)
  remat: str | None = None         # config.model.remat
  # per chip, from the shardings
  trainable_bytes: int = 0
  frozen_bytes: int = 0
  opt_state_bytes: int = 0
  batch_bytes: int = 0
  # global, for the "shards N ways" check
  frozen_bytes_global: int = 0
  encoder_bytes: int = 0       # per chip, part of frozen_bytes; unread (and dropped by XLA) with features in
  trainable_bytes_global: int = 0
  # per chip, from the compiled executable
  argument_bytes: int | None = None
  output_bytes: int | None = None
  alias_bytes: int | None = None
  temp_bytes: int | None = None
  code_bytes: int | None = None
  total_bytes: int | None = None
  fits: bool | None = None
  xla_flops: float | None = None       # per chip, cost_analysis (a while loop's body counted once)
  xla_bytes: float | None = None
  analytic_flops: float | None = None  # per chip, experiment.step_flops / chips (whole step)
  step_time_s: float | None = None
  tokens_per_s_per_chip: float | None = None
  bound: str | None = None
  compile_s: float | None = None
  error: str | None = None
  error_detail: str | None = None
  biggest: list[str] = dataclasses.field(default_factory=list)

  def to_json(self) -> dict:
    return dataclasses.asdict(self)

  @classmethod
  def from_json(cls, d: dict) -> "AotResult":
    """Reads a saved result; the fit verdict is re-judged against today's CHIPS figures."""
    r = cls(**{f.name: d[f.name] for f in dataclasses.fields(cls) if f.name in d})
    chip = next((c for c in CHIPS.values() if c.name == r.chip), None)
    if chip is not None and r.total_bytes is not None:
      r.hbm_bytes = chip.hbm_bytes
      r.fits = r.error is None and r.total_bytes <= chip.hbm_bytes
    return r


def load_results(paths) -> list["AotResult"]:
  out = []
  for p in paths:
    with open(p) as f:
      out += [AotResult.from_json(d) for d in json.load(f)]
  return out


def _rules_name(rules) -> str:
  return rules if isinstance(rules, str) else "custom"


def compile_step(c, topology: str, *, num_slices: int = 1, devices=None) -> AotResult:
  """AOT-compiles config `c`'s train step for `topology`; returns the per-chip report (never raises for
  an out-of-memory compile: the result says so and lists the biggest buffers)."""
  devices = devices if devices is not None else topology_devices(topology, num_slices)
  n = len(devices)
  cfglib.validate(c, num_devices=n, need_data=False)
  chip = chip_of(devices)
  mesh = sharding.make_mesh(c.mesh.shape, devices)
  rules = c.mesh.rules
  mesh_sizes = dict(mesh.shape)

  exp = Experiment.from_config(c, mesh, abstract=True, data=False)
  model = exp.model
  shapes = batch_shapes(c, model.cfg.encoder)
  trainable_s, opt_s, frozen_s, batch_s, step_s = exp.abstract_args(shapes)

  rows, L = c.train.batch_size * c.train.accum_steps, c.data.max_len
  batch_ways = mesh_sizes["data"] * mesh_sizes["fsdp"]
  res = AotResult(
      topology=topology, num_slices=num_slices, chips=n, chip=chip.name if chip else devices[0].device_kind,
      mesh=mesh_sizes, rules=_rules_name(rules), trainable_mode=c.train.trainable,
      inputs="features" if c.data.use_features else "audio", batch_size=c.train.batch_size,
      accum_steps=c.train.accum_steps, rows_per_shard=c.train.batch_size / batch_ways, seq_len=L,
      hbm_bytes=chip.hbm_bytes if chip else None,
      scan_layers=bool(c.model.get("scan_layers", False)), remat=str(c.model.get("remat", "none")),
      trainable_bytes=_per_chip_bytes(trainable_s), frozen_bytes=_per_chip_bytes(frozen_s),
      opt_state_bytes=_per_chip_bytes(opt_s), batch_bytes=_per_chip_bytes(batch_s),
      frozen_bytes_global=_global_bytes(frozen_s), trainable_bytes_global=_global_bytes(trainable_s),
      encoder_bytes=_per_chip_bytes([s for path, s in jax.tree_util.tree_flatten_with_path(frozen_s)[0]
                                     if jax.tree_util.keystr(path, simple=True, separator=".")
                                     .startswith("encoder.")]))
  frames = 0 if c.data.use_features else int(model.cfg.encoder.feature_lengths(audio_samples(c)))
  res.analytic_flops = exp.step_flops(rows, L, audio_slots(c, model.cfg.encoder), encoder_frames=frames) / n
  jitted = exp.train_step({k: v.sharding for k, v in batch_s.items()})
  t0 = time.perf_counter()
  lowered = jitted.lower(trainable_s, opt_s, frozen_s, batch_s, step_s)
  try:
    compiled = lowered.compile()
  except Exception as e:  # noqa: BLE001 -- XlaRuntimeError; an OOM is a result, not a crash
    msg = str(e)
    if "RESOURCE_EXHAUSTED" not in msg:
      raise
    res.fits = False
    res.error = _oom_summary(msg)
    res.error_detail = msg[:6000]
    _memory_from_oom(res, msg)
    # Compile again, told not to fail on OOM, to measure what the step needs and list its biggest buffers
    # (libtpu may refuse: "Invalid TPU program"; then the message's total and the pre-partitioning
    # shapes are what we have).
    try:
      compiled = lowered.compile(compiler_options={"xla_tpu_no_crash_on_oom": True})
    except Exception:  # noqa: BLE001
      res.compile_s = time.perf_counter() - t0
      res.biggest = _biggest_arrays({"trainable": trainable_s, "frozen": frozen_s, "opt_state": opt_s,
                                     "batch": batch_s}, None)
      res.biggest += [f"{_fmt(b)} global (before sharding) {d}" for b, d in
                      _largest_values(lowered.as_text(), _STABLEHLO_SHAPE, k=6)]
      return res
  res.compile_s = time.perf_counter() - t0
  mem = compiled.memory_analysis()
  if mem is not None:
    res.argument_bytes = int(mem.argument_size_in_bytes)
    res.output_bytes = int(mem.output_size_in_bytes)
    res.alias_bytes = int(mem.alias_size_in_bytes)
    res.temp_bytes = int(mem.temp_size_in_bytes)
    res.code_bytes = int(mem.generated_code_size_in_bytes)
    res.total_bytes = (res.argument_bytes + res.output_bytes - res.alias_bytes + res.temp_bytes
                       + res.code_bytes)
    if res.fits is None and res.hbm_bytes:
      res.fits = res.total_bytes <= res.hbm_bytes
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else None
  if cost:
    res.xla_flops = float(cost.get("flops", 0.0))
    res.xla_bytes = float(cost.get("bytes accessed", 0.0))
  res.biggest = _biggest_arrays({"trainable": trainable_s, "frozen": frozen_s, "opt_state": opt_s,
                                 "batch": batch_s}, compiled)
  _roofline(res, chip, res.analytic_flops,
            res.xla_bytes * c.train.accum_steps if res.xla_bytes else None, rows * L)
  del compiled
  gc.collect()
  return res


def _roofline(res: AotResult, chip: Chip | None, flops, bytes_, tokens: int) -> None:
  """Step time >= max(FLOPs / peak, bytes / HBM bandwidth), per chip (no overlap or comms modelled)."""
  if chip is None or not flops:
    return
  t_compute = flops / chip.peak_bf16_flops
  t_memory = (bytes_ or 0.0) / chip.hbm_bandwidth
  res.step_time_s = max(t_compute, t_memory)
  res.bound = "compute" if t_compute >= t_memory else "HBM"
  res.tokens_per_s_per_chip = tokens / res.chips / res.step_time_s


def _parse_size(text: str) -> int | None:
  m = re.match(r"\s*([\d.]+)\s*([KMGT]?)", text)
  if not m:
    return None
  return int(float(m.group(1)) * {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}[m.group(2)])


def _oom_summary(msg: str) -> str:
  for line in msg.splitlines():
    if "Ran out of memory" in line or "Exceeded" in line or "RESOURCE_EXHAUSTED" in line:
      return line.strip()[:300]
  return msg.strip().splitlines()[0][:300]


def _memory_from_oom(res: AotResult, msg: str) -> None:
  """The compiler's usable-HBM figure from its OOM message (both forms libtpu uses):
  '... HLO temporaries (16.02G) exceeds available HBM (15.75G).' or 'Used 20.55G of 15.75G hbm.'"""
  m = (re.search(r"exceeds available HBM \(([\d.]+[KMGT]?)\)", msg)
       or re.search(r"Used [\d.]+[KMGT]? of ([\d.]+[KMGT]?) hbm", msg))
  if m:
    res.hbm_bytes = _parse_size(m.group(1)) or res.hbm_bytes
  m = re.search(r"HLO temporaries \(([\d.]+[KMGT]?)\)", msg) or re.search(r"Used ([\d.]+[KMGT]?) of", msg)
  if m and res.total_bytes is None:
    res.total_bytes = _parse_size(m.group(1))


def _biggest_arrays(groups: dict[str, Any], compiled, k: int = 6) -> list[str]:
  """The largest per-chip arrays: inputs by name (from their shardings) and the largest temporaries in the
  optimized HLO (by shape; a rough guide to what the activations are)."""
  items = []
  for group, tree in groups.items():
    for path, s in jax.tree_util.tree_flatten_with_path(tree)[0]:
      shape = s.sharding.shard_shape(s.shape) if s.sharding is not None else s.shape
      name = jax.tree_util.keystr(path, simple=True, separator=".").removesuffix(".value")
      items.append((math.prod(shape) * _itemsize(s.dtype), f"{group}:{name} {s.dtype}"
                    f"{list(shape)}"))
  items.sort(key=lambda t: -t[0])
  out = [f"{_fmt(b)} {d}" for b, d in items[:k]]
  out += [f"{_fmt(b)} HLO value {d}" for b, d in _largest_hlo_values(compiled, k)]
  return out


_HLO_SHAPE = re.compile(r"= (bf16|f32|f16|s32|u32|pred|s8|u8)\[([\d,]*)\]")
_STABLEHLO_SHAPE = re.compile(r"tensor<((?:\d+x)*)(bf16|f32|f16|i32|ui32|i1|i8|ui8)>")
_DTYPE_BYTES = {"bf16": 2, "f16": 2, "f32": 4, "s32": 4, "u32": 4, "pred": 1, "s8": 1, "u8": 1,
                "i32": 4, "ui32": 4, "i1": 1, "i8": 1, "ui8": 1}


def _largest_values(text: str, pattern, k: int) -> list[tuple[int, str]]:
  """The k largest distinct array shapes in an HLO (or StableHLO) text, as (bytes, "dtype[dims]")."""
  seen: dict[str, int] = {}
  for m in pattern.finditer(text):
    if pattern is _HLO_SHAPE:
      dtype, dims = m.group(1), [int(x) for x in m.group(2).split(",") if x]
    else:
      dtype, dims = m.group(2), [int(x) for x in m.group(1).split("x") if x]
    seen[f"{dtype}[{','.join(map(str, dims))}]"] = math.prod(dims) * _DTYPE_BYTES[dtype]
  return sorted(((b, s) for s, b in seen.items()), key=lambda t: -t[0])[:k]


def _largest_hlo_values(compiled, k: int) -> list[tuple[int, str]]:
  if compiled is None:
    return []
  try:
    text = compiled.as_text()
  except Exception:  # noqa: BLE001
    return []
  return _largest_values(text, _HLO_SHAPE, k)


def _ms(seconds: float) -> str:
  ms = seconds * 1e3
  return f"{ms:,.0f} ms" if ms >= 10 else f"{ms:.3g} ms"


def _fmt(b) -> str:
  if b is None:
    return "?"
  for unit, div in (("GiB", GiB), ("MiB", 2**20), ("KiB", 2**10)):
    if abs(b) >= div:
      return f"{b / div:.2f} {unit}"
  return f"{int(b)} B"


def format_report(r: AotResult) -> str:
  lines = [f"AOT train step: {r.trainable_mode}, {r.inputs} in, global batch {r.batch_size} x accum "
           f"{r.accum_steps} rows of {r.seq_len} ({r.rows_per_shard:g} rows per batch shard per micro-step)",
           f"topology {r.topology}" + (f" x {r.num_slices} slices" if r.num_slices > 1 else "")
           + f": {r.chips} chips ({r.chip}); mesh {r.mesh}; rules {r.rules}; layers {layers_label(r)}; "
           f"compiled in {r.compile_s or 0:.0f} s",
           "per chip:",
           f"  trainable params   {_fmt(r.trainable_bytes):>11}   (all chips hold {_fmt(r.trainable_bytes_global)} "
           "in total)",
           f"  frozen params      {_fmt(r.frozen_bytes):>11}   ({r.frozen_bytes_global / max(r.frozen_bytes, 1):.1f}"
           f"-way split of {_fmt(r.frozen_bytes_global)})"
           + (f"; the encoder's {_fmt(r.encoder_bytes)} is unread with features in (XLA drops it)"
              if r.inputs == "features" and r.encoder_bytes else ""),
           f"  optimizer state    {_fmt(r.opt_state_bytes):>11}",
           f"  batch              {_fmt(r.batch_bytes):>11}"]
  if r.temp_bytes is not None:
    lines += [f"  activations/temp   {_fmt(r.temp_bytes):>11}   (compiler: arguments {_fmt(r.argument_bytes)}, "
              f"outputs {_fmt(r.output_bytes)}, aliased {_fmt(r.alias_bytes)}, code {_fmt(r.code_bytes)})"]
  hbm = f"{_fmt(r.hbm_bytes)} usable HBM" if r.hbm_bytes else "unknown HBM"
  verdict = {True: "FITS", False: "DOES NOT FIT", None: "?"}[r.fits]
  lines.append(f"  total              {_fmt(r.total_bytes):>11}   of {hbm} per chip: {verdict}")
  if r.error:
    lines.append(f"  compiler: {r.error}")
  if r.biggest:
    lines.append("biggest buffers per chip (inputs by name; temporaries by shape in the optimized HLO):")
    lines += [f"  {b}" for b in r.biggest]
  if r.fits is False:
    hint = {"dp": "shard the frozen weights (--config.mesh.rules=fsdp_tp --config.mesh.shape='(1,-1,4)', or fsdp "
                  "with '(1,-1,1)')",
            "fsdp": "use fsdp_tp (--config.mesh.rules=fsdp_tp --config.mesh.shape='(1,-1,4)'): under fsdp every chip "
                    "holds the whole micro-batch's activations (no activation sharding constraints in the model)"
            }.get(r.rules, "add tensor parallelism (a larger mesh tensor axis)")
    lines.append(f"  to fit: {hint}; or lower --config.train.batch_size (raise accum_steps to keep the update "
                 "size) or --config.data.max_len; precomputed features (--config.data.use_features=true) take the "
                 "encoder out of the step")
  chip = next((c for c in CHIPS.values() if c.name == r.chip), None)
  if r.analytic_flops:
    lines.append(f"FLOPs per chip per step: analytic {r.analytic_flops / 1e12:.3f} TFLOP (experiment.step_flops / "
                 f"{r.chips})" + (f"; XLA cost_analysis {r.xla_flops / 1e12:.3f} TFLOP, "
                                  f"{_fmt(r.xla_bytes)} accessed" if r.xla_flops is not None else ""))
    if r.accum_steps > 1 and r.xla_flops is not None:
      lines.append(f"  (cost_analysis counts the accumulation loop's body once: x{r.accum_steps} = "
                   f"{r.xla_flops * r.accum_steps / 1e12:.3f} TFLOP)")
  if r.step_time_s and chip:
    lines.append(f"roofline ({chip.name}: {chip.peak_bf16_flops / 1e12:g} TFLOP/s bf16, "
                 f"{chip.hbm_bandwidth / 1e9:g} GB/s HBM): step >= {_ms(r.step_time_s)} "
                 f"({r.bound}-bound), <= {r.tokens_per_s_per_chip:,.0f} tokens/s per chip")
  return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------
# The fit table

def table_mesh(preset: str, n: int, slices: int = 1) -> tuple[int, int, int]:
  """The mesh a table preset uses on n chips: dp (-1,1,1); fsdp (slices,-1,1); fsdp_tp (slices,-1,tp), tp = 4
  (2 under 8 chips). Across slices (DCN) only the data axis is split."""
  if preset == "dp":
    return (-1, 1, 1)
  if preset == "fsdp":
    return (slices, -1, 1)
  if preset == "fsdp_tp":
    return (slices, -1, 2 if n // slices < 8 else 4)
  raise ValueError(f"unknown table preset {preset!r}")


# (topology, trainable, inputs, preset, micro-batch rows per batch shard): a grid that answers "which preset
# fits where, at which batch" in about an hour of 2-core compiles (each 7B compile takes ~2-4 min here).
DEFAULT_TABLE = (
    ("v5e:4x4", "projection", "features", "fsdp", 1),
    ("v5e:4x4", "projection+lora", "features", "fsdp", 1),
    ("v5p:2x2x2", "projection", "features", "dp", 1),
    ("v5p:2x2x2", "projection+lora", "features", "fsdp", 1),
    ("v5e:4x4", "projection", "features", "dp", 1),
    ("v5e:4x4", "projection", "features", "fsdp_tp", 1),
    ("v5e:4x4", "projection+lora", "features", "fsdp_tp", 1),
    ("v5e:4x4", "projection", "audio", "fsdp", 1),
    ("v5e:4x4", "projection+lora", "audio", "fsdp", 1),
    ("v5e:4x4", "projection", "features", "fsdp", 4),
    ("v5e:2x2", "projection", "features", "fsdp", 1),
    ("v5e:2x2", "projection+lora", "audio", "fsdp", 1),
    ("v5e:8x8", "projection+lora", "audio", "fsdp", 1),
    ("v5p:2x2x2", "projection+lora", "audio", "fsdp", 4),
    ("2xv5e:4x4", "projection", "features", "fsdp", 1),
)


def run_table(base_getter, cases=DEFAULT_TABLE, *, log=print, on_result=None) -> list[AotResult]:
  """Compiles each case; base_getter(trainable_mode) -> a fresh config. Errors other than OOM are logged."""
  results, devices_of = [], {}
  for topo, mode, inp, preset, rps in cases:
    topo_name, slices = parse_topology(topo)
    if topo not in devices_of:
      devices_of[topo] = topology_devices(topo_name, slices)
    devices = devices_of[topo]
    n = len(devices)
    c = base_getter(mode)
    with c.unlocked():
      shape = table_mesh(preset, n, slices)
      c.mesh.shape, c.mesh.rules = shape, preset
      known = math.prod(s for s in shape if s != -1)
      full = [s if s != -1 else n // known for s in shape]
      c.train.batch_size = rps * full[0] * full[1]
      c.data.use_features = inp == "features"
    t = time.perf_counter()
    try:
      r = compile_step(c, topo_name, num_slices=slices, devices=devices)
    except Exception as e:  # noqa: BLE001 -- record and go on
      log(f"{topo} {mode} {inp} {preset} rows/shard {rps}: error {type(e).__name__}: {str(e)[:300]}")
      continue
    results.append(r)
    if on_result is not None:
      on_result(results)
    log(f"{topo} {mode} {inp} {preset} rows/shard {rps} layers {layers_label(r)}: "
        f"{'fits' if r.fits else 'does not fit'} ({_fmt(r.total_bytes)} of {_fmt(r.hbm_bytes)}; "
        f"compile {r.compile_s or 0:.0f} s, {time.perf_counter() - t:.0f} s in all)")
  return results


def parse_topology(topology: str) -> tuple[str, int]:
  """"v5e:4x4" -> ("v5e:4x4", 1); "2xv5e:4x4" (two slices, multi-slice over DCN) -> ("v5e:4x4", 2)."""
  m = re.match(r"^(\d+)x(v\w+:.*)$", topology)
  return (m.group(2), int(m.group(1))) if m else (topology, 1)


def table_header(c, took_s: float, n: int, command: str = "") -> str:
  """The table's preamble; `command`: the command line that compiled it (default: the full --table run)."""
  llm = f"{c.model.llm_preset} + {c.model.encoder_preset} + projection"
  command = command or "python scripts/aot_compile.py --config configs/finetune.py:musicqa --table"
  slots = c.data.n_audio_tokens or "the longest clip's"  # (no backslash inside an f-string before 3.12)
  return "\n".join([
      "# AOT fit table: the real train step compiled for Cloud TPU topologies",
      "",
      f"Generated by `{command}` ({n} compiles, "
      f"{took_s / 60:.0f} min on 2 shared CPU cores, libtpu " + _libtpu_version() + f", jax {jax.__version__}). Model: {llm}, frozen weights "
      f"{c.model.frozen_dtype}, compute {c.model.compute_dtype}; dataset {c.data.dataset}: sequence "
      f"{c.data.max_len}, {slots} audio tokens; raw audio {audio_samples(c)} samples when the "
      f"encoder runs in the step; accumulation {c.train.accum_steps} micro-steps (scanned); "
      "LoRA: rank 8 on q/k/v/o (configs/lora.py).",
      "",
      "Presets: dp = mesh (-1,1,1), weights replicated; fsdp = (slices,-1,1), weights split along `embed`; "
      "fsdp_tp = (slices,-1,4) (tensor 2 under 8 chips per slice), plus heads/mlp over `tensor`. rows/shard = micro-batch rows "
      "per data x fsdp shard. Bytes are per chip from the compiled executable (`memory_analysis`: arguments + "
      "outputs - aliased + temp + code) against the HBM the TPU compiler lets a program use (v5e 15.75 GiB of 16; "
      "v5p 95.74 GiB); a step over it is refused by the compiler. "
      "Roofline step = max(FLOPs / peak, bytes / HBM bandwidth) with experiment.step_flops and XLA's bytes (scaled "
      "by the accumulation count): v5e 197 TFLOP/s bf16, 819 GB/s; v5p 459 TFLOP/s, 2765 GB/s. No communication "
      "is modelled: a lower bound on step time. layers: `unrolled` (a Python loop over the layers) or `scan` "
      "(stacked layers under nnx.scan, config.model.scan_layers) with the per-layer remat policy "
      "(config.model.remat); compile: seconds to trace, lower and compile the step on this machine.",
  ])


def _libtpu_version() -> str:
  try:
    from importlib.metadata import version
    return version("libtpu")
  except Exception:  # noqa: BLE001
    return "?"


def layers_label(r: AotResult) -> str:
  """"scan", "scan, remat full", "unrolled", ... ("?" for a result saved before the fields existed)."""
  if r.scan_layers is None:
    return "?"
  return ("scan" if r.scan_layers else "unrolled") + (f", remat {r.remat}" if r.remat not in (None, "none") else "")


def table_markdown(results: list[AotResult]) -> str:
  lines = ["| topology | chips | trainable | inputs | preset | layers | mesh (data,fsdp,tensor) | rows/shard "
           "| global batch | params+opt / chip | temp / chip | total / chip | HBM | fits | roofline step "
           "| tokens/s/chip | compile |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
  for r in results:
    mesh = f"{r.mesh['data']},{r.mesh['fsdp']},{r.mesh['tensor']}"
    topo = f"{r.num_slices}x{r.topology}" if r.num_slices > 1 else r.topology
    state = r.trainable_bytes + r.frozen_bytes + r.opt_state_bytes
    lines.append(
        f"| {topo} | {r.chips} | {r.trainable_mode} | {r.inputs} | {r.rules} | {layers_label(r)} | {mesh} | "
        f"{r.rows_per_shard:g} | {r.batch_size}x{r.accum_steps} | {_fmt(state)} | {_fmt(r.temp_bytes)} | "
        f"{_fmt(r.total_bytes)} | {_fmt(r.hbm_bytes)} | {'yes' if r.fits else 'no'} | "
        + (_ms(r.step_time_s) if r.step_time_s and r.fits else "-") + " | "
        + (f"{r.tokens_per_s_per_chip:,.0f}" if r.tokens_per_s_per_chip and r.fits else "-") + " | "
        + (f"{r.compile_s:.0f} s" if r.compile_s is not None else "?") + " |")
  return "\n".join(lines)


def write_table(results: list[AotResult], path_md: str, header: str = "") -> str:
  os.makedirs(os.path.dirname(path_md) or ".", exist_ok=True)
  md = (header + "\n\n" if header else "") + table_markdown(results) + "\n"
  with open(path_md, "w") as f:
    f.write(md)
  with open(os.path.splitext(path_md)[0] + ".json", "w") as f:
    json.dump([r.to_json() for r in results], f, indent=1)
  return md
