"""Cross-image attention as a Pallas TPU (Mosaic) kernel with a fused backward.

Computes ``softmax(q k^T * scale + key_padding) v`` for q [batch, q_len, heads, head_dim] and
k/v [batch, kv_len, heads, head_dim] with a per-example key validity mask [batch, kv_len]
(SQuARE: padding images' tokens are invalid keys). Design:

* Online softmax over key/value blocks with float32 statistics and accumulators (bf16 or f32
  inputs; matmuls accumulate in float32).
* Key blocks that hold no valid key are skipped entirely: the wrapper compacts, per example,
  the indices of the blocks that hold a valid key (``block_ids``) and counts them
  (``block_count``); both are scalar-prefetched into SMEM. The kv grid axis walks the compacted
  list, compute runs under ``pl.when(j < block_count[b])`` and the key/value index maps repeat
  the last valid block afterwards, so the pipeline issues no DMA for skipped blocks either.
* Backward as a ``jax.custom_vjp``: the forward saves the log-sum-exp per query row; one kernel
  accumulates dk/dv per key block over query blocks (skipped key blocks write zeros and fetch no
  query blocks), another accumulates dq per query block over the valid key blocks.
* q/kv lengths that are not a multiple of the block are zero-padded in the wrapper; padded keys
  are invalid keys; padded query rows are sliced off. Head dims other than 64 or a multiple of
  128 are zero-padded to the next multiple of 128 (lane width), which leaves the result exact.
* A query row whose example has no valid key at all gets the reference's answer (the
  reference's finite -1e30 mask value gives a uniform softmax, i.e. the mean of the values over
  the unpadded keys); the kernel itself writes zeros there and the wrapper substitutes the mean.

The same code runs on the CPU in TPU interpret mode (``interpret=None`` picks it off TPU), which
is how the tests check it.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

_LANES = 128  # TPU vector lane width: kv blocks and padded head dims are multiples of it.
_SUBLANES = 16  # query blocks are multiples of 16 rows (bf16 sublane packing).
# Finite "minus infinity" for masked logits and the running-max start value (no inf - inf).
_MASK_VALUE = -1e30
_SUPPORTED_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Tile sizes: ``block_q`` query rows (multiple of 16), ``block_k`` keys (multiple of 128),
  ``block_h`` heads per grid step (must divide the number of heads)."""
  block_q: int
  block_k: int
  block_h: int = 1


# Padded head dim -> (largest block_q, block_k, largest block_h). Small head dims take several
# heads per grid step so that one step does enough matmul work to hide the per-step overhead
# at PRIMA's few-query shapes; block_k = 256 fills a 256-wide MXU and, with ~257-token images,
# still lets whole padding images be skipped.
BLOCK_TABLE: dict[int, tuple[int, int, int]] = {
    64: (128, 256, 4),
    128: (128, 256, 2),
    256: (128, 128, 1),
}


def padded_head_dim(head_dim: int) -> int:
  """Head dim the kernel runs at: 64 and multiples of 128 as they are, others up to x128."""
  if head_dim == 64 or head_dim % _LANES == 0:
    return head_dim
  return _round_up(head_dim, _LANES)


def default_block_sizes(q_len: int, kv_len: int, heads: int, head_dim: int) -> BlockSizes:
  """Block sizes from :data:`BLOCK_TABLE` clipped to the (padded) problem size."""
  dim = padded_head_dim(head_dim)
  max_q, block_k, max_h = BLOCK_TABLE[min((d for d in BLOCK_TABLE if d >= dim), default=256)]
  block_q = min(max_q, _round_up(q_len, _SUBLANES))
  block_k = min(block_k, _round_up(kv_len, _LANES))
  block_h = max(h for h in range(1, max_h + 1) if heads % h == 0)
  return BlockSizes(block_q=block_q, block_k=block_k, block_h=block_h)


