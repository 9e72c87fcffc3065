"""From generated token ids to grounded answers: [SEG] parsing and routing, mask post-processing.

Routing rule: a ``[SEG]`` belongs to image k named by the ``(IMAGEk)`` tag that *follows*
it (the text between the ``[SEG]`` and the next added token or ``</s>`` must start with it); its
phrase is the ``<p> ... </p>`` span closed after the previous ``[SEG]`` and before this one ("" when
there is none). A ``[SEG]`` without such a tag (``missing_tag``, also when generation stopped right
after it) or with k outside 1..number of images (``image_out_of_range``) gets no mask: it is listed in
:attr:`Prediction.dropped` with its reason and counted by evaluation, never an error.

Masks: the SAM decoder's low-resolution logits [4g, 4g] are upscaled to the S x S SAM frame, the
padding is cropped to the resized image (h, w) and the rest resized to the original (H, W), all
bilinear with ``align_corners=False`` (``prima_jax.models.sam.sam.postprocess_masks``); pixels with
logit > 0 are the mask. The three linear resamplings are composed into one [H, 4g] and one [W, 4g]
matrix applied on the host in float64 (:func:`low_res_to_original`).
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Sequence
from typing import Any

import numpy as np

from prima_jax.models.sam.sam import bilinear_matrix

DROP_REASONS = ("missing_tag", "image_out_of_range")
_IMAGE_TAG = re.compile(r"\s*\(IMAGE(\d+)\)")


@dataclasses.dataclass(frozen=True)
class SegToken:
  """One generated ``[SEG]``.

  Attributes:
    token_index: its index in the generated tokens (0 = the first generated token).
    phrase: the ``<p> ... </p>`` text before it ("" when none).
    image_index: 0-based image it is routed to; None when dropped.
    reason: why it was dropped (one of :data:`DROP_REASONS`), None when routed.
  """
  token_index: int
  phrase: str
  image_index: int | None
  reason: str | None = None


@dataclasses.dataclass(frozen=True)
class ParsedAnswer:
  """Generated ids up to ``</s>``, their text (added tokens kept), and every ``[SEG]`` in order."""
  token_ids: list[int]
  answer: str
  segs: list[SegToken]

  @property
  def routed(self) -> list[SegToken]:
    return [s for s in self.segs if s.image_index is not None]

  @property
  def dropped(self) -> list[SegToken]:
    return [s for s in self.segs if s.image_index is None]


def parse_generation(ids: Sequence[int], tokenizer, *, num_images: int, seg_id: int, p_start_id: int,
                     p_end_id: int) -> ParsedAnswer:
  """Parses generated ids (cut at the first ``</s>``) into the answer text and its routed [SEG]s.

  Args:
    ids: generated token ids (the prompt excluded).
    tokenizer: the LLM :class:`prima_jax.data.tokenizer.Tokenizer` (``eos_id``, ``decode``,
      ``added_tokens``).
    num_images: images of the example (tags must name 1..num_images).
    seg_id, p_start_id, p_end_id: ids of ``[SEG]``, ``<p>``, ``</p>``.
  """
  ids = [int(i) for i in ids]
  if tokenizer.eos_id in ids:
    ids = ids[:ids.index(tokenizer.eos_id)]
  added = set(tokenizer.added_tokens.values())
  segs: list[SegToken] = []
  open_at: int | None = None
  phrase = ""
  for i, tok in enumerate(ids):
    if tok == p_start_id:
      open_at = i
    elif tok == p_end_id and open_at is not None:
      phrase = tokenizer.decode(ids[open_at + 1:i], skip_special_tokens=True).strip()
      open_at = None
    elif tok == seg_id:
      end = i + 1
      while end < len(ids) and ids[end] not in added:
        end += 1
      tail = tokenizer.decode(ids[i + 1:end], skip_special_tokens=True)
      m = _IMAGE_TAG.match(tail)
      if m is None:
        segs.append(SegToken(i, phrase, None, "missing_tag"))
      elif not 1 <= int(m.group(1)) <= num_images:
        segs.append(SegToken(i, phrase, None, "image_out_of_range"))
      else:
        segs.append(SegToken(i, phrase, int(m.group(1)) - 1))
      phrase = ""
  return ParsedAnswer(ids, tokenizer.decode(ids, skip_special_tokens=True), segs)


@functools.lru_cache(maxsize=256)
def _resample_matrix(low_res: int, frame: int, resized: int, original: int) -> np.ndarray:
  """[original, low_res] float64: low_res -> frame (upscale), crop to resized, -> original."""
  up = bilinear_matrix(low_res, frame).astype(np.float64)[:resized]
  down = bilinear_matrix(resized, original).astype(np.float64)
  return down @ up


def low_res_to_original(low_res: np.ndarray, frame: int, resized_hw: tuple[int, int],
                        original_hw: tuple[int, int]) -> np.ndarray:
  """Low-res mask logits [..., r, r] -> float32 logits [..., H, W] on the original image.

  Equals ``postprocess_masks(upscale_masks(low_res, frame), resized_hw, original_hw)`` up to float
  rounding (the same three bilinear maps, composed).
  """
  low_res = np.asarray(low_res, np.float64)
  r_h, r_w = low_res.shape[-2:]
  wy = _resample_matrix(r_h, frame, int(resized_hw[0]), int(original_hw[0]))
  wx = _resample_matrix(r_w, frame, int(resized_hw[1]), int(original_hw[1]))
  return np.einsum("Yy,...yx,Xx->...YX", wy, low_res, wx).astype(np.float32)


def mask_score(logits: np.ndarray, mask: np.ndarray) -> float:
  """Confidence of a mask: mean sigmoid probability over its pixels (0 for an empty mask)."""
  if not mask.any():
    return 0.0
  return float(np.mean(1.0 / (1.0 + np.exp(-logits[mask].astype(np.float64)))))


@dataclasses.dataclass
class SegPrediction:
  """One routed [SEG] with its mask on the original image ``image_index`` (0-based)."""
  phrase: str
  image_index: int
  mask: np.ndarray        # bool [H_k, W_k]
  score: float
  token_index: int

  @property
  def area(self) -> int:
    return int(self.mask.sum())


@dataclasses.dataclass
class Prediction:
  """The grounded answer to one example.

  Attributes:
    answer: generated text up to ``</s>`` (added tokens ``<p>``, ``</p>``, ``[SEG]`` kept).
    segs: routed [SEG]s in answer order, each with its mask.
    dropped: [SEG]s without a mask (see the module docstring for the rule).
    token_ids: generated ids up to (excluding) ``</s>``.
    finished: True when ``</s>`` was generated within the token budget.
    num_images, image_sizes: the example's images and their (H, W).
    example_id: caller's id (evaluation: the dataset example id).
  """
  answer: str
  segs: list[SegPrediction]
  dropped: list[SegToken]
  token_ids: list[int]
  finished: bool
  num_images: int
  image_sizes: list[tuple[int, int]]
  example_id: str = ""

  def to_grounded(self):
    """The :class:`prima_jax.evaluation.metrics.GroundedAnswer` of this prediction."""
    from prima_jax.evaluation.metrics import GroundedAnswer  # noqa: PLC0415 (evaluation depends on us)
    return GroundedAnswer(answer=self.answer, phrases=[s.phrase for s in self.segs],
                          image_index=[s.image_index for s in self.segs], masks=[s.mask for s in self.segs])

  def to_json(self) -> dict[str, Any]:
    """JSON-ready dict; masks as COCO compressed RLE on the original image, image indices 1-based."""
    from prima_jax.evaluation.rle import encode_rle  # noqa: PLC0415
    return dict(
        example_id=self.example_id,
        answer=self.answer,
        finished=self.finished,
        num_images=self.num_images,
        image_sizes=[list(s) for s in self.image_sizes],
        segs=[dict(phrase=s.phrase, image=s.image_index + 1, score=round(s.score, 6), area=s.area,
                   token_index=s.token_index, mask=encode_rle(s.mask)) for s in self.segs],
        dropped=[dict(phrase=s.phrase, reason=s.reason, token_index=s.token_index) for s in self.dropped],
    )
