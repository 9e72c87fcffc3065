"""Library attention kernels behind :func:`prima_jax.models.attention.dot_product_attention`.

Two kernels that JAX ships, registered here (``structured``: they see ``causal`` and
``key_valid`` [batch, kv_len] rather than one dense mask):

* ``"cudnn"``: ``jax.nn.dot_product_attention(..., implementation="cudnn")``, cuDNN's fused flash
  attention. Form (:func:`cudnn_applies`): causal (q_len == kv_len) and/or key padding, an additive
  bias, grouped KV; not a general mask. Runs (:func:`cudnn_unsupported_reason`): bf16/fp16 only
  (other dtypes are declined with the reason), head dim a multiple of 8 and <= 128 (256 on Hopper;
  cuDNN's own check), the same head dim for q/k/v, and a CUDA GPU. Key padding goes to cuDNN as a
  dense additive mask [batch, 1, q_len, kv_len] (its bias input): cuDNN's length-based padding
  mask would need right padding (valid keys a prefix), which ``key_valid`` does not promise.
  cuDNN's partitioning rules (``custom_partitioning`` in JAX) shard it over batch and heads, so no
  ``shard_map`` is needed.
* ``"splash"``: the TPU splash attention of ``jax.experimental.pallas.ops.tpu.splash_attention``
  (Mosaic). Form (:func:`splash_applies`): causal (q_len == kv_len) or full, key padding as segment
  ids (every query in segment 1, valid keys 1, padding keys 0), grouped KV through its MHA kernel
  (kv heads dividing the query heads); no bias, no general mask. Runs: f32/bf16, equal q/k/v head
  dims. Lengths are zero-padded to the blocks (padded keys get segment 0), head dims other than 64
  or a multiple of 128 are zero-padded to the next multiple of 128 (exact). Off a TPU it runs in
  Pallas interpret mode (slow; for tests). A Pallas call is opaque to XLA's partitioner, so inside
  :func:`prima_jax.sharding.activation_sharding` it runs under ``jax.shard_map`` over the batch and
  heads mesh axes (heads only when the key/value heads divide as well), vmapped over the local
  batch.

Preferences (``implementation=None``): GPU tries ``"pallas_gpu"`` then ``"cudnn"``, TPU
``"pallas_tpu"`` then ``"splash"`` (``priority=-1``, below the Pallas kernels). The project's own
Pallas kernels stay preferred for the cross-image form (SQuARE / Q-Former key padding, and the
other unmasked or key-padding attentions of that form) only because no device benchmark comparing
them with these library kernels exists yet; the library kernels take what the Pallas kernels
cannot run (LLaMA's causal grouped-KV attention; on cuDNN also SAM's encoder attention with its
relative-position bias). Both names are also selectable explicitly (model-wide ``attention_implementation``).

Rows with no key to attend (a padding query under causal + key padding, an example whose keys are
all padding) come out finite but differ from the reference's uniform softmax; they are padding.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from prima_jax import sharding
from prima_jax.models import attention

# Logical axes of q / k / v / out [batch, length, heads, head_dim] for the per-shard splash call.
_AXES = ("batch", None, "act_heads", None)


def _platform() -> str:
  """Platform of the devices computations run on ("cpu", "gpu", "tpu")."""
  return jax.devices()[0].platform


def _common_reason(query, key, value, *, mask, causal) -> str | None:
  if query.ndim != 4 or key.ndim != 4 or value.ndim != 4:
    return f"rank-{query.ndim} inputs (need [batch, len, heads, head_dim])"
  if mask is not None:
    return f"general mask {tuple(mask.shape)} (only causal and key padding)"
  if causal and query.shape[1] != key.shape[1]:
    return f"causal with q_len {query.shape[1]} != kv_len {key.shape[1]}"
  return None


# --------------------------------------------------------------------------- cuDNN


def cudnn_applies(query, key, value, *, mask, bias, causal, key_valid) -> str | None:
  """None when the attention has the form the cuDNN kernel implements, else why not."""
  del key_valid
  reason = _common_reason(query, key, value, mask=mask, causal=causal)
  if reason is None and bias is not None and bias.ndim > 4:
    reason = f"bias of rank {bias.ndim} > 4"
  return reason


def _dtype_reason(query, key, value, allowed, kernel: str, names: str) -> str | None:
  """Why ``kernel`` cannot take these arrays' dtypes (one dtype of ``allowed``, called ``names``), or None."""
  dtypes = {jnp.dtype(x.dtype) for x in (query, key, value)}
  if len(dtypes) > 1:
    return f"mixed dtypes {sorted(map(str, dtypes))}"
  dtype = dtypes.pop()
  if dtype not in {jnp.dtype(a) for a in allowed}:
    return f"dtype {dtype} ({kernel} takes {names} only)"
  return None


