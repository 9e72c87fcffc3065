"""The decoded form of one M⁴Seg example, shared by the builder, the pipeline and the tools."""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass
class GroundedExample:
  """One question about 1..max_images images, its grounded answer and one mask per ``[SEG]``.

  Attributes:
    example_id: unique id within its split (e.g. ``"paco_lvis/train/123"``).
    source: the record's ``dataset_name`` (``paco_lvis``, ``ade20k_part234``, ``pascal_part``,
      ``synthetic``).
    category: question category (``functional``, ``spatial``, ``numerical``, ``open-ended``) or "".
    images: uint8 [H_k, W_k, 3] per image, in IMAGE1, IMAGE2, ... order.
    image_ids: the source dataset's image id of each image (as strings).
    question: the question text.
    answer: the answer with every grounded mention as ``<p> phrase </p> [SEG] (IMAGEk)`` and a
      repeated mention as ``(IMAGEk)`` (docs/inference.md, "How an answer is grounded").
    phrases: the phrase of each ``[SEG]``, in answer order.
    mask_image: 0-based image index of each ``[SEG]``, in answer order.
    masks: bool [H_k, W_k] per ``[SEG]``, in the frame of image ``mask_image[i]``.
  """
  example_id: str
  source: str
  category: str
  images: list[np.ndarray]
  image_ids: list[str]
  question: str
  answer: str
  phrases: list[str]
  mask_image: list[int]
  masks: list[np.ndarray]

  def check(self) -> None:
    """Raises ValueError naming the example and the field when the parts do not agree."""
    where = f"example {self.example_id!r}"
    if not self.images:
      raise ValueError(f"{where}: no images")
    if len(self.image_ids) != len(self.images):
      raise ValueError(f"{where}: {len(self.image_ids)} image ids for {len(self.images)} images")
    n_seg = self.answer.count("[SEG]")
    if not (n_seg == len(self.masks) == len(self.mask_image) == len(self.phrases)):
      raise ValueError(f"{where}: {n_seg} [SEG] in the answer, {len(self.masks)} masks, "
                       f"{len(self.mask_image)} image indices, {len(self.phrases)} phrases")
    for i, (k, mask) in enumerate(zip(self.mask_image, self.masks)):
      if not 0 <= k < len(self.images):
        raise ValueError(f"{where}: [SEG] {i} routed to image {k + 1} of {len(self.images)}")
      if mask.shape != self.images[k].shape[:2]:
        raise ValueError(f"{where}: mask {i} has shape {mask.shape}, image {k + 1} is "
                         f"{self.images[k].shape[:2]}")
