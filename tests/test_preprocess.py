"""EVA / SAM preprocessing: constants, geometry and values checked by hand (no torchvision here)."""

import numpy as np
import pytest
from PIL import Image

from prima_jax.data import preprocess as pp


def _random_image(rng, h, w):
  return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)


def _nearest(mask, h, w):
  """Reference nearest-neighbour resize: output pixel centres mapped back to the input grid."""
  rows = np.floor((np.arange(h) + 0.5) * mask.shape[0] / h).astype(int)
  cols = np.floor((np.arange(w) + 0.5) * mask.shape[1] / w).astype(int)
  return mask[rows][:, cols]


def test_normalisation_constants_match_spec():
  np.testing.assert_array_equal(pp.CLIP_MEAN, (0.48145466, 0.4578275, 0.40821073))
  np.testing.assert_array_equal(pp.CLIP_STD, (0.26862954, 0.26130258, 0.27577711))
  np.testing.assert_array_equal(pp.SAM_MEAN, (123.675, 116.28, 103.53))
  np.testing.assert_array_equal(pp.SAM_STD, (58.395, 57.12, 57.375))


@pytest.mark.parametrize("value", [0, 37, 255])
def test_constant_image_values(value):
  image = np.full((31, 47, 3), value, np.uint8)
  eva = pp.eva_preprocess(image, 28, train=False)
  assert eva.dtype == np.float32 and eva.shape == (28, 28, 3)
  expected = (value / 255.0 - np.asarray(pp.CLIP_MEAN)) / np.asarray(pp.CLIP_STD)
  np.testing.assert_allclose(eva, np.broadcast_to(expected, eva.shape), rtol=0, atol=1e-5)
  sam, (h, w) = pp.sam_preprocess(image, 64)
  assert sam.dtype == np.float32 and sam.shape == (64, 64, 3) and (h, w) == (42, 64)
  expected = (value - np.asarray(pp.SAM_MEAN)) / np.asarray(pp.SAM_STD)
  np.testing.assert_allclose(sam[:h, :w], np.broadcast_to(expected, (h, w, 3)), rtol=0, atol=1e-5)
  assert not sam[h:].any() and not sam[:, w:].any()


@pytest.mark.parametrize("hw,size,expected", [
    ((480, 640), 1024, (768, 1024)),
    ((640, 480), 1024, (1024, 768)),
    ((333, 500), 1024, (682, 1024)),   # 333 * 2.048 = 681.98 -> rounds up
    ((1024, 1024), 1024, (1024, 1024)),
    ((1, 1000), 1024, (1, 1024)),
    ((100, 50), 64, (64, 32)),
    ((2000, 1500), 1024, (1024, 768)),  # downscale
])
def test_sam_resized_size(hw, size, expected):
  assert pp.sam_resized_size(*hw, size) == expected
  image = np.zeros((*hw, 3), np.uint8)
  assert pp.sam_preprocess(image, size)[1] == expected


def test_sam_preprocess_values_and_padding():
  rng = np.random.default_rng(0)
  image = _random_image(rng, 45, 30)
  sam, (h, w) = pp.sam_preprocess(image, 64)
  assert (h, w) == (64, 43)
  resized = np.asarray(Image.fromarray(image).resize((w, h), Image.Resampling.BILINEAR), np.float64)
  expected = (resized - np.asarray(pp.SAM_MEAN)) / np.asarray(pp.SAM_STD)
  np.testing.assert_allclose(sam[:h, :w], expected, rtol=0, atol=1e-5)
  np.testing.assert_array_equal(sam[:, w:], 0.0)


def test_eva_eval_matches_pil_bicubic():
  rng = np.random.default_rng(1)
  image = _random_image(rng, 37, 61)
  resized = np.asarray(Image.fromarray(image).resize((28, 28), Image.Resampling.BICUBIC), np.float64)
  expected = (resized / 255.0 - np.asarray(pp.CLIP_MEAN)) / np.asarray(pp.CLIP_STD)
  np.testing.assert_allclose(pp.eva_preprocess(image, 28, train=False), expected, rtol=0, atol=1e-5)


def test_eva_train_crop_params_and_values():
  rng = np.random.default_rng(2)
  image = _random_image(rng, 120, 90)
  for seed in range(50):
    top, left, h, w = pp.random_resized_crop_params(120, 90, np.random.default_rng(seed))
    assert 0 <= top and top + h <= 120 and 0 <= left and left + w <= 90
    area = h * w / (120 * 90)
    assert 0.5 - 0.02 <= area <= 1.0
    assert 3 / 4 - 0.03 <= w / h <= 4 / 3 + 0.03
  params = pp.random_resized_crop_params(120, 90, np.random.default_rng(7))
  top, left, h, w = params
  crop = Image.fromarray(image).crop((left, top, left + w, top + h))
  expected = np.asarray(crop.resize((28, 28), Image.Resampling.BICUBIC))
  np.testing.assert_array_equal(pp.eva_resize(image, 28, train=True, rng=np.random.default_rng(7)), expected)
  a = pp.eva_preprocess(image, 28, train=True, rng=np.random.default_rng(7))
  b = pp.eva_preprocess(image, 28, train=True, rng=np.random.default_rng(8))
  assert a.shape == (28, 28, 3) and not np.array_equal(a, b)
  with pytest.raises(ValueError, match="rng"):
    pp.eva_preprocess(image, 28, train=True)


