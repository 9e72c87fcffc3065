"""Block-sparse cross attention for GPUs in Pallas (Triton lowering), with a fused backward.

Few queries (SQuARE's relational queries, the Q-Former's 32 queries) attend over the concatenated
visual tokens of up to ``max_images`` images, some of which are padding. A per-key validity mask
([batch, kv_len], True = attend) removes the padding images; every key block that holds no valid
key is skipped entirely: the forward and the dq kernel iterate only over a compacted list of the
valid key blocks of their batch row, and the dk/dv kernel does no load and no compute for an
invalid block (it writes zeros).

Math: online softmax over key blocks in base 2 (logits scaled by ``scale * log2(e)``), float32
accumulation whatever the input dtype; the forward saves the row logsumexp for the backward
(dq kernel over the valid key blocks of a query block; dk/dv kernel over all query blocks of a
key block; delta = rowsum(out * d_out) in XLA). Wrapped in ``jax.custom_vjp``.

Layout handling in the wrapper: query and key lengths are zero-padded to the block sizes (padded
keys are invalid; padded query rows are sliced off and masked out of dk/dv), head dim 96 is
zero-padded to 128 (Triton needs power-of-two tiles) and sliced back.

Masking semantics equal :func:`prima_jax.models.attention.xla_attention` with
``mask=key_valid[:, None, None, :]``: a batch row without any valid key (every image padding)
gets the reference's uniform softmax over all ``kv_len`` keys, i.e. the mean of ``value``; its
query/key gradients are zero. Keys and values at invalid positions inside a block that also holds
valid keys are read and must be finite (as for the reference); blocks without valid keys are
never read.

Backend note: this uses Pallas' Triton lowering (``pl.pallas_call`` with
``jax.experimental.pallas.triton.CompilerParams``), which upstream JAX has deprecated in favour
of Mosaic GPU (``plgpu.kernel``, Hopper and newer). The Triton lowering is kept because it runs
on Ampere and newer and in Pallas interpret mode on the CPU, where the tests run it. API
differences between JAX versions (the compiler-params class name) are resolved with
``getattr``; the module imports on machines without a GPU.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

try:  # The Triton lowering may be removed from a future JAX.
  from jax.experimental.pallas import triton as _pl_triton
except ImportError:  # pragma: no cover - depends on the installed JAX
  _pl_triton = None

SUPPORTED_HEAD_DIMS = (64, 96, 128)
SUPPORTED_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
_LOG2E = math.log2(math.e)
_MIN_BLOCK = 16  # Triton's smallest dot tile.


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Tile sizes (powers of two >= 16) and Triton launch parameters.

  Attributes:
    block_q: query rows per forward program.
    block_k: keys per forward loop step; also the skipping granularity of the forward.
    block_q_bwd: query rows per dq program and per dk/dv loop step.
    block_k_bwd: keys per dk/dv program and per dq loop step.
    num_warps: warps per program.
    num_stages: software-pipelining stages of the key loops.
  """
  block_q: int = 64
  block_k: int = 64
  block_q_bwd: int = 32
  block_k_bwd: int = 32
  num_warps: int = 4
  num_stages: int = 2


# (padded head dim, input itemsize) -> block sizes. Chosen so that the tiles of one program
# (q, k, v, accumulators, double-buffered) fit Hopper/Ampere shared memory; not autotuned.
BLOCK_TABLE: dict[tuple[int, int], BlockSizes] = {
    (64, 2): BlockSizes(block_q=64, block_k=64, block_q_bwd=32, block_k_bwd=64, num_warps=4,
                        num_stages=3),
    (128, 2): BlockSizes(block_q=64, block_k=64, block_q_bwd=32, block_k_bwd=64, num_warps=4,
                         num_stages=2),
    (64, 4): BlockSizes(block_q=64, block_k=32, block_q_bwd=32, block_k_bwd=32, num_warps=4,
                        num_stages=2),
    (128, 4): BlockSizes(block_q=32, block_k=32, block_q_bwd=16, block_k_bwd=32, num_warps=4,
                         num_stages=2),
}


@dataclasses.dataclass(frozen=True)
class _Config:
  """Static parameters of one padded call (hashable: a custom_vjp non-diff argument)."""
  scale: float
  q_len: int  # Real (unpadded) query length; rows beyond it are masked out of dk/dv.
  blocks: BlockSizes
  interpret: bool


def _padded_head_dim(head_dim: int) -> int:
  return max(_MIN_BLOCK, pl.next_power_of_2(head_dim))


