"""Library attention kernels (prima_jax/kernels/library_attention.py) and the structured mask arguments.

What runs on this CPU machine, against the XLA reference ``xla_attention`` on inputs drawn from
``np.random.default_rng(SEED)`` (SEED fixed below, printed by each parity check's name):

* ``causal=`` / ``key_valid=`` give exactly (bitwise) the dense-mask result, also through
  ``dot_product_attention``; the reference matches ``jax.nn.dot_product_attention(
  implementation="xla")`` for causal + right padding + grouped KV + bias within 1e-6 (f32).
* ``"splash"`` in Pallas interpret mode: output and dq/dk/dv of a cotangent, causal and full masks,
  left/right/ragged key padding, grouped KV, q/kv lengths off the 128 block, head dims 64, 96
  (zero-padded to 128) and 128, f32 within 1e-5 and bf16 within 2e-2 of the reference's largest magnitude;
  rows that can attend no key are only required to be finite (the module docstring's rule);
  under ``activation_sharding`` on a 2x2x2 mesh of fake devices it runs in ``shard_map``; a tiny
  LLaMA with ``attention_implementation="splash"`` gives the XLA logits at real tokens.
* the selection rule with a faked backend: TPU picks ``pallas_tpu`` for the cross-image form and
  ``splash`` for causal grouped-KV attention; GPU tries ``pallas_gpu``, then ``cudnn``, which
  declines here (no GPU), logged once at WARNING; an explicit ``"cudnn"`` raises for f32 and
  without a GPU.
* lowering for the accelerators without one: ``jax.export(..., platforms=["tpu"])`` of splash
  (forward, dq, dk/dv Mosaic ``tpu_custom_call``) and ``platforms=["cuda"]`` of the cuDNN path
  (``__cudnn$fmha*`` forward and backward custom calls). cuDNN cannot be traced on a machine
  without cuDNN as is: ``jax._src.cudnn.fused_attention_stablehlo.check_cudnn_version`` raises
  "cuDNN is not detected." because the CPU jaxlib has no ``cuda_versions`` module. The test sets
  that module attribute to a stub reporting cuDNN 9.10 (monkeypatch, test only); the rest of the
  lowering is JAX's real one (compute-capability checks read the CPU backend and assume
  pre-Hopper limits). The cuDNN numerics cannot be checked without a GPU.
"""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax import export

from prima_jax import sharding
from prima_jax.kernels import library_attention
from prima_jax.models import attention, configs, llama

from parity_utils import assert_close

SEED = 20240611
RTOL = {jnp.float32: 1e-5, jnp.bfloat16: 2e-2}


def _rng(offset: int = 0) -> np.random.Generator:
  return np.random.default_rng(SEED + offset)


def _qkv(rng, batch=3, q_len=40, kv_len=40, heads=4, kv_heads=2, dim=64, dtype=jnp.float32):
  normal = lambda *s: jnp.asarray(rng.standard_normal(s), dtype)  # noqa: E731
  return (normal(batch, q_len, heads, dim), normal(batch, kv_len, kv_heads, dim),
          normal(batch, kv_len, kv_heads, dim))


def _key_valid(batch, kv_len, kind, rng):
  """[batch, kv_len] bool: right, left or ragged (random, first key valid) padding."""
  pos = np.arange(kv_len)[None, :]
  lengths = rng.integers(1, kv_len + 1, (batch, 1))
  if kind == "right":
    valid = pos < lengths
  elif kind == "left":
    valid = pos >= kv_len - lengths
  else:
    valid = rng.random((batch, kv_len)) > 0.4
    valid[:, 0] = True
  valid[-1] = True  # one unpadded row
  return jnp.asarray(valid)


def _attendable(q_len, kv_len, causal, key_valid):
  """[batch, q_len] bool: rows with at least one key to attend."""
  mask = np.asarray(key_valid)[:, None, :]
  if causal:
    mask = mask & (np.arange(kv_len)[None, :] <= np.arange(q_len)[:, None])[None]
  return jnp.asarray(mask.any(-1))


@pytest.fixture
def attention_log(caplog, monkeypatch):
  """The attention module's WARNING records so far, then cleared (and its once-memory cleared)."""
  monkeypatch.setattr(attention, "_logged_fallbacks", set())
  caplog.set_level(logging.WARNING, logger=attention.__name__)

  def messages():
    out = [r.getMessage() for r in caplog.records
           if r.name == attention.__name__ and r.levelno == logging.WARNING]
    caplog.clear()
    return out
  return messages


# --------------------------------------------------------------------------- structured arguments