def cudnn_unsupported_reason(query, key, value) -> str | None:
  """None when cuDNN can run these arrays (before its own trace-time checks), else why not."""
  reason = _dtype_reason(query, key, value, (jnp.bfloat16, jnp.float16), "cuDNN flash attention", "bf16/fp16")
  if reason is not None:
    return reason
  d = query.shape[-1]
  if d % 8 or d > 256:
    return f"head dim {d} (cuDNN needs a multiple of 8, <= 128, or <= 256 on Hopper)"
  if key.shape[-1] != d or value.shape[-1] != d:
    return f"head dims q {d} k {key.shape[-1]} v {value.shape[-1]} differ"
  return None


def cudnn_attention(query, key, value, *, bias=None, scale=None, causal=False, key_valid=None):
  """cuDNN flash attention: q [b, t, h, d], k/v [b, s, kv_heads, d] bf16/fp16, key_valid [b, s].

  Needs a CUDA GPU (and cuDNN) at trace time: JAX reads the cuDNN version while tracing.
  """
  b, t = query.shape[:2]
  s = key.shape[1]
  mask = None
  if key_valid is not None:
    mask = jnp.broadcast_to(key_valid.astype(bool)[:, None, None, :], (b, 1, t, s))
  if bias is not None:
    shape = (1,) * (4 - bias.ndim) + tuple(bias.shape)
    bias = jnp.broadcast_to(bias.reshape(shape), (*shape[:2], t, s)).astype(query.dtype)
  return jax.nn.dot_product_attention(query, key, value, bias=bias, mask=mask, scale=scale,
                                      is_causal=causal, implementation="cudnn")


def _cudnn(query, key, value, *, mask, bias, scale, causal, key_valid):
  """Registered ``"cudnn"``: the output, or the reason it cannot run (``applies`` ran first)."""
  del mask
  reason = cudnn_unsupported_reason(query, key, value)
  if reason is not None:
    return reason
  if _platform() != "gpu":
    return f"cuDNN needs a CUDA GPU (devices are {_platform()!r})"
  try:
    return cudnn_attention(query, key, value, bias=bias, scale=scale, causal=causal,
                           key_valid=key_valid)
  except (NotImplementedError, RuntimeError, ValueError) as e:  # JAX's trace-time cuDNN checks
    return f"{type(e).__name__}: {e}"


# --------------------------------------------------------------------------- splash (TPU)


def _splash_module():
  """``jax.experimental.pallas.ops.tpu.splash_attention``, or the reason it cannot be imported."""
  try:
    from jax.experimental.pallas.ops.tpu import splash_attention  # noqa: PLC0415
  except Exception as e:  # noqa: BLE001  any import failure only disables this kernel
    return None, f"splash attention unavailable: {type(e).__name__}: {e}"
  return splash_attention, None


def splash_applies(query, key, value, *, mask, bias, causal, key_valid) -> str | None:
  """None when the attention has the form the splash kernel implements, else why not."""
  del key_valid
  if bias is not None:
    return "additive bias (splash attention takes none)"
  return _common_reason(query, key, value, mask=mask, causal=causal)


def splash_unsupported_reason(query, key, value) -> str | None:
  """None when the splash kernel can run these arrays, else why not."""
  _, reason = _splash_module()
  if reason is not None:
    return reason
  reason = _dtype_reason(query, key, value, (jnp.float32, jnp.bfloat16), "splash", "f32/bf16")
  if reason is not None:
    return reason
  if query.shape[2] % key.shape[2]:
    return f"query heads {query.shape[2]} not a multiple of key heads {key.shape[2]}"
  if key.shape[-1] != query.shape[-1] or value.shape[-1] != query.shape[-1]:
    return f"head dims q {query.shape[-1]} k {key.shape[-1]} v {value.shape[-1]} differ"
  return None


