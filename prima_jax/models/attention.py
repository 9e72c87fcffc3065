"""The one attention entry point of the model.

Every attention in prima_jax (EVA ViT, Q-Former, SQuARE, LLaMA, SAM) calls
:func:`dot_product_attention`. ``implementation`` selects the code path: ``"xla"`` is the
reference written here; kernels register themselves with :func:`register_implementation` and are
then selectable by name. They are registered on the first call that asks for anything but
``"xla"`` (no import is needed):

* ``"pallas_tpu"`` / ``"pallas_gpu"`` (:mod:`prima_jax.kernels.cross_image_attention`): the
  project's own cross-image kernels; their form: no bias, as many key as query heads, no causal
  mask, mask None or key padding (``key_valid`` or a mask broadcastable to [batch, 1, 1, kv_len]).
* ``"cudnn"`` (:mod:`prima_jax.kernels.library_attention`, ``jax.nn.dot_product_attention(
  implementation="cudnn")``): causal and/or key padding, additive bias, grouped KV; bf16/fp16 on a
  CUDA GPU.
* ``"splash"`` (same module, ``jax.experimental.pallas.ops.tpu.splash_attention``): causal or full,
  key padding (as segment ids), grouped KV; no bias; TPU, or the CPU in interpret mode.

The structure of the mask is passed as arguments, so that kernels need not inspect a dense mask:
``causal=True`` (key index <= query index, top-left aligned as in ``jax.nn``) and ``key_valid``
[batch, kv_len] bool; ``mask=`` (a general boolean mask) and ``bias=`` still work. The reference
ANDs them into one dense mask. A kernel implements one *form* of attention (``applies``); the rule:

* ``implementation=None``: the backend's preferred kernels are tried in order, and the first whose
  form the attention has and that supports the shapes/dtypes runs it: GPU ``"pallas_gpu"`` then
  ``"cudnn"``, TPU ``"pallas_tpu"`` then ``"splash"``, none on the CPU. So the project's Pallas
  kernels stay preferred for the cross-image form (SQuARE and Q-Former key padding, and the other
  unmasked / key-padding attentions of its form) because no device benchmark comparing them with
  the library kernels exists yet; the library kernels take what the Pallas kernels cannot run
  (LLaMA's causal attention with grouped KV, SAM's biased attention on cuDNN). If no preferred
  kernel runs it, the XLA reference does and the reasons are logged once (``logger.warning``, once
  per reason, visible at the default verbosity).
* ``implementation=<kernel name>``: the named kernel runs every attention of its form, also off
  its backend where it can (the Pallas and splash kernels then run in interpret mode, e.g. on the
  CPU for tests); a call of its form that it cannot run (head dim, dtype, no device) raises
  ``ValueError``, so an explicit request is never silently ignored. Attentions of another form run
  the XLA reference, logged once. This is what makes the model-wide config field
  ``attention_implementation`` usable: it means "this kernel wherever it applies".
* ``implementation="xla"``: always the reference.

Rows whose query may attend no key at all (e.g. a left-padding query under ``causal`` and
``key_valid``) get the reference's uniform softmax over all keys from ``"xla"`` and the Pallas
kernels; from the library kernels they are finite but otherwise unspecified (such rows are
padding: no valid query ever attends to them).
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
  structured: bool


_IMPLEMENTATIONS: dict[str, _Implementation] = {}
# backend name ("cpu", "gpu", "tpu") -> implementation names tried in order when implementation=None.
_PREFERRED: dict[str, list[str]] = {}
_PRIORITY: dict[str, int] = {}
_logged_fallbacks: set[str] = set()
# Modules whose import registers kernels; imported on the first non-"xla" call.
_KERNEL_MODULES = ("prima_jax.kernels.cross_image_attention", "prima_jax.kernels.library_attention")
_kernels_loaded = False


def register_implementation(name: str, fn: Callable[..., jax.Array | str | None], *,
                            preferred_on: tuple[str, ...] = (),
                            applies: Callable[..., str | None] | None = None,
                            structured: bool = False, priority: int = 0) -> None:
  """Registers ``fn`` under ``name``.

  Args:
    fn: ``fn(query, key, value, *, mask, bias, scale)`` (plus ``causal``, ``key_valid`` when
      ``structured``) returns the attention output, or declines a call it cannot run (shapes,
      dtypes, device) by returning a string saying why (or None).
    preferred_on: backends on which ``implementation=None`` tries this implementation: in order
      of decreasing ``priority``, then of registration.
    applies: ``applies(query, key, value, *, mask, bias)`` (plus ``causal``, ``key_valid`` when
      ``structured``) -> None when the attention has the form ``fn`` implements, else a string
      saying why not (see the module docstring).
    structured: False: ``fn``/``applies`` get ``causal`` and ``key_valid`` folded into one dense
      boolean ``mask``. True: they get ``causal`` and ``key_valid`` [batch, kv_len] as given, with
      a key-padding-shaped ``mask`` ([batch | 1, 1, 1, kv_len]) folded into ``key_valid``; any
      other ``mask`` is passed as ``mask``.
    priority: see ``preferred_on`` (the project's Pallas kernels 0, the library kernels -1).
  """
  _IMPLEMENTATIONS[name] = _Implementation(fn, applies, structured)
  _PRIORITY[name] = priority
  for backend in preferred_on:
    order = _PREFERRED.setdefault(backend, [])
    if name not in order:
      order.append(name)
      order.sort(key=lambda n: -_PRIORITY[n])  # stable: registration order within a priority


def implementations() -> list[str]:
  """Every registered implementation name (the kernel modules are imported first)."""
  _load_kernels()
  return sorted(_IMPLEMENTATIONS)


def preferred_order(backend: str) -> list[str]:
  """The kernels ``implementation=None`` tries on ``backend``, in order (the XLA reference comes last)."""
  _load_kernels()
  return list(_PREFERRED.get(backend, ()))


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


def _log_once(message: str, key: str | None = None) -> None:
  """Logs ``message`` at WARNING the first time ``key`` (default: the message) is seen."""
  key = message if key is None else key
  if key not in _logged_fallbacks:
    _logged_fallbacks.add(key)
    logger.warning("attention: %s", message)


def _backend() -> str:
  """The backend whose preferences ``implementation=None`` uses (a function so tests can fake it)."""
  return jax.default_backend()


def causal_mask(q_len: int, kv_len: int) -> jax.Array:
  """[1, 1, q_len, kv_len] bool, True where key index <= query index (as ``jax.nn``'s is_causal)."""
  return (jnp.arange(kv_len)[None, :] <= jnp.arange(q_len)[:, None])[None, None]


def combined_mask(mask: jax.Array | None, causal: bool, key_valid: jax.Array | None,
                  q_len: int, kv_len: int) -> jax.Array | None:
  """``mask`` AND the causal mask AND ``key_valid`` [batch, kv_len] as one boolean mask
  broadcastable to [batch, heads, q_len, kv_len]; None when there is nothing to mask."""
  parts = []
  if mask is not None:
    parts.append(mask.astype(bool))
  if causal:
    parts.append(causal_mask(q_len, kv_len))
  if key_valid is not None:
    parts.append(key_valid.astype(bool)[:, None, None, :])
  if not parts:
    return None
  out = parts[0]
  for part in parts[1:]:
    out = out & part
  return out


def key_padding(mask: jax.Array | None, batch: int, kv_len: int) -> jax.Array | None:
  """key_valid [batch, kv_len] bool when ``mask`` broadcasts from [batch | 1, 1, 1, kv_len | 1],
  else None (also for ``mask`` None)."""
  if mask is None or mask.ndim > 4:
    return None
  mb, mh, mq, mk = (1,) * (4 - mask.ndim) + tuple(mask.shape)
  if mh != 1 or mq != 1 or mb not in (1, batch) or mk not in (1, kv_len):
    return None
  return jnp.broadcast_to(mask.reshape(mb, mk).astype(bool), (batch, kv_len))


def xla_attention(query: jax.Array, key: jax.Array, value: jax.Array, *,
                  mask: jax.Array | None = None, bias: jax.Array | None = None,
                  scale: float | None = None, causal: bool = False,
                  key_valid: jax.Array | None = None) -> jax.Array:
  """Reference attention in plain XLA ops; softmax in float32.

  Args:
    query: [batch, q_len, heads, head_dim].
    key: [batch, kv_len, kv_heads, head_dim]; heads must be a multiple of kv_heads (grouped KV).
    value: [batch, kv_len, kv_heads, value_dim].
    mask: boolean, broadcastable to [batch, heads, q_len, kv_len]; True = attend.
    bias: additive float logits bias, broadcastable to [batch, heads, q_len, kv_len].
    scale: logits scale; default 1/sqrt(head_dim).
    causal: also mask keys after the query (key index > query index).
    key_valid: [batch, kv_len] bool; also mask the keys where it is False (key padding).
  Returns:
    [batch, q_len, heads, value_dim] in query's dtype. A row with no key to attend gets a
    uniform softmax over all keys (the mean of the values).
  """
  heads, kv_heads = query.shape[2], key.shape[2]
  if heads % kv_heads:
    raise ValueError(f"query heads {heads} not a multiple of key/value heads {kv_heads}")
  if kv_heads != heads:
    key = jnp.repeat(key, heads // kv_heads, axis=2)
    value = jnp.repeat(value, heads // kv_heads, axis=2)
  mask = combined_mask(mask, causal, key_valid, query.shape[1], key.shape[1])
  scale = query.shape[-1] ** -0.5 if scale is None else scale
  logits = jnp.einsum("bqhd,bkhd->bhqk", query, key,
                      preferred_element_type=jnp.float32) * scale
  if bias is not None:
    logits = logits + bias.astype(jnp.float32)
  if mask is not None:
    logits = jnp.where(mask, logits, _MASK_VALUE)
  probs = jax.nn.softmax(logits, axis=-1).astype(value.dtype)
  return jnp.einsum("bhqk,bkhd->bqhd", probs, value).astype(query.dtype)


register_implementation("xla", xla_attention, structured=True)


def _try(name: str, query, key, value, *, mask, bias, scale, causal, key_valid
         ) -> tuple[jax.Array | None, str | None]:
  """Runs implementation ``name``: (output, None), (None, why it declined: not its form), or
  raises _Declined(why) when the attention has its form but it cannot run it."""
  impl = _IMPLEMENTATIONS[name]
  if impl.structured:
    padding = key_padding(mask, query.shape[0], key.shape[1])
    if padding is not None:
      mask = None
      key_valid = padding if key_valid is None else key_valid.astype(bool) & padding
    kwargs = dict(mask=mask, bias=bias, causal=causal, key_valid=key_valid)
  else:
    kwargs = dict(mask=combined_mask(mask, causal, key_valid, query.shape[1], key.shape[1]),
                  bias=bias)
  reason = impl.applies(query, key, value, **kwargs) if impl.applies else None
  if reason is not None:
    return None, reason
  out = impl.fn(query, key, value, scale=scale, **kwargs)
  if out is not None and not isinstance(out, str):
    return out, None
  raise _Declined(out or "declined")


class _Declined(Exception):
  """An implementation cannot run an attention of its form (the message says why)."""


def dot_product_attention(query: jax.Array, key: jax.Array, value: jax.Array, *,
                          mask: jax.Array | None = None, bias: jax.Array | None = None,
                          scale: float | None = None, causal: bool = False,
                          key_valid: jax.Array | None = None,
                          implementation: str | None = None) -> jax.Array:
  """Scaled dot-product attention; see :func:`xla_attention` for shapes and arguments.

  Args:
    causal: key index <= query index only (top-left aligned when q_len != kv_len).
    key_valid: [batch, kv_len] bool key-padding mask (True = a real key).
    implementation: ``"xla"``, a registered kernel name, or ``None`` for the backend's
      preferred kernels; the fallback rule is in the module docstring.
  Raises:
    ValueError: unknown ``implementation``, or an explicitly named kernel cannot run an
      attention of the form it implements at these shapes/dtypes.
  """
  if implementation != "xla":
    _load_kernels()
  if implementation is not None and implementation not in _IMPLEMENTATIONS:
    raise ValueError(f"unknown attention implementation {implementation!r}; "
                     f"registered: {sorted(_IMPLEMENTATIONS)}")
  args = dict(mask=mask, bias=bias, scale=scale, causal=causal, key_valid=key_valid)
  reference = lambda: xla_attention(query, key, value, **args)  # noqa: E731
  if implementation == "xla":
    return reference()
  shapes = f"q{tuple(query.shape)} k{tuple(key.shape)}"
  if implementation is None:
    backend = _backend()
    names = _PREFERRED.get(backend, [])
    if not names:
      _log_once(f"no attention kernel for backend {backend!r}; using the XLA reference")
      return reference()
    reasons = []
    for name in names:
      try:
        out, reason = _try(name, query, key, value, **args)
      except _Declined as e:
        out, reason = None, str(e)
      if out is not None:
        return out
      reasons.append(f"{name}: {reason}")
    _log_once(f"no {backend} kernel runs {shapes} {query.dtype} ({'; '.join(reasons)}); "
              "using the XLA reference", key=f"{backend}: {'; '.join(reasons)}")
    return reference()
  try:
    out, reason = _try(implementation, query, key, value, **args)
  except _Declined as e:
    raise ValueError(f"attention implementation {implementation!r} cannot run {shapes} "
                     f"v{tuple(value.shape)} {query.dtype}: {e}") from None
  if out is not None:
    return out
  _log_once(f"{implementation} not used for {shapes} ({reason}); using the XLA reference",
            key=f"{implementation}: {reason}")
  return reference()
