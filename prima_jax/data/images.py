"""Image files -> uint8 [H, W, 3] RGB: the one decoder of the dataset builder, the input pipeline and
``prima_jax.predict`` (docs/data.md, "Images").

* EXIF orientation is applied (``PIL.ImageOps.exif_transpose``): the reference loaders read images
  with OpenCV, which rotates by the EXIF tag, so annotations are in the rotated frame.
* Every mode PIL opens becomes 8-bit RGB: 16-bit integer modes (``I;16``, ``I;16B``, ``I;16L``, ``I``)
  map 0..65535 to 0..255 (value / 257, rounded; ``I`` is clipped to 0..65535 first); ``F`` maps
  0..1 to 0..255 when every value lies in [0, 1], else is clipped to 0..255 (NaN is 0); alpha
  (``RGBA``, ``LA``, ``PA``, a palette's or a colour's ``transparency``) is composited on white;
  ``P``, ``L``, ``1``, ``CMYK``, ``YCbCr``, ... go through PIL's own conversion. Animated files give
  their first frame.
* An image of more than ``MAX_IMAGE_PIXELS`` pixels is refused from its header, before decoding.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, ImageOps

# 64 Mi pixels (8192 x 8192; 192 MiB decoded). Below PIL's own decompression-bomb threshold, so
# every image PIL would warn about is refused here first, with an error naming the file.
MAX_IMAGE_PIXELS = 64 * 2**20

# PIL warns from Image.open, before the size check below can refuse the image; the refusal is the
# message (a filter, not catch_warnings, which is not thread-safe and the input pipeline decodes in
# threads).
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)

_EXIF_ORIENTATION = 0x0112


class ImageError(ValueError):
  """An image file that cannot be decoded; the message starts with the file's name."""


class ImageTooLarge(ImageError):
  """An image over the pixel limit (``MAX_IMAGE_PIXELS``)."""


def _sixteen_bit(img: Image.Image) -> Image.Image:
  value = np.asarray(img).astype(np.int64).clip(0, 65535)
  return Image.fromarray(np.round(value / 257).astype(np.uint8), "L")


def _float(img: Image.Image) -> Image.Image:
  value = np.nan_to_num(np.asarray(img, np.float32), nan=0.0, posinf=255.0, neginf=0.0)
  if value.size and value.min() >= 0 and value.max() <= 1:
    value = value * 255
  return Image.fromarray(np.round(value.clip(0, 255)).astype(np.uint8), "L")


def to_rgb(img: Image.Image) -> Image.Image:
  """``img`` (any PIL mode) as 8-bit RGB by the rules of this module; ValueError for a mode PIL
  cannot convert (``LAB``, ``HSV``)."""
  mode = img.mode
  if mode == "I" or mode.startswith("I;16"):
    return _sixteen_bit(img).convert("RGB")
  if mode == "F":
    return _float(img).convert("RGB")
  if mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info:
    rgba = img.convert("RGBA")
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, rgba).convert("RGB")
  return img if mode == "RGB" else img.convert("RGB")


def decode(data: bytes, name: str = "image", *, max_pixels: int | None = None) -> np.ndarray:
  """Encoded image bytes -> uint8 [height, width, 3] RGB, oriented by its EXIF tag.

  Args:
    data: the file's bytes.
    name: the file, for messages.
    max_pixels: the pixel limit (default ``MAX_IMAGE_PIXELS``).

  Raises:
    ImageTooLarge: more than ``max_pixels`` pixels (from the header; nothing is decoded).
    ImageError: not an image PIL can read, truncated, or a mode without an RGB conversion.
  """
  limit = MAX_IMAGE_PIXELS if max_pixels is None else max_pixels
  try:
    with Image.open(io.BytesIO(data)) as img:
      width, height = img.size
      if width * height > limit:
        raise ImageTooLarge(f"{name}: {width}x{height} = {width * height} pixels, over the limit of "
                            f"{limit} (prima_jax.data.images.MAX_IMAGE_PIXELS)")
      img.load()
      return np.asarray(to_rgb(ImageOps.exif_transpose(img)), dtype=np.uint8)
  except ImageError:
    raise
  except Image.DecompressionBombError as e:
    raise ImageTooLarge(f"{name}: {e}") from None
  except Image.UnidentifiedImageError:
    raise ImageError(f"{name}: not an image file PIL can read") from None
  except Exception as e:  # PIL raises many types (OSError, SyntaxError, ValueError, struct.error, ...).
    raise ImageError(f"{name}: {type(e).__name__}: {e}") from None


def exif_orientation(data: bytes) -> int:
  """The EXIF orientation tag of an image file (1, upright, when absent or unreadable)."""
  try:
    with Image.open(io.BytesIO(data)) as img:
      return int(img.getexif().get(_EXIF_ORIENTATION, 1))
  except Exception:  # noqa: BLE001 -- only a hint for messages
    return 1