def unsupported_reason(query: jax.Array, key: jax.Array, value: jax.Array) -> str | None:
  """None when :func:`cross_attention` supports these shapes/dtypes; else a short reason."""
  if _pl_triton is None:
    return "Pallas Triton lowering not available in this JAX"
  if query.ndim != 4 or key.ndim != 4 or value.ndim != 4:
    return f"expected rank-4 [b, len, heads, dim] q/k/v, got q{query.shape} k{key.shape} v{value.shape}"
  if key.shape != value.shape:
    return f"key {key.shape} and value {value.shape} shapes differ"
  if query.shape[0] != key.shape[0]:
    return f"batch of query {query.shape[0]} != batch of key {key.shape[0]}"
  if query.shape[2] != key.shape[2]:
    return f"grouped KV (query heads {query.shape[2]}, key heads {key.shape[2]}) not supported"
  if query.shape[3] != key.shape[3]:
    return f"query head dim {query.shape[3]} != key head dim {key.shape[3]}"
  if query.shape[3] not in SUPPORTED_HEAD_DIMS:
    return f"head dim {query.shape[3]} not in {SUPPORTED_HEAD_DIMS}"
  dtypes = {jnp.dtype(x.dtype) for x in (query, key, value)}
  if len(dtypes) != 1:
    return f"mixed dtypes {sorted(str(d) for d in dtypes)}"
  if jnp.dtype(query.dtype) not in SUPPORTED_DTYPES:
    return f"dtype {query.dtype} not in {[str(d) for d in SUPPORTED_DTYPES]}"
  if query.shape[1] == 0 or key.shape[1] == 0:
    return "empty query or key sequence"
  return None


def default_block_sizes(head_dim: int, dtype) -> BlockSizes:
  """The table entry for a head dim (padded to a power of two) and input dtype."""
  return BLOCK_TABLE[(_padded_head_dim(head_dim), jnp.dtype(dtype).itemsize)]


def _fit_blocks(blocks: BlockSizes, q_len: int, kv_len: int) -> BlockSizes:
  """Shrinks blocks (powers of two, >= 16) that exceed the padded sequence lengths."""
  q_cap = max(_MIN_BLOCK, pl.next_power_of_2(q_len))
  k_cap = max(_MIN_BLOCK, pl.next_power_of_2(kv_len))
  for name in ("block_q", "block_k", "block_q_bwd", "block_k_bwd"):
    size = getattr(blocks, name)
    if size < _MIN_BLOCK or size & (size - 1):
      raise ValueError(f"pallas_gpu: {name}={size} must be a power of two >= {_MIN_BLOCK}")
  return dataclasses.replace(
      blocks, block_q=min(blocks.block_q, q_cap), block_k=min(blocks.block_k, k_cap),
      block_q_bwd=min(blocks.block_q_bwd, q_cap), block_k_bwd=min(blocks.block_k_bwd, k_cap))


def _compiler_params(blocks: BlockSizes):
  # jax 0.5-0.11: CompilerParams; older releases: TritonCompilerParams.
  cls = getattr(_pl_triton, "CompilerParams", None) or _pl_triton.TritonCompilerParams
  return cls(num_warps=blocks.num_warps, num_stages=blocks.num_stages)


def _dot(a: jax.Array, b: jax.Array, contract: tuple[int, int]) -> jax.Array:
  """2-D matmul contracting a's dim contract[0] with b's dim contract[1]; float32 result."""
  return lax.dot_general(a, b, (((contract[0],), (contract[1],)), ((), ())),
                         preferred_element_type=jnp.float32)


def _pad_to(x: jax.Array, axis: int, size: int) -> jax.Array:
  """Zero-pads ``x`` along ``axis`` to ``size``."""
  if x.shape[axis] == size:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, size - x.shape[axis])
  return jnp.pad(x, widths)


