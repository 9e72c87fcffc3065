"""JSON-safe COCO run-length encoding of bool masks (for prediction files)."""

from __future__ import annotations

from typing import Any

import numpy as np

from prima_jax.data.records import decode_segmentation, encode_mask


def encode_rle(mask: np.ndarray) -> dict[str, Any]:
  """bool [height, width] -> ``{"size": [height, width], "counts": str}`` (COCO compressed RLE)."""
  mask = np.asarray(mask)
  if mask.ndim != 2:
    raise ValueError(f"encode_rle expects a [height, width] mask, got shape {mask.shape}")
  counts = encode_mask(mask.astype(bool)).decode("ascii")
  return {"size": [int(mask.shape[0]), int(mask.shape[1])], "counts": counts}


def decode_rle(rle: dict[str, Any]) -> np.ndarray:
  """A COCO RLE dict (compressed ``str``/``bytes`` counts or uncompressed ``list`` counts) -> bool
  [height, width]; ValueError naming the problem when it is malformed."""
  if not isinstance(rle, dict) or "size" not in rle:
    raise ValueError(f"decode_rle expects a dict with 'size' and 'counts', got {type(rle).__name__} "
                     f"{sorted(rle) if isinstance(rle, dict) else ''}")
  size = rle["size"]
  if not (isinstance(size, (list, tuple)) and len(size) == 2):
    raise ValueError(f"RLE size {size!r} is not [height, width]")
  return decode_segmentation(rle, int(size[0]), int(size[1]))
