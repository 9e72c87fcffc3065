"""Scanned layers (``model.scan_layers``): stacked blocks, the scan over them, and the one mapping
between the stacked and the unrolled parameter layouts.

A tower of ``depth`` blocks whose kinds repeat with period ``P`` (EVA, LLaMA: every block alike,
P = 1; the Q-Former: a cross-attention layer every ``cross_attention_freq``, P = 2; SAM ViT-H: 7
windowed blocks then a global one, P = 8) holds, when scanned, an ``nnx.List`` of P stacked modules
(built with ``nnx.vmap`` + ``nnx.split_rngs``), each with a leading axis of ``G = depth / P``
groups and a leading ``"layers"`` logical axis on every parameter (mapped to no mesh axis).
Stacked module ``k`` holds the blocks ``k, P + k, 2P + k, ...``: unrolled block ``i`` is stacked
``(i % P)[i // P]``. :func:`run` scans over the G groups (``jax.lax.scan`` over the split state, as
``nnx.scan`` does) and runs the P blocks of a group in order inside the body, each rematerialised
under the tower's remat policy.

Parameter paths keep their shape: unrolled ``llm/layers/5/self_attn/q_proj/lora_a`` [in, r] is
``llm/layers/0/self_attn/q_proj/lora_a`` [32, in, r] when scanned, so path patterns written with the
layer index as ``\\d+`` or without it (``/lora_a``, ``sam/image_encoder/``) select the same
parameters in both layouts. Everything outside the models that must name per-layer tensors (the
PyTorch tables of ``prima_jax.convert``) works on the unrolled names and goes through
:func:`locate` / :func:`unstack` / :func:`stack` here.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx

from prima_jax.models import layers

Path = tuple[str | int, ...]
LAYERS_AXIS = "layers"


def period(kinds: Sequence[Hashable]) -> int:
  """The smallest P dividing ``len(kinds)`` with ``kinds[i] == kinds[i % P]`` for every i."""
  n = len(kinds)
  for p in range(1, n + 1):
    if n % p == 0 and all(kinds[i] == kinds[i % p] for i in range(n)):
      return p
  return max(n, 1)


@dataclasses.dataclass(frozen=True)
class Stack:
  """One tower's scan layout: ``prefix`` (path of the block list), ``depth`` blocks, period ``period``."""
  prefix: Path
  depth: int
  period: int

  @property
  def groups(self) -> int:
    return self.depth // self.period

  def stacked(self, index: int) -> tuple[int, int]:
    """Unrolled block ``index`` -> (stacked module k, group g)."""
    return index % self.period, index // self.period

  def unrolled(self, k: int, g: int) -> int:
    return g * self.period + k


def _add_layers_axis(module: nnx.Module) -> None:
  for _, var in nnx.to_flat_state(nnx.state(module)):
    axes = var.get_metadata().get("logical_axes")
    if axes is not None:
      var.set_metadata(logical_axes=(LAYERS_AXIS, *axes))


def build(make: Callable[[int, nnx.Rngs], nnx.Module], kinds: Sequence[Hashable], rngs: nnx.Rngs,
          *, scan: bool) -> nnx.List:
  """The blocks of a tower: ``make(i, rngs)`` builds block ``i`` (of kind ``kinds[i]``).

  Unrolled (``scan=False``): ``nnx.List`` of ``len(kinds)`` blocks. Scanned: ``nnx.List`` of P stacked
  modules, stacked module k made by ``make(k, ...)`` vmapped over the G groups with split RNGs.
  """
  if not scan:
    return nnx.List([make(i, rngs) for i in range(len(kinds))])
  p = period(kinds)
  groups = len(kinds) // p
  stacks = []
  for k in range(p):
    stack = _stacked(make, k, groups, rngs)
    _add_layers_axis(stack)
    stacks.append(stack)
  return nnx.List(stacks)


def _stacked(make: Callable[[int, nnx.Rngs], nnx.Module], k: int, groups: int,
             rngs: nnx.Rngs) -> nnx.Module:
  @nnx.split_rngs(splits=groups)
  @nnx.vmap(in_axes=0, out_axes=0, axis_size=groups)
  def create(r):
    return make(k, r)

  return create(rngs)


def run(blocks: nnx.List, x: Any, apply: Callable[..., Any], *broadcast: Any, scan: bool,
        remat: bool | str | None = None, scanned: Any = None) -> Any:
  """Runs the blocks of :func:`build` over the carry ``x``.

  ``apply(block, x, *broadcast)`` -> new x; with ``scanned`` (a pytree with a leading depth axis, e.g.
  per-layer KV caches) ``apply(block, x, *broadcast, scanned_i)`` -> (new x, new scanned_i), and
  :func:`run` returns (x, the new scanned pytree with its leading depth axis). ``remat`` is the
  tower's policy (``layers.remat``), applied to each block. Requires P = 1 when ``scanned`` is given.
  """
  step = layers.remat(apply, remat)
  if not scan:
    if scanned is None:
      for block in blocks:
        x = step(block, x, *broadcast)
      return x
    outs = []
    for i, block in enumerate(blocks):
      x, out = step(block, x, *broadcast, jax.tree.map(lambda a, i=i: a[i], scanned))
      outs.append(out)
    return x, jax.tree.map(lambda *a: jax.numpy.stack(a), *outs)
  if scanned is not None and len(blocks) != 1:
    raise ValueError("a scanned input needs blocks of one kind (period 1)")
  # A functional scan (what nnx.scan does) over the blocks' state: the body merges one group's
  # slice. State the body leaves untouched (parameters; RNG streams of deterministic dropout) is not
  # written back, so a module whose variables live outside the trace (closed over by jax.jit) runs.
  graphdef, state = nnx.split(blocks)
  leaves, treedef = jax.tree.flatten(state)
  changed: list[bool] = []

  def body(carry, xs):
    group_leaves, per_layer = xs
    group = nnx.merge(graphdef, jax.tree.unflatten(treedef, group_leaves))
    if per_layer is None:
      for block in group:
        carry = step(block, carry, *broadcast)
      out = None
    else:
      carry, out = step(group[0], carry, *broadcast, per_layer)
    new_leaves = jax.tree.leaves(nnx.state(group))
    changed[:] = [n is not o for n, o in zip(new_leaves, group_leaves)]
    return carry, (new_leaves, out)

  x, (new_leaves, out) = jax.lax.scan(body, x, (leaves, scanned))
  if any(changed):
    nnx.update(blocks, jax.tree.unflatten(treedef, [n if c else o for n, o, c in
                                                    zip(new_leaves, leaves, changed)]))
  return x if scanned is None else (x, out)