def unsupported_reason(query: jax.Array, key: jax.Array, value: jax.Array) -> str | None:
  """Why the kernel cannot run these shapes/dtypes, or None if it can.

  Args:
    query: [batch, q_len, heads, head_dim]; key/value: [batch, kv_len, heads, head_dim].
  """
  if query.ndim != 4 or key.ndim != 4 or value.ndim != 4:
    return f"expected rank-4 q/k/v, got q{query.shape} k{key.shape} v{value.shape}"
  if key.shape != value.shape:
    return f"key {key.shape} and value {value.shape} shapes differ"
  if query.shape[0] != key.shape[0] or query.shape[3] != key.shape[3]:
    return f"query {query.shape} and key {key.shape} differ in batch or head dim"
  if query.shape[2] != key.shape[2]:
    return f"grouped KV heads ({query.shape[2]} query vs {key.shape[2]} key heads)"
  if query.shape[3] > 256:
    return f"head dim {query.shape[3]} > 256"
  dtypes = {jnp.dtype(x.dtype) for x in (query, key, value)}
  if len(dtypes) != 1 or next(iter(dtypes)) not in _SUPPORTED_DTYPES:
    return f"dtypes {sorted(map(str, dtypes))}; need one of float32/bfloat16 for q, k and v"
  if query.shape[1] == 0 or key.shape[1] == 0:
    return "empty query or key sequence"
  return None


