"""EVA-CLIP ViT-g image encoder of InstructBLIP (LAVIS ``eva_vit.py``), with ``ln_vision``.

Pre-LN ViT: patch embedding (conv, stride = patch) + class token + learned position embedding,
``depth`` blocks ``x + attn(ln1(x)); x + mlp(ln2(x))``, then the LayerNorm LAVIS calls
``ln_vision`` (Hugging Face: ``post_layernorm``). The fused qkv projection has no bias of its
own; q and v get separate bias vectors and k has none, as in EVA-CLIP.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from prima_jax import sharding
from prima_jax.models import attention, layers, stacking

ACT_AXES = ("batch", "length", "act_embed")


class EvaAttention(nnx.Module):
  """Multi-head self-attention with a fused bias-free qkv kernel [width, 3 * width] plus q/v biases."""

  def __init__(self, width: int, num_heads: int, *, qkv_bias: bool, rngs: nnx.Rngs, dtype: Any = None,
               param_dtype: Any = jnp.float32, attention_implementation: str | None = None):
    if width % num_heads:
      raise ValueError(f"width {width} is not a multiple of num_heads {num_heads}")
    self.num_heads = num_heads
    self.attention_implementation = attention_implementation
    self.qkv = layers.linear(width, 3 * width, ("embed", "qkv"), use_bias=False, rngs=rngs, dtype=dtype,
                             param_dtype=param_dtype)
    if qkv_bias:
      zeros = nnx.initializers.zeros_init()
      self.q_bias = layers.param(rngs, (width,), ("heads",), init=zeros, param_dtype=param_dtype)
      self.v_bias = layers.param(rngs, (width,), ("heads",), init=zeros, param_dtype=param_dtype)
    else:
      self.q_bias = None
      self.v_bias = None
    self.proj = layers.linear(width, width, ("heads", "embed"), rngs=rngs, dtype=dtype,
                              param_dtype=param_dtype)

  def __call__(self, x: jax.Array) -> jax.Array:
    """[batch, tokens, width] -> [batch, tokens, width]."""
    q, k, v = jnp.split(self.qkv(x), 3, axis=-1)
    if self.q_bias is not None:
      q = q + self.q_bias[...].astype(q.dtype)
      v = v + self.v_bias[...].astype(v.dtype)
    q, k, v = (layers.split_heads(t, self.num_heads) for t in (q, k, v))
    out = attention.dot_product_attention(q, k, v, implementation=self.attention_implementation)
    return self.proj(layers.merge_heads(out))


class EvaBlock(nnx.Module):
  """Pre-LN transformer block: x + attn(norm1(x)), then x + mlp(norm2(x)) with exact GELU."""

  def __init__(self, cfg, *, rngs: nnx.Rngs, dtype: Any = None, param_dtype: Any = jnp.float32,
               attention_implementation: str | None = None):
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.norm1 = layers.layer_norm(cfg.width, eps=cfg.layer_norm_eps, **kw)
    self.attn = EvaAttention(cfg.width, cfg.num_heads, qkv_bias=cfg.qkv_bias,
                             attention_implementation=attention_implementation, **kw)
    self.norm2 = layers.layer_norm(cfg.width, eps=cfg.layer_norm_eps, **kw)
    self.mlp = layers.MLP(cfg.width, cfg.mlp_dim, **kw)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = x + self.attn(self.norm1(x))
    x = x + self.mlp(self.norm2(x))
    return sharding.constrain(x, ACT_AXES)


def _apply_block(block: EvaBlock, x: jax.Array) -> jax.Array:
  return block(x)


class EvaViT(nnx.Module):
  """EVA-CLIP ViT followed by ``ln_vision``.

  Args:
    cfg: the ``vision`` config (image_size, patch_size, width, depth, num_heads, mlp_dim,
      layer_norm_eps, qkv_bias, ln_vision_eps).
    dtype: compute dtype (None: the parameters' dtype).
    param_dtype: storage dtype of the parameters.
    attention_implementation: passed to :func:`attention.dot_product_attention`.
    remat: recompute each block in the backward pass (gradient checkpointing): False, True ("full")
      or a policy name of ``layers.REMAT_POLICIES``.
    scan_layers: hold the blocks stacked and run them with ``nnx.scan`` (``model.scan_layers``,
      :mod:`prima_jax.models.stacking`); False: a Python loop over ``depth`` blocks.
  """

  def __init__(self, cfg, *, dtype: Any = None, param_dtype: Any = jnp.float32,
               attention_implementation: str | None = None, remat: bool | str = False,
               scan_layers: bool = False, rngs: nnx.Rngs):
    if cfg.image_size % cfg.patch_size:
      raise ValueError(f"image_size {cfg.image_size} is not a multiple of patch_size {cfg.patch_size}")
    self.patch_size = cfg.patch_size
    self.num_patches = (cfg.image_size // cfg.patch_size) ** 2
    self.remat = layers.remat_policy_name(remat)
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    p = cfg.patch_size
    self.patch_embed = layers.conv(3, cfg.width, (p, p), strides=p, padding="VALID",
                                   axes=("conv_height", "conv_width", "conv_in", "embed"), **kw)
    self.cls_token = layers.param(rngs, (cfg.width,), ("embed",), param_dtype=param_dtype)
    self.pos_embed = layers.param(rngs, (1 + self.num_patches, cfg.width), ("positions", "embed"),
                                  param_dtype=param_dtype)
    self.scan_layers = bool(scan_layers)
    kinds = [0] * cfg.depth
    self.scan_stack = (stacking.Stack(("blocks",), cfg.depth, stacking.period(kinds))
                       if self.scan_layers else None)
    self.blocks = stacking.build(
        lambda i, r: EvaBlock(cfg, attention_implementation=attention_implementation, rngs=r,
                              dtype=dtype, param_dtype=param_dtype),
        kinds, rngs, scan=self.scan_layers)
    self.ln_vision = layers.layer_norm(cfg.width, eps=cfg.ln_vision_eps, **kw)

  def __call__(self, images: jax.Array) -> jax.Array:
    """Normalised images [batch, H, W, 3] -> features [batch, 1 + (H/p)*(W/p), width] after ln_vision."""
    if images.ndim != 4 or images.shape[-1] != 3:
      raise ValueError(f"images must be [batch, H, W, 3], got {images.shape}")
    x = self.patch_embed(images)                       # [batch, H/p, W/p, width]
    batch, gh, gw, width = x.shape
    if gh * gw != self.num_patches:
      raise ValueError(f"images {images.shape[1:3]} give {gh * gw} patches; the position embedding has "
                       f"{self.num_patches} (no interpolation)")
    x = x.reshape(batch, gh * gw, width)               # row-major patches, as torch's flatten(2)
    dtype = x.dtype
    cls = jnp.broadcast_to(self.cls_token[...].astype(dtype), (batch, 1, width))
    x = jnp.concatenate([cls, x], axis=1) + self.pos_embed[...].astype(dtype)[None]
    x = sharding.constrain(x, ACT_AXES)
    x = stacking.run(self.blocks, x, _apply_block, scan=self.scan_layers, remat=self.remat)
    return self.ln_vision(x)
