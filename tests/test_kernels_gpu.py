"""The GPU (Pallas Triton) cross-image attention kernel, run in Pallas interpret mode on the CPU.

Outputs and gradients (dq, dk, dv of a random cotangent) are compared with the plain-XLA
reference ``xla_attention(mask=key_valid[:, None, None, :])`` computed in float32 on the same
input values. Tolerance: max|ours - ref| / max|ref| <= 1e-5 (float32), 2e-2 (bfloat16).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export

from prima_jax.kernels import pallas_gpu
from prima_jax.models.attention import xla_attention

from parity_utils import assert_close

TOKENS = 33     # visual tokens per image: not a multiple of any block
MAX_IMAGES = 5
HEADS = 2
RTOL = {jnp.float32: 1e-5, jnp.bfloat16: 2e-2}


def _inputs(seed: int, q_len: int, head_dim: int, dtype, image_counts):
  """Random q [b, q_len, h, d], k/v [b, 5*33, h, d], cotangent, and key_valid from image counts."""
  rng = np.random.default_rng(seed)
  batch, kv_len = len(image_counts), MAX_IMAGES * TOKENS

  def normal(*shape):
    return jnp.asarray(rng.standard_normal(shape), dtype)

  key_valid = np.arange(kv_len)[None, :] // TOKENS < np.asarray(image_counts)[:, None]
  return (normal(batch, q_len, HEADS, head_dim), normal(batch, kv_len, HEADS, head_dim),
          normal(batch, kv_len, HEADS, head_dim), jnp.asarray(key_valid),
          normal(batch, q_len, HEADS, head_dim))


def _with_vjp(attention):
  """jit(q, k, v, key_valid, cotangent) -> (out, dq, dk, dv)."""
  def run(q, k, v, key_valid, cotangent):
    out, vjp = jax.vjp(lambda q, k, v: attention(q, k, v, key_valid), q, k, v)
    return (out, *vjp(cotangent.astype(out.dtype)))
  return jax.jit(run)


@functools.cache
def _ours(block_sizes=None):
  return _with_vjp(functools.partial(pallas_gpu.cross_attention, block_sizes=block_sizes,
                                     interpret=True))


@functools.cache
def _reference():
  def attention(q, k, v, key_valid):
    return xla_attention(q, k, v, mask=key_valid[:, None, None, :])
  return _with_vjp(attention)


def _check(name, ours, q, k, v, key_valid, cotangent, dtype):
  """Compares ours (4 arrays) with the float32 reference on the same values; returns rel errs."""
  f32 = [x.astype(jnp.float32) for x in (q, k, v)]
  reference = _reference()(*f32, key_valid, cotangent.astype(jnp.float32))
  errors = []
  for part, a, b in zip(("out", "dq", "dk", "dv"), ours, reference):
    assert a.dtype == dtype, f"{name} {part}: dtype {a.dtype} != {dtype}"
    errors.append(assert_close(f"{name} {part}", a, b, rtol=RTOL[dtype])[1])
  return errors


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("q_len,head_dim", [(32, 64), (56, 96), (100, 128)])
def test_matches_reference(q_len, head_dim, dtype):
  # Ragged image counts: padding images give whole key blocks without a valid key.
  image_counts = (1, 3, 5)
  args = _inputs(q_len * head_dim, q_len, head_dim, dtype, image_counts)
  ours = _ours()(*args)
  _check(f"q{q_len} d{head_dim} {jnp.dtype(dtype).name}", ours, *args, dtype)


def test_skipped_blocks_never_read():
  """NaN in every key block without a valid key leaves out and grads finite and exact.

  Keys/values of blocks without a valid key are NaN: a forward or dq loop step over such a
  block would read them. Batch row 0 has no valid key at all and NaN queries: a dk/dv program
  that computed on its (invalid) blocks would multiply them in. Invalid positions inside partly
  valid blocks are read (and masked) and get huge finite values. Uses a block_sizes override so
  that the test knows the block grid.
  """
  blocks = pallas_gpu.BlockSizes(block_q=16, block_k=16, block_q_bwd=16, block_k_bwd=16)
  dtype = jnp.float32
  q, k, v, key_valid, cotangent = _inputs(7, 56, 64, dtype, (0, 1, 4))
  batch, kv_len = key_valid.shape
  padded = -(-kv_len // 16) * 16
  valid_np = np.zeros((batch, padded), bool)
  valid_np[:, :kv_len] = np.asarray(key_valid)
  block_valid = valid_np.reshape(batch, -1, 16).any(-1)
  never_read = ~np.repeat(block_valid, 16, axis=1)[:, :kv_len]     # [b, kv]
  partly_read = ~np.asarray(key_valid) & ~never_read
  assert never_read[1:].sum() > 3 * 16 and partly_read.sum() > 0   # the test exercises both
  fill = np.where(never_read, np.nan, np.where(partly_read, 1e30, 0.0))[:, :, None, None]
  poisoned_k = jnp.where(fill != 0, jnp.asarray(fill, dtype), k)
  # Row 0's output is the mean of all its values (reference semantics), so its values stay finite.
  poisoned_v = jnp.where((fill != 0) & (np.arange(batch) > 0)[:, None, None, None],
                         jnp.asarray(fill, dtype), v)
  poisoned_q = q.at[0].set(jnp.nan)
  ours = _ours(blocks)(poisoned_q, poisoned_k, poisoned_v, key_valid, cotangent)
  errors = _check("nan-in-skipped-blocks", ours, q, k, v, key_valid, cotangent, dtype)
  assert max(errors) <= RTOL[dtype]
  # The XLA reference itself propagates the NaNs: the inputs really are poisoned.
  reference = _reference()(poisoned_q, poisoned_k, poisoned_v, key_valid, cotangent)
  assert not all(np.all(np.isfinite(np.asarray(x))) for x in reference)


def test_padding_cannot_leak(monkeypatch):
  """Sequence padding filled with huge random values instead of zeros changes nothing.

  Padded key positions must be marked invalid and padded query rows sliced off and kept out
  of dk/dv; the head-dim padding (which enters the logits) stays zero.
  """
  original = pallas_gpu._pad_to
  rng = np.random.default_rng(3)

  def poisoned_pad(x, axis, size):
    out = original(x, axis, size)
    if axis != 1 or out.dtype == bool or x.shape[1] == size:
      return out
    noise = rng.choice([-1e38, 1e38], out.shape) * rng.uniform(0.5, 1.0, out.shape)
    rows = (np.arange(size) >= x.shape[1]).reshape(1, size, 1, 1)
    return jnp.where(rows, jnp.asarray(noise, out.dtype), out)

  monkeypatch.setattr(pallas_gpu, "_pad_to", poisoned_pad)
  dtype = jnp.float32
  args = _inputs(11, 56, 96, dtype, (2, 5))   # q 56 -> 64 rows, kv 165 -> 192, d 96 -> 128
  ours = _with_vjp(functools.partial(pallas_gpu.cross_attention, interpret=True))(*args)
  _check("poisoned-padding", ours, *args, dtype)


def test_batch_row_without_valid_keys_matches_reference():
  """All images padding: the reference's uniform softmax over all keys (mean of values)."""
  dtype = jnp.float32
  args = _inputs(5, 32, 64, dtype, (0, 2, 5))
  ours = _ours()(*args)
  _check("no-valid-key-row", ours, *args, dtype)
  np.testing.assert_allclose(ours[0][0], jnp.broadcast_to(args[2][0].mean(0), ours[0][0].shape),
                             rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32], ids=["bf16", "f32"])
