"""The one image decoder (prima_jax.data.images): every PIL mode to 8-bit RGB, EXIF orientation, the
pixel limit; and its skip reasons in the record converter."""

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from prima_jax.data import images
from prima_jax.data import records as rec


def encode(img: Image.Image, fmt: str = "PNG", **kwargs) -> bytes:
  buf = io.BytesIO()
  img.save(buf, format=fmt, **kwargs)
  return buf.getvalue()


def png_header_only(width: int, height: int) -> bytes:
  """A PNG that declares ``width`` x ``height`` grey pixels and holds none (the header is enough)."""
  def chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
  return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
          + chunk(b"IEND", b""))


@pytest.fixture
def rng():
  return np.random.default_rng(7)


def test_sixteen_bit_png_is_scaled_not_clipped(rng):
  value = rng.integers(0, 65536, (24, 40)).astype(np.uint16)
  data = encode(Image.fromarray(value))
  assert Image.open(io.BytesIO(data)).mode.startswith("I")
  out = images.decode(data)
  assert out.shape == (24, 40, 3) and out.dtype == np.uint8
  np.testing.assert_array_equal(out[..., 0], np.round(value / 257).astype(np.uint8))
  assert np.all(out[..., 0] == out[..., 2])
  assert 120 < out.mean() < 136  # uniform 16-bit noise; clipping gave ~254


@pytest.mark.parametrize("mode", ["I;16", "I;16B", "I"])
def test_every_sixteen_bit_mode_maps_the_full_range(mode):
  value = np.asarray([[0, 257, 32896, 65535]], np.int64)
  img = Image.fromarray(value.astype(np.int32), "I") if mode == "I" else Image.new(mode, (4, 1))
  if mode != "I":
    img.putdata([int(v) for v in value[0]])
  assert img.mode == mode
  out = images.to_rgb(img)
  assert out.mode == "RGB"
  np.testing.assert_array_equal(np.asarray(out)[0, :, 1], [0, 1, 128, 255])


def test_alpha_is_composited_on_white(rng):
  rgb = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
  alpha = np.zeros((6, 8, 1), np.uint8)
  alpha[:, 4:] = 255
  alpha[0, 0] = 128
  out = images.decode(encode(Image.fromarray(np.concatenate([rgb, alpha], -1), "RGBA")))
  np.testing.assert_array_equal(out[:, 4:], rgb[:, 4:])  # opaque: unchanged
  np.testing.assert_array_equal(out[1:, :4], 255)  # transparent: white, not the hidden colour
  assert np.all(np.abs(out[0, 0].astype(int) - (rgb[0, 0].astype(int) * 128 + 255 * 127) / 255) <= 1)
  la = Image.fromarray(np.stack([rgb[..., 0], alpha[..., 0]], -1), "LA")
  out = images.decode(encode(la))
  np.testing.assert_array_equal(out[1:, :4], 255)
  np.testing.assert_array_equal(out[:, 4:, 2], rgb[:, 4:, 0])


def test_palette_with_and_without_transparency():
  pal = Image.new("P", (4, 2))
  pal.putpalette([0, 0, 0, 200, 10, 20] + [0] * 762)
  pal.putdata([0, 1, 1, 0, 1, 1, 1, 1])
  plain = images.decode(encode(pal))
  assert plain.shape == (2, 4, 3)
  np.testing.assert_array_equal(plain[0, 0], [0, 0, 0])
  np.testing.assert_array_equal(plain[0, 1], [200, 10, 20])
  transparent = images.decode(encode(pal, transparency=0))
  np.testing.assert_array_equal(transparent[0, 0], [255, 255, 255])
  np.testing.assert_array_equal(transparent[0, 1], [200, 10, 20])


def test_grey_bilevel_cmyk_and_float(rng):
  grey = rng.integers(0, 256, (5, 7), dtype=np.uint8)
  out = images.decode(encode(Image.fromarray(grey, "L")))
  np.testing.assert_array_equal(out, np.repeat(grey[..., None], 3, -1))
  bits = Image.fromarray(grey > 127).convert("1")
  assert bits.mode == "1"
  np.testing.assert_array_equal(images.decode(encode(bits))[..., 0], np.where(grey > 127, 255, 0))
  cmyk = Image.new("CMYK", (3, 2), (0, 255, 255, 0))  # pure red
  out = images.decode(encode(cmyk, "JPEG", quality=100))
  assert out.shape == (2, 3, 3) and out[..., 0].min() > 230 and out[..., 1:].max() < 30
  unit = np.asarray([[0.0, 0.5, 1.0]], np.float32)
  np.testing.assert_array_equal(images.to_rgb(Image.fromarray(unit, "F")).getpixel((1, 0)), (128, 128, 128))
  wide = np.asarray([[-5.0, 100.0, 300.0, np.nan]], np.float32)
  out = np.asarray(images.to_rgb(Image.fromarray(wide, "F")))
  np.testing.assert_array_equal(out[0, :, 0], [0, 100, 255, 0])


