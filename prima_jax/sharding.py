"""Device meshes and the one table that maps logical axis names to mesh axes.

Parameters carry ``logical_axes`` metadata (see ``prima_jax.models.layers``); activations are
annotated with :func:`constrain`. :data:`LOGICAL_AXIS_RULES` is the only place that says which
mesh axis a logical axis is split over. A mesh axis that does not divide a dimension is dropped
for that array (it is replicated along that mesh axis instead), so tiny and odd shapes still shard.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

# logical axis -> mesh axis (or tuple of mesh axes, or None = replicated).
LOGICAL_AXIS_RULES: tuple[tuple[str, Any], ...] = (
    # activations
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
    # parameters
    ("embed", "fsdp"),          # model width (LLM 4096, ViT 1408/1280, BERT 768)
    ("mlp", "tensor"),          # feed-forward hidden
    ("heads", "tensor"),        # heads * head_dim of a projection
    ("kv_heads", "tensor"),
    ("qkv", "tensor"),          # fused q/k/v output (3 * width)
    ("vocab", "tensor"),
    ("lora_rank", None),
    ("norm", None),
    ("conv_height", None),
    ("conv_width", None),
    ("conv_in", None),
    ("conv_out", "tensor"),
    ("positions", None),
    ("queries", None),
    ("relative", None),
    ("head_dim", None),
    # the leading axis of stacked (scanned) blocks, model.scan_layers: never split
    ("layers", None),
)


def make_mesh(shape: dict[str, int] | Sequence[int], devices: Sequence[Any] | None = None) -> Mesh:
  """Builds a (data, fsdp, tensor) mesh; one size may be -1 (= the remaining devices).

  Raises ValueError when the sizes do not multiply to the device count.
  """
  devices = list(jax.devices() if devices is None else devices)
  sizes = [shape[a] for a in MESH_AXES] if isinstance(shape, dict) else list(shape)
  if len(sizes) != len(MESH_AXES):
    raise ValueError(f"mesh needs {len(MESH_AXES)} sizes {MESH_AXES}, got {sizes}")
  if sizes.count(-1) > 1:
    raise ValueError(f"at most one mesh size may be -1, got {sizes}")
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if len(devices) % known:
      raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))} does not divide {len(devices)} devices")
    sizes[sizes.index(-1)] = len(devices) // known
  if math.prod(sizes) != len(devices):
    raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices, "
                     f"have {len(devices)}")
  grid = np.asarray(devices, dtype=object).reshape(sizes)
  return Mesh(grid, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def logical_to_spec(logical_axes: Sequence[str | None], shape: Sequence[int] | None = None,
                    mesh: Mesh | None = None, rules=LOGICAL_AXIS_RULES) -> PartitionSpec:
  """Maps logical names to a PartitionSpec; drops mesh axes that do not divide the dimension
  or that an earlier dimension already uses."""
  table = dict(rules)
  used: set[str] = set()
  spec = []
  for dim, name in enumerate(logical_axes):
    target = table.get(name) if name is not None else None
    if name is not None and name not in table:
      raise ValueError(f"logical axis {name!r} has no rule in the sharding table")
    axes = () if target is None else ((target,) if isinstance(target, str) else tuple(target))
    kept = []
    size = 1
    for axis in axes:
      if axis in used:
        continue
      axis_size = mesh.shape[axis] if mesh is not None else 1
      if shape is not None and shape[dim] % (size * axis_size):
        continue
      kept.append(axis)
      size *= axis_size
    used.update(kept)
    spec.append(None if not kept else (kept[0] if len(kept) == 1 else tuple(kept)))
  return PartitionSpec(*spec)


def state_shardings(state: nnx.State, mesh: Mesh, rules=LOGICAL_AXIS_RULES) -> nnx.State:
  """NamedShardings for every variable of ``state`` from its ``logical_axes`` metadata
  (variables without it are replicated)."""

  def one(variable):
    axes = variable.get_metadata().get("logical_axes")
    shape = variable.get_value().shape
    if axes is None:
      return NamedSharding(mesh, PartitionSpec())
    if len(axes) != len(shape):
      raise ValueError(f"logical_axes {axes} do not match shape {shape}")
    return NamedSharding(mesh, logical_to_spec(axes, shape, mesh, rules))

  return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


_ACTIVE: contextvars.ContextVar[tuple[Mesh, Any] | None] = contextvars.ContextVar(
    "prima_jax_activation_sharding", default=None)


@contextlib.contextmanager
def activation_sharding(mesh: Mesh, rules=LOGICAL_AXIS_RULES) -> Iterator[None]:
  """Within this context (while tracing), :func:`constrain` applies sharding constraints."""
  token = _ACTIVE.set((mesh, rules))
  try:
    yield
  finally:
    _ACTIVE.reset(token)


def active_activation_sharding() -> tuple[Mesh, Any] | None:
  """(mesh, rules) of the enclosing :func:`activation_sharding`, or None outside one."""
  return _ACTIVE.get()


def constrain(x: jax.Array, logical_axes: Sequence[str | None]) -> jax.Array:
  """Sharding constraint on an activation by logical names; a no-op outside
  :func:`activation_sharding`."""
  active = _ACTIVE.get()
  if active is None:
    return x
  mesh, rules = active
  spec = logical_to_spec(logical_axes, x.shape, mesh, rules)
  return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def process_max(value: int) -> int:
  """The maximum of ``value`` over all processes (the value itself with one process): bucket choices
  that every process must agree on so the global arrays have one shape."""
  if jax.process_count() == 1:
    return int(value)
  from jax.experimental import multihost_utils  # noqa: PLC0415
  return int(np.max(multihost_utils.process_allgather(np.asarray(value, np.int32))))