def test_triton_lowering(dtype):
  """Forward, dq and dk/dv kernels lower through Pallas' Triton lowering for CUDA (no GPU needed)."""
  def loss(q, k, v, key_valid):
    return pallas_gpu.cross_attention(q, k, v, key_valid, interpret=False).astype(jnp.float32).sum()

  spec = lambda *shape: jax.ShapeDtypeStruct(shape, dtype)  # noqa: E731
  target = getattr(pallas_gpu._pl_triton, "CUSTOM_CALL_TARGET_NAME", "__gpu$xla.gpu.triton")
  exported = export.export(
      jax.jit(jax.grad(loss, argnums=(0, 1, 2))), platforms=["cuda"],
      disabled_checks=[export.DisabledSafetyCheck.custom_call(target)],
  )(spec(2, 56, HEADS, 96), spec(2, 165, HEADS, 96), spec(2, 165, HEADS, 96),
    jax.ShapeDtypeStruct((2, 165), bool))
  text = exported.mlir_module()
  assert text.count(target) == 3, "expected three Triton kernels: forward, dq, dk/dv"
  for kernel in ("cross_attention_fwd", "cross_attention_dq", "cross_attention_dkv"):
    assert kernel in text, f"{kernel} missing from the lowered module"


def test_unsupported_reason():
  def arrays(q_shape, k_shape, dtype=jnp.float32, k_dtype=None):
    return (jax.ShapeDtypeStruct(q_shape, dtype), jax.ShapeDtypeStruct(k_shape, k_dtype or dtype),
            jax.ShapeDtypeStruct(k_shape, k_dtype or dtype))

  for d in pallas_gpu.SUPPORTED_HEAD_DIMS:
    for dtype in (jnp.float32, jnp.bfloat16, jnp.float16):
      assert pallas_gpu.unsupported_reason(*arrays((2, 32, 4, d), (2, 1285, 4, d), dtype)) is None
  cases = {
      "head dim 80": arrays((2, 32, 4, 80), (2, 64, 4, 80)),
      "grouped KV": arrays((2, 32, 4, 64), (2, 64, 2, 64)),
      "dtype int32": arrays((2, 32, 4, 64), (2, 64, 4, 64), jnp.int32),
      "mixed dtypes": arrays((2, 32, 4, 64), (2, 64, 4, 64), jnp.float32, jnp.bfloat16),
      "rank-4": arrays((32, 4, 64), (64, 4, 64)),
      "batch": arrays((2, 32, 4, 64), (3, 64, 4, 64)),
  }
  for expected, case in cases.items():
    reason = pallas_gpu.unsupported_reason(*case)
    assert reason is not None and expected in reason, (expected, reason)
  q, k, v = (jnp.zeros(s.shape, s.dtype) for s in cases["head dim 80"])
  with pytest.raises(ValueError, match="head dim 80"):
    pallas_gpu.cross_attention(q, k, v)
  with pytest.raises(ValueError, match="key_valid"):
    pallas_gpu.cross_attention(*(jnp.zeros((1, 16, 1, 64)),) * 3, jnp.ones((1, 8), bool))