def test_exif_orientation_is_applied(rng):
  pixels = rng.integers(0, 256, (16, 24, 3), dtype=np.uint8)
  exif = Image.Exif()
  exif[0x0112] = 6  # stored landscape, shown rotated 90 degrees clockwise
  data = encode(Image.fromarray(pixels), "PNG", exif=exif)
  assert images.exif_orientation(data) == 6
  out = images.decode(data)
  assert out.shape == (24, 16, 3)
  np.testing.assert_array_equal(out, np.rot90(pixels, k=-1))
  assert images.exif_orientation(encode(Image.fromarray(pixels))) == 1


def test_size_mismatch_after_exif_rotation_says_so(tmp_path, rng):
  exif = Image.Exif()
  exif[0x0112] = 8
  path = tmp_path / "rot.png"
  Image.fromarray(rng.integers(0, 256, (10, 20, 3), dtype=np.uint8)).save(path, exif=exif)
  array, _ = rec.read_image(path, rec.ImageInfo("rot.png", 20, 10))  # the annotation in the rotated frame
  assert array.shape == (20, 10, 3)
  with pytest.raises(rec.SkipExample, match="EXIF orientation 8") as e:
    rec.read_image(path, rec.ImageInfo("rot.png", 10, 20))
  assert e.value.reason == rec.IMAGE_SIZE_MISMATCH


def test_pixel_limit_is_checked_from_the_header():
  data = png_header_only(9000, 8000)  # 72 M pixels, no pixel data at all
  with pytest.raises(images.ImageTooLarge, match=r"big\.png: 9000x8000 = 72000000 pixels, over the limit"):
    images.decode(data, "big.png")
  with pytest.raises(images.ImageTooLarge, match="over the limit of 100"):
    images.decode(encode(Image.new("RGB", (11, 10))), "small.png", max_pixels=100)
  assert images.decode(encode(Image.new("RGB", (10, 10))), max_pixels=100).shape == (10, 10, 3)


def test_pil_decompression_bomb_error_is_a_too_large_image(monkeypatch):
  monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10)
  with pytest.raises(images.ImageTooLarge, match=r"bomb\.png: .*decompression bomb"):
    images.decode(encode(Image.new("RGB", (5, 5))), "bomb.png")


def test_undecodable_files_name_the_file(rng):
  with pytest.raises(images.ImageError, match=r"^junk\.png: not an image file PIL can read$"):
    images.decode(rng.bytes(64), "junk.png")
  truncated = encode(Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)))[:300]
  with pytest.raises(images.ImageError, match=r"^cut\.png: "):
    images.decode(truncated, "cut.png")


def test_record_decoder_maps_errors_to_skip_reasons(rng, monkeypatch):
  with pytest.raises(rec.SkipExample) as e:
    rec.decode_image(rng.bytes(64), "junk.png")
  assert e.value.reason == rec.CORRUPT_IMAGE and "junk.png" in e.value.detail
  monkeypatch.setattr(images, "MAX_IMAGE_PIXELS", 50)
  with pytest.raises(rec.SkipExample) as e:
    rec.decode_image(encode(Image.new("L", (8, 8))), "big.png")
  assert e.value.reason == rec.IMAGE_TOO_LARGE and "big.png: 8x8 = 64 pixels" in e.value.detail


def test_stored_images_decode_by_the_same_rules(rng):
  """What the input pipeline decodes (m4seg.decode_example on a stored record) is images.decode's."""
  from prima_jax.data import m4seg

  value = rng.integers(0, 65536, (6, 9)).astype(np.uint16)
  exif = Image.Exif()
  exif[0x0112] = 6
  files = [encode(Image.fromarray(value)), encode(Image.fromarray(value.astype(np.uint8)), exif=exif)]
  raw = {"example_id": b"x", "source": b"s", "category": b"", "question": b"q", "answer": b"a",
         "images": {"encoded": files, "id": [b"1", b"2"], "height": [6, 9], "width": [9, 6]},
         "segs": {"rle": [], "height": [], "width": [], "phrase": [], "image_index": []}}
  ex = m4seg.decode_example(raw)
  for got, data in zip(ex.images, files):
    np.testing.assert_array_equal(got, images.decode(data))
  assert ex.images[0].mean() > 100 and ex.images[1].shape == (9, 6, 3)
