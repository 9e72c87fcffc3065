"""The Pallas TPU cross-image attention kernel (TPU interpret mode on the CPU) against the XLA reference.

Every case compares the output and dq, dk, dv (``jax.vjp`` with a random cotangent) with
:func:`prima_jax.models.attention.xla_attention` on fresh random inputs: f32 within 1e-5 and
bf16 within 2e-2 of the reference's largest magnitude.

Poisoning, to show that nothing outside the valid keys reaches a result:
* interpret mode runs with ``uninitialized_memory="nan"``: the kernel's scratch (running max,
  sum, accumulators) starts as NaN, so a missing initialisation shows up as NaN;
* keys and values in key blocks that hold no valid key are NaN in the kernel's inputs (the
  reference gets zeros there). Such a block is skipped only if no NaN reaches any output or
  gradient: computing it would multiply its NaN values by zero probabilities, giving NaN;
* invalid keys inside a block that also holds valid keys are set to 1e4 (finite, as the
  reference requires too): they must be masked, not just down-weighted.
"""

from __future__ import annotations

import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export
from jax.experimental.pallas import tpu as pltpu

from prima_jax.kernels import pallas_tpu
from prima_jax.models.attention import xla_attention

from parity_utils import assert_close

_INTERPRET = pltpu.InterpretParams(uninitialized_memory="nan")
_TOL = {jnp.float32: 1e-5, jnp.bfloat16: 2e-2}

# (id, dtype, q_len, head_dim, heads, tokens per image, image_valid per example, block sizes or None)
CASES = [
    # f32, head dim 64, q 32 over 2 q blocks; example 0 has 1 of 3 images -> 2 skipped kv blocks.
    ("f32-q32-d64", jnp.float32, 32, 64, 2, 100, [[1, 0, 0], [1, 1, 0]],
     pallas_tpu.BlockSizes(16, 128, 1)),
    # bf16, head dim 96 (padded to 128), q 56 (padded to 64); example 1's valid image is the last
    # one, so its first kv block is skipped and the compacted block list starts at block 1.
    ("bf16-q56-d96", jnp.bfloat16, 56, 96, 2, 130, [[1, 1, 0], [0, 0, 1]], None),
    # f32, head dim 128, q 100 (4 q blocks of 32), two heads per grid step.
    ("f32-q100-d128-h2", jnp.float32, 100, 128, 2, 90, [[1, 1, 1], [0, 1, 0]],
     pallas_tpu.BlockSizes(32, 128, 2)),
    # bf16, head dim 64, default block table (4 heads per step), mask None (all keys valid).
    ("bf16-q32-d64-nomask", jnp.bfloat16, 32, 64, 4, 60, None, None),
]


def _inputs(seed, dtype, q_len, head_dim, heads, tokens, image_valid):
  rng = np.random.default_rng(seed)
  batch = 2 if image_valid is None else len(image_valid)
  images = 3 if image_valid is None else len(image_valid[0])
  kv_len = images * tokens

  def normal(*shape):
    return rng.standard_normal(shape).astype(np.float32)

  q, k, v = normal(batch, q_len, heads, head_dim), normal(batch, kv_len, heads, head_dim), \
      normal(batch, kv_len, heads, head_dim)
  if image_valid is None:
    key_valid = None
  else:
    key_valid = np.repeat(np.asarray(image_valid, bool), tokens, axis=1)
  return q, k, v, key_valid, normal(batch, q_len, heads, head_dim)


