"""Tests of prima_jax/evaluation/rle.py: COCO RLE round trips, JSON safety, and the counts string against an
independent implementation of the format (encode_rle calls pycocotools, so pycocotools is no reference for
its strings)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from prima_jax.evaluation.rle import decode_rle, encode_rle


def _reference_counts(mask: np.ndarray) -> str:
  """COCO compressed RLE written from the format: run lengths of the column-major mask starting with a
  (possibly empty) run of zeros; from the third run on, each stored as the difference to the run two
  before; each value in 5-bit groups, low first, +48, 0x20 marking that another group follows."""
  flat = np.asarray(mask, bool).flatten(order="F")
  edges = np.flatnonzero(np.diff(flat.astype(np.int8))) + 1
  runs = np.diff(np.concatenate([[0], edges, [flat.size]])).tolist()
  if flat.size and flat[0]:
    runs = [0] + runs
  chars = []
  for i, x in enumerate(runs):
    x -= runs[i - 2] if i > 2 else 0
    more = True
    while more:
      c, x = x & 0x1F, x >> 5
      more = x != -1 if c & 0x10 else x != 0
      chars.append(chr((c | 0x20 if more else c) + 48))
  return "".join(chars)


def test_reference_encoder_on_hand_computed_masks():
  mask = np.zeros((3, 4), bool)
  mask[1, 2] = mask[2, 2] = True  # runs 7, 2, 3
  assert _reference_counts(mask) == "723" and encode_rle(mask)["counts"] == "723"
  assert _reference_counts(np.ones((2, 3), bool)) == "06" == encode_rle(np.ones((2, 3), bool))["counts"]
  column = np.array([0, 1, 1, 1, 0, 0, 1], bool)[:, None]  # runs 1, 3, 2, 1 -> 1, 3, 2, 1-3 = -2 -> "N"
  assert _reference_counts(column) == "132N" == encode_rle(column)["counts"]


@pytest.mark.parametrize("shape", [(1, 1), (1, 17), (13, 1), (31, 47), (256, 200)])
def test_round_trip_through_json(shape):
  rng = np.random.default_rng(shape[0] * 1000 + shape[1])
  for density in (0.0, 0.05, 0.5, 1.0):
    mask = rng.random(shape) < density
    rle = encode_rle(mask)
    assert rle["size"] == list(shape) and isinstance(rle["counts"], str)
    back = decode_rle(json.loads(json.dumps(rle)))
    assert back.dtype == bool and back.shape == shape
    np.testing.assert_array_equal(back, mask)
    # The format's string (independent encoder), and pycocotools decodes ours.
    assert rle["counts"] == _reference_counts(mask)
    np.testing.assert_array_equal(mask_utils.decode({"size": rle["size"], "counts": rle["counts"].encode()}),
                                  mask.astype(np.uint8))


def test_accepts_any_layout_and_dtype():
  rng = np.random.default_rng(0)
  mask = rng.random((20, 30)) < 0.3
  variants = (mask, np.asfortranarray(mask), mask.astype(np.uint8), mask.astype(np.float32),
              mask[:, ::-1][:, ::-1])
  for variant in variants:
    np.testing.assert_array_equal(decode_rle(encode_rle(variant)), mask)


def test_decodes_uncompressed_and_bytes_counts():
  mask = np.zeros((3, 4), bool)
  mask[1, 2] = mask[2, 2] = True  # column-major runs: 7 zeros, 2 ones, 3 zeros
  np.testing.assert_array_equal(decode_rle({"size": [3, 4], "counts": [7, 2, 3]}), mask)
  rle = encode_rle(mask)
  np.testing.assert_array_equal(decode_rle({"size": rle["size"], "counts": rle["counts"].encode()}), mask)


def test_errors():
  with pytest.raises(ValueError, match="\\[height, width\\] mask"):
    encode_rle(np.zeros((2, 2, 2), bool))
  with pytest.raises(ValueError, match="'size' and 'counts'"):
    decode_rle([1, 2])
  with pytest.raises(ValueError, match="cover 11 pixels"):
    decode_rle({"size": [3, 4], "counts": [7, 2, 2]})
  with pytest.raises(ValueError, match="not \\[height, width\\]"):
    decode_rle({"size": [3], "counts": [3]})
