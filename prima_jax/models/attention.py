"""The one attention entry point of the model.

Every attention in prima_jax (EVA ViT, Q-Former, SQuARE, LLaMA, SAM) calls
:func:`dot_product_attention`. ``implementation`` selects the code path: ``"xla"`` is the
reference written here; kernels register themselves with :func:`register_implementation` and are
then selectable by name. The Pallas cross-image attention kernels ``"pallas_tpu"`` and
``"pallas_gpu"`` (:mod:`prima_jax.kernels.cross_image_attention`) are registered on the first
call that asks for anything but ``"xla"``; no import is needed.

A kernel implements one *form* of attention (for the cross-image kernels: no bias, as many key
as query heads, mask None or a key-padding mask broadcastable to [batch, 1, 1, kv_len]). The rule:

* ``implementation=None``: the backend's preferred kernel (TPU: ``"pallas_tpu"``, GPU:
  ``"pallas_gpu"``; none on the CPU) where it applies and supports the shapes; everything else
  runs the XLA reference, and the reason is logged once.
* ``implementation=<kernel name>``: the named kernel runs every attention of its form, also off
  its backend (the Pallas kernels then run in interpret mode, e.g. on the CPU for tests); a call
  of its form that it cannot run (head dim, dtype) raises ``ValueError``, so an explicit request
  is never silently ignored. Attentions of another form (causal or general masks, biases,
  grouped KV) run the XLA reference, logged once. This is what makes the model-wide config field
  ``attention_implementation`` usable: it means "this kernel wherever it applies" (SQuARE and the
  Q-Former's attentions, EVA's unmasked self-attention), while LLaMA's causal attention and SAM's
  relative-position attention keep the reference.
* ``implementation="xla"``: always the reference.
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
from collections.abc import Callable

import jax
import jax.numpy as jnp

# Large finite negative value: fully masked rows give a uniform (not NaN) softmax.
_MASK_VALUE = -1e30

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class _Implementation:
  fn: Callable[..., jax.Array | str | None]
  applies: Callable[..., str | None] | None


_IMPLEMENTATIONS: dict[str, _Implementation] = {}
# backend name ("cpu", "gpu", "tpu") -> implementation name tried first when implementation=None.
_PREFERRED: dict[str, str] = {}
_logged_fallbacks: set[str] = set()
# Modules whose import registers kernels; imported on the first non-"xla" call.
_KERNEL_MODULES = ("prima_jax.kernels.cross_image_attention",)
_kernels_loaded = False


def register_implementation(name: str, fn: Callable[..., jax.Array | str | None], *,
                            preferred_on: tuple[str, ...] = (),
                            applies: Callable[..., str | None] | None = None) -> None:
  """Registers ``fn`` (same signature as :func:`xla_attention`) under ``name``.

  Args:
    fn: returns the attention output, or declines a call it cannot run (shapes, dtypes) by
      returning a string saying why (or None).
    preferred_on: backends on which ``implementation=None`` picks this implementation.
    applies: ``applies(query, key, value, mask=, bias=)`` -> None when the attention has the
      form ``fn`` implements, else a string saying why not (see the module docstring).
  """
  _IMPLEMENTATIONS[name] = _Implementation(fn, applies)
  for backend in preferred_on:
    _PREFERRED[backend] = name


def _load_kernels() -> None:
  """Imports the kernel modules once (they register themselves); a failure is logged."""
  global _kernels_loaded
  if _kernels_loaded:
    return
  _kernels_loaded = True
  for module in _KERNEL_MODULES:
    try:
      importlib.import_module(module)
    except ImportError as e:  # e.g. a JAX without Pallas: the reference still works
      logger.warning("attention: kernels in %s unavailable (%s)", module, e)


def _log_once(message: str) -> None:
  if message not in _logged_fallbacks:
    _logged_fallbacks.add(message)
    logger.info("attention: %s", message)


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
      preferred kernel; the fallback rule is in the module docstring.
  Raises:
    ValueError: unknown ``implementation``, or an explicitly named kernel cannot run an
      attention of the form it implements at these shapes/dtypes.
  """
  if implementation != "xla":
    _load_kernels()
  name = implementation
  if name is None:
    backend = jax.default_backend()
    name = _PREFERRED.get(backend)
    if name is None:
      _log_once(f"no attention kernel for backend {backend!r}; using the XLA reference")
      name = "xla"
  if name not in _IMPLEMENTATIONS:
    raise ValueError(f"unknown attention implementation {name!r}; "
                     f"registered: {sorted(_IMPLEMENTATIONS)}")
  if name != "xla":
    impl = _IMPLEMENTATIONS[name]
    shapes = f"q{tuple(query.shape)} k{tuple(key.shape)}"
    reason = impl.applies(query, key, value, mask=mask, bias=bias) if impl.applies else None
    if reason is None:
      out = impl.fn(query, key, value, mask=mask, bias=bias, scale=scale)
      if out is not None and not isinstance(out, str):
        return out
      reason = out or "declined"
      if implementation is not None:
        raise ValueError(f"attention implementation {name!r} cannot run {shapes} "
                         f"v{tuple(value.shape)} {query.dtype}: {reason}")
    _log_once(f"{name} not used for {shapes} ({reason}); using the XLA reference")
  return xla_attention(query, key, value, mask=mask, bias=bias, scale=scale)