def _round_up(x: int, m: int) -> int:
  return -(-x // m) * m


def _interpret_params(interpret):
  """None -> TPU interpret mode off TPU; True -> interpret mode; or pass InterpretParams."""
  if interpret is None:
    interpret = jax.default_backend() != "tpu"
  if interpret is True:
    return pltpu.InterpretParams()
  return interpret or False


def _dot(a, b, contract, dtype):
  """a . b contracting dims ``contract`` = (a_dim, b_dim), float32 accumulation."""
  precision = jax.lax.Precision.HIGHEST if dtype == jnp.float32 else None
  return jax.lax.dot_general(a, b, ((contract[:1], contract[1:]), ((), ())),
                             preferred_element_type=jnp.float32, precision=precision)


# ------------------------------------------------------------------------------------- forward


def _fwd_kernel(ids_ref, count_ref, q_ref, k_ref, v_ref, valid_ref, o_ref, lse_ref,
                m_scr, l_scr, acc_scr, *, scale: float, block_h: int):
  """Grid (batch, head block, q block, compacted kv block); refs hold [block_h, rows, dim]."""
  del ids_ref  # used by the index maps only
  b, j = pl.program_id(0), pl.program_id(3)

  @pl.when(j == 0)
  def _init():
    m_scr[...] = jnp.full(m_scr.shape, _MASK_VALUE, jnp.float32)
    l_scr[...] = jnp.zeros(l_scr.shape, jnp.float32)
    acc_scr[...] = jnp.zeros(acc_scr.shape, jnp.float32)

  @pl.when(j < count_ref[b])
  def _step():
    valid = valid_ref[...] != 0  # [1, block_k]
    for h in range(block_h):
      q, k, v = q_ref[h], k_ref[h], v_ref[h]
      s = _dot(q, k, (1, 1), q.dtype) * scale  # [block_q, block_k]
      s = jnp.where(valid, s, _MASK_VALUE)
      m_prev = m_scr[h]  # [block_q, lanes], replicated over lanes
      m_next = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
      p = jnp.exp(s - m_next[:, :1])
      alpha = jnp.exp(m_prev - m_next)
      m_scr[h] = m_next
      l_scr[h] = alpha * l_scr[h] + jnp.sum(p, axis=1, keepdims=True)
      acc_scr[h] = acc_scr[h] * alpha[:, :1] + _dot(p.astype(v.dtype), v, (1, 0), v.dtype)

  @pl.when(j == pl.num_programs(3) - 1)
  def _finish():
    for h in range(block_h):
      denom = l_scr[h]
      denom = jnp.where(denom == 0.0, 1.0, denom)  # examples without a valid key: acc 0, out 0
      o_ref[h] = (acc_scr[h] / denom[:, :1]).astype(o_ref.dtype)
      lse_ref[h] = m_scr[h] + jnp.log(denom)


def _block_tables(key_valid: jax.Array, block_k: int) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Per-(example, kv block) validity from key_valid [b, kv_pad] (kv_pad a multiple of block_k).

  Returns (block_valid [b * nk] int32, block_ids [b * nk] int32: indices of the valid blocks
  first, in order, then the last valid one repeated (0 if none), block_count [b] int32).
  """
  batch, kv_pad = key_valid.shape
  nk = kv_pad // block_k
  block_valid = key_valid.reshape(batch, nk, block_k).any(axis=-1)
  count = block_valid.sum(axis=1).astype(jnp.int32)
  # Stable sort puts valid blocks first in their original order.
  order = jnp.argsort(~block_valid, axis=1, stable=True).astype(jnp.int32)
  last = jnp.take_along_axis(order, jnp.maximum(count - 1, 0)[:, None], axis=1)
  ids = jnp.where(jnp.arange(nk)[None] < count[:, None], order, last)
  return block_valid.astype(jnp.int32).reshape(-1), ids.reshape(-1), count


@dataclasses.dataclass(frozen=True)
class _Static:
  """Hashable static configuration of one kernel call."""
  scale: float
  blocks: BlockSizes
  interpret: object


def _forward(q, k, v, valid, block_ids, block_count, static: _Static):
  """q [b, h, Lq, d], k/v [b, h, Lk, d] (padded), valid [b, 1, Lk] int32 -> (o, lse [b,h,Lq,lanes])."""
  batch, heads, q_len, dim = q.shape
  kv_len = k.shape[2]
  bh, bq, bk = static.blocks.block_h, static.blocks.block_q, static.blocks.block_k
  nk = kv_len // bk
  grid = (batch, heads // bh, q_len // bq, nk)

  def q_map(b, h, i, j, ids, count):
    return b, h, i, 0

  def kv_map(b, h, i, j, ids, count):
    return b, h, ids[b * nk + j], 0

  def valid_map(b, h, i, j, ids, count):
    return b, 0, ids[b * nk + j]

  sq = pl.Squeezed()
  grid_spec = pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=2, grid=grid,
      in_specs=[pl.BlockSpec((sq, bh, bq, dim), q_map),
                pl.BlockSpec((sq, bh, bk, dim), kv_map),
                pl.BlockSpec((sq, bh, bk, dim), kv_map),
                pl.BlockSpec((sq, 1, bk), valid_map)],
      out_specs=[pl.BlockSpec((sq, bh, bq, dim), q_map),
                 pl.BlockSpec((sq, bh, bq, _LANES), q_map)],
      scratch_shapes=[pltpu.VMEM((bh, bq, _LANES), jnp.float32),
                      pltpu.VMEM((bh, bq, _LANES), jnp.float32),
                      pltpu.VMEM((bh, bq, dim), jnp.float32)])
  flops = 4 * batch * heads * q_len * kv_len * dim
  bytes_accessed = sum(x.size * x.dtype.itemsize for x in (q, k, v)) + q.size * q.dtype.itemsize
  return pl.pallas_call(
      functools.partial(_fwd_kernel, scale=static.scale, block_h=bh),
      grid_spec=grid_spec,
      out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype),
                 jax.ShapeDtypeStruct((batch, heads, q_len, _LANES), jnp.float32)],
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
      cost_estimate=pl.CostEstimate(flops=flops, transcendentals=batch * heads * q_len * kv_len,
                                    bytes_accessed=bytes_accessed),
      interpret=static.interpret,
      name="cross_image_attention_fwd",
  )(block_ids, block_count, q, k, v, valid)


# ------------------------------------------------------------------------------------ backward


def _probs_and_dscores(q, k, v, do, lse, di, valid, scale):
  """Recomputes p = softmax rows [bq, bk] and ds = dL/d(logits) for one head's tiles."""
  s = jnp.where(valid, _dot(q, k, (1, 1), q.dtype) * scale, _MASK_VALUE)
  p = jnp.exp(s - lse[:, :1])
  dp = _dot(do, v, (1, 1), do.dtype)  # [bq, bk]
  ds = p * (dp - di[:, :1]) * scale
  return p, ds


def _dkdv_kernel(block_valid_ref, q_ref, k_ref, v_ref, valid_ref, do_ref, lse_ref, di_ref,
                 dk_ref, dv_ref, dk_scr, dv_scr, *, scale: float, block_h: int, nk: int):
  """Grid (batch, head block, kv block, q block): dk/dv of one kv block summed over q blocks."""
  b, j, i = pl.program_id(0), pl.program_id(2), pl.program_id(3)

  @pl.when(i == 0)
  def _init():
    dk_scr[...] = jnp.zeros(dk_scr.shape, jnp.float32)
    dv_scr[...] = jnp.zeros(dv_scr.shape, jnp.float32)

  @pl.when(block_valid_ref[b * nk + j] != 0)
  def _step():
    valid = valid_ref[...] != 0
    for h in range(block_h):
      q, k, v, do = q_ref[h], k_ref[h], v_ref[h], do_ref[h]
      p, ds = _probs_and_dscores(q, k, v, do, lse_ref[h], di_ref[h], valid, scale)
      dv_scr[h] += _dot(p.astype(do.dtype), do, (0, 0), do.dtype)
      dk_scr[h] += _dot(ds.astype(q.dtype), q, (0, 0), q.dtype)

  @pl.when(i == pl.num_programs(3) - 1)
  def _finish():
    dk_ref[...] = dk_scr[...].astype(dk_ref.dtype)
    dv_ref[...] = dv_scr[...].astype(dv_ref.dtype)


def _dq_kernel(ids_ref, count_ref, q_ref, k_ref, v_ref, valid_ref, do_ref, lse_ref, di_ref,
               dq_ref, dq_scr, *, scale: float, block_h: int):
  """Grid (batch, head block, q block, compacted kv block): dq of one q block."""
  del ids_ref
  b, j = pl.program_id(0), pl.program_id(3)

  @pl.when(j == 0)
  def _init():
    dq_scr[...] = jnp.zeros(dq_scr.shape, jnp.float32)

  @pl.when(j < count_ref[b])
  def _step():
    valid = valid_ref[...] != 0
    for h in range(block_h):
      q, k, v, do = q_ref[h], k_ref[h], v_ref[h], do_ref[h]
      _, ds = _probs_and_dscores(q, k, v, do, lse_ref[h], di_ref[h], valid, scale)
      dq_scr[h] += _dot(ds.astype(k.dtype), k, (1, 0), k.dtype)

  @pl.when(j == pl.num_programs(3) - 1)
  def _finish():
    dq_ref[...] = dq_scr[...].astype(dq_ref.dtype)


def _backward(q, k, v, valid, block_valid, block_ids, block_count, o, lse, do, static: _Static):
  """Returns dq, dk, dv for the padded [b, h, L, d] operands."""
  batch, heads, q_len, dim = q.shape
  kv_len = k.shape[2]
  bh, bq, bk = static.blocks.block_h, static.blocks.block_q, static.blocks.block_k
  nq, nk = q_len // bq, kv_len // bk
  di = jnp.sum(do.astype(jnp.float32) * o.astype(jnp.float32), axis=-1, keepdims=True)
  di = jnp.broadcast_to(di, (batch, heads, q_len, _LANES))
  sq = pl.Squeezed()
  params = pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "parallel", "arbitrary"))
  flops = 4 * batch * heads * q_len * kv_len * dim

  # dk, dv: grid over kv blocks (outer) and q blocks (inner). For a skipped kv block the q-side
  # index maps stay at block 0, so no query tiles are fetched for it.
  def q_map_kv(b, h, j, i, bv):
    return b, h, i * bv[b * nk + j], 0

  def kv_map_kv(b, h, j, i, bv):
    return b, h, j, 0

  def valid_map_kv(b, h, j, i, bv):
    return b, 0, j

  q_spec = pl.BlockSpec((sq, bh, bq, dim), q_map_kv)
  row_spec = pl.BlockSpec((sq, bh, bq, _LANES), q_map_kv)
  kv_spec = pl.BlockSpec((sq, bh, bk, dim), kv_map_kv)
  dk, dv = pl.pallas_call(
      functools.partial(_dkdv_kernel, scale=static.scale, block_h=bh, nk=nk),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=1, grid=(batch, heads // bh, nk, nq),
          in_specs=[q_spec, kv_spec, kv_spec, pl.BlockSpec((sq, 1, bk), valid_map_kv),
                    q_spec, row_spec, row_spec],
          out_specs=[kv_spec, kv_spec],
          scratch_shapes=[pltpu.VMEM((bh, bk, dim), jnp.float32),
                          pltpu.VMEM((bh, bk, dim), jnp.float32)]),
      out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
      compiler_params=params,
      cost_estimate=pl.CostEstimate(flops=2 * flops, transcendentals=flops // (4 * dim),
                                    bytes_accessed=3 * (q.nbytes + k.nbytes + v.nbytes)),
      interpret=static.interpret,
      name="cross_image_attention_dkdv",
  )(block_valid, q, k, v, valid, do, lse, di)

  # dq: grid over q blocks (outer) and the compacted valid kv blocks (inner), as the forward.
  def q_map_q(b, h, i, j, ids, count):
    return b, h, i, 0

  def kv_map_q(b, h, i, j, ids, count):
    return b, h, ids[b * nk + j], 0

  def valid_map_q(b, h, i, j, ids, count):
    return b, 0, ids[b * nk + j]

  q_spec = pl.BlockSpec((sq, bh, bq, dim), q_map_q)
  row_spec = pl.BlockSpec((sq, bh, bq, _LANES), q_map_q)
  kv_spec = pl.BlockSpec((sq, bh, bk, dim), kv_map_q)
  dq = pl.pallas_call(
      functools.partial(_dq_kernel, scale=static.scale, block_h=bh),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=2, grid=(batch, heads // bh, nq, nk),
          in_specs=[q_spec, kv_spec, kv_spec, pl.BlockSpec((sq, 1, bk), valid_map_q),
                    q_spec, row_spec, row_spec],
          out_specs=q_spec,
          scratch_shapes=[pltpu.VMEM((bh, bq, dim), jnp.float32)]),
      out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
      compiler_params=params,
      cost_estimate=pl.CostEstimate(flops=3 * flops // 2, transcendentals=flops // (4 * dim),
                                    bytes_accessed=2 * (q.nbytes + k.nbytes + v.nbytes)),
      interpret=static.interpret,
      name="cross_image_attention_dq",
  )(block_ids, block_count, q, k, v, valid, do, lse, di)
  return dq, dk, dv


