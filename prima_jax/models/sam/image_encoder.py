"""SAM ViT image encoder (NHWC): patch embedding, windowed / global attention blocks with
decomposed relative positions, and the convolutional neck.

Shapes use S = image size, p = patch size, g = S / p (grid), D = width, C = out_channels.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from prima_jax import sharding
from prima_jax.models import layers, stacking
from prima_jax.models.attention import dot_product_attention

# LayerNorm2d of SAM's neck, mask downscaling and output upscaling (a channel-last LayerNorm).
LAYER_NORM_2D_EPS = 1e-6
# Logical axes of the [b, g, g, D] activations (and of the [b * windows, w, w, D] windows). Without
# them the partitioner replicated the encoder over the batch axes: every device encoded the whole
# micro-batch's images (docs/perf.md, "Memory per device").
ACT_AXES = ("batch", None, None, "act_embed")


def window_partition(x: jax.Array, window: int) -> tuple[jax.Array, tuple[int, int]]:
  """[b, h, w, c] -> ([b * nh * nw, window, window, c], (padded h, padded w)); zero-pads bottom/right."""
  b, h, w, c = x.shape
  pad_h, pad_w = (-h) % window, (-w) % window
  if pad_h or pad_w:
    x = jnp.pad(x, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)))
  hp, wp = h + pad_h, w + pad_w
  x = x.reshape(b, hp // window, window, wp // window, window, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(-1, window, window, c), (hp, wp)


def window_unpartition(windows: jax.Array, window: int, padded_hw: tuple[int, int],
                       hw: tuple[int, int]) -> jax.Array:
  """Inverse of :func:`window_partition`: [b * nh * nw, window, window, c] -> [b, h, w, c]."""
  hp, wp = padded_hw
  c = windows.shape[-1]
  b = windows.shape[0] // ((hp // window) * (wp // window))
  x = windows.reshape(b, hp // window, wp // window, window, window, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, hp, wp, c)[:, :hw[0], :hw[1]]


def relative_positions(rel_pos: jax.Array, size: int) -> jax.Array:
  """Table [2 * size - 1, d] -> [size (query), size (key), d] indexed by q - k + size - 1."""
  if rel_pos.shape[0] != 2 * size - 1:
    raise ValueError(f"relative position table of length {rel_pos.shape[0]} does not fit a "
                     f"{size}-token axis (needs {2 * size - 1})")
  idx = jnp.arange(size)[:, None] - jnp.arange(size)[None, :] + size - 1
  return rel_pos[idx]


def decomposed_rel_pos_bias(q: jax.Array, rel_pos_h: jax.Array, rel_pos_w: jax.Array,
                            hw: tuple[int, int]) -> jax.Array:
  """MViTv2 decomposed relative-position logits bias.

  Args:
    q: unscaled queries [b, h * w, heads, head_dim].
    rel_pos_h, rel_pos_w: [2h - 1, head_dim], [2w - 1, head_dim].
  Returns:
    [b, heads, h * w, h * w] additive bias (query-dependent).
  """
  h, w = hw
  b, _, heads, d = q.shape
  q = q.reshape(b, h, w, heads, d)
  r_h = relative_positions(rel_pos_h, h).astype(q.dtype)  # [h, kh, d]
  r_w = relative_positions(rel_pos_w, w).astype(q.dtype)  # [w, kw, d]
  bias_h = jnp.einsum("byxnd,ykd->bnyxk", q, r_h)
  bias_w = jnp.einsum("byxnd,xkd->bnyxk", q, r_w)
  bias = bias_h[..., :, None] + bias_w[..., None, :]  # [b, heads, h, w, kh, kw]
  return bias.reshape(b, heads, h * w, h * w)


class VisionAttention(nnx.Module):
  """Multi-head self-attention over a [b, h, w, D] grid with fused qkv and relative positions.

  The decomposed relative-position logits go to :func:`dot_product_attention` as ``bias=`` (dense
  [b, heads, h*w, h*w]: 196^2 per window, 4096^2 per head at the global layers of a 1024 image).
  Kernels (``implementation=None``): on a GPU in bf16/fp16 the cuDNN flash kernel takes the bias
  (it reads the bias instead of materialising f32 logits and probabilities: half the memory of the
  reference at the global layers); on a TPU it stays on the XLA reference, since splash attention
  takes no bias and the bias-taking TPU ``flash_attention`` would stream the same dense bias for a
  frozen, forward-only encoder without a measured gain (no TPU here to measure it).
  """

  def __init__(self, width: int, num_heads: int, grid: int, *, use_rel_pos: bool, qkv_bias: bool,
               dtype: Any, param_dtype: Any, attention_implementation: str | None, rngs: nnx.Rngs):
    self.num_heads = num_heads
    self.use_rel_pos = use_rel_pos
    self.attention_implementation = attention_implementation
    self.qkv = layers.linear(width, 3 * width, ("embed", "qkv"), use_bias=qkv_bias, dtype=dtype,
                             param_dtype=param_dtype, rngs=rngs)
    self.proj = layers.linear(width, width, ("heads", "embed"), dtype=dtype, param_dtype=param_dtype,
                              rngs=rngs)
    if use_rel_pos:
      head_dim = width // num_heads
      zeros = nnx.initializers.zeros
      self.rel_pos_h = layers.param(rngs, (2 * grid - 1, head_dim), ("relative", "head_dim"), init=zeros,
                                    param_dtype=param_dtype)
      self.rel_pos_w = layers.param(rngs, (2 * grid - 1, head_dim), ("relative", "head_dim"), init=zeros,
                                    param_dtype=param_dtype)

  def __call__(self, x: jax.Array) -> jax.Array:
    """[b, h, w, D] -> [b, h, w, D]."""
    b, h, w, d = x.shape
    qkv = self.qkv(x).reshape(b, h * w, 3, self.num_heads, d // self.num_heads)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    bias = None
    if self.use_rel_pos:
      bias = decomposed_rel_pos_bias(q, self.rel_pos_h[...], self.rel_pos_w[...], (h, w))
    out = dot_product_attention(q, k, v, bias=bias, implementation=self.attention_implementation)
    return self.proj(layers.merge_heads(out).reshape(b, h, w, d))



class VisionBlock(nnx.Module):
  """Pre-LN ViT block; ``window > 0`` attends within non-overlapping windows, 0 = global."""

  def __init__(self, cfg, window: int, *, dtype: Any, param_dtype: Any,
               attention_implementation: str | None, rngs: nnx.Rngs):
    width = cfg.width
    self.window = window
    grid = window if window > 0 else cfg.image_size // cfg.patch_size
    norm = dict(eps=cfg.layer_norm_eps, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.norm1 = layers.layer_norm(width, **norm)
    self.attn = VisionAttention(width, cfg.num_heads, grid, use_rel_pos=cfg.use_rel_pos,
                                qkv_bias=cfg.qkv_bias, dtype=dtype, param_dtype=param_dtype,
                                attention_implementation=attention_implementation, rngs=rngs)
    self.norm2 = layers.layer_norm(width, **norm)
    self.mlp = layers.MLP(width, cfg.mlp_dim, activation=layers.gelu, dtype=dtype,
                          param_dtype=param_dtype, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    """[b, g, g, D] -> [b, g, g, D]."""
    y = self.norm1(x)
    if self.window > 0:
      hw = y.shape[1:3]
      y, padded = window_partition(y, self.window)
      y = self.attn(sharding.constrain(y, ACT_AXES))
      y = window_unpartition(y, self.window, padded, hw)
    else:
      y = self.attn(y)
    x = x + y
    return sharding.constrain(x + self.mlp(self.norm2(x)), ACT_AXES)


def _apply_block(block: VisionBlock, x: jax.Array) -> jax.Array:
  return block(x)


class SamImageEncoder(nnx.Module):
  """SAM ViT: images [b, S, S, 3] (normalised) -> embeddings [b, S/p, S/p, out_channels].

  ``scan_layers`` (``model.scan_layers``) holds the blocks stacked and scans over groups that repeat
  the windowed / global pattern (ViT-H: 4 groups of 7 windowed blocks + 1 global one), each group's
  blocks run in order inside the scan body (:mod:`prima_jax.models.stacking`).
  """

  def __init__(self, cfg, *, dtype=None, param_dtype=jnp.float32, attention_implementation=None,
               remat: bool | str = False, scan_layers: bool = False, rngs: nnx.Rngs):
    grid = cfg.image_size // cfg.patch_size
    self.remat = layers.remat_policy_name(remat)
    self.patch_embed = layers.conv(3, cfg.width, (cfg.patch_size, cfg.patch_size),
                                   strides=cfg.patch_size, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.pos_embed = layers.param(rngs, (grid, grid, cfg.width), ("positions", "positions", "embed"),
                                  init=nnx.initializers.zeros, param_dtype=param_dtype)
    global_idx = set(cfg.global_attn_indexes)
    windows = [0 if i in global_idx else cfg.window_size for i in range(cfg.depth)]
    self.scan_layers = bool(scan_layers)
    self.scan_stack = (stacking.Stack(("blocks",), cfg.depth, stacking.period(windows))
                       if self.scan_layers else None)
    self.blocks = stacking.build(
        lambda i, r: VisionBlock(cfg, windows[i], dtype=dtype, param_dtype=param_dtype,
                                 attention_implementation=attention_implementation, rngs=r),
        windows, rngs, scan=self.scan_layers)
    out = cfg.out_channels
    norm = dict(eps=LAYER_NORM_2D_EPS, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.neck_conv1 = layers.conv(cfg.width, out, (1, 1), use_bias=False, dtype=dtype,
                                  param_dtype=param_dtype, rngs=rngs)
    self.neck_norm1 = layers.layer_norm(out, **norm)
    self.neck_conv2 = layers.conv(out, out, (3, 3), padding=((1, 1), (1, 1)), use_bias=False, dtype=dtype,
                                  param_dtype=param_dtype, rngs=rngs)
    self.neck_norm2 = layers.layer_norm(out, **norm)

  def __call__(self, images: jax.Array) -> jax.Array:
    """[b, S, S, 3] -> [b, S/p, S/p, out_channels]."""
    x = self.patch_embed(sharding.constrain(images, ACT_AXES))
    x = sharding.constrain(x + self.pos_embed[...].astype(x.dtype), ACT_AXES)
    x = stacking.run(self.blocks, x, _apply_block, scan=self.scan_layers, remat=self.remat)
    x = self.neck_norm1(self.neck_conv1(x))
    return sharding.constrain(self.neck_norm2(self.neck_conv2(x)), ACT_AXES)
