"""Image and mask preprocessing for the two vision towers (numpy + PIL, pure functions).

* EVA-CLIP (LAVIS ``Blip2ImageTrainProcessor`` / ``BlipImageEvalProcessor``): train
  ``RandomResizedCrop(size, scale=(0.5, 1))``, eval ``Resize((size, size))``, both bicubic on the
  uint8 image, then ``/255`` and CLIP normalisation.
* SAM (``ResizeLongestSide`` + ``Sam.preprocess``): bilinear resize of the longest side to ``size``,
  normalisation on the 0–255 scale, zero padding at the bottom/right to ``size x size``.
* Ground-truth masks go to the SAM frame with the same geometry (nearest), zeros in the padding.

Resizing goes through PIL on uint8 images exactly as the torchvision transforms of the reference
code do on PIL images, so the uint8 intermediates match them.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image

# The normalisation constants belong to the model's input contract (the jitted step normalises uint8
# batches with the same float32 numbers): x_normalised = x_uint8 * scale + offset.
from prima_jax.models.batch import CLIP_MEAN, CLIP_STD, SAM_MEAN, SAM_STD  # noqa: F401 (re-exported)
from prima_jax.models.batch import EVA_OFFSET as _EVA_OFFSET
from prima_jax.models.batch import EVA_SCALE as _EVA_SCALE
from prima_jax.models.batch import SAM_OFFSET as _SAM_OFFSET
from prima_jax.models.batch import SAM_SCALE as _SAM_SCALE

EVA_TRAIN_SCALE = (0.5, 1.0)
EVA_TRAIN_RATIO = (3.0 / 4.0, 4.0 / 3.0)


def _check_image(image: np.ndarray) -> np.ndarray:
  image = np.asarray(image)
  if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
    raise ValueError(f"expected a uint8 [height, width, 3] image, got {image.dtype} {image.shape}")
  if image.shape[0] < 1 or image.shape[1] < 1:
    raise ValueError(f"empty image of shape {image.shape}")
  return image


def _check_out(out: np.ndarray, shape: tuple[int, ...]) -> None:
  if out.shape != shape or out.dtype != np.float32 or not out.flags.c_contiguous:
    raise ValueError(f"out must be a C-contiguous float32 {list(shape)} array, got {out.dtype} {out.shape}")


def _normalise(image: np.ndarray, scale: np.ndarray, offset: np.ndarray, out: np.ndarray) -> None:
  """Writes float32 ``image * scale + offset`` (uint8 [h, w, 3] image) into ``out[:h, :w]``.

  ``out`` is a C-contiguous float32 [rows, cols, 3] array. Works on [h, w * 3] rows with the
  per-channel constants tiled along them: numpy is ~7x slower with a length-3 inner loop.
  """
  h, w = image.shape[:2]
  flat = out.reshape(out.shape[0], out.shape[1] * 3)[:h, :w * 3]
  flat[...] = image.reshape(h, w * 3)
  flat *= np.tile(scale, w)
  flat += np.tile(offset, w)


def random_resized_crop_params(height: int, width: int, rng: np.random.Generator,
                               scale: tuple[float, float] = EVA_TRAIN_SCALE,
                               ratio: tuple[float, float] = EVA_TRAIN_RATIO) -> tuple[int, int, int, int]:
  """torchvision ``RandomResizedCrop.get_params``: (top, left, crop height, crop width)."""
  area = height * width
  log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
  for _ in range(10):
    target_area = area * rng.uniform(scale[0], scale[1])
    aspect = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
    w = int(round(math.sqrt(target_area * aspect)))
    h = int(round(math.sqrt(target_area / aspect)))
    if 0 < w <= width and 0 < h <= height:
      top = int(rng.integers(0, height - h + 1))
      left = int(rng.integers(0, width - w + 1))
      return top, left, h, w
  # Fallback: the central crop with the aspect ratio clamped to ``ratio``.
  in_ratio = width / height
  if in_ratio < min(ratio):
    w, h = width, int(round(width / min(ratio)))
  elif in_ratio > max(ratio):
    w, h = int(round(height * max(ratio))), height
  else:
    w, h = width, height
  return (height - h) // 2, (width - w) // 2, h, w


def eva_resize(image: np.ndarray, size: int, *, train: bool,
               rng: np.random.Generator | None = None) -> np.ndarray:
  """The uint8 half of :func:`eva_preprocess`: uint8 [H, W, 3] -> uint8 [size, size, 3]."""
  image = _check_image(image)
  pil = Image.fromarray(image)
  if train:
    if rng is None:
      raise ValueError("eva_preprocess(train=True) needs an rng")
    top, left, h, w = random_resized_crop_params(image.shape[0], image.shape[1], rng)
    # Crop, then resize (torchvision's order): ``resize(box=...)`` would filter across the crop edge.
    pil = pil.crop((left, top, left + w, top + h)).resize((size, size), Image.Resampling.BICUBIC)
  else:
    pil = pil.resize((size, size), Image.Resampling.BICUBIC)
  return np.asarray(pil)


def eva_preprocess(image: np.ndarray, size: int, *, train: bool, rng: np.random.Generator | None = None,
                   out: np.ndarray | None = None) -> np.ndarray:
  """EVA-CLIP input: uint8 [H, W, 3] -> float32 [size, size, 3], CLIP-normalised.

  Train: random-resized crop (scale 0.5–1, ratio 3/4–4/3, torchvision's sampling with ``rng``);
  eval: plain resize to ``size x size``. Bicubic in both cases. ``out`` (optional, C-contiguous
  float32 [size, size, 3]) receives the result without a copy.
  """
  if out is None:
    out = np.empty((size, size, 3), np.float32)
  _check_out(out, (size, size, 3))
  _normalise(eva_resize(image, size, train=train, rng=rng), _EVA_SCALE, _EVA_OFFSET, out)
  return out


def sam_resized_size(height: int, width: int, size: int) -> tuple[int, int]:
  """SAM ``ResizeLongestSide.get_preprocess_shape``: (new height, new width)."""
  scale = size * 1.0 / max(height, width)
  return int(height * scale + 0.5), int(width * scale + 0.5)


def _sam_resized(image: np.ndarray, size: int) -> np.ndarray:
  image = _check_image(image)
  h, w = sam_resized_size(image.shape[0], image.shape[1], size)
  if (h, w) == image.shape[:2]:
    return image
  return np.asarray(Image.fromarray(image).resize((w, h), Image.Resampling.BILINEAR))


def sam_resize(image: np.ndarray, size: int,
               out: np.ndarray | None = None) -> tuple[np.ndarray, tuple[int, int]]:
  """The uint8 half of :func:`sam_preprocess`: uint8 [H, W, 3] -> (uint8 [size, size, 3] with zeros
  at the bottom/right, (h, w) of the resized image). ``out``: an optional uint8 [size, size, 3]."""
  resized = _sam_resized(image, size)
  h, w = resized.shape[:2]
  if out is None:
    out = np.zeros((size, size, 3), np.uint8)
  else:
    if out.shape != (size, size, 3) or out.dtype != np.uint8:
      raise ValueError(f"out must be a uint8 [{size}, {size}, 3] array, got {out.dtype} {out.shape}")
    out[h:] = 0
    out[:h, w:] = 0
  out[:h, :w] = resized
  return out, (h, w)


def sam_preprocess(image: np.ndarray, size: int,
                   out: np.ndarray | None = None) -> tuple[np.ndarray, tuple[int, int]]:
  """SAM input: uint8 [H, W, 3] -> (float32 [size, size, 3], (h, w) of the resized image).

  Bilinear resize so the longest side is ``size``, SAM normalisation, zeros at the bottom/right.
  ``out`` (optional, C-contiguous float32 [size, size, 3]) receives the result without a copy.
  """
  resized = _sam_resized(image, size)
  h, w = resized.shape[:2]
  if out is None:
    out = np.zeros((size, size, 3), np.float32)
  else:
    _check_out(out, (size, size, 3))
    out[h:] = 0.0
    out[:h, w:] = 0.0
  _normalise(resized, _SAM_SCALE, _SAM_OFFSET, out)
  return out, (h, w)


def mask_to_sam_frame(mask: np.ndarray, size: int, out: np.ndarray | None = None) -> np.ndarray:
  """bool [H, W] mask -> float32 [size, size] (1 inside) in the frame of :func:`sam_preprocess` (nearest).

  ``out`` (optional, C-contiguous float32 or uint8 [size, size]) receives the result without a copy.
  """
  mask = np.asarray(mask)
  if mask.ndim != 2 or mask.shape[0] < 1 or mask.shape[1] < 1:
    raise ValueError(f"expected a [height, width] mask, got shape {mask.shape}")
  h, w = sam_resized_size(mask.shape[0], mask.shape[1], size)
  small = mask.astype(np.uint8)
  if (h, w) != mask.shape:
    small = np.asarray(Image.fromarray(small).resize((w, h), Image.Resampling.NEAREST))
  if out is None:
    out = np.zeros((size, size), np.float32)
  else:
    if out.shape != (size, size) or out.dtype not in (np.float32, np.uint8) or not out.flags.c_contiguous:
      raise ValueError(f"out must be a C-contiguous float32 or uint8 [{size}, {size}] array, "
                       f"got {out.dtype} {out.shape}")
    out[h:] = 0
    out[:h, w:] = 0
  np.not_equal(small, 0, out=out[:h, :w], casting="unsafe")
  return out
