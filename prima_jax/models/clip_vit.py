"""CLIP ViT vision encoder (Hugging Face ``CLIPVisionModel`` math and names) and the LLaVA projector.

The image side of the single-image baselines LISA and GLaMM (docs/model.md, "Visual tokens per image"):
OpenAI CLIP ViT-L/14 (width 1024, depth 24, 16 heads, MLP 4096, quick-GELU, LayerNorm eps 1e-5).
At 336 px it makes 24 x 24 = 576 patch tokens + CLS = 577; at 224 px 16 x 16 = 256 + CLS.

Pre-LN ViT: patch embedding (conv, stride = patch, no bias) + class embedding + learned positions,
then ``pre_layrnorm`` (CLIP's spelling), ``depth`` blocks ``x + attn(ln1(x)); x + mlp(ln2(x))``.
``post_layernorm`` only normalises the pooled CLS token. LLaVA (and so LISA and GLaMM) take the
penultimate layer's hidden state (``select_layer=-2``) and drop CLS (``select_feature='patch'``),
then project it into the LLM width: LISA / LLaVA-v1 with one Linear (``projector='linear'``), GLaMM
with Linear -> GELU -> Linear (``projector='mlp2x_gelu'``).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from prima_jax import sharding
from prima_jax.models import layers
from prima_jax.models.sam.mask_decoder import Attention

ACT_AXES = ("batch", "length", "act_embed")
PROJECTORS = ("linear", "mlp2x_gelu")


def full_clip_config(image_size: int = 336, projector: str = "mlp2x_gelu") -> ml_collections.ConfigDict:
  """OpenAI CLIP ViT-L/14 at ``image_size`` (336: GLaMM, 224: LISA) with a LLaVA projector."""
  return ml_collections.ConfigDict(dict(
      image_size=image_size, patch_size=14, width=1024, depth=24, num_heads=16, mlp_dim=4096,
      layer_norm_eps=1e-5,
      select_layer=-2,          # LLaVA mm_vision_select_layer: hidden_states[-2] (penultimate layer)
      select_feature="patch",   # "patch": drop CLS | "cls_patch": keep it
      projector=projector,      # "linear" (LISA / LLaVA-v1) | "mlp2x_gelu" (GLaMM / LLaVA-1.5)
  ))


def tiny_clip_config(image_size: int = 42, projector: str = "mlp2x_gelu") -> ml_collections.ConfigDict:
  """Same schema at test size (patch 14: 42 px -> 9 patch tokens, 28 px -> 4)."""
  c = full_clip_config(image_size, projector)
  c.update(width=32, depth=3, num_heads=4, mlp_dim=64)
  return c


def num_patches(cfg) -> int:
  """Patch tokens per image: (image_size / patch_size)^2."""
  if cfg.image_size % cfg.patch_size:
    raise ValueError(f"clip image_size {cfg.image_size} is not a multiple of patch_size {cfg.patch_size}")
  return (cfg.image_size // cfg.patch_size) ** 2


def tokens_per_image(cfg) -> int:
  """Visual tokens each image contributes to the LLM sequence after ``select_feature``."""
  if cfg.select_feature == "patch":
    return num_patches(cfg)
  if cfg.select_feature == "cls_patch":
    return num_patches(cfg) + 1
  raise ValueError(f"clip.select_feature must be 'patch' or 'cls_patch', got {cfg.select_feature!r}")


def quick_gelu(x: jax.Array) -> jax.Array:
  """CLIP's activation: x * sigmoid(1.702 x)."""
  return x * jax.nn.sigmoid(1.702 * x)


class ClipEncoderLayer(nnx.Module):
  """Pre-LN block: x + self_attn(layer_norm1(x)), then x + mlp(layer_norm2(x)) with quick-GELU."""

  def __init__(self, cfg, *, rngs: nnx.Rngs, dtype: Any = None, param_dtype: Any = jnp.float32,
               attention_implementation: str | None = None):
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.layer_norm1 = layers.layer_norm(cfg.width, eps=cfg.layer_norm_eps, **kw)
    # q/k/v/out projections with biases, no downsampling: the same attention as SAM's decoder uses.
    self.self_attn = Attention(cfg.width, cfg.num_heads, 1,
                               attention_implementation=attention_implementation, **kw)
    self.layer_norm2 = layers.layer_norm(cfg.width, eps=cfg.layer_norm_eps, **kw)
    self.mlp = layers.MLP(cfg.width, cfg.mlp_dim, activation=quick_gelu, **kw)

  def __call__(self, x: jax.Array) -> jax.Array:
    """[batch, tokens, width] -> [batch, tokens, width]."""
    h = self.layer_norm1(x)
    x = x + self.self_attn(h, h, h)
    x = x + self.mlp(self.layer_norm2(x))
    return sharding.constrain(x, ACT_AXES)


def _apply_layer(layer: ClipEncoderLayer, x: jax.Array) -> jax.Array:
  return layer(x)


