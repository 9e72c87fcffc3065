"""Parameter-carrying building blocks with logical axis names.

Every parameter made here carries a ``logical_axes`` metadata tuple (one name per array
dimension). ``prima_jax.sharding`` maps those names to mesh axes through one rules table.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

Axes = tuple[str | None, ...]

DEFAULT_KERNEL_INIT = nnx.initializers.normal(stddev=0.02)

# model.kernel_init -> the initialiser of every dense / conv kernel built while it is in force
# (:func:`kernel_init_scheme`). "normal" is how the published towers were initialised and what the
# references do; at widths of 16-64 it leaves activations ~10x too small, so the tiny config is fan-in
# scaled. Embeddings, query tokens, LoRA's A (PEFT's init) and zero-initialised layers are not kernels
# here: they keep their own initialisers whatever the scheme.
KERNEL_INITS: dict[str, Any] = {
    "normal": DEFAULT_KERNEL_INIT,
    "lecun_normal": nnx.initializers.lecun_normal(),
}
_kernel_init = contextvars.ContextVar("kernel_init", default="normal")


@contextlib.contextmanager
def kernel_init_scheme(name: str):
  """Within the block, :func:`linear`, :func:`conv` and :func:`kernel_param` use ``KERNEL_INITS[name]``.

  The model builder (``Prima``) enters it with ``model.kernel_init`` around construction, so one
  config field reaches every tower without threading an initialiser through each constructor.
  """
  if name not in KERNEL_INITS:
    raise ValueError(f"unknown kernel_init {name!r}; choose from {', '.join(KERNEL_INITS)}")
  token = _kernel_init.set(name)
  try:
    yield
  finally:
    _kernel_init.reset(token)


def kernel_initializer(kernel_init=None):
  """``kernel_init`` when given, else the scheme in force (:func:`kernel_init_scheme`)."""
  return KERNEL_INITS[_kernel_init.get()] if kernel_init is None else kernel_init


class _HostRngCount(nnx.RngCount):
  """An RNG stream's draw counter held as a NumPy integer; every read of it is a copy (a traced
  computation that took the counter as a constant keeps the value it read). While flax's
  ``split_rngs`` (scanned layers) has set a split counter, that one is a JAX array, read as is."""

  def get_value(self, **kwargs):
    value = super().get_value(**kwargs)
    return value.copy() if isinstance(value, np.ndarray) else value


def _cpu_threefry() -> tuple[dict, Any] | None:
  """(JAX's table of CPU-only lowering rules, the threefry primitive), or None where this JAX has no
  such table (private API: then nothing here changes anything)."""
  try:
    from jax._src.interpreters import mlir  # noqa: PLC0415
    from jax._src.random.threefry2x32 import threefry2x32_p  # noqa: PLC0415
    return mlir._platform_specific_lowerings["cpu"], threefry2x32_p
  except (ImportError, AttributeError, KeyError):
    return None


_THREEFRY_LOOP_RULE: list = []   # JAX's CPU rule, kept while it is out of the table


def _set_threefry_unrolled(unrolled: bool) -> bool:
  """Lowers threefry on the CPU unrolled (or as JAX's loop); returns whether it was unrolled before."""
  found = _cpu_threefry()
  if found is None:
    return unrolled
  table, prim = found
  was_unrolled = prim not in table
  if unrolled and not was_unrolled:
    _THREEFRY_LOOP_RULE[:] = [table.pop(prim)]
  elif not unrolled and was_unrolled and _THREEFRY_LOOP_RULE:
    table[prim] = _THREEFRY_LOOP_RULE[0]
  return was_unrolled


def unroll_threefry_on_cpu() -> None:
  """From now on in this process JAX lowers its threefry PRNG hash on the CPU unrolled, as it does on
  TPU and GPU (programs lowered before keep what they were lowered with).

  On the CPU JAX emits each threefry call as a 5-step ``fori_loop``; unrolled, the hash computes the
  same bits and XLA compiles the programs that draw many keys far faster: the demo model's
  initialisation (~200 truncated normals) in 20 s instead of 32 s, the tests' train step (its key
  folding) in 37 s instead of 48 s on a 2-core CPU (docs/training.md). :func:`init_rngs` calls it, so
  every program that builds or trains a model of this package compiles this way.
  """
  _set_threefry_unrolled(True)


@contextlib.contextmanager
def threefry_lowering(*, unrolled: bool):
  """Within the block, threefry lowers on the CPU unrolled or as JAX's loop; the previous way after."""
  before = _set_threefry_unrolled(unrolled)
  try:
    yield
  finally:
    _set_threefry_unrolled(before)


def init_rngs(seed: int) -> nnx.Rngs:
  """``nnx.Rngs(seed)`` for building a model: the same keys, its draw counters on the host.

  flax keeps each stream's counter as a JAX array and, inside ``jax.jit`` / ``nnx.eval_shape``, every
  draw's counter update reads the new value's ``sharding``: on a tracer that raises an AttributeError
  whose message JAX builds by scanning the whole trace so far, so building a model under a trace is
  quadratic in its number of draws (the demo model's ~1000: 4.1-4.9 s to trace, 1.2 s with host
  counters). Host counters fold the same integers into the same keys (``tests/test_prima.py`` compares
  the draws and whole models bitwise with ``nnx.Rngs``'s). Only for construction: a module that keeps
  a stream (dropout) forks its own, with flax's counter. Also lowers threefry unrolled from then on
  (:func:`unroll_threefry_on_cpu`: the same keys, faster compiles).
  """
  unroll_threefry_on_cpu()
  rngs = nnx.Rngs(seed)
  for stream in vars(rngs).values():
    if isinstance(stream, nnx.RngStream):
      stream.count = _HostRngCount(np.zeros(stream.count.shape, np.uint32), tag=stream.tag)
  return rngs


# model.remat_policy -> what a rematerialised block keeps from its forward pass for the backward
# (everything else is recomputed). JAX's own policies (jax.checkpoint_policies).
REMAT_POLICIES: dict[str, Any] = {
    # Only the block's inputs: the whole block runs again in the backward (least memory).
    "full": None,
    # Every matmul output, the attention logits included: only elementwise work is recomputed.
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
    # Matmuls without batch dimensions (the weight projections, LoRA included): attention's
    # batched einsums and the elementwise work are recomputed; its [heads, q, k] logits are not kept.
    "dots_with_no_batch_dims_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def remat_policy_name(remat: bool | str | None) -> str | None:
  """A module's ``remat`` argument as a policy name: False / None / "none" -> None, True -> "full".

  Raises:
    ValueError: an unknown policy name.
  """
  if remat is None or remat is False or remat == "none":
    return None
  if remat is True:
    return "full"
  if remat not in REMAT_POLICIES:
    raise ValueError(f"unknown remat policy {remat!r}; choose from none, {', '.join(REMAT_POLICIES)}")
  return remat


def remat_setting(model_cfg) -> str | None:
  """The towers' ``remat`` argument from a model config: ``remat_policy`` when ``remat`` is on, else None."""
  return remat_policy_name(model_cfg.get("remat_policy", "full")) if model_cfg.remat else None


def remat(fn, policy: bool | str | None, **kwargs):
  """``fn`` wrapped in ``nnx.remat`` under ``policy`` (see :func:`remat_policy_name`); unchanged when off.

  ``kwargs`` go to ``nnx.remat`` (e.g. ``static_argnums``).
  """
  name = remat_policy_name(policy)
  if name is None:
    return fn
  return nnx.remat(fn, policy=REMAT_POLICIES[name], **kwargs)


def dtype_of(name: Any) -> jnp.dtype:
  """Turns a config string ('float32', 'bfloat16') or dtype into a jnp dtype."""
  if name is None:
    return None
  return jnp.dtype(name)


def linear(in_features: int, out_features: int, axes: Axes, *, rngs: nnx.Rngs,
           use_bias: bool = True, dtype: Any = None, param_dtype: Any = jnp.float32,
           kernel_init=None) -> nnx.Linear:
  """A dense layer with kernel [in, out] named ``axes`` and bias [out] named ``axes[1]``.

  ``kernel_init`` None: the scheme in force (:func:`kernel_init_scheme`; N(0, 0.02) outside one).
  """
  return nnx.Linear(
      in_features, out_features, use_bias=use_bias, dtype=dtype_of(dtype),
      param_dtype=dtype_of(param_dtype), kernel_init=kernel_initializer(kernel_init), rngs=rngs,
      kernel_metadata={"logical_axes": tuple(axes)},
      bias_metadata={"logical_axes": (axes[1],)})


def layer_norm(features: int, *, eps: float, rngs: nnx.Rngs, axis_name: str | None = "norm",
               dtype: Any = None, param_dtype: Any = jnp.float32) -> nnx.LayerNorm:
  """LayerNorm over the last axis with an explicit epsilon (Flax and PyTorch defaults differ)."""
  return nnx.LayerNorm(
      features, epsilon=eps, dtype=dtype_of(dtype), param_dtype=dtype_of(param_dtype),
      use_fast_variance=False, rngs=rngs,
      scale_metadata={"logical_axes": (axis_name,)}, bias_metadata={"logical_axes": (axis_name,)})


def conv(in_features: int, out_features: int, kernel_size: Sequence[int], *, rngs: nnx.Rngs,
         strides: Sequence[int] | int = 1, padding: Any = "VALID", use_bias: bool = True,
         dtype: Any = None, param_dtype: Any = jnp.float32,
         axes: Axes = ("conv_height", "conv_width", "conv_in", "conv_out")) -> nnx.Conv:
  """An NHWC convolution with an HWIO kernel named ``axes``."""
  return nnx.Conv(
      in_features, out_features, tuple(kernel_size), strides=strides, padding=padding,
      use_bias=use_bias, dtype=dtype_of(dtype), param_dtype=dtype_of(param_dtype),
      kernel_init=kernel_initializer(), rngs=rngs,
      kernel_metadata={"logical_axes": tuple(axes)}, bias_metadata={"logical_axes": (axes[-1],)})


def kernel_param(rngs: nnx.Rngs, shape: Sequence[int], axes: Axes, *, fan_in_axes: Sequence[int],
                 param_dtype: Any = jnp.float32) -> nnx.Param:
  """A free-standing kernel under the scheme in force, its fan-in taken over ``fan_in_axes``.

  For kernels that are not ``[..., in, out]`` convolutions (a stride-2 transposed conv's output
  pixel sees only its ``in`` channels, not the 2 x 2 window): the other axes count as batch axes.
  """
  init = DEFAULT_KERNEL_INIT
  if _kernel_init.get() == "lecun_normal":
    batch = tuple(a for a in range(len(shape) - 1) if a not in tuple(fan_in_axes))
    init = nnx.initializers.variance_scaling(1.0, "fan_in", "truncated_normal", in_axis=tuple(fan_in_axes),
                                             out_axis=-1, batch_axis=batch)
  return param(rngs, shape, axes, init=init, param_dtype=param_dtype)


def param(rngs: nnx.Rngs, shape: Sequence[int], axes: Axes, *, init=DEFAULT_KERNEL_INIT,
          param_dtype: Any = jnp.float32) -> nnx.Param:
  """A free-standing parameter (embeddings, tokens, relative positions) with logical axes."""
  if len(axes) != len(shape):
    raise ValueError(f"axes {axes} do not match shape {tuple(shape)}")
  return nnx.Param(init(rngs.params(), tuple(shape), dtype_of(param_dtype)), logical_axes=tuple(axes))


class RMSNorm(nnx.Module):
  """LLaMA RMSNorm: x / sqrt(mean(x^2) + eps) * weight, computed in float32."""

  def __init__(self, features: int, *, eps: float, rngs: nnx.Rngs, param_dtype: Any = jnp.float32,
               axis_name: str | None = "norm"):
    del rngs
    self.eps = eps
    self.scale = nnx.Param(jnp.ones((features,), dtype_of(param_dtype)), logical_axes=(axis_name,))

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return (normed.astype(x.dtype) * self.scale[...].astype(x.dtype))


def gelu(x: jax.Array) -> jax.Array:
  """Exact (erf) GELU, as PyTorch's ``nn.GELU()``."""
  return jax.nn.gelu(x, approximate=False)


class MLP(nnx.Module):
  """Two-layer feed-forward block: fc2(act(fc1(x))) with [embed, mlp] / [mlp, embed] kernels."""

  def __init__(self, width: int, hidden: int, *, rngs: nnx.Rngs, activation=gelu, dtype: Any = None,
               param_dtype: Any = jnp.float32, axes: tuple[str, str] = ("embed", "mlp")):
    self.fc1 = linear(width, hidden, axes, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.fc2 = linear(hidden, width, (axes[1], axes[0]), rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.activation = activation

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.fc2(self.activation(self.fc1(x)))


def split_heads(x: jax.Array, num_heads: int) -> jax.Array:
  """[..., tokens, heads * head_dim] -> [..., tokens, heads, head_dim]."""
  return x.reshape(*x.shape[:-1], num_heads, x.shape[-1] // num_heads)


def merge_heads(x: jax.Array) -> jax.Array:
  """[..., tokens, heads, head_dim] -> [..., tokens, heads * head_dim]."""
  return x.reshape(*x.shape[:-2], x.shape[-2] * x.shape[-1])
