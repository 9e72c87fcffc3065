"""Low-rank adaptation (LoRA) of dense layers, in the PEFT convention.

``y = base(x) + dropout(x) @ A @ B * (alpha / rank)`` with ``A`` [in, rank] and ``B`` [rank, out].
``A`` and ``B`` are :class:`LoRAParam` variables (Flax's ``nnx.LoRAParam``, a subclass of
``nnx.Param``), so an optimizer built with ``wrt=LoRAParam`` trains only the adapters while
``nnx.Param`` still selects every weight (for loading, saving and sharding).
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from prima_jax.models import layers

# Flax's LoRAParam subclasses nnx.Param (checked in tests/test_lora.py); use it rather than a copy.
LoRAParam = nnx.LoRAParam


def peft_lora_a_init(key: jax.Array, shape: tuple[int, int], dtype: Any = jnp.float32) -> jax.Array:
  """PEFT's default init of ``lora_A``: ``kaiming_uniform_(a=sqrt(5))`` on the torch weight [rank, in].

  The gain is sqrt(2 / (1 + 5)) and fan_in = in, so the bound is gain * sqrt(3 / in) = 1 / sqrt(in):
  ``A ~ U(-1/sqrt(in), 1/sqrt(in))`` (shape here [in, rank]).
  """
  bound = 1.0 / math.sqrt(shape[0])
  return jax.random.uniform(key, shape, dtype, -bound, bound)


class LoRALinear(nnx.Module):
  """A bias-optional dense layer plus a low-rank update.

  Attributes:
    base: the wrapped ``nnx.Linear`` (kernel [in, out] named ``axes``); the frozen weight.
    lora_a: LoRAParam [in, rank], axes (axes[0], 'lora_rank'); PEFT init (see :func:`peft_lora_a_init`).
    lora_b: LoRAParam [rank, out], axes ('lora_rank', axes[1]); zeros, so a fresh adapter is a no-op.
    dropout: ``nnx.Dropout`` on the LoRA input path only, with its own forked rng stream;
      ``module.eval()`` makes it deterministic.
    scaling: alpha / rank.
    merged: True after :func:`merge_lora` folded the update into ``base``; the LoRA path is then skipped.
      A Python attribute (static under ``nnx.jit``); merge and unmerge eagerly, outside jit.
  """

  def __init__(self, in_features: int, out_features: int, axes: layers.Axes, *, rank: int, alpha: float,
               dropout: float = 0.0, use_bias: bool = False, dtype: Any = None,
               param_dtype: Any = jnp.float32, kernel_init=None, rngs: nnx.Rngs):
    if rank < 1:
      raise ValueError(f"LoRA rank must be >= 1, got {rank}")
    self.base = layers.linear(in_features, out_features, axes, rngs=rngs, use_bias=use_bias, dtype=dtype,
                              param_dtype=param_dtype, kernel_init=kernel_init)
    pdt = layers.dtype_of(param_dtype)
    self.lora_a = LoRAParam(peft_lora_a_init(rngs.params(), (in_features, rank), pdt),
                            logical_axes=(axes[0], "lora_rank"))
    self.lora_b = LoRAParam(jnp.zeros((rank, out_features), pdt), logical_axes=("lora_rank", axes[1]))
    self.dropout = nnx.Dropout(dropout, rngs=rngs)
    self.rank = rank
    self.alpha = alpha
    self.scaling = alpha / rank
    self.dtype = layers.dtype_of(dtype)
    self.merged = False

  def delta(self) -> jax.Array:
    """The kernel update A @ B * scaling, [in, out], in the base kernel's dtype."""
    a = self.lora_a[...].astype(jnp.float32)
    b = self.lora_b[...].astype(jnp.float32)
    return (a @ b * self.scaling).astype(self.base.kernel[...].dtype)

  def __call__(self, x: jax.Array) -> jax.Array:
    """[..., in] -> [..., out]."""
    y = self.base(x)
    if self.merged:
      return y
    dtype = self.dtype or jnp.result_type(x, self.lora_a[...])
    h = self.dropout(x).astype(dtype)
    h = h @ self.lora_a[...].astype(dtype)
    h = h @ self.lora_b[...].astype(dtype)
    return y + (h * jnp.asarray(self.scaling, dtype)).astype(y.dtype)


def lora_modules(module: nnx.Module) -> list[LoRALinear]:
  """Every LoRALinear inside ``module`` (``module`` itself included)."""
  return [m for _, m in nnx.iter_modules(module) if isinstance(m, LoRALinear)]


def merge_lora(module: nnx.Module) -> int:
  """Folds A @ B * scaling into each unmerged LoRALinear's base kernel, in place.

  Returns the number of layers merged. Eager only (changes the static ``merged`` flag).
  """
  count = 0
  for m in lora_modules(module):
    if not m.merged:
      m.base.kernel[...] = m.base.kernel[...] + m.delta()
      m.merged = True
      count += 1
  return count


def unmerge_lora(module: nnx.Module) -> int:
  """Undoes :func:`merge_lora` (subtracts the same update; exact up to float rounding)."""
  count = 0
  for m in lora_modules(module):
    if m.merged:
      m.base.kernel[...] = m.base.kernel[...] - m.delta()
      m.merged = False
      count += 1
  return count


def dense(name: str, in_features: int, out_features: int, axes: layers.Axes, lora_cfg: Any = None, *,
          rngs: nnx.Rngs, use_bias: bool = False, dtype: Any = None, param_dtype: Any = jnp.float32,
          kernel_init=None) -> nnx.Module:
  """A LoRALinear when ``lora_cfg`` is enabled and lists ``name`` in its targets, else a plain linear.

  ``lora_cfg``: the ``lora`` sub-config (enabled, rank, alpha, dropout, targets) or None.
  """
  if is_target(name, lora_cfg):
    return LoRALinear(in_features, out_features, axes, rank=int(lora_cfg.rank), alpha=float(lora_cfg.alpha),
                      dropout=float(lora_cfg.get("dropout", 0.0)), use_bias=use_bias, dtype=dtype,
                      param_dtype=param_dtype, kernel_init=kernel_init, rngs=rngs)
  return layers.linear(in_features, out_features, axes, rngs=rngs, use_bias=use_bias, dtype=dtype,
                       param_dtype=param_dtype, kernel_init=kernel_init)


def is_target(name: str, lora_cfg: Any) -> bool:
  """Whether the projection called ``name`` (e.g. 'q_proj') gets a LoRA adapter under ``lora_cfg``."""
  return bool(lora_cfg is not None and lora_cfg.get("enabled", False) and name in tuple(lora_cfg.targets))