@pytest.mark.parametrize("kind", ["right", "left", "ragged"])
def test_causal_and_key_valid_equal_the_dense_mask(kind):
  rng = _rng(1)
  q, k, v = _qkv(rng)
  key_valid = _key_valid(3, 40, kind, rng)
  dense = jnp.tril(jnp.ones((40, 40), bool))[None, None] & key_valid[:, None, None, :]
  ref = attention.xla_attention(q, k, v, mask=dense)
  np.testing.assert_array_equal(attention.xla_attention(q, k, v, causal=True, key_valid=key_valid), ref)
  np.testing.assert_array_equal(
      attention.dot_product_attention(q, k, v, causal=True, key_valid=key_valid), ref)
  # mask= and key_valid= are ANDed; a key-padding mask= alone is the same as key_valid=.
  extra = jnp.asarray(rng.random((3, 1, 40, 40)) > 0.2)
  np.testing.assert_array_equal(
      attention.xla_attention(q, k, v, mask=extra, causal=True, key_valid=key_valid),
      attention.xla_attention(q, k, v, mask=dense & extra))
  np.testing.assert_array_equal(attention.xla_attention(q, k, v, key_valid=key_valid),
                                attention.xla_attention(q, k, v, mask=key_valid[:, None, None, :]))


def test_reference_matches_jax_nn_xla():
  """Causal + right padding (as lengths) + grouped KV + bias: our reference vs jax.nn's."""
  rng = _rng(2)
  q, k, v = _qkv(rng, q_len=48, kv_len=48, heads=6, kv_heads=2)
  lengths = jnp.asarray(rng.integers(1, 49, 3), jnp.int32)
  bias = jnp.asarray(rng.standard_normal((3, 6, 48, 48)), jnp.float32)
  key_valid = jnp.arange(48)[None, :] < lengths[:, None]
  ours = attention.xla_attention(q, k, v, bias=bias, causal=True, key_valid=key_valid)
  ref = jax.nn.dot_product_attention(q, k, v, bias=bias, is_causal=True,
                                     key_value_seq_lengths=lengths, implementation="xla")
  assert_close(f"seed {SEED} reference vs jax.nn xla", ours, ref, rtol=1e-6)


# --------------------------------------------------------------------------- splash (interpret mode)


def _vjp(fn, q, k, v, cotangent):
  out, pullback = jax.vjp(fn, q, k, v)
  return (out, *pullback(cotangent.astype(out.dtype)))


_SPLASH_CASES = [  # (causal, padding, q_len, kv_len, dim, dtype)
    (True, "right", 200, 200, 128, jnp.float32),
    (True, "left", 130, 130, 96, jnp.float32),
    (True, "ragged", 200, 200, 64, jnp.bfloat16),
    (False, "ragged", 32, 300, 64, jnp.float32),   # SQuARE-like: few queries over padded keys
]


@pytest.mark.parametrize("causal,padding,q_len,kv_len,dim,dtype", _SPLASH_CASES)
def test_splash_matches_reference(causal, padding, q_len, kv_len, dim, dtype):
  rng = _rng(3)
  q, k, v = _qkv(rng, batch=2, q_len=q_len, kv_len=kv_len, heads=4, kv_heads=2, dim=dim, dtype=dtype)
  key_valid = None if padding is None else _key_valid(2, kv_len, padding, rng)
  rows = (jnp.ones((2, q_len), bool) if key_valid is None
          else _attendable(q_len, kv_len, causal, key_valid))
  # Rows with no key to attend are unspecified: no cotangent there, and compared only for finiteness.
  cotangent = jnp.asarray(rng.standard_normal(q.shape), jnp.float32) * rows[:, :, None, None]
  kw = dict(causal=causal, key_valid=key_valid)
  ours = jax.jit(lambda *a: _vjp(lambda q, k, v: attention.dot_product_attention(
      q, k, v, implementation="splash", **kw), *a))
  assert "pallas_call" in str(jax.make_jaxpr(ours)(q, k, v, cotangent))
  f32 = lambda x: x.astype(jnp.float32)  # noqa: E731
  ref = _vjp(lambda q, k, v: attention.xla_attention(q, k, v, **kw), f32(q), f32(k), f32(v), cotangent)
  got = ours(q, k, v, cotangent)
  assert np.all(np.isfinite(np.asarray(got[0], np.float32)))
  name = f"seed {SEED} splash causal={causal} {padding} q{q_len} kv{kv_len} d{dim} {jnp.dtype(dtype).name}"
  where = rows[:, :, None, None]
  assert_close(f"{name} out", jnp.where(where, f32(got[0]), 0), jnp.where(where, ref[0], 0),
               rtol=RTOL[dtype])
  for label, g, r in zip(("dq", "dk", "dv"), got[1:], ref[1:]):
    assert_close(f"{name} {label}", f32(g), r, rtol=RTOL[dtype])


