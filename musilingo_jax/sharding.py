"""Device mesh, logical-axis rules and shardings (MaxText's idea, our few lines).

Model code names dimensions with logical axes (`embed`, `mlp`, `heads`, `kv_heads`, `vocab`, ...; see
DESIGN.md). One table of rules maps each logical name to mesh axes (`data`, `fsdp`, `tensor`), so data
parallel <-> FSDP <-> FSDP + tensor parallel is a config edit. A dimension whose size does not divide the
mesh axes it maps to is replicated instead (e.g. Vicuna's vocab of 32001 under tensor parallelism).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

import jax
import numpy as np
from flax import nnx
from jax.experimental import mesh_utils  # a submodule `import jax` does not load
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")
# The logical name of the leading axis of stacked (scanned) layers' variables (models.layers.stacked): every
# preset replicates it (each chip holds its shard of every layer; nnx.scan walks the axis).
LAYERS = "layers"

Rules = Sequence[tuple[str, Any]]

# Presets: logical name -> mesh axis (or tuple of axes, or None = replicated).
PRESETS: dict[str, Rules] = {
    # Pure data parallel: every parameter replicated, the batch split over all devices.
    "dp": (("batch", BATCH_AXES), (LAYERS, None)),
    # FSDP: parameters split along their embed dimension (ZeRO-3 style); the batch over data x fsdp.
    "fsdp": (("batch", BATCH_AXES), ("embed", "fsdp"), (LAYERS, None)),
    # FSDP + tensor parallel (Megatron-style column/row split of attention heads and the MLP).
    "fsdp_tp": (("batch", BATCH_AXES), ("embed", "fsdp"), ("mlp", "tensor"), ("heads", "tensor"),
                ("kv_heads", "tensor"), ("vocab", "tensor"), (LAYERS, None)),
}


def make_mesh(shape: Sequence[int], devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A (data, fsdp, tensor) mesh; one entry may be -1 to take the remaining devices."""
  devices = list(devices if devices is not None else jax.devices())
  shape = list(shape)
  if len(shape) != len(MESH_AXES):
    raise ValueError(f"mesh shape must have {len(MESH_AXES)} entries {MESH_AXES}, got {shape}")
  if shape.count(-1) > 1:
    raise ValueError(f"mesh shape may have at most one -1, got {shape}")
  if -1 in shape:
    known = math.prod(s for s in shape if s != -1)
    if len(devices) % known:
      raise ValueError(f"mesh shape {shape} does not divide {len(devices)} devices")
    shape[shape.index(-1)] = len(devices) // known
  if math.prod(shape) != len(devices):
    raise ValueError(f"mesh shape {tuple(shape)} needs {math.prod(shape)} devices, "
                     f"but {len(devices)} are available")
  mesh_devices = np.asarray(devices).reshape(shape)
  if len(devices) == len(jax.devices()) and jax.process_count() > 1:
    mesh_devices = mesh_utils.create_device_mesh(shape, devices)
  return Mesh(mesh_devices, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def resolve_rules(rules: Rules | str) -> dict[str, Any]:
  if isinstance(rules, str):
    if rules not in PRESETS:
      raise ValueError(f"unknown sharding preset {rules!r}; choose from {sorted(PRESETS)}")
    rules = PRESETS[rules]
  return {name: axes for name, axes in rules}


def _axis_size(mesh: Mesh, axes) -> int:
  if axes is None:
    return 1
  axes = (axes,) if isinstance(axes, str) else tuple(axes)
  return math.prod(mesh.shape[a] for a in axes)


def logical_to_spec(names: Sequence[str | None], shape: Sequence[int], mesh: Mesh,
                    rules: Rules | str) -> P:
  """PartitionSpec for an array of `shape` whose dimensions have logical `names`."""
  table = resolve_rules(rules)
  used: set[str] = set()
  spec = []
  for name, size in zip(names, shape):
    axes = table.get(name) if name is not None else None
    flat = () if axes is None else ((axes,) if isinstance(axes, str) else tuple(axes))
    # An axis may shard only one dimension, and only one it divides.
    if not flat or used.intersection(flat) or size % _axis_size(mesh, flat) or _axis_size(mesh, flat) == 1:
      spec.append(None)
      continue
    used.update(flat)
    spec.append(flat[0] if len(flat) == 1 else flat)
  return P(*spec)


def _names_of(var) -> tuple | None:
  meta = var.get_metadata() if hasattr(var, "get_metadata") else {}
  return meta.get("out_sharding")


def state_shardings(state: nnx.State, mesh: Mesh, rules: Rules | str):
  """NamedSharding for every leaf of an nnx.State (or abstract state), from its logical names."""
  def one(var):
    value = var.get_value() if hasattr(var, "get_value") else var
    names = _names_of(var) or (None,) * len(value.shape)
    return var.replace(NamedSharding(mesh, logical_to_spec(names, value.shape, mesh, rules)))
  return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh, ndim: int = 1) -> NamedSharding:
  """Leading (batch) dimension split over data x fsdp, the rest replicated."""
  return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def global_batch(local_batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Assembles the global batch from this process's slice (multi-host ready).

  Each process passes its own rows (its 1/process_count share of the global batch, in process order);
  the result is one jax.Array per key, split over data x fsdp.
  """
  return {k: jax.make_array_from_process_local_data(batch_sharding(mesh, np.ndim(v)), np.asarray(v))
          for k, v in local_batch.items()}


# ---- activations -----------------------------------------------------------------------------------
# Weights carry their shardings in, but without constraints on the activations XLA is free to (and under
# FSDP does) gather the whole batch onto every chip. Models call `constrain(x, cfg.activations)` on their
# [B, T, D] hidden states. `Activations` (mesh + logical rules) lives in the model's config, a static part
# of its graph, so jit's cache sees it: a model built for a training mesh traces with the constraints, one
# built without (`activations=None`) traces none, whatever else runs in the process.


def _frozen_rules(rules: Rules | str):
  if isinstance(rules, str):
    return rules
  return tuple((name, tuple(axes) if isinstance(axes, (list, tuple)) else axes) for name, axes in rules)


@dataclasses.dataclass(frozen=True)
class Activations:
  """Where activations go: a mesh and the logical-axis rules (a preset name or (name, axes) pairs).
  Hashable, so it can sit in a frozen model config (LlamaConfig / MERTConfig `activations`)."""
  mesh: Mesh
  rules: Any

  def __post_init__(self):
    object.__setattr__(self, "rules", _frozen_rules(self.rules))

  def spec(self, names: Sequence[str | None], shape: Sequence[int]) -> P:
    return logical_to_spec(names, shape, self.mesh, self.rules)


def constrain(x: jax.Array, activations: Activations | None, names: Sequence[str | None] = ("batch",)) -> jax.Array:
  """with_sharding_constraint by logical names (missing trailing names = replicated dimensions); the
  identity when `activations` is None."""
  if activations is None:
    return x
  names = tuple(names) + (None,) * (x.ndim - len(names))
  return jax.lax.with_sharding_constraint(x, NamedSharding(activations.mesh, activations.spec(names, x.shape)))