def _block_lists(key_valid: jax.Array, block: int) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Per batch row: valid-block indices first (ascending), their count, and a validity flag.

  Args:
    key_valid: [batch, kv_padded] bool, kv_padded a multiple of ``block``.
  Returns:
    ids [batch, blocks] int32, count [batch, 1] int32, block_valid [batch, blocks] int32.
  """
  batch, kv = key_valid.shape
  block_valid = key_valid.reshape(batch, kv // block, block).any(axis=-1)
  ids = jnp.argsort(jnp.logical_not(block_valid).astype(jnp.int32), axis=-1, stable=True)
  count = block_valid.sum(axis=-1, dtype=jnp.int32)[:, None]
  return ids.astype(jnp.int32), count, block_valid.astype(jnp.int32)


# ----------------------------------------------------------------------------------------------
# Kernels. Refs are per-(batch, head) views: q/o [rows, d], k/v [kv_padded, d], key_valid
# [kv_padded], lse/delta [rows], ids [blocks], count [1].


def _fwd_kernel(q_ref, k_ref, v_ref, kvalid_ref, ids_ref, count_ref, o_ref, lse_ref, *,
                cfg: _Config):
  block_q, block_k = cfg.blocks.block_q, cfg.blocks.block_k
  q = q_ref[...]
  logit_scale = cfg.scale * _LOG2E

  def body(i, carry):
    acc, m, denom = carry
    start = pl.multiple_of(ids_ref[i] * block_k, block_k)
    keys = pl.ds(start, block_k)
    k = k_ref[keys, :]
    valid = kvalid_ref[keys] != 0
    s = _dot(q, k, (1, 1)) * logit_scale
    s = jnp.where(valid[None, :], s, -jnp.inf)
    m_new = jnp.maximum(m, jnp.max(s, axis=1))
    correction = jnp.exp2(m - m_new)
    p = jnp.exp2(s - m_new[:, None])
    v = v_ref[keys, :]
    acc = acc * correction[:, None] + _dot(p.astype(v.dtype), v, (1, 0))
    return acc, m_new, denom * correction + jnp.sum(p, axis=1)

  init = (jnp.zeros(o_ref.shape, jnp.float32), jnp.full((block_q,), -jnp.inf, jnp.float32),
          jnp.zeros((block_q,), jnp.float32))
  acc, m, denom = lax.fori_loop(0, count_ref[0], body, init)
  empty = denom == 0.0  # No valid key block in this batch row (handled by the wrapper).
  denom = jnp.where(empty, 1.0, denom)
  o_ref[...] = (acc / denom[:, None]).astype(o_ref.dtype)
  lse_ref[...] = jnp.where(empty, 0.0, m + jnp.log2(denom))  # base-2 logsumexp of the logits


def _dq_kernel(q_ref, k_ref, v_ref, kvalid_ref, ids_ref, count_ref, do_ref, lse_ref, delta_ref,
               dq_ref, *, cfg: _Config):
  block_k = cfg.blocks.block_k_bwd
  q, do = q_ref[...], do_ref[...]
  lse, delta = lse_ref[...], delta_ref[...]
  logit_scale = cfg.scale * _LOG2E

  def body(i, dq):
    start = pl.multiple_of(ids_ref[i] * block_k, block_k)
    keys = pl.ds(start, block_k)
    k, v = k_ref[keys, :], v_ref[keys, :]
    valid = kvalid_ref[keys] != 0
    p = jnp.exp2(_dot(q, k, (1, 1)) * logit_scale - lse[:, None])
    # Select (not multiply) so that huge values at invalid keys cannot give 0 * inf.
    ds = jnp.where(valid[None, :], p * (_dot(do, v, (1, 1)) - delta[:, None]), 0.0)
    return dq + _dot(ds.astype(k.dtype), k, (1, 0))

  dq = lax.fori_loop(0, count_ref[0], body, jnp.zeros(dq_ref.shape, jnp.float32))
  dq_ref[...] = (dq * cfg.scale).astype(dq_ref.dtype)


def _dkv_kernel(q_ref, k_ref, v_ref, kvalid_ref, bvalid_ref, do_ref, lse_ref, delta_ref,
                dk_ref, dv_ref, *, cfg: _Config):
  block_q = cfg.blocks.block_q_bwd
  num_q_blocks = q_ref.shape[0] // block_q
  logit_scale = cfg.scale * _LOG2E
  zeros = jnp.zeros(dk_ref.shape, jnp.float32)

  def compute():
    k, v = k_ref[...], v_ref[...]
    kvalid = kvalid_ref[...] != 0

    def body(j, carry):
      dk, dv = carry
      start = pl.multiple_of(j * block_q, block_q)
      rows = pl.ds(start, block_q)
      q, do = q_ref[rows, :], do_ref[rows, :]
      lse, delta = lse_ref[rows], delta_ref[rows]
      row_valid = start + jnp.arange(block_q) < cfg.q_len
      mask = row_valid[:, None] & kvalid[None, :]
      p = jnp.where(mask, jnp.exp2(_dot(q, k, (1, 1)) * logit_scale - lse[:, None]), 0.0)
      dv = dv + _dot(p.astype(do.dtype), do, (0, 0))
      ds = jnp.where(mask, p * (_dot(do, v, (1, 1)) - delta[:, None]), 0.0)
      dk = dk + _dot(ds.astype(q.dtype), q, (0, 0))
      return dk, dv

    dk, dv = lax.fori_loop(0, num_q_blocks, body, (zeros, zeros))
    return dk * cfg.scale, dv

  dk, dv = lax.cond(bvalid_ref[0] != 0, compute, lambda: (zeros, zeros))
  dk_ref[...] = dk.astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)


# ----------------------------------------------------------------------------------------------
# pallas_call wrappers on padded [b, len, h, d] arrays.


def _rows_spec(block: int, d: int) -> pl.BlockSpec:
  """Grid (row block i, batch j, head h) -> [block, d] tile of a [b, len, h, d] array."""
  return pl.BlockSpec((None, block, None, d), lambda i, j, h: (j, i, h, 0))


def _full_spec(length: int, d: int) -> pl.BlockSpec:
  """Grid (i, batch j, head h) -> the whole [length, d] sequence of (j, h)."""
  return pl.BlockSpec((None, length, None, d), lambda i, j, h: (j, 0, h, 0))


def _per_batch_spec(length: int) -> pl.BlockSpec:
  return pl.BlockSpec((None, length), lambda i, j, h: (j, 0))


def _stat_spec(block: int) -> pl.BlockSpec:
  """lse/delta [b, h, len] -> [block] of (j, h)."""
  return pl.BlockSpec((None, None, block), lambda i, j, h: (j, h, i))


def _full_stat_spec(length: int) -> pl.BlockSpec:
  """lse/delta [b, h, len] -> the whole [len] row of (j, h)."""
  return pl.BlockSpec((None, None, length), lambda i, j, h: (j, h, 0))


def _forward(q, k, v, kvalid, ids, count, cfg: _Config):
  b, q_pad, h, d = q.shape
  kv_pad = k.shape[1]
  bq = cfg.blocks.block_q
  return pl.pallas_call(
      functools.partial(_fwd_kernel, cfg=cfg),
      grid=(q_pad // bq, b, h),
      in_specs=[_rows_spec(bq, d), _full_spec(kv_pad, d), _full_spec(kv_pad, d),
                _per_batch_spec(kv_pad), _per_batch_spec(ids.shape[1]), _per_batch_spec(1)],
      out_specs=[_rows_spec(bq, d), _stat_spec(bq)],
      out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype),
                 jax.ShapeDtypeStruct((b, h, q_pad), jnp.float32)],
      compiler_params=_compiler_params(cfg.blocks),
      interpret=cfg.interpret,
      name="cross_attention_fwd",
  )(q, k, v, kvalid, ids, count)


def _backward(q, k, v, kvalid, bwd_lists, out, lse, do, cfg: _Config):
  ids, count, block_valid = bwd_lists
  b, q_pad, h, d = q.shape
  kv_pad = k.shape[1]
  bq, bk = cfg.blocks.block_q_bwd, cfg.blocks.block_k_bwd
  # delta = rowsum(out * d_out): [b, h, q_pad] float32.
  delta = jnp.einsum("bqhd,bqhd->bhq", out.astype(jnp.float32), do.astype(jnp.float32))
  params = _compiler_params(cfg.blocks)
  dq = pl.pallas_call(
      functools.partial(_dq_kernel, cfg=cfg),
      grid=(q_pad // bq, b, h),
      in_specs=[_rows_spec(bq, d), _full_spec(kv_pad, d), _full_spec(kv_pad, d),
                _per_batch_spec(kv_pad), _per_batch_spec(ids.shape[1]), _per_batch_spec(1),
                _rows_spec(bq, d), _stat_spec(bq), _stat_spec(bq)],
      out_specs=_rows_spec(bq, d),
      out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
      compiler_params=params,
      interpret=cfg.interpret,
      name="cross_attention_dq",
  )(q, k, v, kvalid, ids, count, do, lse, delta)
  kv_block_spec = pl.BlockSpec((None, bk), lambda i, j, h: (j, i))
  dk, dv = pl.pallas_call(
      functools.partial(_dkv_kernel, cfg=cfg),
      grid=(kv_pad // bk, b, h),
      in_specs=[_full_spec(q_pad, d), _rows_spec(bk, d), _rows_spec(bk, d), kv_block_spec,
                pl.BlockSpec((None, 1), lambda i, j, h: (j, i)),
                _full_spec(q_pad, d), _full_stat_spec(q_pad), _full_stat_spec(q_pad)],
      out_specs=[_rows_spec(bk, d), _rows_spec(bk, d)],
      out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
      compiler_params=params,
      interpret=cfg.interpret,
      name="cross_attention_dkv",
  )(q, k, v, kvalid, block_valid, do, lse, delta)
  return dq, dk, dv


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _attention(cfg: _Config, q, k, v, kvalid, fwd_lists, bwd_lists):
  """Padded attention: q [b, q_pad, h, d], k/v [b, kv_pad, h, d], kvalid [b, kv_pad] int32."""
  del bwd_lists
  return _forward(q, k, v, kvalid, *fwd_lists, cfg)[0]


def _attention_fwd(cfg, q, k, v, kvalid, fwd_lists, bwd_lists):
  out, lse = _forward(q, k, v, kvalid, *fwd_lists, cfg)
  return out, (q, k, v, kvalid, bwd_lists, out, lse)


def _attention_bwd(cfg, residuals, do):
  q, k, v, kvalid, bwd_lists, out, lse = residuals
  dq, dk, dv = _backward(q, k, v, kvalid, bwd_lists, out, lse, do, cfg)
  return dq, dk, dv, None, None, None


_attention.defvjp(_attention_fwd, _attention_bwd)


def cross_attention(query: jax.Array, key: jax.Array, value: jax.Array,
                    key_valid: jax.Array | None = None, *, scale: float | None = None,
                    block_sizes: BlockSizes | None = None, interpret: bool | None = None) -> jax.Array:
  """Attention of every query over the valid keys of its batch row; differentiable.

  Args:
    query: [batch, q_len, heads, head_dim], head_dim in ``SUPPORTED_HEAD_DIMS``.
    key: [batch, kv_len, heads, head_dim] (same heads as query; no grouped KV).
    value: [batch, kv_len, heads, head_dim].
    key_valid: [batch, kv_len] bool, True = attend; None = all keys valid.
    scale: logits scale; default 1/sqrt(head_dim).
    block_sizes: overrides the ``BLOCK_TABLE`` entry (blocks larger than the padded lengths are
      shrunk).
    interpret: Pallas interpret mode; None = interpret unless the default backend is "gpu".
  Returns:
    [batch, q_len, heads, head_dim] in query's dtype.
  """
  reason = unsupported_reason(query, key, value)
  if reason is not None:
    raise ValueError(f"pallas_gpu.cross_attention: {reason}")
  batch, q_len, _, head_dim = query.shape
  kv_len = key.shape[1]
  if key_valid is None:
    key_valid = jnp.ones((batch, kv_len), bool)
  if key_valid.shape != (batch, kv_len):
    raise ValueError(f"pallas_gpu.cross_attention: key_valid {key_valid.shape} != "
                     f"[batch, kv_len] = {(batch, kv_len)}")
  key_valid = key_valid.astype(bool)
  if interpret is None:
    interpret = jax.default_backend() != "gpu"
  blocks = block_sizes or default_block_sizes(head_dim, query.dtype)
  blocks = _fit_blocks(blocks, q_len, kv_len)
  cfg = _Config(scale=float(head_dim ** -0.5 if scale is None else scale), q_len=q_len,
                blocks=blocks, interpret=bool(interpret))

  q_block = max(blocks.block_q, blocks.block_q_bwd)  # powers of two: a multiple of both
  kv_block = max(blocks.block_k, blocks.block_k_bwd)
  q_pad = pl.cdiv(q_len, q_block) * q_block
  kv_pad = pl.cdiv(kv_len, kv_block) * kv_block
  d_pad = _padded_head_dim(head_dim)
  q = _pad_to(_pad_to(query, 1, q_pad), 3, d_pad)
  k = _pad_to(_pad_to(key, 1, kv_pad), 3, d_pad)
  v = _pad_to(_pad_to(value, 1, kv_pad), 3, d_pad)
  valid = _pad_to(key_valid, 1, kv_pad)  # Padded keys are invalid.
  fwd_lists = _block_lists(valid, blocks.block_k)[:2]
  bwd_lists = _block_lists(valid, blocks.block_k_bwd)
  out = _attention(cfg, q, k, v, valid.astype(jnp.int32), fwd_lists, bwd_lists)
  out = out[:, :q_len, :, :head_dim]

  # Batch rows without any valid key: the reference's uniform softmax over all kv_len keys.
  has_key = key_valid.any(axis=1)

  def uniform_rows(out, value):
    mean = jnp.mean(value.astype(jnp.float32), axis=1, keepdims=True).astype(out.dtype)
    return jnp.where(has_key[:, None, None, None], out, mean)

  return lax.cond(jnp.all(has_key), lambda out, value: out, uniform_rows, out, value)
