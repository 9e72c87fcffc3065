"""The batch contract at the model boundary, and its validator.

A PRIMA batch is a dict of arrays with static shapes (B = batch, N = max images per example,
L = LLM sequence length after image-slot expansion, T = Q-Former text length, M = [SEG] slots,
S = SAM input size):

===================== ====================== ==========================================================
key                   shape / dtype          meaning
===================== ====================== ==========================================================
eva_images            [B, N, H, W, 3] uint8  EVA input pixels (H = W = vision.image_size), or float:
                                             already CLIP-normalised
sam_images            [B, N, S, S, 3] uint8  SAM input pixels, longest side resized to S, zero padded,
                                             or float: already SAM-normalised (padding 0)
eva_features          [B, N, T, E] float     instead of eva_images: cached ``ln_vision`` output
                                             (T = 1 + (H / patch)^2, E = vision.width)
sam_embeddings        [B, N, g, g, C] float  instead of sam_images: cached SAM image embeddings
                                             (g = S / patch, C = sam.out_channels)
image_valid           [B, N] bool            real image (True) or padding; real images come first
sam_sizes             [B, N, 2] int          (height, width) of the resized image inside the S x S frame
input_ids             [B, L] int             prompt + answer; image slots hold prima.image_token_id
attention_mask        [B, L] bool            real token
labels                [B, L] int             target id per position (aligned with input_ids), -100 = no loss
qformer_input_ids     [B, T] int             question tokens for the Q-Former
qformer_attention_mask[B, T] bool
seg_positions         [B, M] int             index in input_ids of each [SEG] token (after expansion)
seg_image_index       [B, M] int             image (0-based) each [SEG] is routed to
seg_valid             [B, M] bool            real [SEG] slot
gt_masks              [B, M, S, S] uint8     ground-truth mask (0 / 1) of each [SEG] in the SAM frame
                                             (training; any dtype with 1 = inside works)
===================== ====================== ==========================================================

uint8 images travel to the device at a quarter of the float32 bytes and are normalised inside the
jitted step (:func:`normalise_eva`, :func:`normalise_sam`: the same constants and the same float32
arithmetic as the host preprocessing). A batch carries either ``eva_images`` or ``eva_features``
and either ``sam_images`` or ``sam_embeddings``: a tower whose output is given is not run.

Each example's k-th ``<image>`` owns ``qformer.num_query_tokens`` consecutive image slots; the
j-th slot of an example receives token ``j % nq`` of image ``j // nq``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

INPUT_KEYS = ("image_valid", "sam_sizes", "input_ids", "attention_mask",
              "qformer_input_ids", "qformer_attention_mask", "seg_positions", "seg_image_index",
              "seg_valid")
# One of each pair: the tower's input images, or its cached output.
TOWER_KEYS = (("eva_images", "eva_features"), ("sam_images", "sam_embeddings"))
IMAGE_KEYS = tuple(k for pair in TOWER_KEYS for k in pair)  # per-image arrays, [B, N, ...]
TRAINING_KEYS = ("labels", "gt_masks")
IGNORE_LABEL = -100

# Normalisation of each tower's uint8 input (EVA-CLIP: /255 then CLIP mean / std; SAM: mean / std
# on the 0-255 scale), folded into x * scale + offset in float32.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
SAM_MEAN = (123.675, 116.28, 103.53)
SAM_STD = (58.395, 57.12, 57.375)
EVA_SCALE = (1.0 / (255.0 * np.asarray(CLIP_STD, np.float64))).astype(np.float32)
EVA_OFFSET = (-np.asarray(CLIP_MEAN, np.float64) / np.asarray(CLIP_STD, np.float64)).astype(np.float32)
SAM_SCALE = (1.0 / np.asarray(SAM_STD, np.float64)).astype(np.float32)
SAM_OFFSET = (-np.asarray(SAM_MEAN, np.float64) / np.asarray(SAM_STD, np.float64)).astype(np.float32)


def normalise_eva(images: jax.Array) -> jax.Array:
  """uint8 EVA input [..., H, W, 3] -> float32 CLIP-normalised; a float input is returned as it is."""
  if images.dtype != jnp.uint8:
    return images
  return images.astype(jnp.float32) * EVA_SCALE + EVA_OFFSET


def normalise_sam(images: jax.Array, sizes: jax.Array) -> jax.Array:
  """uint8 SAM input [..., S, S, 3] -> float32 SAM-normalised with zeros outside the resized image
  (``sizes`` [..., 2] = its height, width), as ``Sam.preprocess`` pads; float input is returned as it is."""
  if images.dtype != jnp.uint8:
    return images
  s = images.shape[-2]
  inside = ((jnp.arange(s)[:, None] < sizes[..., 0, None, None])
            & (jnp.arange(s)[None, :] < sizes[..., 1, None, None]))
  return jnp.where(inside[..., None], images.astype(jnp.float32) * SAM_SCALE + SAM_OFFSET, 0.0)


def tower_key(batch: Mapping[str, Any], pair: tuple[str, str]) -> str:
  """Which key of ``pair`` (images, cached output) ``batch`` carries; ValueError if neither or both."""
  present = [k for k in pair if k in batch]
  if len(present) != 1:
    raise ValueError(f"batch needs exactly one of {list(pair)}, has {present or 'neither'}")
  return present[0]


def _is_concrete(x: Any) -> bool:
  return not isinstance(x, jax.core.Tracer)


def validate_batch(batch: Mapping[str, Any], cfg, *, training: bool = False) -> None:
  """Raises ValueError naming the field when ``batch`` breaks the contract above.

  Shapes are always checked; values (slot counts, [SEG] routing) only when the arrays are
  concrete, i.e. on the host before the batch enters a jitted step.
  """
  keys = INPUT_KEYS + (TRAINING_KEYS if training else ())
  missing = [k for k in keys if k not in batch]
  if missing:
    raise ValueError(f"batch is missing fields {missing}")
  eva_key, sam_key = (tower_key(batch, pair) for pair in TOWER_KEYS)
  keys = keys + (eva_key, sam_key)
  shape = {k: tuple(np.shape(batch[k])) for k in keys}

  def fail(field, msg):
    raise ValueError(f"batch field {field!r}: {msg}")

  def expect(field, expected):
    got = shape[field]
    if len(got) != len(expected) or any(e is not None and g != e for g, e in zip(got, expected)):
      fail(field, f"shape {got}, expected {tuple('?' if e is None else e for e in expected)}")

  if len(shape["image_valid"]) != 2:
    fail("image_valid", f"shape {shape['image_valid']}, expected [batch, images]")
  b, n = shape["image_valid"]
  if n > cfg.prima.max_images:
    fail(eva_key, f"{n} images per example, more than max_images={cfg.prima.max_images}")
  size, s = cfg.vision.image_size, cfg.sam.image_size
  if eva_key == "eva_images":
    expect("eva_images", (b, n, size, size, 3))
  else:
    tokens = 1 + (size // cfg.vision.patch_size) ** 2
    expect("eva_features", (b, n, tokens, cfg.vision.width))
  if sam_key == "sam_images":
    expect("sam_images", (b, n, s, s, 3))
  else:
    g = s // cfg.sam.patch_size
    expect("sam_embeddings", (b, n, g, g, cfg.sam.out_channels))
  expect("image_valid", (b, n))
  expect("sam_sizes", (b, n, 2))
  if len(shape["input_ids"]) != 2 or shape["input_ids"][0] != b:
    fail("input_ids", f"shape {shape['input_ids']}, expected [{b}, length]")
  length = shape["input_ids"][1]
  if length > cfg.llm.max_position_embeddings:
    fail("input_ids", f"length {length} exceeds llm.max_position_embeddings="
                      f"{cfg.llm.max_position_embeddings}")
  expect("attention_mask", (b, length))
  if len(shape["qformer_input_ids"]) != 2 or shape["qformer_input_ids"][0] != b:
    fail("qformer_input_ids", f"shape {shape['qformer_input_ids']}, expected [{b}, text_length]")
  expect("qformer_attention_mask", shape["qformer_input_ids"])
  if shape["qformer_input_ids"][1] > cfg.qformer.max_position_embeddings:
    fail("qformer_input_ids", f"length {shape['qformer_input_ids'][1]} exceeds "
                              f"qformer.max_position_embeddings={cfg.qformer.max_position_embeddings}")
  if len(shape["seg_positions"]) != 2 or shape["seg_positions"][0] != b:
    fail("seg_positions", f"shape {shape['seg_positions']}, expected [{b}, max_masks]")
  m = shape["seg_positions"][1]
  expect("seg_image_index", (b, m))
  expect("seg_valid", (b, m))
  if training:
    expect("labels", (b, length))
    expect("gt_masks", (b, m, s, s))

  if not all(_is_concrete(batch[k]) for k in keys):
    return
  valid = np.asarray(batch["image_valid"]).astype(bool)
  if not valid.any(1).all():
    fail("image_valid", f"examples {np.flatnonzero(~valid.any(1)).tolist()} have no image")
  if (valid[:, 1:] & ~valid[:, :-1]).any():
    fail("image_valid", "padding images must come after the real ones")
  num_images = valid.sum(1)
  sizes = np.asarray(batch["sam_sizes"])
  if ((sizes[valid] < 1) | (sizes[valid] > s)).any():
    fail("sam_sizes", f"real images need 1 <= height, width <= {s}")
  ids = np.asarray(batch["input_ids"])
  attn = np.asarray(batch["attention_mask"]).astype(bool)
  nq = cfg.qformer.num_query_tokens
  slots = ((ids == cfg.prima.image_token_id) & attn).sum(1)
  bad = np.flatnonzero(slots != num_images * nq)
  if bad.size:
    i = bad[0]
    fail("input_ids", f"example {i} has {slots[i]} image slots, expected {nq} x {num_images[i]} images")
  seg_valid = np.asarray(batch["seg_valid"]).astype(bool)
  pos = np.asarray(batch["seg_positions"])
  img = np.asarray(batch["seg_image_index"])
  if ((pos < 1) | (pos >= length))[seg_valid].any():
    fail("seg_positions", f"valid [SEG] positions must lie in [1, {length})")
  if ((img < 0) | (img >= n))[seg_valid].any():
    fail("seg_image_index", f"valid [SEG] image index must lie in [0, {n})")
  routed_valid = np.take_along_axis(valid, np.clip(img, 0, n - 1), axis=1)
  if (seg_valid & ~routed_valid).any():
    i, j = np.argwhere(seg_valid & ~routed_valid)[0]
    fail("seg_image_index", f"example {i} [SEG] {j} is routed to padding image {img[i, j]}")
  at = np.take_along_axis(ids, np.clip(pos, 0, length - 1), axis=1)
  if ((at != cfg.prima.seg_token_id) & seg_valid).any():
    i, j = np.argwhere((at != cfg.prima.seg_token_id) & seg_valid)[0]
    fail("seg_positions", f"example {i} [SEG] {j} points at position {pos[i, j]} holding token "
                          f"{at[i, j]}, not seg_token_id={cfg.prima.seg_token_id}")
  seg_in_text = ((ids == cfg.prima.seg_token_id) & attn).sum(1)
  if (seg_in_text != seg_valid.sum(1)).any():
    i = int(np.flatnonzero(seg_in_text != seg_valid.sum(1))[0])
    fail("seg_valid", f"example {i} has {seg_in_text[i]} [SEG] tokens but {seg_valid[i].sum()} valid "
                      "[SEG] slots (each [SEG] needs exactly one slot)")


def collate(examples: list[Mapping[str, np.ndarray]], cfg, *, num_images: int | None = None,
            length: int | None = None, text_length: int | None = None,
            max_masks: int | None = None, extra_image_keys: tuple[str, ...] = ()) -> dict[str, np.ndarray]:
  """Pads unbatched examples to one static-shape batch (right padding everywhere).

  Each example holds per-image arrays [n_i, ...] (``eva_images`` [n_i, H, W, 3] or ``eva_features``,
  ``sam_images`` [n_i, S, S, 3] or ``sam_embeddings``: the :data:`IMAGE_KEYS` of the first example,
  in their dtype), ``sam_sizes`` [n_i, 2], ``input_ids`` / ``labels`` [l_i], ``qformer_input_ids``
  [t_i], ``seg_positions`` / ``seg_image_index`` [m_i] and optionally ``gt_masks`` [m_i, S, S]
  (stored as uint8). ``extra_image_keys``: more per-image arrays to pad the same way when present.
  Sizes default to the largest in the batch (``num_images``: prima.max_images is the usual choice
  for a fixed shape).
  """
  n = num_images or max(len(e["sam_sizes"]) for e in examples)
  length = length or max(len(e["input_ids"]) for e in examples)
  t = text_length or max(len(e["qformer_input_ids"]) for e in examples)
  m = max_masks or max(1, max(len(e["seg_positions"]) for e in examples))
  b = len(examples)
  s = cfg.sam.image_size
  image_keys = [k for k in (*IMAGE_KEYS, *extra_image_keys) if k in examples[0]]
  out = {k: np.zeros((b, n, *examples[0][k].shape[1:]), examples[0][k].dtype) for k in image_keys}
  out.update(
      image_valid=np.zeros((b, n), bool),
      sam_sizes=np.zeros((b, n, 2), np.int32),
      input_ids=np.full((b, length), cfg.llm.pad_token_id, np.int32),
      attention_mask=np.zeros((b, length), bool),
      labels=np.full((b, length), IGNORE_LABEL, np.int32),
      qformer_input_ids=np.full((b, t), cfg.qformer.pad_token_id, np.int32),
      qformer_attention_mask=np.zeros((b, t), bool),
      seg_positions=np.zeros((b, m), np.int32),
      seg_image_index=np.zeros((b, m), np.int32),
      seg_valid=np.zeros((b, m), bool),
      gt_masks=np.zeros((b, m, s, s), np.uint8),
  )
  for i, e in enumerate(examples):
    k, l_i, t_i, m_i = len(e["sam_sizes"]), len(e["input_ids"]), len(e["qformer_input_ids"]), \
        len(e["seg_positions"])
    if k > n or l_i > length or t_i > t or m_i > m:
      raise ValueError(f"example {i} ({k} images, {l_i} tokens, {t_i} question tokens, {m_i} [SEG]) "
                       f"does not fit the batch shape ({n}, {length}, {t}, {m})")
    for key in image_keys:
      if key not in e:
        raise ValueError(f"example {i} has no {key!r} (the first example of the batch has)")
      out[key][i, :k] = e[key]
    out["image_valid"][i, :k] = True
    out["sam_sizes"][i, :k] = e["sam_sizes"]
    out["input_ids"][i, :l_i] = e["input_ids"]
    out["attention_mask"][i, :l_i] = True
    out["labels"][i, :l_i] = e.get("labels", np.full(l_i, IGNORE_LABEL))
    out["qformer_input_ids"][i, :t_i] = e["qformer_input_ids"]
    out["qformer_attention_mask"][i, :t_i] = True
    out["seg_positions"][i, :m_i] = e["seg_positions"]
    out["seg_image_index"][i, :m_i] = e["seg_image_index"]
    out["seg_valid"][i, :m_i] = True
    if "gt_masks" in e:
      out["gt_masks"][i, :m_i] = e["gt_masks"]
  return out


def random_example(cfg, rng: np.random.Generator, *, num_images: int, num_masks: int,
                   prompt_tokens: int = 6, answer_tokens: int = 8,
                   question_tokens: int = 5) -> dict[str, np.ndarray]:
  """A random example in the model's input format, for tests and benchmarks.

  Layout: ``<s> prompt (<im_start> slots <im_end>) x num_images prompt answer </s>``, with
  ``num_masks`` [SEG] tokens at random answer positions routed to random images. Labels cover the
  answer only.
  """
  p = cfg.prima
  nq = cfg.qformer.num_query_tokens
  text = lambda k: rng.integers(3, min(cfg.llm.vocab_size, p.first_added_id), size=k).tolist()
  ids = [1] + text(prompt_tokens)
  for _ in range(num_images):
    ids += [p.im_start_id] + [p.image_token_id] * nq + [p.im_end_id]
  ids += text(prompt_tokens)
  answer_start = len(ids)
  answer = text(answer_tokens)
  seg_at = sorted(rng.choice(answer_tokens, size=num_masks, replace=False).tolist()) if num_masks else []
  for j in seg_at:
    answer[j] = p.seg_token_id
  ids += answer + [2]
  ids = np.asarray(ids, np.int32)
  labels = np.full(len(ids), IGNORE_LABEL, np.int32)
  labels[answer_start:] = ids[answer_start:]
  size, s = cfg.vision.image_size, cfg.sam.image_size
  sizes = np.stack([rng.integers(s // 2, s + 1, num_images), rng.integers(s // 2, s + 1, num_images)], 1)
  sizes[np.arange(num_images), rng.integers(0, 2, num_images)] = s  # longest side = S
  return dict(
      eva_images=rng.standard_normal((num_images, size, size, 3)).astype(np.float32),
      sam_images=rng.standard_normal((num_images, s, s, 3)).astype(np.float32),
      sam_sizes=sizes.astype(np.int32),
      input_ids=ids, labels=labels,
      qformer_input_ids=rng.integers(1, cfg.qformer.vocab_size, question_tokens).astype(np.int32),
      seg_positions=np.asarray([answer_start + j for j in seg_at], np.int32),
      seg_image_index=rng.integers(0, num_images, num_masks).astype(np.int32),
      gt_masks=(rng.random((num_masks, s, s)) < 0.3).astype(np.float32),
  )
