"""Prediction images: each [SEG]'s predicted mask over the image it is routed to, next to the truth."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from etils import epath
from PIL import Image

from prima_jax.data.pipeline import DISPLAY_KEY
from prima_jax.data.preprocess import SAM_MEAN, SAM_STD

PRED_COLOR = np.asarray((255, 40, 40), np.float32)
GT_COLOR = np.asarray((40, 220, 60), np.float32)


def sam_to_uint8(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
  """SAM input [S, S, 3] (uint8 pixels, or SAM-normalised float) -> uint8 [h, w, 3], the resized image
  without the padding."""
  if image.dtype == np.uint8:
    return image[:size[0], :size[1]]
  pixels = image * np.asarray(SAM_STD, np.float32) + np.asarray(SAM_MEAN, np.float32)
  return np.clip(pixels[:size[0], :size[1]], 0, 255).round().astype(np.uint8)


def overlay(image: np.ndarray, mask: np.ndarray, color: np.ndarray, alpha: float = 0.5) -> np.ndarray:
  """uint8 [h, w, 3] with bool [h, w] blended in ``color``."""
  out = image.astype(np.float32)
  out[mask] = (1 - alpha) * out[mask] + alpha * color
  return out.round().astype(np.uint8)


def example_panels(batch: Mapping[str, np.ndarray], mask_logits: np.ndarray, b: int) -> list[np.ndarray]:
  """One panel per valid [SEG] of example ``b``: [h, 2w + 2, 3] = prediction | ground truth."""
  panels = []
  for j in np.flatnonzero(batch["seg_valid"][b]):
    k = int(batch["seg_image_index"][b, j])
    h, w = (int(v) for v in batch["sam_sizes"][b, k])
    # A batch whose SAM embeddings come from the feature cache carries the pixels only for display
    # (``DISPLAY_KEY``); without them the masks are drawn on grey.
    pixels = batch.get("sam_images", batch.get(DISPLAY_KEY))
    image = (sam_to_uint8(pixels[b, k], (h, w)) if pixels is not None
             else np.full((h, w, 3), 128, np.uint8))
    pred = overlay(image, mask_logits[b, j, :h, :w] > 0, PRED_COLOR)
    gt = overlay(image, batch["gt_masks"][b, j, :h, :w] > 0.5, GT_COLOR)
    panels.append(np.concatenate([pred, np.full((h, 2, 3), 255, np.uint8), gt], axis=1))
  return panels


def prediction_panels(batch: Mapping[str, np.ndarray], mask_logits: np.ndarray,
                      max_examples: int) -> dict[str, np.ndarray]:
  """``example{b}_seg{j}`` -> uint8 panel (prediction in red | truth in green) of the first examples."""
  return {f"example{b}_seg{j}": panel
          for b in range(min(max_examples, len(batch["seg_valid"])))
          for j, panel in enumerate(example_panels(batch, mask_logits, b))}


def write_predictions(directory: epath.Path | str, panels: Mapping[str, np.ndarray]) -> list[epath.Path]:
  """Writes ``directory/<name>.png`` for each of :func:`prediction_panels`; returns the paths."""
  directory = epath.Path(directory)
  directory.mkdir(parents=True, exist_ok=True)
  written = []
  for name, panel in panels.items():
    path = directory / f"{name}.png"
    with path.open("wb") as f:
      Image.fromarray(panel).save(f, format="PNG")
    written.append(path)
  return written