def test_splash_runs_per_shard_under_activation_sharding():
  rng = _rng(4)
  q, k, v = _qkv(rng, batch=4, q_len=64, kv_len=64, heads=4, kv_heads=2)
  key_valid = _key_valid(4, 64, "right", rng)
  cotangent = jnp.asarray(rng.standard_normal(q.shape), jnp.float32)
  mesh = sharding.make_mesh((2, 2, 2))

  def run(implementation):
    def loss(q, k, v):
      out = attention.dot_product_attention(q, k, v, causal=True, key_valid=key_valid,
                                            implementation=implementation)
      return jnp.sum(out * cotangent), out
    with sharding.activation_sharding(mesh), jax.set_mesh(mesh):
      fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))
      assert ("shard_map" in str(jax.make_jaxpr(fn)(q, k, v))) == (implementation == "splash")
      return fn(q, k, v)

  (_, out), grads = run("splash")
  (_, ref_out), ref_grads = run("xla")
  assert_close(f"seed {SEED} splash per-shard out", out, ref_out, rtol=1e-5)
  for label, g, r in zip("qkv", grads, ref_grads):
    assert_close(f"seed {SEED} splash per-shard d{label}", g, r, rtol=1e-5)


def test_tiny_llama_on_splash_matches_xla():
  """cfg attention_implementation="splash": LLaMA's causal grouped-KV attention with right and left
  padding runs on splash (interpret mode) and gives the XLA logits at every real token."""
  cfg = configs.tiny_config().llm
  cfg.update(vocab_size=128, num_layers=2)
  rng = _rng(5)
  ids = jnp.asarray(rng.integers(0, 128, (2, 24)), jnp.int32)
  mask = np.ones((2, 24), bool)
  mask[0, 20:] = False
  mask[1, :3] = False
  mask = jnp.asarray(mask)

  def logits(implementation):
    model = llama.Llama(cfg, attention_implementation=implementation, rngs=nnx.Rngs(SEED))
    run = lambda m: m(m.embed(ids), attention_mask=mask)[0]  # noqa: E731
    if implementation == "splash":
      assert "pallas_call" in str(jax.make_jaxpr(lambda: run(model))())
    return nnx.jit(run)(model)

  real = mask[:, :, None]
  assert_close(f"seed {SEED} tiny llama splash logits", jnp.where(real, logits("splash"), 0),
               jnp.where(real, logits("xla"), 0), rtol=1e-5)


# --------------------------------------------------------------------------- selection rule


def _kernel_names(fn, *args) -> set[str]:
  text = str(jax.make_jaxpr(fn)(*args))
  return {name for name in ("splash_mha", "cross_image_attention") if name in text}


def test_preferences_on_a_faked_tpu(monkeypatch, attention_log):
  monkeypatch.setattr(attention, "_backend", lambda: "tpu")
  rng = _rng(6)
  q, k, v = _qkv(rng, q_len=24, kv_len=24)
  key_valid = _key_valid(3, 24, "right", rng)
  causal = lambda q, k, v: attention.dot_product_attention(q, k, v, causal=True, key_valid=key_valid)  # noqa: E731
  assert _kernel_names(causal, q, k, v) == {"splash_mha"}
  qm, km, vm = _qkv(rng, q_len=8, kv_len=40, kv_heads=4)
  valid = _key_valid(3, 40, "ragged", rng)
  padded = lambda q, k, v: attention.dot_product_attention(q, k, v, mask=valid[:, None, None, :])  # noqa: E731
  assert _kernel_names(padded, qm, km, vm) == {"cross_image_attention"}  # pallas_tpu
  assert_close("faked tpu: causal on splash", causal(q, k, v),
               attention.xla_attention(q, k, v, causal=True, key_valid=key_valid), rtol=1e-5)
  bias = jnp.zeros((1, 4, 24, 24))
  biased = lambda q, k, v: attention.dot_product_attention(q, k, v, bias=bias)  # noqa: E731
  assert _kernel_names(biased, q, k, v) == set()
  messages = attention_log()
  assert len(messages) == 1 and "additive bias (splash attention takes none)" in messages[0], messages


def test_preferences_on_a_faked_gpu_fall_back_once(monkeypatch, attention_log):
  """GPU: pallas_gpu declines causal, cudnn declines here (f32; no GPU for bf16): XLA, one warning."""
  monkeypatch.setattr(attention, "_backend", lambda: "gpu")
  rng = _rng(7)
  cases = ((jnp.float32, "cudnn: dtype float32"), (jnp.bfloat16, "cudnn: cuDNN needs a CUDA GPU"))
  for dtype, reason in cases:
    q, k, v = _qkv(rng, q_len=16, kv_len=16, dtype=dtype)
    for _ in range(2):
      out = attention.dot_product_attention(q, k, v, causal=True)
    np.testing.assert_array_equal(out, attention.xla_attention(q, k, v, causal=True))
    messages = attention_log()
    assert len(messages) == 1 and reason in messages[0] and "pallas_gpu:" in messages[0], messages
    attention._logged_fallbacks.clear()