# --------------------------------------------------------------------------- custom_vjp glue


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _attention(q, k, v, valid, block_valid, block_ids, static):
  # block_count is recomputed from block_valid so that every integer input is a plain operand.
  count = block_valid.reshape(q.shape[0], -1).sum(axis=1)
  out, _ = _forward(q, k, v, valid, block_ids, count, static)
  return out


def _attention_fwd(q, k, v, valid, block_valid, block_ids, static):
  count = block_valid.reshape(q.shape[0], -1).sum(axis=1)
  out, lse = _forward(q, k, v, valid, block_ids, count, static)
  return out, (q, k, v, valid, block_valid, block_ids, out, lse)


def _attention_bwd(static, residuals, do):
  q, k, v, valid, block_valid, block_ids, out, lse = residuals
  count = block_valid.reshape(q.shape[0], -1).sum(axis=1)
  dq, dk, dv = _backward(q, k, v, valid, block_valid, block_ids, count, out, lse, do, static)
  return dq, dk, dv, None, None, None


_attention.defvjp(_attention_fwd, _attention_bwd)


def cross_attention(query: jax.Array, key: jax.Array, value: jax.Array,
                    key_valid: jax.Array | None = None, *, scale: float | None = None,
                    block_sizes: BlockSizes | None = None, interpret=None) -> jax.Array:
  """Key-padding-masked attention through the TPU kernel; differentiable in q, k and v.

  Args:
    query: [batch, q_len, heads, head_dim], float32 or bfloat16.
    key: [batch, kv_len, heads, head_dim], same dtype.
    value: [batch, kv_len, heads, head_dim], same dtype.
    key_valid: [batch, kv_len] bool (True = attend), or None for all keys valid.
    scale: logits scale; default 1/sqrt(head_dim).
    block_sizes: tile sizes; default :func:`default_block_sizes`.
    interpret: None (TPU interpret mode when not running on TPU), a bool, or
      ``pltpu.InterpretParams``.
  Returns:
    [batch, q_len, heads, head_dim] in query's dtype; an example with no valid key gets the mean
    of its values over all kv_len keys (as the -1e30-masked reference does).
  """
  reason = unsupported_reason(query, key, value)
  if reason is not None:
    raise ValueError(f"pallas_tpu cross_attention: {reason}")
  batch, q_len, heads, head_dim = query.shape
  kv_len = key.shape[1]
  scale = head_dim ** -0.5 if scale is None else float(scale)
  blocks = block_sizes or default_block_sizes(q_len, kv_len, heads, head_dim)
  if blocks.block_q % 8 or blocks.block_k % _LANES or heads % blocks.block_h:
    raise ValueError(f"pallas_tpu cross_attention: invalid {blocks} for {heads} heads "
                     f"(block_q % 8, block_k % {_LANES}, heads % block_h must be 0)")
  if key_valid is None:
    key_valid = jnp.ones((batch, kv_len), bool)
  key_valid = jnp.broadcast_to(key_valid.astype(bool), (batch, kv_len))

  q_pad, kv_pad = _round_up(q_len, blocks.block_q), _round_up(kv_len, blocks.block_k)
  dim = padded_head_dim(head_dim)

  def to_kernel_layout(x, length):  # [b, L, h, d] -> [b, h, L_pad, d_pad]
    x = jnp.pad(x, ((0, 0), (0, length - x.shape[1]), (0, 0), (0, dim - head_dim)))
    return x.transpose(0, 2, 1, 3)

  valid_pad = jnp.pad(key_valid, ((0, 0), (0, kv_pad - kv_len)))
  block_valid, block_ids, _ = _block_tables(valid_pad, blocks.block_k)
  static = _Static(scale=scale, blocks=blocks, interpret=_interpret_params(interpret))
  out = _attention(to_kernel_layout(query, q_pad), to_kernel_layout(key, kv_pad),
                   to_kernel_layout(value, kv_pad), valid_pad.astype(jnp.int32)[:, None, :],
                   block_valid, block_ids, static)
  out = out.transpose(0, 2, 1, 3)[:, :q_len, :, :head_dim]
  # Examples with no valid key: the reference's uniform softmax over the kv_len keys.
  any_valid = key_valid.any(axis=1)[:, None, None, None]
  uniform = jnp.mean(value.astype(jnp.float32), axis=1, keepdims=True).astype(out.dtype)
  return jnp.where(any_valid, out, uniform)


__all__ = ["BLOCK_TABLE", "BlockSizes", "cross_attention", "default_block_sizes",
           "padded_head_dim", "unsupported_reason"]
