"""The one attention entry point of the model.

Every attention in prima_jax (EVA ViT, Q-Former, SQuARE, LLaMA, SAM) calls
:func:`dot_product_attention`. ``implementation`` selects the code path: ``"xla"`` is the
reference written here; kernels (e.g. the Pallas cross-image attention) register themselves
with :func:`register_implementation` and are then selectable by name. ``None`` picks the
best registered implementation for the current backend, falling back to ``"xla"``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import jax
import jax.numpy as jnp

# Large finite negative value: fully masked rows give a uniform (not NaN) softmax.
_MASK_VALUE = -1e30

_IMPLEMENTATIONS: dict[str, Callable[..., jax.Array]] = {}
# backend name ("cpu", "gpu", "tpu") -> implementation name tried first when implementation=None.
_PREFERRED: dict[str, str] = {}
_logged_fallbacks: set[str] = set()


def register_implementation(name: str, fn: Callable[..., jax.Array], *,
                            preferred_on: tuple[str, ...] = ()) -> None:
  """Registers ``fn`` (same signature as :func:`xla_attention`) under ``name``.

  ``fn`` may return ``None`` to decline a call (unsupported shape); the reference then runs.
  """
  _IMPLEMENTATIONS[name] = fn
  for backend in preferred_on:
    _PREFERRED[backend] = name


def xla_attention(query: jax.Array, key: jax.Array, value: jax.Array, *,
                  mask: jax.Array | None = None, bias: jax.Array | None = None,
                  scale: float | None = None) -> jax.Array:
  """Reference attention in plain XLA ops; softmax in float32.

  Args:
    query: [batch, q_len, heads, head_dim].
    key: [batch, kv_len, kv_heads, head_dim]; heads must be a multiple of kv_heads (grouped KV).
    value: [batch, kv_len, kv_heads, value_dim].
    mask: boolean, broadcastable to [batch, heads, q_len, kv_len]; True = attend.
    bias: additive float logits bias, broadcastable to [batch, heads, q_len, kv_len].
    scale: logits scale; default 1/sqrt(head_dim).
  Returns:
    [batch, q_len, heads, value_dim] in query's dtype.
  """
  heads, kv_heads = query.shape[2], key.shape[2]
  if heads % kv_heads:
    raise ValueError(f"query heads {heads} not a multiple of key/value heads {kv_heads}")
  if kv_heads != heads:
    key = jnp.repeat(key, heads // kv_heads, axis=2)
    value = jnp.repeat(value, heads // kv_heads, axis=2)
  scale = query.shape[-1] ** -0.5 if scale is None else scale
  logits = jnp.einsum("bqhd,bkhd->bhqk", query, key,
                      preferred_element_type=jnp.float32) * scale
  if bias is not None:
    logits = logits + bias.astype(jnp.float32)
  if mask is not None:
    logits = jnp.where(mask, logits, _MASK_VALUE)
  probs = jax.nn.softmax(logits, axis=-1).astype(value.dtype)
  return jnp.einsum("bhqk,bkhd->bqhd", probs, value).astype(query.dtype)


register_implementation("xla", xla_attention)


def dot_product_attention(query: jax.Array, key: jax.Array, value: jax.Array, *,
                          mask: jax.Array | None = None, bias: jax.Array | None = None,
                          scale: float | None = None,
                          implementation: str | None = None) -> jax.Array:
  """Scaled dot-product attention; see :func:`xla_attention` for shapes.

  Args:
    implementation: ``"xla"``, a registered kernel name, or ``None`` for the backend's
      preferred kernel with fallback to ``"xla"`` (logged once per reason).
  """
  if implementation is None:
    backend = jax.default_backend()
    name = _PREFERRED.get(backend, "xla")
  else:
    name = implementation
  if name not in _IMPLEMENTATIONS:
    raise ValueError(f"unknown attention implementation {name!r}; "
                     f"registered: {sorted(_IMPLEMENTATIONS)}")
  if name != "xla":
    out = _IMPLEMENTATIONS[name](query, key, value, mask=mask, bias=bias, scale=scale)
    if out is not None:
      return out
    if implementation is not None:
      raise ValueError(f"attention implementation {name!r} does not support q{query.shape} "
                       f"k{key.shape} v{value.shape}")
    reason = f"{name} declined q{query.shape} k{key.shape}"
    if reason not in _logged_fallbacks:
      _logged_fallbacks.add(reason)
      logging.info("attention: %s; using the XLA reference", reason)
  return xla_attention(query, key, value, mask=mask, bias=bias, scale=scale)