def test_explicit_cudnn_raises_where_it_cannot_run():
  q, k, v = _qkv(_rng(8), q_len=16, kv_len=16)
  with pytest.raises(ValueError, match="'cudnn' cannot run .*bf16/fp16 only"):
    attention.dot_product_attention(q, k, v, causal=True, implementation="cudnn")
  with pytest.raises(ValueError, match="'cudnn' cannot run .*needs a CUDA GPU"):
    attention.dot_product_attention(*(x.astype(jnp.bfloat16) for x in (q, k, v)), causal=True,
                                    implementation="cudnn")


def test_form_rules():
  q, k, v = _qkv(_rng(9), q_len=8, kv_len=16)
  general = jnp.ones((3, 1, 8, 16), bool)
  assert "general mask" in library_attention.splash_applies(q, k, v, mask=general, bias=None,
                                                            causal=False, key_valid=None)
  assert "causal with q_len 8 != kv_len 16" in library_attention.cudnn_applies(
      q, k, v, mask=None, bias=None, causal=True, key_valid=None)
  assert library_attention.cudnn_applies(q, k, v, mask=None, bias=jnp.zeros((8, 16)), causal=False,
                                         key_valid=None) is None
  assert "head dim 100" in library_attention.cudnn_unsupported_reason(
      *(jnp.zeros((1, 8, 2, 100), jnp.bfloat16),) * 3)
  f16 = jnp.zeros((1, 8, 2, 64), jnp.float16)
  assert "float16" in library_attention.splash_unsupported_reason(f16, f16, f16)


# --------------------------------------------------------------------------- lowering


def _spec(*shape, dtype=jnp.bfloat16):
  return jax.ShapeDtypeStruct(shape, dtype)


def test_splash_lowers_to_mosaic_for_tpu():
  def loss(q, k, v, key_valid):
    out = library_attention.splash_attention(q, k, v, key_valid, causal=True, interpret=False)
    return out.astype(jnp.float32).sum()

  exported = export.export(jax.jit(jax.grad(loss, argnums=(0, 1, 2))), platforms=["tpu"])(
      _spec(2, 300, 8, 128), _spec(2, 300, 2, 128), _spec(2, 300, 2, 128), _spec(2, 300, dtype=bool))
  text = exported.mlir_module()
  assert text.count("tpu_custom_call") == 3, "expected splash forward, dq and dk/dv kernels"
  assert "splash_mha" in text


class _FakeCudaVersions:
  """Stands in for jaxlib's cuda_versions (absent from the CPU jaxlib) during the cuDNN lowering."""

  @staticmethod
  def cudnn_get_version() -> int:
    return 91000


@pytest.mark.parametrize("form", ["causal_padding_gqa", "bias"])
def test_cudnn_lowers_for_cuda(form, monkeypatch):
  from jax._src.cudnn import fused_attention_stablehlo  # noqa: PLC0415

  monkeypatch.setattr(fused_attention_stablehlo, "cuda_versions", _FakeCudaVersions)
  if form == "bias":  # SAM's encoder: relative-position bias [b, heads, q, k]
    args = (_spec(2, 196, 4, 80), _spec(2, 196, 4, 80), _spec(2, 196, 4, 80), _spec(2, 4, 196, 196))
    attend = lambda q, k, v, b: library_attention.cudnn_attention(q, k, v, bias=b)  # noqa: E731
  else:
    args = (_spec(2, 128, 8, 64), _spec(2, 128, 2, 64), _spec(2, 128, 2, 64), _spec(2, 128, dtype=bool))
    attend = lambda q, k, v, valid: library_attention.cudnn_attention(  # noqa: E731
        q, k, v, causal=True, key_valid=valid)
  loss = lambda *a: attend(*a).astype(jnp.float32).sum()  # noqa: E731
  targets = ("__cudnn$fmhaScaleBiasSoftmax", "__cudnn$fmhaScaleBiasSoftmaxBackward")
  exported = export.export(
      jax.jit(jax.grad(loss, argnums=(0, 1, 2))), platforms=["cuda"],
      disabled_checks=[export.DisabledSafetyCheck.custom_call(t) for t in targets])(*args)
  text = exported.mlir_module()
  for target in targets:
    assert f"@{target}(" in text, f"{target} missing from the lowered module"
  if form != "bias":
    assert "CAUSAL" in text
