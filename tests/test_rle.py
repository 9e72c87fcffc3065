"""Tests of prima_jax/evaluation/rle.py: COCO RLE round trips, JSON safety, agreement with pycocotools."""

from __future__ import annotations

import json

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from prima_jax.evaluation.rle import decode_rle, encode_rle


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
    # Same string as pycocotools' own encoder, and pycocotools decodes ours.
    theirs = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    assert rle["counts"] == theirs["counts"].decode("ascii")
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
