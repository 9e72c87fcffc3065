"""PRIMA's training loss: ce_weight * CE + bce_weight * BCE + dice_weight * DICE (docs/training.md).

Pure functions over arrays; padding tokens, padding masks and the padded area of the SAM frame
never contribute.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from prima_jax.models.batch import IGNORE_LABEL


def next_token_cross_entropy(logits: jax.Array, labels: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Mean next-token CE. logits [b, l, vocab], labels [b, l] aligned with the inputs (position t is
  predicted from t-1), IGNORE_LABEL = no loss. Returns (loss, number of target tokens)."""
  logits = logits[:, :-1].astype(jnp.float32)
  targets = labels[:, 1:]
  valid = targets != IGNORE_LABEL
  log_probs = jax.nn.log_softmax(logits, axis=-1)
  picked = jnp.take_along_axis(log_probs, jnp.where(valid, targets, 0)[..., None], axis=-1)[..., 0]
  count = valid.sum()
  return -(picked * valid).sum() / jnp.maximum(count, 1), count


def frame_region(sizes: jax.Array, frame: int) -> jax.Array:
  """sizes [..., 2] (height, width) -> bool [..., frame, frame], True inside the resized image."""
  rows = jnp.arange(frame)[:, None] < sizes[..., 0, None, None]
  cols = jnp.arange(frame)[None, :] < sizes[..., 1, None, None]
  return rows & cols


def mask_bce(logits: jax.Array, targets: jax.Array, region: jax.Array) -> jax.Array:
  """Per-mask sigmoid BCE averaged over the region's pixels. [..., h, w] -> [...]."""
  logits = logits.astype(jnp.float32)
  per_pixel = jnp.maximum(logits, 0) - logits * targets + jnp.log1p(jnp.exp(-jnp.abs(logits)))
  region = region.astype(jnp.float32)
  return (per_pixel * region).sum((-2, -1)) / jnp.maximum(region.sum((-2, -1)), 1.0)


def mask_dice(logits: jax.Array, targets: jax.Array, region: jax.Array, *, scale: float = 1000.0,
              eps: float = 1e-6) -> jax.Array:
  """Per-mask DICE loss 1 - (2 sum(p g) + eps) / (sum p + sum g + eps), sums scaled by 1/scale
  (GLaMM's convention), over the region's pixels. [..., h, w] -> [...]."""
  region = region.astype(jnp.float32)
  probs = jax.nn.sigmoid(logits.astype(jnp.float32)) * region
  targets = targets.astype(jnp.float32) * region
  numerator = 2.0 * (probs / scale * targets).sum((-2, -1))
  denominator = (probs / scale).sum((-2, -1)) + (targets / scale).sum((-2, -1))
  return 1.0 - (numerator + eps) / (denominator + eps)


def reduce_mask_losses(per_mask: jax.Array, seg_valid: jax.Array, seg_image_index: jax.Array,
                       num_images: int, reduction: str) -> jax.Array:
  """Averages per-mask losses [b, m] over valid masks.

  ``per_mask``: plain mean over all valid masks of the batch (GLaMM). ``per_image``: mean over the
  masks of each (example, image) pair first, then over the pairs that have masks, so an image
  with many masks does not dominate (the multi-image version, docs/training.md).
  """
  valid = seg_valid.astype(jnp.float32)
  if reduction == "per_mask":
    return (per_mask * valid).sum() / jnp.maximum(valid.sum(), 1.0)
  if reduction != "per_image":
    raise ValueError(f"unknown mask loss reduction {reduction!r}")
  onehot = jax.nn.one_hot(seg_image_index, num_images) * valid[..., None]  # [b, m, n]
  per_slot_sum = jnp.einsum("bm,bmn->bn", per_mask, onehot)
  per_slot_count = onehot.sum(1)
  has = per_slot_count > 0
  per_slot = per_slot_sum / jnp.maximum(per_slot_count, 1.0)
  return (per_slot * has).sum() / jnp.maximum(has.sum(), 1)


def prima_loss(outputs: Mapping[str, jax.Array], batch: Mapping[str, jax.Array], loss_cfg: Any,
               ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Total loss and its parts.

  Args:
    outputs: ``Prima.__call__`` outputs: ``logits`` [b, l, vocab], ``mask_logits`` [b, m, S, S].
    batch: the model batch with ``labels``, ``gt_masks``, ``seg_valid``, ``seg_image_index``,
      ``sam_sizes`` (see prima_jax.models.batch).
  Returns:
    (loss, {"loss", "ce", "bce", "dice", "num_tokens", "num_masks"}).
  """
  ce, num_tokens = next_token_cross_entropy(outputs["logits"], batch["labels"])
  frame = outputs["mask_logits"].shape[-1]
  sizes = jnp.take_along_axis(batch["sam_sizes"], batch["seg_image_index"][..., None], axis=1)
  region = frame_region(sizes, frame)
  gt = batch["gt_masks"].astype(jnp.float32)
  num_images = batch["image_valid"].shape[1]
  reduce = lambda x: reduce_mask_losses(x, batch["seg_valid"], batch["seg_image_index"],
                                        num_images, loss_cfg.mask_reduction)
  bce = reduce(mask_bce(outputs["mask_logits"], gt, region))
  dice = reduce(mask_dice(outputs["mask_logits"], gt, region, scale=loss_cfg.dice_scale,
                          eps=loss_cfg.dice_eps))
  loss = loss_cfg.ce_weight * ce + loss_cfg.bce_weight * bce + loss_cfg.dice_weight * dice
  parts = dict(loss=loss, ce=ce, bce=bce, dice=dice, num_tokens=num_tokens,
               num_masks=batch["seg_valid"].sum())
  return loss, parts