def test_eva_train_crop_fallback_is_central():
  # A 1 x 100 image admits no crop of area >= 50 with ratio <= 4/3: central 1 x 1 crop.
  assert pp.random_resized_crop_params(1, 100, np.random.default_rng(0)) == (0, 49, 1, 1)
  assert pp.random_resized_crop_params(100, 1, np.random.default_rng(0)) == (49, 0, 1, 1)


@pytest.mark.parametrize("hw", [(37, 53), (50, 30), (64, 64), (7, 9)])
def test_mask_to_sam_frame_geometry(hw):
  rng = np.random.default_rng(3)
  mask = rng.random(hw) < 0.4
  frame = pp.mask_to_sam_frame(mask, 64)
  h, w = pp.sam_resized_size(*hw, 64)
  assert frame.dtype == np.float32 and frame.shape == (64, 64)
  np.testing.assert_array_equal(frame[:h, :w], _nearest(mask, h, w))
  assert not frame[h:].any() and not frame[:, w:].any()


def test_painted_square_lands_in_the_same_place():
  image = np.zeros((300, 400, 3), np.uint8)
  mask = np.zeros((300, 400), bool)
  image[100:160, 200:280] = 255
  mask[100:160, 200:280] = True
  sam, (h, w) = pp.sam_preprocess(image, 128)
  frame = pp.mask_to_sam_frame(mask, 128)
  assert (h, w) == (96, 128)
  # 128 / 400 = 0.32: rows 32..51, cols 64..89 (exact multiples, so no ambiguity at the edges).
  expected = np.zeros((128, 128), bool)
  expected[32:51, 64:90] = True
  np.testing.assert_array_equal(frame.astype(bool), expected)
  bright = sam[..., 0] > 0.5 * ((255 - pp.SAM_MEAN[0]) / pp.SAM_STD[0] + (0 - pp.SAM_MEAN[0]) / pp.SAM_STD[0])
  assert (bright & ~expected).sum() <= 2 * (19 + 26) and (expected & ~bright).sum() == 0
  iou = (bright & expected).sum() / (bright | expected).sum()
  assert iou > 0.85


@pytest.mark.parametrize("bad", [np.zeros((4, 4), np.uint8), np.zeros((4, 4, 4), np.uint8),
                                 np.zeros((4, 4, 3), np.float32), np.zeros((0, 4, 3), np.uint8)])
def test_bad_images_raise(bad):
  with pytest.raises(ValueError, match="image"):
    pp.sam_preprocess(bad, 64)
  with pytest.raises(ValueError, match="image"):
    pp.eva_preprocess(bad, 28, train=False)


def test_out_arrays_are_filled_completely():
  rng = np.random.default_rng(4)
  image = _random_image(rng, 45, 30)
  mask = rng.random((45, 30)) < 0.5
  dirty = lambda shape: np.full(shape, 7.0, np.float32)  # noqa: E731
  sam, hw = pp.sam_preprocess(image, 64, out=dirty((64, 64, 3)))
  fresh, fresh_hw = pp.sam_preprocess(image, 64)
  np.testing.assert_array_equal(sam, fresh)
  assert hw == fresh_hw
  np.testing.assert_array_equal(pp.mask_to_sam_frame(mask, 64, out=dirty((64, 64))),
                                pp.mask_to_sam_frame(mask, 64))
  np.testing.assert_array_equal(pp.eva_preprocess(image, 28, train=False, out=dirty((28, 28, 3))),
                                pp.eva_preprocess(image, 28, train=False))
  with pytest.raises(ValueError, match="out must be"):
    pp.sam_preprocess(image, 64, out=np.zeros((64, 64, 3), np.float64))


def test_device_normalisation_of_uint8_equals_the_host_preprocessing():
  """The jitted step's normalisation of uint8 batches (models.batch) against the host float32 path:
  the same constants and arithmetic, so within one float32 rounding (XLA may fuse to an FMA)."""
  import jax  # noqa: PLC0415
  import jax.numpy as jnp  # noqa: PLC0415

  from prima_jax.models.batch import normalise_eva, normalise_sam  # noqa: PLC0415

  rng = np.random.default_rng(0)
  image = rng.integers(0, 256, (37, 53, 3), dtype=np.uint8)
  eva_u8 = pp.eva_resize(image, 28, train=False)
  np.testing.assert_allclose(np.asarray(jax.jit(normalise_eva)(jnp.asarray(eva_u8))),
                             pp.eva_preprocess(image, 28, train=False), rtol=0, atol=1e-6)
  sam_u8, hw = pp.sam_resize(image, 64)
  host, host_hw = pp.sam_preprocess(image, 64)
  assert hw == host_hw == (45, 64) and not sam_u8[45:].any()
  device = np.asarray(jax.jit(normalise_sam)(jnp.asarray(sam_u8), jnp.asarray(hw)))
  np.testing.assert_allclose(device, host, rtol=0, atol=1e-5)
  assert not device[45:].any()  # the padding is 0 after normalisation, as SAM pads
  # float input is already normalised: passed through unchanged
  np.testing.assert_array_equal(np.asarray(normalise_eva(jnp.asarray(host))), host)
