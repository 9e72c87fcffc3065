"""The model split for training: trainable parameters, frozen parameters, and the rest.

``nnx.split(model, trainable, frozen, ...)`` with the trainable filter built from path substrings
(``config.train.trainable``). Jitted steps take plain nested dicts of arrays (``State.to_pure_dict``)
and rebuild the module with :meth:`ModelParts.merge`; the rest (dropout RNG keys and counters) is
re-derived from ``(seed, step)`` every step, so it never needs a checkpoint.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from prima_jax.models import layers
from prima_jax.sharding import state_shardings

PyTree = Any


def path_str(path: Sequence[Any]) -> str:
  return "/".join(str(p) for p in path)


def trainable_filter(patterns: Sequence[str]):
  """An nnx filter: a Param whose "/"-joined path contains one of ``patterns`` ("" = every Param)."""
  patterns = tuple(patterns)

  def is_trainable(path, value) -> bool:
    if not isinstance(value, nnx.Param):
      return False
    p = "/" + path_str(path)
    return any(pattern in p for pattern in patterns)

  return is_trainable


def unmatched_patterns(model: nnx.Module, patterns: Sequence[str]) -> list[str]:
  """Patterns that match no parameter of ``model`` (a typo freezes everything silently otherwise)."""
  paths = ["/" + path_str(p) for p, _ in nnx.to_flat_state(nnx.state(model, nnx.Param))]
  return [pat for pat in patterns if not any(pat in p for p in paths)]


@dataclasses.dataclass
class ModelParts:
  """A model split into (graphdef, trainable, frozen, rest) states, plus an eval-mode graphdef."""
  graphdef: Any
  eval_graphdef: Any
  trainable: nnx.State
  frozen: nnx.State
  rest: nnx.State

  @classmethod
  def split(cls, model: nnx.Module, patterns: Sequence[str]) -> ModelParts:
    model.eval()
    eval_graphdef = nnx.graphdef(model)
    model.train()
    graphdef, trainable, frozen, rest = nnx.split(model, trainable_filter(patterns), nnx.Param, ...)
    return cls(graphdef, eval_graphdef, trainable, frozen, rest)

  def merge(self, trainable: PyTree, frozen: PyTree, rest: nnx.State | None = None, *,
            train: bool = True) -> nnx.Module:
    """Module from pure-dict ``trainable`` / ``frozen`` (inside or outside ``jit``)."""
    t = _with_values(self.trainable, trainable)
    f = _with_values(self.frozen, frozen)
    # Fresh Variables for the rest too: a remat-ed block writes its RNG counters back, which a Variable
    # created outside the current trace refuses (the eval step of a remat config closes over the rest).
    r = jax.tree.map(lambda x: x, self.rest if rest is None else rest)
    return nnx.merge(self.graphdef if train else self.eval_graphdef, t, f, r)

  def reseeded_rest(self, key: jax.Array) -> nnx.State:
    """The rest with every RNG stream re-keyed from ``key`` (typed) and counters at 0."""
    flat = []
    for i, (path, var) in enumerate(nnx.to_flat_state(self.rest)):
      if isinstance(var, nnx.RngKey):
        # stacked (scanned) blocks hold one key per group: [groups] keys from the same fold
        k, shape = jax.random.fold_in(key, i), var.get_value().shape
        var = var.replace(jax.random.split(k, shape) if shape else k)
      elif isinstance(var, nnx.RngCount):
        var = var.replace(jnp.zeros_like(var.get_value()))
      flat.append((path, var))
    return nnx.from_flat_state(flat)


def _with_values(template: nnx.State, values: PyTree) -> nnx.State:
  state = jax.tree.map(lambda x: x, template)  # fresh Variables, same metadata
  nnx.replace_by_pure_dict(state, values)
  return state


def cast_state(state: nnx.State, dtype: str) -> None:
  """Casts the floating variables of ``state`` to ``dtype`` in place ("" = keep)."""
  if not dtype:
    return
  dt = layers.dtype_of(dtype)
  for _, var in nnx.to_flat_state(state):
    value = var.get_value()
    if jnp.issubdtype(value.dtype, jnp.floating):
      var.set_value(value.astype(dt))


def pure_shardings(state: nnx.State, mesh: Mesh) -> PyTree:
  """NamedShardings (pure dict, like ``state.to_pure_dict()``) from the logical-axis metadata."""
  return state_shardings(state, mesh).to_pure_dict()


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def count(tree: PyTree) -> int:
  return int(sum(x.size for x in jax.tree.leaves(tree)))
