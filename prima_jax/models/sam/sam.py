"""SAM composed for PRIMA / GLaMM: image encoder, prompt encoder, mask decoder, mask resizing.

S = image size, g = S / patch size, C = prompt_embed_dim. The low-resolution masks are [4g, 4g]
(256 x 256 for SAM ViT-H at 1024 px).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from prima_jax.models.sam.image_encoder import SamImageEncoder
from prima_jax.models.sam.mask_decoder import SamMaskDecoder
from prima_jax.models.sam.prompt_encoder import SamPromptEncoder


def bilinear_matrix(in_size: int, out_size: int) -> np.ndarray:
  """[out, in] interpolation weights of torch ``F.interpolate(mode='bilinear', align_corners=False)``
  (no antialiasing) along one axis: source = (i + 0.5) * in / out - 0.5, clamped at 0."""
  src = (np.arange(out_size, dtype=np.float64) + 0.5) * (in_size / out_size) - 0.5
  src = np.maximum(src, 0.0)
  i0 = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
  i1 = np.minimum(i0 + 1, in_size - 1)
  frac = src - i0
  weights = np.zeros((out_size, in_size), np.float64)
  rows = np.arange(out_size)
  np.add.at(weights, (rows, i0), 1.0 - frac)
  np.add.at(weights, (rows, i1), frac)
  return weights.astype(np.float32)


def resize_bilinear(x: jax.Array, out_hw: tuple[int, int]) -> jax.Array:
  """Resizes the last two axes [..., h, w] -> [..., H, W] exactly like torch bilinear,
  align_corners=False (up- and downsampling, no antialiasing); computed and returned in float32.

  ``jax.image.resize(..., 'linear')`` agrees when upsampling but antialiases when downsampling
  (unless ``antialias=False``); separable weight matrices keep both cases explicit.
  """
  x = jnp.asarray(x, jnp.float32)
  h, w = x.shape[-2:]
  wy = jnp.asarray(bilinear_matrix(h, out_hw[0]))
  wx = jnp.asarray(bilinear_matrix(w, out_hw[1]))
  return jnp.einsum("...yx,Yy,Xx->...YX", x, wy, wx, precision=jax.lax.Precision.HIGHEST)


def upscale_masks(low_res: jax.Array, image_size: int) -> jax.Array:
  """Low-resolution mask logits [b, 4g, 4g] -> float32 [b, S, S] (bilinear, align_corners=False)."""
  return resize_bilinear(low_res, (image_size, image_size))


def postprocess_masks(masks, resized_hw: tuple[int, int], original_hw: tuple[int, int]) -> jax.Array:
  """Masks [..., S, S] on the padded model input -> [..., H0, W0] on the original image.

  Crops the bottom/right padding (the image was resized to ``resized_hw``, longest side S, then
  padded) and resizes bilinearly (align_corners=False) to ``original_hw``.
  """
  masks = jnp.asarray(masks)
  cropped = masks[..., :int(resized_hw[0]), :int(resized_hw[1])]
  return resize_bilinear(cropped, (int(original_hw[0]), int(original_hw[1])))


class Sam(nnx.Module):
  """Segment Anything: ``image_encoder``, ``prompt_encoder``, ``mask_decoder``.

  Args:
    cfg: the ``sam`` sub-config (prima_jax.models.configs).
  """

  def __init__(self, cfg, *, dtype=None, param_dtype=jnp.float32, attention_implementation=None,
               remat: bool | str = False, scan_layers: bool = False, rngs: nnx.Rngs):
    self.image_size = cfg.image_size
    self.image_encoder = SamImageEncoder(cfg, dtype=dtype, param_dtype=param_dtype,
                                         attention_implementation=attention_implementation, remat=remat,
                                         scan_layers=scan_layers, rngs=rngs)
    self.prompt_encoder = SamPromptEncoder(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.mask_decoder = SamMaskDecoder(cfg, dtype=dtype, param_dtype=param_dtype,
                                       attention_implementation=attention_implementation, rngs=rngs)

  def encode(self, images: jax.Array) -> jax.Array:
    """Normalised, padded images [b, S, S, 3] -> image embeddings [b, g, g, C]."""
    return self.image_encoder(images)

  def decode(self, image_embeddings: jax.Array, prompt_tokens: jax.Array) -> jax.Array:
    """GLaMM/PRIMA decoding: prompt tokens as sparse prompt, dense = no_mask_embed, one mask.

    Args:
      image_embeddings: [b, g, g, C], one row per mask (gather the routed image's embedding).
      prompt_tokens: [b, n, C] (n = 1: the projected [SEG] hidden state).
    Returns:
      low-resolution mask logits [b, 4g, 4g].
    """
    b = image_embeddings.shape[0]
    masks, _ = self.mask_decoder(image_embeddings, self.prompt_encoder.image_positional_embedding(),
                                 prompt_tokens, self.prompt_encoder.dense_no_mask(b),
                                 multimask_output=False)
    return masks[:, 0]

  def upscale_masks(self, low_res: jax.Array) -> jax.Array:
    """[b, 4g, 4g] -> [b, S, S] (bilinear, align_corners=False)."""
    return upscale_masks(low_res, self.image_size)
