"""SAM prompt encoder (NHWC): random-Fourier positional encoding, point / box / mask prompts.

g = image_size / patch_size is the side of the image-embedding grid, C = prompt_embed_dim.
PRIMA/GLaMM use only :meth:`SamPromptEncoder.image_positional_embedding` and
:meth:`SamPromptEncoder.dense_no_mask` (the [SEG] embedding is the single sparse token); points,
boxes and masks are kept for parity with SAM and for interactive use.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from prima_jax.models import layers
from prima_jax.models.sam.image_encoder import LAYER_NORM_2D_EPS

# Point labels (SAM + the Hugging Face padding label).
LABEL_NOT_A_POINT = -1
LABEL_PADDING = -10


def fourier_features(coords: jax.Array, gaussian: jax.Array) -> jax.Array:
  """Coordinates in [0, 1] [..., 2] (x, y) -> [..., 2 * F] = [sin, cos](2 pi (2 c - 1) @ G), G [2, F]."""
  proj = (2.0 * coords.astype(gaussian.dtype) - 1.0) @ gaussian
  proj = 2.0 * math.pi * proj
  return jnp.concatenate([jnp.sin(proj), jnp.cos(proj)], axis=-1)


class SamPromptEncoder(nnx.Module):
  """Embeds prompts into sparse tokens [.., n, C] and dense maps [b, g, g, C]."""

  def __init__(self, cfg, *, dtype=None, param_dtype=jnp.float32, rngs: nnx.Rngs):
    c = cfg.prompt_embed_dim
    if c % 2:
      raise ValueError(f"prompt_embed_dim must be even, got {c}")
    self.image_size = cfg.image_size
    self.grid = cfg.image_size // cfg.patch_size
    self.dtype = layers.dtype_of(dtype)
    emb = dict(axes=(None, "embed"), init=nnx.initializers.normal(1.0), param_dtype=param_dtype)
    # Random Fourier matrix (SAM's PositionEmbeddingRandom, HF's shared_image_embedding).
    self.positional_embedding = layers.param(rngs, (2, c // 2), (None, None),
                                             init=nnx.initializers.normal(1.0), param_dtype=param_dtype)
    # 0: negative point, 1: positive point, 2: box top-left, 3: box bottom-right.
    self.point_embeddings = nnx.List([layers.param(rngs, (1, c), **emb) for _ in range(4)])
    self.not_a_point_embed = layers.param(rngs, (1, c), **emb)
    self.no_mask_embed = layers.param(rngs, (1, c), **emb)
    m = cfg.mask_in_channels
    conv = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    norm = dict(eps=LAYER_NORM_2D_EPS, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.mask_conv1 = layers.conv(1, m // 4, (2, 2), strides=2, **conv)
    self.mask_norm1 = layers.layer_norm(m // 4, **norm)
    self.mask_conv2 = layers.conv(m // 4, m, (2, 2), strides=2, **conv)
    self.mask_norm2 = layers.layer_norm(m, **norm)
    self.mask_conv3 = layers.conv(m, c, (1, 1), **conv)

  def _cast(self, x: jax.Array) -> jax.Array:
    return x if self.dtype is None else x.astype(self.dtype)

  def image_positional_embedding(self) -> jax.Array:
    """Dense positional encoding of the image-embedding grid: [g, g, C] (pixel centres)."""
    centres = (jnp.arange(self.grid, dtype=jnp.float32) + 0.5) / self.grid
    xy = jnp.stack(jnp.meshgrid(centres, centres, indexing="xy"), axis=-1)  # [y, x, (x, y)]
    return self._cast(fourier_features(xy, self.positional_embedding[...]))

  def embed_points(self, points: jax.Array, labels: jax.Array, *, pad: bool = True) -> jax.Array:
    """Point prompts -> sparse tokens.

    Args:
      points: [..., n, 2] (x, y) in pixels of the resized S x S input.
      labels: [..., n] int: 1 positive, 0 negative, -1 not-a-point, -10 padding (zero embedding).
      pad: append one not-a-point token (SAM does so when no box is given).
    Returns:
      [..., n (+1), C].
    """
    points = points.astype(jnp.float32) + 0.5  # pixel centres
    if pad:
      points = jnp.concatenate([points, jnp.zeros_like(points[..., :1, :])], axis=-2)
      labels = jnp.concatenate([labels, jnp.full_like(labels[..., :1], LABEL_NOT_A_POINT)], axis=-1)
    emb = fourier_features(points / self.image_size, self.positional_embedding[...])
    lab = labels[..., None]
    emb = jnp.where(lab == LABEL_NOT_A_POINT, self.not_a_point_embed[0], emb)
    emb = jnp.where(lab == LABEL_PADDING, 0.0, emb)
    emb = emb + jnp.where(lab == 0, self.point_embeddings[0][0], 0.0)
    emb = emb + jnp.where(lab == 1, self.point_embeddings[1][0], 0.0)
    return self._cast(emb)

  def embed_boxes(self, boxes: jax.Array) -> jax.Array:
    """Box prompts [..., 4] (x1, y1, x2, y2) in pixels -> corner tokens [..., 2, C]."""
    corners = (boxes.astype(jnp.float32) + 0.5).reshape(*boxes.shape[:-1], 2, 2)
    emb = fourier_features(corners / self.image_size, self.positional_embedding[...])
    corner_embed = jnp.concatenate([self.point_embeddings[2][...], self.point_embeddings[3][...]], axis=0)
    return self._cast(emb + corner_embed)

  def embed_masks(self, masks: jax.Array) -> jax.Array:
    """Mask prompts (logits) [b, 4g, 4g] -> dense embeddings [b, g, g, C]."""
    x = self._cast(masks[..., None])
    x = layers.gelu(self.mask_norm1(self.mask_conv1(x)))
    x = layers.gelu(self.mask_norm2(self.mask_conv2(x)))
    return self.mask_conv3(x)

  def dense_no_mask(self, batch: int) -> jax.Array:
    """The dense prompt when no mask is given: no_mask_embed broadcast to [batch, g, g, C]."""
    c = self.no_mask_embed[...].shape[-1]
    return self._cast(jnp.broadcast_to(self.no_mask_embed[0], (batch, self.grid, self.grid, c)))