def _round_up(x: int, m: int) -> int:
  return -(-x // m) * m


def _block(length: int) -> int:
  """Block length for a sequence: 128-aligned, at most 512 (MaxText's default)."""
  return min(512, _round_up(length, 128))


@functools.lru_cache(maxsize=64)
def _splash_kernel(heads: int, q_len: int, kv_len: int, causal: bool, block_q: int, block_kv: int,
                   interpret: bool):
  splash, _ = _splash_module()
  shape = (q_len, kv_len)
  one = splash.CausalMask(shape) if causal else splash.FullMask(shape)
  blocks = splash.BlockSizes(block_q=block_q, block_kv=block_kv, block_kv_compute=block_kv,
                             block_q_dkv=block_q, block_kv_dkv=block_kv,
                             block_kv_dkv_compute=block_kv, block_q_dq=block_q, block_kv_dq=block_kv)
  # Concrete mask-info arrays even when first built inside a trace (the kernel is cached).
  with jax.ensure_compile_time_eval():
    return splash.make_splash_mha(splash.MultiHeadMask([one] * heads), block_sizes=blocks,
                                  head_shards=1, q_seq_shards=1, interpret=interpret)


def splash_attention(query, key, value, key_valid=None, *, causal=False, scale=None,
                     interpret=None):
  """Splash attention: q [b, t, h, d], k/v [b, s, kv_heads, d], key_valid [b, s] bool.

  ``interpret`` None: interpret mode unless the devices are TPUs. Returns [b, t, h, d].
  """
  if interpret is None:
    interpret = _platform() != "tpu"
  splash, reason = _splash_module()
  if reason is not None:
    raise ImportError(reason)
  b, t, h, d = query.shape
  s = key.shape[1]
  scale = d ** -0.5 if scale is None else scale
  query = (query.astype(jnp.float32) * scale).astype(query.dtype)  # splash does not scale
  padded_d = d if d == 64 or d % 128 == 0 else _round_up(d, 128)
  block_q, block_kv = _block(t), _block(s)
  t_pad, s_pad = _round_up(t, block_q), _round_up(s, block_kv)

  def pad(x, length):
    return jnp.pad(x, ((0, 0), (0, length - x.shape[1]), (0, 0), (0, padded_d - d)))

  q, k, v = pad(query, t_pad), pad(key, s_pad), pad(value, s_pad)
  if key_valid is None and s_pad != s:
    key_valid = jnp.broadcast_to(jnp.arange(s_pad) < s, (b, s_pad))
  elif key_valid is not None:
    key_valid = jnp.pad(key_valid.astype(bool), ((0, 0), (0, s_pad - s)))
  kernel = _splash_kernel(h, t_pad, s_pad, bool(causal), block_q, block_kv, bool(interpret))
  q, k, v = (x.transpose(0, 2, 1, 3) for x in (q, k, v))  # [b, heads, len, d]
  if key_valid is None:
    out = jax.vmap(kernel)(q, k, v)
  else:
    segments = splash.SegmentIds(q=jnp.ones((b, t_pad), jnp.int32), kv=key_valid.astype(jnp.int32))
    out = jax.vmap(lambda q, k, v, seg: kernel(q, k, v, segment_ids=seg))(q, k, v, segments)
  return out.transpose(0, 2, 1, 3)[:, :t, :, :d]


def per_shard(kernel, query, key, value, key_valid):
  """``kernel(q, k, v, key_valid)`` per device on its shard of the batch and heads inside
  :func:`prima_jax.sharding.activation_sharding`, else on the whole arrays. Heads are split only
  when the key/value heads split the same way (grouped KV stays aligned)."""
  active = sharding.active_activation_sharding()
  if active is None:
    return kernel(query, key, value, key_valid)
  mesh, rules = active
  q_spec = sharding.logical_to_spec(_AXES, query.shape, mesh, rules)
  k_spec = sharding.logical_to_spec(_AXES, key.shape, mesh, rules)
  if q_spec[2] != k_spec[2]:
    q_spec = k_spec = PartitionSpec(q_spec[0], None, None, None)
  if all(axis is None for axis in q_spec):
    return kernel(query, key, value, key_valid)
  if key_valid is None:
    key_valid = jnp.ones(key.shape[:2], bool)
  return jax.shard_map(kernel, mesh=mesh,
                       in_specs=(q_spec, k_spec, k_spec, PartitionSpec(q_spec[0], None)),
                       out_specs=q_spec, check_vma=False)(query, key, value, key_valid)


def _splash(query, key, value, *, mask, bias, scale, causal, key_valid):
  """Registered ``"splash"``: the output, or the reason it cannot run (``applies`` ran first)."""
  del mask, bias
  reason = splash_unsupported_reason(query, key, value)
  if reason is not None:
    return reason
  kernel = lambda q, k, v, valid: splash_attention(q, k, v, valid, causal=causal, scale=scale)  # noqa: E731
  return per_shard(kernel, query, key, value, key_valid)


# priority -1: after the project's Pallas kernels (priority 0) on the same backend.
attention.register_implementation("cudnn", _cudnn, preferred_on=("gpu",), applies=cudnn_applies,
                                  structured=True, priority=-1)
attention.register_implementation("splash", _splash, preferred_on=("tpu",), applies=splash_applies,
                                  structured=True, priority=-1)