def _poison(k, v, key_valid, block_k):
  """(kernel k/v with NaN in skipped blocks and 1e4 at other invalid keys, reference k/v with 0
  at invalid keys). Examples without any valid key are left as they are (their reference output
  is the mean of all values)."""
  if key_valid is None:
    return (k, v), (k, v)
  batch, kv_len = key_valid.shape
  padded = np.zeros((batch, -(-kv_len // block_k) * block_k), bool)
  padded[:, :kv_len] = key_valid
  block_valid = padded.reshape(batch, -1, block_k).any(-1)
  in_skipped = np.repeat(block_valid, block_k, axis=1)[:, :kv_len] == 0
  has_key = key_valid.any(axis=1)[:, None]
  invalid = (~key_valid & has_key)[:, :, None, None]
  skipped = (in_skipped & has_key)[:, :, None, None]
  assert skipped.any(), "every masked case holds a skipped key block"
  kernel = [np.where(skipped, np.nan, np.where(invalid, 1e4, x)) for x in (k, v)]
  reference = [np.where(invalid, 0.0, x) for x in (k, v)]
  return kernel, reference


def _run(fn, q, k, v, g):
  """Output and (dq, dk, dv) of ``fn`` for cotangent g, in one jitted function."""
  def fwd_bwd(q, k, v, g):
    out, vjp = jax.vjp(fn, q, k, v)
    return (out, *vjp(g))
  return jax.jit(fwd_bwd)(q, k, v, g)


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_matches_reference(case):
  name, dtype, q_len, head_dim, heads, tokens, image_valid, blocks = case
  q, k, v, key_valid, g = _inputs(zlib.crc32(name.encode()), dtype, q_len, head_dim, heads, tokens,
                                  image_valid)
  used = blocks or pallas_tpu.default_block_sizes(q_len, k.shape[1], heads, head_dim)
  (k_kernel, v_kernel), (k_ref, v_ref) = _poison(k, v, key_valid, used.block_k)
  mask = None if key_valid is None else jnp.asarray(key_valid)[:, None, None, :]
  cast = lambda *xs: [jnp.asarray(x, dtype) for x in xs]  # noqa: E731

  ours = _run(lambda q, k, v: pallas_tpu.cross_attention(
      q, k, v, None if key_valid is None else jnp.asarray(key_valid), block_sizes=blocks,
      interpret=_INTERPRET), *cast(q, k_kernel, v_kernel, g))
  ref = _run(lambda q, k, v: xla_attention(q, k, v, mask=mask), *cast(q, k_ref, v_ref, g))
  for label, a, r in zip(("out", "dq", "dk", "dv"), ours, ref):
    assert a.dtype == dtype
    assert_close(f"pallas_tpu {name} {label}", a, r, rtol=_TOL[dtype])
  if key_valid is not None:  # gradients of invalid keys are exactly zero
    invalid = ~key_valid[:, :, None, None]
    assert np.all(np.where(invalid, np.asarray(ours[2], np.float32), 0) == 0)
    assert np.all(np.where(invalid, np.asarray(ours[3], np.float32), 0) == 0)


def test_example_without_valid_keys_matches_reference():
  """An example whose images are all padding gets the reference's uniform softmax (mean of the
  values over all keys) and its gradients; the other example is unaffected."""
  q, k, v, key_valid, g = _inputs(7, jnp.float32, 24, 64, 2, 70, [[0, 0], [1, 0]])
  blocks = pallas_tpu.BlockSizes(16, 128, 1)
  (k_kernel, v_kernel), (k_ref, v_ref) = _poison(k, v, key_valid, blocks.block_k)
  ours = _run(lambda q, k, v: pallas_tpu.cross_attention(
      q, k, v, jnp.asarray(key_valid), block_sizes=blocks, interpret=_INTERPRET),
      q, k_kernel, v_kernel, g)
  ref = _run(lambda q, k, v: xla_attention(q, k, v, mask=jnp.asarray(key_valid)[:, None, None, :]),
             q, k_ref, v_ref, g)
  for label, a, r in zip(("out", "dq", "dk", "dv"), ours, ref):
    assert_close(f"pallas_tpu no-valid-key {label}", a, r, rtol=1e-5)
  np.testing.assert_allclose(ours[0][0], np.broadcast_to(v[0].mean(0), ours[0][0].shape), rtol=1e-5,
                             atol=1e-6)


def test_block_tables_compact_valid_blocks():
  """Valid blocks come first in order, then the last valid one repeats; counts per example."""
  key_valid = np.zeros((3, 4 * 128), bool)
  key_valid[0, 130:140] = True   # block 1
  key_valid[1, [5, 400]] = True  # blocks 0 and 3
  block_valid, ids, count = pallas_tpu._block_tables(jnp.asarray(key_valid), 128)
  np.testing.assert_array_equal(np.asarray(block_valid).reshape(3, 4),
                                [[0, 1, 0, 0], [1, 0, 0, 1], [0, 0, 0, 0]])
  np.testing.assert_array_equal(np.asarray(ids).reshape(3, 4), [[1, 1, 1, 1], [0, 3, 3, 3], [0, 0, 0, 0]])
  np.testing.assert_array_equal(count, [1, 2, 0])


def test_block_table_and_padding_rules():
  assert pallas_tpu.default_block_sizes(32, 5 * 257, 12, 64) == pallas_tpu.BlockSizes(32, 256, 4)
  assert pallas_tpu.default_block_sizes(56, 2 * 257, 16, 128) == pallas_tpu.BlockSizes(64, 256, 2)
  assert pallas_tpu.default_block_sizes(300, 100, 3, 88) == pallas_tpu.BlockSizes(128, 128, 1)
  assert [pallas_tpu.padded_head_dim(d) for d in (16, 64, 88, 96, 128, 200, 256)] == \
      [128, 64, 128, 128, 128, 256, 256]


def test_unsupported_shapes_raise():
  q = jnp.zeros((1, 8, 2, 320))
  assert "head dim" in pallas_tpu.unsupported_reason(q, q, q)
  with pytest.raises(ValueError, match="head dim 320"):
    pallas_tpu.cross_attention(q, q, q)
  q16 = jnp.zeros((1, 8, 2, 64), jnp.float16)
  assert "float16" in pallas_tpu.unsupported_reason(q16, q16, q16)
  k = jnp.zeros((1, 8, 1, 64))
  assert "grouped KV" in pallas_tpu.unsupported_reason(jnp.zeros((1, 8, 2, 64)), k, k)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32], ids=["bf16", "f32"])
def test_mosaic_lowering(dtype):
  """Forward, dq and dk/dv lower to Mosaic TPU custom calls (jax.export for TPU; no TPU needed)."""
  def loss(q, k, v, key_valid):
    return pallas_tpu.cross_attention(q, k, v, key_valid, interpret=False).astype(jnp.float32).sum()

  spec = lambda *shape: jax.ShapeDtypeStruct(shape, dtype)  # noqa: E731
  exported = export.export(jax.jit(jax.grad(loss, argnums=(0, 1, 2))), platforms=["tpu"])(
      spec(2, 56, 4, 96), spec(2, 5 * 257, 4, 96), spec(2, 5 * 257, 4, 96),
      jax.ShapeDtypeStruct((2, 5 * 257), bool))
  assert exported.mlir_module().count("tpu_custom_call") == 3, "expected forward, dq and dk/dv kernels"
