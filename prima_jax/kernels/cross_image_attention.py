"""Cross-image attention kernels behind :func:`prima_jax.models.attention.dot_product_attention`.

SQuARE's relational queries attend over the concatenated EVA tokens of all images of an example,
with padding images removed by a key-padding mask [batch, 1, 1, kv_len]; the Q-Former's queries
attend over one image's tokens (mask None or key padding). Both run through the Pallas kernels
registered here:

* ``"pallas_tpu"`` (:mod:`prima_jax.kernels.pallas_tpu`, Mosaic), preferred on TPU;
* ``"pallas_gpu"`` (:mod:`prima_jax.kernels.pallas_gpu`), preferred on GPU.

The form the kernels implement (``applies``): no additive bias, as many key/value heads as query
heads, and ``mask`` None or a boolean key-padding mask broadcastable from [batch | 1, 1, 1,
kv_len] (turned into ``key_valid`` [batch, kv_len]). Anything else (causal or general masks,
biases, grouped KV) is left to the XLA reference; see the fallback rule in
:mod:`prima_jax.models.attention`. Importing this module registers both names; the GPU module is
imported on first use, so a problem there cannot break the TPU kernel.

A Pallas call is opaque to XLA's SPMD partitioner, which would gather its operands onto every
device. Inside :func:`prima_jax.sharding.activation_sharding` (the jitted train, eval and inference
steps) the kernels therefore run under ``jax.shard_map``, each device on its own shard of the batch
and heads (:func:`per_shard`).
"""

from __future__ import annotations

import importlib

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from prima_jax import sharding
from prima_jax.kernels import pallas_tpu
from prima_jax.models import attention

# Logical axes of the kernels' q / k / v / out [batch, length, heads, head_dim].
_KERNEL_AXES = ("batch", None, "act_heads", None)


def key_padding_mask(mask: jax.Array | None, batch: int, kv_len: int
                     ) -> tuple[jax.Array | None, str | None]:
  """Turns a key-padding ``mask`` into key_valid [batch, kv_len] bool.

  Returns (key_valid or None when ``mask`` is None, None), or (None, reason) when ``mask`` is
  not broadcastable from [batch | 1, 1, 1, kv_len | 1].
  """
  if mask is None:
    return None, None
  shape = tuple(mask.shape)
  if len(shape) > 4:
    return None, f"mask of rank {len(shape)} > 4"
  shape = (1,) * (4 - len(shape)) + shape
  mb, mh, mq, mk = shape
  if mh != 1 or mq != 1 or mb not in (1, batch) or mk not in (1, kv_len):
    return None, (f"mask {tuple(mask.shape)} is not a key-padding mask "
                  f"[{batch}|1, 1, 1, {kv_len}]")
  key_valid = jnp.broadcast_to(mask.reshape(mb, mk).astype(bool), (batch, kv_len))
  return key_valid, None


def applies(query: jax.Array, key: jax.Array, value: jax.Array, *,
            mask: jax.Array | None, bias: jax.Array | None) -> str | None:
  """None when the attention has the form the cross-image kernels implement, else why not."""
  del value
  if bias is not None:
    return "additive bias"
  if query.ndim == 4 and key.ndim == 4 and query.shape[2] != key.shape[2]:
    return f"grouped KV heads ({query.shape[2]} query, {key.shape[2]} key heads)"
  return key_padding_mask(mask, query.shape[0], key.shape[1])[1]


def per_shard(kernel, query: jax.Array, key: jax.Array, value: jax.Array,
              key_valid: jax.Array | None) -> jax.Array:
  """``kernel(q, k, v, key_valid)`` run per device on its shard of the batch and heads.

  Outside :func:`prima_jax.sharding.activation_sharding`, or when no mesh axis divides the batch
  or heads, the kernel runs on the whole arrays. ``key_valid`` None means every key is valid.
  """
  if key_valid is None:
    key_valid = jnp.ones(key.shape[:2], bool)
  active = sharding.active_activation_sharding()
  if active is None:
    return kernel(query, key, value, key_valid)
  mesh, rules = active
  spec = sharding.logical_to_spec(_KERNEL_AXES, query.shape, mesh, rules)
  if all(axis is None for axis in spec):
    return kernel(query, key, value, key_valid)
  return jax.shard_map(kernel, mesh=mesh, in_specs=(spec, spec, spec, PartitionSpec(spec[0], None)),
                       out_specs=spec, check_vma=False)(query, key, value, key_valid)


def _tpu(query, key, value, *, mask, bias, scale):
  """Registered ``"pallas_tpu"``: the output, or the reason the kernel cannot run these shapes."""
  del bias  # ``applies`` ran first
  reason = pallas_tpu.unsupported_reason(query, key, value)
  if reason is not None:
    return reason
  key_valid, _ = key_padding_mask(mask, query.shape[0], key.shape[1])
  return per_shard(lambda q, k, v, valid: pallas_tpu.cross_attention(q, k, v, valid, scale=scale),
                   query, key, value, key_valid)


def _gpu_module():
  """The GPU kernel module, or the reason it cannot be imported."""
  try:
    return importlib.import_module("prima_jax.kernels.pallas_gpu"), None
  except Exception as e:  # noqa: BLE001  any import failure only disables this kernel
    return None, f"prima_jax.kernels.pallas_gpu failed to import: {type(e).__name__}: {e}"


def _gpu(query, key, value, *, mask, bias, scale):
  """Registered ``"pallas_gpu"``; head dims below the kernel's smallest supported one that fits
  are zero-padded (exact: zero columns add nothing to q.k and produce zero output columns)."""
  del bias
  module, reason = _gpu_module()
  if module is None:
    return reason
  head_dim = query.shape[-1]
  supported = getattr(module, "SUPPORTED_HEAD_DIMS", ())
  padded = min((d for d in supported if d >= head_dim), default=head_dim)
  if query.ndim == 4 and key.ndim == 4 and value.ndim == 4 and padded != head_dim:
    pad = ((0, 0), (0, 0), (0, 0), (0, padded - head_dim))
    query, key, value = (jnp.pad(x, pad) for x in (query, key, value))
  reason = module.unsupported_reason(query, key, value)
  if reason is not None:
    return reason
  key_valid, _ = key_padding_mask(mask, query.shape[0], key.shape[1])
  scale = head_dim ** -0.5 if scale is None else scale
  out = per_shard(lambda q, k, v, valid: module.cross_attention(q, k, v, valid, scale=scale),
                  query, key, value, key_valid)
  return out[..., :head_dim]


attention.register_implementation("pallas_tpu", _tpu, preferred_on=("tpu",), applies=applies)
attention.register_implementation("pallas_gpu", _gpu, preferred_on=("gpu",), applies=applies)