# --- the module's stacks, and stacked <-> unrolled parameter paths --------------------------------


def find_stacks(module: nnx.Module) -> list[Stack]:
  """Every scanned block list in ``module`` (towers record theirs as ``scan_stack``), with full paths."""
  out = []
  for path, m in nnx.iter_modules(module):
    stack = getattr(m, "scan_stack", None)
    if isinstance(stack, Stack):
      out.append(dataclasses.replace(stack, prefix=tuple(path) + stack.prefix))
  return out


def _match(path: Path, stacks: Iterable[Stack]) -> tuple[Stack, int, Path] | None:
  for stack in stacks:
    n = len(stack.prefix)
    if tuple(path[:n]) == stack.prefix and len(path) > n and isinstance(path[n], int):
      return stack, int(path[n]), tuple(path[n + 1:])
  return None


def locate(path: Path, stacks: Iterable[Stack]) -> tuple[Path, int] | None:
  """Unrolled parameter path -> (stacked path, group index), or None outside the stacks."""
  m = _match(path, stacks)
  if m is None:
    return None
  stack, i, rest = m
  k, g = stack.stacked(i)
  return (*stack.prefix, k, *rest), g


def unrolled_paths(path: Path, stacks: Iterable[Stack]) -> list[Path] | None:
  """Stacked parameter path -> the unrolled paths of its groups (in group order), or None."""
  m = _match(path, stacks)
  if m is None:
    return None
  stack, k, rest = m
  return [(*stack.prefix, stack.unrolled(k, g), *rest) for g in range(stack.groups)]


def unstack(flat: Mapping[Path, Any], stacks: Sequence[Stack]) -> dict[Path, Any]:
  """{stacked path: array [G, ...]} -> {unrolled path: array [...]} (other paths unchanged)."""
  out = {}
  for path, value in flat.items():
    paths = unrolled_paths(path, stacks) if stacks else None
    if paths is None:
      out[path] = value
    else:
      for g, p in enumerate(paths):
        out[p] = value[g]
  return out


def stack(flat: Mapping[Path, Any], stacks: Sequence[Stack]) -> dict[Path, Any]:
  """The inverse of :func:`unstack` (numpy or jax arrays; every group must be present)."""
  out: dict[Path, Any] = {}
  parts: dict[Path, dict[int, Any]] = {}
  for path, value in flat.items():
    loc = locate(path, stacks) if stacks else None
    if loc is None:
      out[path] = value
    else:
      parts.setdefault(loc[0], {})[loc[1]] = value
  for path, groups in parts.items():
    stack_of = _match(path, stacks)[0]
    missing = [g for g in range(stack_of.groups) if g not in groups]
    if missing:
      raise ValueError(f"cannot stack {path}: groups {missing} are missing")
    values = [groups[g] for g in range(stack_of.groups)]
    xp = np if all(isinstance(v, np.ndarray) for v in values) else jax.numpy
    out[path] = xp.stack(values)
  return out


def unstack_shapes(flat: Mapping[Path, Any], stacks: Sequence[Stack]) -> dict[Path, jax.ShapeDtypeStruct]:
  """{stacked path: anything with shape/dtype (nnx Variables too)} -> {unrolled path: ShapeDtypeStruct}."""
  out = {}
  for path, value in flat.items():
    if isinstance(value, nnx.Variable):
      value = value.get_value()
    paths = unrolled_paths(path, stacks) if stacks else None
    if paths is None:
      out[path] = jax.ShapeDtypeStruct(tuple(value.shape), value.dtype)
    else:
      for p in paths:
        out[p] = jax.ShapeDtypeStruct(tuple(value.shape[1:]), value.dtype)
  return out


def unstack_module_state(module: nnx.Module) -> dict[Path, Any]:
  """{unrolled path: array} of ``module``'s parameters (scanned or not)."""
  flat = {tuple(p): v.get_value() for p, v in nnx.to_flat_state(nnx.state(module, nnx.Param))}
  return unstack(flat, find_stacks(module))


def load_unrolled(module: nnx.Module, flat: Mapping[Path, Any]) -> None:
  """Sets ``module``'s parameters (in place) from {unrolled path: array} (:func:`unstack_module_state`
  of a model of either layout)."""
  stacked = stack(flat, find_stacks(module))
  params = {tuple(p): v for p, v in nnx.to_flat_state(nnx.state(module, nnx.Param))}
  if set(stacked) != set(params):
    raise ValueError(f"parameter paths differ: {sorted(map(str, set(stacked) ^ set(params)))[:10]}")
  for path, var in params.items():
    value = stacked[path]
    if tuple(value.shape) != tuple(var.get_value().shape):
      raise ValueError(f"{path}: shape {tuple(value.shape)}, expected {tuple(var.get_value().shape)}")
    var.set_value(jax.numpy.asarray(value, var.get_value().dtype))
