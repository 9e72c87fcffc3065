"""The batch validator: each rule raises a ValueError that names the field."""

import numpy as np
import pytest

from prima_jax.models.batch import collate, random_example, validate_batch
from prima_jax.models.configs import tiny_config

from parity_utils import test_seed

CFG = tiny_config()


def _batch(num_images=(2, 1), num_masks=(2, 1), **kw):
  rng = np.random.default_rng(test_seed())
  ex = [random_example(CFG, rng, num_images=n, num_masks=m) for n, m in zip(num_images, num_masks)]
  return collate(ex, CFG, num_images=CFG.prima.max_images, **kw)


def test_valid_batch_passes():
  validate_batch(_batch(), CFG, training=True)
  validate_batch(_batch(num_images=(1, 2, 3), num_masks=(0, 1, 3)), CFG, training=True)


def _expect(batch, field, match=None, training=True):
  with pytest.raises(ValueError, match=match or field) as info:
    validate_batch(batch, CFG, training=training)
  assert field in str(info.value)
  return info


def test_missing_field():
  b = _batch()
  del b["seg_valid"]
  _expect(b, "seg_valid")


def test_too_many_images():
  b = _batch()
  for k in ("eva_images", "sam_images"):
    b[k] = np.concatenate([b[k], b[k][:, :1]], axis=1)
  b["image_valid"] = np.concatenate([b["image_valid"], b["image_valid"][:, :1] * 0], axis=1)
  _expect(b, "eva_images", "more than max_images")


def test_wrong_image_size():
  b = _batch()
  b["eva_images"] = b["eva_images"][:, :, :-1]
  _expect(b, "eva_images", "shape")


def test_wrong_sam_shape():
  b = _batch()
  b["sam_images"] = b["sam_images"][..., :2]
  _expect(b, "sam_images", "shape")


def test_mask_shape_mismatch():
  b = _batch()
  b["gt_masks"] = b["gt_masks"][:, :, :8]
  _expect(b, "gt_masks")


def test_example_without_images():
  b = _batch()
  b["image_valid"][1] = False
  _expect(b, "image_valid", "no image")


def test_padding_image_before_real_one():
  b = _batch(num_images=(1, 1))
  b["image_valid"][0, :2] = [False, True]
  _expect(b, "image_valid", "after the real ones")


def test_image_slot_count_mismatch():
  b = _batch()
  slots = np.flatnonzero(b["input_ids"][0] == CFG.prima.image_token_id)
  b["input_ids"][0, slots[-1]] = 5
  _expect(b, "input_ids", "image slots")


def test_seg_routed_to_padding_image():
  b = _batch(num_images=(2, 1), num_masks=(2, 1))
  b["seg_image_index"][1, 0] = 2
  _expect(b, "seg_image_index", "padding image")


def test_seg_image_index_out_of_range():
  b = _batch()
  b["seg_image_index"][0, 0] = CFG.prima.max_images
  _expect(b, "seg_image_index")


def test_seg_position_not_on_seg_token():
  b = _batch()
  b["seg_positions"][0, 0] -= 1
  _expect(b, "seg_positions", "not seg_token_id")


def test_seg_position_out_of_range():
  b = _batch()
  b["seg_positions"][0, 0] = b["input_ids"].shape[1]
  _expect(b, "seg_positions")


def test_more_seg_tokens_than_slots():
  b = _batch()
  b["seg_valid"][0, 1] = False
  _expect(b, "seg_valid", "each \\[SEG\\] needs exactly one slot")


def test_sequence_longer_than_positions():
  b = _batch(length=CFG.llm.max_position_embeddings + 1)
  _expect(b, "input_ids", "max_position_embeddings")


def test_collate_rejects_oversized_example():
  rng = np.random.default_rng(test_seed())
  ex = random_example(CFG, rng, num_images=3, num_masks=1)
  with pytest.raises(ValueError, match="does not fit"):
    collate([ex], CFG, num_images=2)