class ClipVisionTower(nnx.Module):
  """CLIP ViT returning every hidden state, as ``CLIPVisionModel(output_hidden_states=True)``.

  Args:
    cfg: a config of :func:`full_clip_config`'s schema.
    dtype: compute dtype (None: the parameters' dtype).
    param_dtype: storage dtype of the parameters.
    attention_implementation: passed to :func:`prima_jax.models.attention.dot_product_attention`.
    remat: recompute each block in the backward pass: False, True ("full") or a policy name of
      ``layers.REMAT_POLICIES``.
  """

  def __init__(self, cfg, *, dtype: Any = None, param_dtype: Any = jnp.float32,
               attention_implementation: str | None = None, remat: bool | str = False, rngs: nnx.Rngs):
    self.num_patches = num_patches(cfg)
    self.remat = layers.remat_policy_name(remat)
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    p = cfg.patch_size
    self.patch_embed = layers.conv(3, cfg.width, (p, p), strides=p, padding="VALID", use_bias=False,
                                   axes=("conv_height", "conv_width", "conv_in", "embed"), **kw)
    self.class_embedding = layers.param(rngs, (cfg.width,), ("embed",), param_dtype=param_dtype)
    self.position_embedding = layers.param(rngs, (1 + self.num_patches, cfg.width), ("positions", "embed"),
                                           param_dtype=param_dtype)
    self.pre_layrnorm = layers.layer_norm(cfg.width, eps=cfg.layer_norm_eps, **kw)
    self.layers = nnx.List([
        ClipEncoderLayer(cfg, attention_implementation=attention_implementation, **kw)
        for _ in range(cfg.depth)])
    self.post_layernorm = layers.layer_norm(cfg.width, eps=cfg.layer_norm_eps, **kw)

  def __call__(self, images: jax.Array) -> tuple[jax.Array, ...]:
    """Normalised images [batch, H, W, 3] -> depth + 1 hidden states, each [batch, 1 + patches, width].

    Entry 0 is the embedding after ``pre_layrnorm``, entry i the output of block i (HF's
    ``hidden_states``); the last one is HF's ``last_hidden_state``.
    """
    if images.ndim != 4 or images.shape[-1] != 3:
      raise ValueError(f"images must be [batch, H, W, 3], got {images.shape}")
    x = self.patch_embed(images)                       # [batch, H/p, W/p, width]
    batch, gh, gw, width = x.shape
    if gh * gw != self.num_patches:
      raise ValueError(f"images {images.shape[1:3]} give {gh * gw} patches; the position embedding has "
                       f"{self.num_patches} (no interpolation)")
    x = x.reshape(batch, gh * gw, width)               # row-major patches, as torch's flatten(2)
    cls = jnp.broadcast_to(self.class_embedding[...].astype(x.dtype), (batch, 1, width))
    x = jnp.concatenate([cls, x], axis=1) + self.position_embedding[...].astype(x.dtype)[None]
    x = sharding.constrain(self.pre_layrnorm(x), ACT_AXES)
    apply = layers.remat(_apply_layer, self.remat)
    hidden = [x]
    for layer in self.layers:
      x = apply(layer, x)
      hidden.append(x)
    return tuple(hidden)

  def pooled(self, last_hidden_state: jax.Array) -> jax.Array:
    """HF ``pooler_output``: post_layernorm of the CLS token; [batch, tokens, width] -> [batch, width]."""
    return self.post_layernorm(last_hidden_state[:, 0])


def select_features(hidden_states: tuple[jax.Array, ...], cfg) -> jax.Array:
  """LLaVA's feature selection: hidden_states[select_layer], without CLS for 'patch'.

  Returns [batch, :func:`tokens_per_image`, width].
  """
  x = hidden_states[cfg.select_layer]
  if cfg.select_feature == "patch":
    return x[:, 1:]
  if cfg.select_feature == "cls_patch":
    return x
  raise ValueError(f"clip.select_feature must be 'patch' or 'cls_patch', got {cfg.select_feature!r}")


class ClipProjector(nnx.Module):
  """Vision -> LLM projector: 'linear' = fc1; 'mlp2x_gelu' = fc2(gelu(fc1(x))) (exact GELU).

  [..., in_width] -> [..., out_width].
  """

  def __init__(self, in_width: int, out_width: int, kind: str, *, rngs: nnx.Rngs, dtype: Any = None,
               param_dtype: Any = jnp.float32):
    if kind not in PROJECTORS:
      raise ValueError(f"clip.projector must be one of {PROJECTORS}, got {kind!r}")
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.kind = kind
    self.fc1 = layers.linear(in_width, out_width, ("embed", "mlp"), **kw)
    self.fc2 = layers.linear(out_width, out_width, ("mlp", "embed"), **kw) if kind == "mlp2x_gelu" else None

  def __call__(self, x: jax.Array) -> jax.Array:
    x = self.fc1(x)
    if self.fc2 is not None:
      x = self.fc2(layers.gelu(x))
    return x
