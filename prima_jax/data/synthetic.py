"""A synthetic benchmark in exactly M⁴Seg's record format (docs/data.md), drawn procedurally.

Each example shows 2-5 small images of flat-coloured objects (ball, box, cone, cup, gift box, bottle) on a
plain background. Cups have a ``handle``, gift boxes a ``ribbon`` and bottles a ``cap``: part-level masks.
Questions fall in M⁴Seg's four categories (functional, spatial, numerical, open-ended); their answers name and
ground objects and parts with the original loader's inline tags, and at least half of them need more than one
image.

Tag grammar (kanguyen-vn/LISA ``MultiImage_8Q_single_turn_ds.py``, pattern
``\\b(\\w+)_\\d{3}\\b|\\b(\\w+)_\\d{5}\\b``):

- object ``{name}_{X}{YY}``: X = 1-based image index (one digit, 1-9), YY = 2-digit 1-based instance number
  within that image, e.g. ``cup_102``, ``gift_box_301`` (the name may itself hold ``_``: the code is the last
  ``_``-separated field). Instances are numbered *per class, left to right* (by the centre of their box;
  ties by height): ``ball_2`` is the second ball from the left. A rule the pixels show, so a model can learn
  to name the instance it masks (a draw-order number could not be read off the image);
- part ``{part}_{X}{YY}{ZZ}``: ZZ = 2-digit 1-based part number within instance YY, e.g. ``handle_10201``;
- images 10-99 (the many variant): ``{name}_{XX}{YY}`` and ``{part}_{XX}{YY}{ZZ}`` with a two-digit image
  index, e.g. ``cone_4101`` (instance 1 of IMAGE41). ``records.py`` reads these 4- and 6-digit forms as tags
  only in records of 10 or more images; images 1-9 keep the one-digit forms everywhere.

The k-th *new* tag naming image X in the answer takes ``groundings["img_X"][k]``; a repeated tag takes
nothing. A grounding is ``{"segmentation": polygon list | uncompressed RLE | compressed RLE,
"name": class or part name}`` plus ``"obj_ann_id"`` (the object's annotation id in
``synthetic_{split}.json``) for parts, as the original loader reads them (phrase ``{name}_{int(YY)}``;
part phrase ``{object category}_{int(YY)}'s {name}_{int(ZZ)}``).

Layout written by :func:`generate`::

  DIR/synthetic/images/{image_id}.png
  DIR/synthetic/annotations/synthetic_{split}.json   COCO style: images, annotations (objects and parts,
                                                     PACO-style obj_ann_id), categories
  DIR/Part_Segm/synthetic_{split}.json               list of M⁴Seg records (+ "category")

In the COCO file an image's object annotations come left to right (YY = rank among the image's objects
of the same class, left to right), each followed by its parts in part-number order; objects carry
``obj_ann_id == id``, parts their object's id, and every annotation its RGB ``color``. Objects never
overlap, so masks equal the drawn pixels.

The many-image variant (``variant="many"``): each question shows ``images`` = (8, 64) (configurable)
sparse images, each with 0-2 objects, and asks what needs a search through all of them: the few images
that show a rare (colour, class) (open-ended) or something with a property (functional), how many of a
rare class there are across all images (numerical), or a comparison of two images at least half the
scene apart: which holds more of a class (numerical), whether one object is on the same side in both
(spatial). The scene of a question is drawn for it (the rare thing planted in 1-4 images and kept out of
the others); answers ground at most ``MANY_MAX_GROUNDINGS`` = 6 objects, mostly 1-4. Its own random stream:
the standard variant's output is unchanged by it.

CLI: ``python -m prima_jax.data.synthetic --out DIR --seed S [--train N --val N --test N] [--image_size 96]
[--variant many [--images 8,64]]``.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import re
import sys
import time
from collections.abc import Callable, Mapping, Sequence

import numpy as np
from absl import flags
from etils import epath
from PIL import Image
from pycocotools import mask as mask_utils

from prima_jax import cli, paths
from prima_jax.progress import Progress

DATASET_NAME = "synthetic"
SPLITS = ("train", "val", "test")
CATEGORIES = ("functional", "spatial", "numerical", "open-ended")
DEFAULT_SIZES = {"train": 2400, "val": 300, "test": 300}
# Image and annotation ids of split s start at s * ID_STRIDE + 1, so image files never collide across splits.
ID_STRIDE = 10_000_000
MIN_IMAGES, MAX_IMAGES = 2, 5
MAX_OBJECTS = 5
# The many-image variant (variant="many"): images per question (a configurable range within 2..99), default
# sizes (its examples hold ~10x the images), masks per answer at most, the images a "find" question's
# answer lies in, and the chance of 0 / 1 / 2 objects in an image (sparse images: cheap, few masks).
VARIANTS = ("standard", "many")
MANY_IMAGES = (8, 64)
MANY_DEFAULT_SIZES = {"train": 600, "val": 60, "test": 60}
MANY_MAX_GROUNDINGS = 6
MANY_FIND_IMAGES = (1, 4)
MANY_OBJECTS_P = (0.25, 0.5, 0.25)

# The original loader's tag pattern (objects: 3 digits, parts: 5 digits).
TAG_PATTERN = re.compile(r"\b(\w+)_\d{3}\b|\b(\w+)_\d{5}\b")
# In records of WIDE_TAGS_FROM or more images, also 4 (object) and 6 (part) digits: a two-digit image index.
WIDE_TAG_PATTERN = re.compile(r"\b(\w+)_(\d{3}|\d{4}|\d{5}|\d{6})\b")
WIDE_TAGS_FROM = 10
ENCODINGS = ("polygon", "rle", "compressed_rle")

COLORS: dict[str, tuple[int, int, int]] = {
  "red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220),
  "yellow": (240, 210, 40), "purple": (140, 60, 180), "orange": (245, 140, 30),
}
PART_COLORS = {"ribbon": (250, 250, 250), "cap": (50, 50, 50)}  # the handle takes its cup's colour

# class -> (display name, plural, parts)
CLASSES: dict[str, tuple[str, str, tuple[str, ...]]] = {
  "ball": ("ball", "balls", ()),
  "box": ("box", "boxes", ()),
  "cone": ("cone", "cones", ()),
  "cup": ("cup", "cups", ("handle",)),
  "gift_box": ("gift box", "gift boxes", ("ribbon",)),
  "bottle": ("bottle", "bottles", ("cap",)),
}
PART_OWNER = {"handle": "cup", "ribbon": "gift_box", "cap": "bottle"}

# The functional property table: property -> (question phrase, answer phrase, classes that have it).
PROPERTIES: dict[str, tuple[str, str, frozenset[str]]] = {
  "rolls": ("would roll away on a slope", "can roll", frozenset({"ball"})),
  "liquid": ("could you pour water into", "can hold liquid", frozenset({"cup", "bottle"})),
  "storage": ("could you keep small things in", "can store things", frozenset({"box", "gift_box"})),
  "present": ("would you give as a present", "is a present", frozenset({"gift_box"})),
  "stacks": ("could you stack on top of each other", "can be stacked", frozenset({"box", "gift_box"})),
  "road": ("could mark off a road", "can mark off a road", frozenset({"cone"})),
}
# part -> (question phrase, answer template with {part} and {obj} slots)
PART_USES: dict[str, tuple[str, str]] = {
  "handle": ("which part would you grip to lift",
             "Grip the {part} of the {color} {obj}; the {obj2} can hold liquid."),
  "ribbon": ("which part would you untie to open",
             "Untie the {part} of the {color} {obj}; then the {obj2} opens."),
  "cap": ("which part would you twist off to open",
          "Twist off the {part} of the {color} {obj}; then you can pour from the {obj2}."),
}
ORDINALS = ("first", "second", "third", "fourth", "fifth")
EXTREMES = {"left": "leftmost", "right": "rightmost", "top": "topmost", "bottom": "bottommost"}

# Every fixed piece of question/answer text; placeholders in braces are filled from the tables above.
TEXT: dict[str, tuple[str, ...]] = {
  "f_all_q": ("Which objects in these images {prop}?", "Across all the images, what {prop}?"),
  "f_all_a": ("These objects {ans}: {groups}.", " {ref} has nothing that {ans}."),
  "f_cmp_q": ("Which has something that {ans}, {ref_a} or {ref_b}?",),
  "f_cmp_a": ("Both do: {objs_a} in {ref_a} and {objs_b} in {ref_b} {ans}.",
              "{ref} does: {objs} {ans}; {ref_other} has nothing that {ans}."),
  "f_one_q": ("In {ref}, what {prop}?",),
  "f_one_a": ("{objs} {ans}.",),
  "f_part_q": ("In {ref}, {use} the {color} {display}?",),
  "s_ext_q": ("What is the {extreme} object in {ref}?",
              "Which object is closest to the {side} edge of {ref}?"),
  "s_ext_a": ("The {color} {obj} is the {extreme} object in {ref}.",),
  "s_next_q": ("What is the nearest object to the {side} of the {color} {display} in {ref}?",),
  "s_next_a": ("The {color2} {obj2} is the nearest object to the {side} of the {color} {obj}; "
               "the {obj_again} is further {other_side}.",),
  "s_side_q": ("Is the {display} on the same side in {ref_a} and {ref_b}?",),
  "s_side_a": ("{yes_no}, the {obj_a} is on the {side_a} of {ref_a} and "
               "the {obj_b} is on the {side_b} of {ref_b}.",),
  "s_high_q": ("In which image is the {display} closest to the top?",),
  "s_high_a": ("In {ref}: the {obj} is higher than {others}.", "the {obj} in {ref}"),
  "n_more_q": ("Which image has more {color} objects, {ref_a} or {ref_b}?",),
  "n_more_a": ("{ref} has more {color} objects, {n}: {objs}; {ref_other} has {m}: {objs_other}.",
               "{ref} has more {color} objects, {n}: {objs}; {ref_other} has none."),
  "n_total_q": ("How many {plural} are there in all the images together?",),
  "n_total_a": ("There are {n} {plural}: {groups}.", "There is 1 {display}: {groups}.", "{objs} in {ref}"),
  "n_count_q": ("How many objects are in {ref}?",),
  "n_count_a": ("There are {n} objects in {ref}: {objs}.", "There is 1 object in {ref}: {objs}."),
  "n_most_q": ("Which image contains the most objects?",),
  "n_most_a": ("{ref} contains the most objects, {n}: {objs}.",),
  "o_every_q": ("Which object appears in every image?",),
  "o_every_a": ("The {displays} {verb} in every image: {groups}.", "appears", "appear"),
  "o_diff_q": ("What does {ref_a} show that {ref_b} does not?",),
  "o_diff_a": ("{ref_a} shows {objs}; {ref_b} has no {displays}.",),
  "o_desc_q": ("Describe {ref}.", "What is in {ref}?"),
  "o_desc_a": ("{ref} shows {items}.", "{article} {color} {obj} at the {vert} {horiz}", " with its {part}"),
  # The train split's optional extra records (``describe_train``): the objects of several images at once.
  "o_images_q": ("Describe these images.", "Describe {refs}."),
  "o_images_a": ("{ref} shows {objs}",),
  "o_parts_q": ("Which objects in these images have a {part}?",),
  "o_parts_a": ("the {obj} in {ref} has a {part}",),
  # The many-image variant (its answers also use n_total_a and s_side_a).
  "m_find_q": ("Which images show {article} {color} {display}?",
               "In which images is there {article} {color} {display}?"),
  "m_find_a": ("{refs} show {article} {color} {display}: {groups}.",
               "{ref} shows {article} {color} {display}: {objs}."),
  "m_use_q": ("Which images show something that {ans}?",),
  "m_use_a": ("{refs} show something that {ans}: {groups}.", "{ref} shows something that {ans}: {objs}."),
  "m_count_q": ("How many {plural} are there across all the images?",
                "How many {plural} are there in all the images together?"),
  "m_more_q": ("Which image has more {plural}, {ref_a} or {ref_b}?",),
  "m_more_a": ("{ref} has more {plural}, {n}: {objs}; {ref_other} has {m}: {objs_other}.",
               "{ref} has more {plural}, {n}: {objs}; {ref_other} has none."),
  "m_side_q": ("Is the {color} {display} on the same side in {ref_a} and {ref_b}?",),
  "glue": ("the", "The", "a", "an", "and", ", and ", "; ", ", ", "Yes", "No", "Image", "none", "no"),
}


# ----------------------------------------------------------------------------------------------------
# Scenes


@dataclasses.dataclass
class Part:
  """One part of an instance: COCO polygons, bool [H, W] mask, RGB colour."""
  name: str
  number: int
  polygons: list[list[float]]
  mask: np.ndarray
  color: tuple[int, int, int]
  ann_id: int = 0


@dataclasses.dataclass
class Instance:
  """One drawn object: class, colour, polygons (its parts' included), bool [H, W] mask, bbox [x, y, w, h]."""
  cls: str
  color_name: str
  number: int
  polygons: list[list[float]]
  mask: np.ndarray
  bbox: tuple[int, int, int, int]
  parts: list[Part]
  ann_id: int = 0

  @property
  def color(self) -> tuple[int, int, int]:
    return COLORS[self.color_name]

  @property
  def center(self) -> tuple[float, float]:
    x, y, w, h = self.bbox
    return x + w / 2, y + h / 2


@dataclasses.dataclass
class SceneImage:
  """One image: id, uint8 [height, width, 3] pixels, its instances (left to right, numbered per class)."""
  image_id: int
  height: int
  width: int
  pixels: np.ndarray
  instances: list[Instance]


def _rasterize(polygons: list[list[float]], height: int, width: int) -> np.ndarray:
  """Union of COCO polygons as bool [height, width], exactly as pycocotools decodes them."""
  rles = mask_utils.frPyObjects(polygons, height, width)
  return mask_utils.decode(mask_utils.merge(rles)).astype(bool)


def _bbox(mask: np.ndarray) -> tuple[int, int, int, int]:
  """COCO [x, y, w, h] of a non-empty bool [H, W] mask."""
  cols = np.flatnonzero(mask.any(0))
  rows = np.flatnonzero(mask.any(1))
  return int(cols[0]), int(rows[0]), int(cols[-1] - cols[0] + 1), int(rows[-1] - rows[0] + 1)


def _r(values) -> list[float]:
  return [round(float(v), 2) for v in values]


def _rect(x0: float, y0: float, x1: float, y1: float) -> list[float]:
  return _r([x0, y0, x1, y0, x1, y1, x0, y1])


def _shape(cls: str, x: float, y: float, s: float, rng: np.random.Generator):
  """Polygons of a class drawn in the box [x, x + s] x [y, y + s]: (body polygons, [(part, polygon)])."""
  if cls == "ball":
    t = np.linspace(0, 2 * np.pi, 28, endpoint=False)
    r = s / 2
    pts = np.stack([x + r + r * np.cos(t), y + r + r * np.sin(t)], -1).reshape(-1)
    return [_r(pts)], []
  if cls == "box":
    a = rng.uniform(0.75, 1.0)
    return [_rect(x, y + s * (1 - a), x + s, y + s)], []
  if cls == "cone":
    return [_r([x + s / 2, y, x + s, y + s, x, y + s])], []
  if cls == "cup":
    bw = 0.68 * s
    body = _r([x, y, x + bw, y, x + 0.9 * bw, y + s, x + 0.1 * bw, y + s])
    t = max(2.0, 0.12 * s)
    xa, xb = x + 0.9 * bw, x + s
    ya, yb = y + 0.18 * s, y + 0.68 * s
    handle = _r([xa, ya, xb, ya, xb, yb, xa, yb, xa, yb - t, xb - t, yb - t, xb - t, ya + t, xa, ya + t])
    return [body], [("handle", handle)]
  if cls == "gift_box":
    rw = max(3.0, 0.2 * s)
    cx = x + s / 2
    return [_rect(x, y, x + s, y + s)], [("ribbon", _rect(cx - rw / 2, y, cx + rw / 2, y + s))]
  if cls == "bottle":
    bw, nw = 0.5 * s, 0.26 * s
    cx = x + s / 2
    ch = max(3.0, 0.16 * s)
    body = _rect(cx - bw / 2, y + 0.42 * s, cx + bw / 2, y + s)
    neck = _rect(cx - nw / 2, y + ch, cx + nw / 2, y + 0.42 * s)
    cap = _rect(cx - nw / 2 - 1, y, cx + nw / 2 + 1, y + ch)
    return [body, neck], [("cap", cap)]
  raise ValueError(f"unknown class {cls!r}")


def _canvas(rng: np.random.Generator, image_size: int) -> np.ndarray:
  """A new image: uint8 [height, width, 3], a plain greyish background, each side 0.8-1.2 x image_size."""
  height = int(round(image_size * rng.uniform(0.8, 1.2)))
  width = int(round(image_size * rng.uniform(0.8, 1.2)))
  grey = int(rng.integers(195, 236))
  background = np.array([grey, grey - int(rng.integers(0, 12)), grey - int(rng.integers(0, 20))], np.uint8)
  return np.broadcast_to(background, (height, width, 3)).copy()


def _place(rng: np.random.Generator, image_id: int, cls: str, pixels: np.ndarray,
           boxes: list[tuple[float, float, float, float]], color_name: str | None = None) -> Instance | None:
  """Draws one ``cls`` object where it overlaps none of ``boxes`` (None after 30 failed tries).

  ``color_name`` None draws a colour (after the shape, the order the standard benchmark's bytes depend on).
  """
  height, width = pixels.shape[:2]
  lo = 0.16 * min(height, width)
  hi = 0.32 * min(height, width)
  for _ in range(30):
    s = float(rng.uniform(max(lo, 13.0), max(hi, 14.0)))
    x = float(rng.uniform(1, width - s - 2))
    y = float(rng.uniform(1, height - s - 2))
    if all(x + s + 2 < bx or bx + bs + 2 < x or y + s + 2 < by or by + bs + 2 < y
           for bx, by, bs, _ in boxes):
      break
  else:
    return None
  boxes.append((x, y, s, s))
  body, part_polys = _shape(cls, x, y, s, rng)
  polygons = body + [p for _, p in part_polys]
  mask = _rasterize(polygons, height, width)
  if color_name is None:
    color_name = str(rng.choice(list(COLORS)))
  number = 0  # set by _finish, once every instance is placed
  parts = []
  for k, (name, poly) in enumerate(part_polys):
    part_color = COLORS[color_name] if name == "handle" else PART_COLORS[name]
    parts.append(Part(name, k + 1, [poly], _rasterize([poly], height, width), part_color))
  if not mask.any() or any(not p.mask.any() for p in parts):
    raise AssertionError(f"image {image_id}: empty mask for {cls}")  # a generator bug, not bad input
  inst = Instance(cls, color_name, number, polygons, mask, _bbox(mask), parts)
  pixels[mask] = inst.color
  for part in parts:
    pixels[part.mask] = part.color
  return inst


def _finish(image_id: int, pixels: np.ndarray, instances: list[Instance]) -> SceneImage:
  """The image with its instances sorted left to right and numbered per class."""
  instances.sort(key=lambda i: i.center)
  for inst in instances:
    inst.number = 1 + sum(other.cls == inst.cls for other in instances if other.number)
  return SceneImage(image_id, pixels.shape[0], pixels.shape[1], pixels, instances)


def _draw_image(rng: np.random.Generator, image_id: int, image_size: int, forced: list[str]) -> SceneImage:
  """Draws one image with 1..MAX_OBJECTS non-overlapping objects (``forced`` classes first)."""
  pixels = _canvas(rng, image_size)
  n = int(rng.integers(1, MAX_OBJECTS + 1))
  classes = list(forced) + [str(c) for c in rng.choice(list(CLASSES), size=max(0, n - len(forced)))]
  boxes: list[tuple[float, float, float, float]] = []
  instances = [inst for cls in classes if (inst := _place(rng, image_id, cls, pixels, boxes)) is not None]
  if not instances:  # cannot happen with these sizes; keep the invariant explicit
    raise AssertionError(f"image {image_id}: no object placed")
  return _finish(image_id, pixels, instances)


def _draw_scene(rng: np.random.Generator, next_image_id: int, image_size: int) -> list[SceneImage]:
  n_images = int(rng.integers(MIN_IMAGES, MAX_IMAGES + 1))
  common = [str(rng.choice(list(CLASSES)))] if rng.random() < 0.4 else []
  return [_draw_image(rng, next_image_id + k, image_size, common) for k in range(n_images)]


# ----------------------------------------------------------------------------------------------------
# Answers with tags and groundings


def _image_code(image_index: int) -> str:
  """The image digits of a tag for 0-based ``image_index``: X for images 1-9 (the original's one digit),
  XX for 10-99 (read as tags in records of 10 or more images)."""
  if not 0 <= image_index < 99:
    raise ValueError(f"tags name images 1..99, not {image_index + 1}")
  return str(image_index + 1) if image_index < 9 else f"{image_index + 1:02d}"


def object_tag(inst: Instance, image_index: int) -> str:
  """``{class}_{X}{YY}`` (``{class}_{XX}{YY}`` from image 10) for 0-based ``image_index``."""
  return f"{inst.cls}_{_image_code(image_index)}{inst.number:02d}"


def part_tag(inst: Instance, part: Part, image_index: int) -> str:
  """``{part}_{X}{YY}{ZZ}`` (``{part}_{XX}{YY}{ZZ}`` from image 10) for 0-based ``image_index``."""
  return f"{part.name}_{_image_code(image_index)}{inst.number:02d}{part.number:02d}"


def tag_pattern(num_images: int) -> re.Pattern:
  """The tag pattern of a record of ``num_images`` images (two-digit image indices from 10 images)."""
  return WIDE_TAG_PATTERN if num_images >= WIDE_TAGS_FROM else TAG_PATTERN


def parse_tag(tag: str, num_images: int = 1) -> tuple[str, int, int, int | None]:
  """``(name, image index 1-based, instance, part or None)`` of a tag in a record of ``num_images`` images:
  the original loader's rule, with two-digit image indices (4 and 6 digits) from 10 images."""
  if not tag_pattern(num_images).fullmatch(tag):
    raise ValueError(f"not an instance tag: {tag!r}")
  name, code = tag.rsplit("_", 1)
  x = 2 if len(code) in (4, 6) else 1
  return name, int(code[:x]), int(code[x:x + 2]), (int(code[x + 2:]) if len(code) > x + 2 else None)


class _Answer:
  """Collects the mentions of an answer in order; ``obj``/``part`` return the tag to write."""

  def __init__(self):
    self.mentions: list[tuple[int, Instance, Part | None]] = []
    self._seen: set[str] = set()
    self.repeated = 0

  def obj(self, k: int, inst: Instance) -> str:
    return self._mention(k, inst, None)

  def part(self, k: int, inst: Instance, part: Part) -> str:
    return self._mention(k, inst, part)

  def _mention(self, k: int, inst: Instance, part: Part | None) -> str:
    tag = part_tag(inst, part, k) if part is not None else object_tag(inst, k)
    if tag in self._seen:
      self.repeated += 1
    else:
      self._seen.add(tag)
      self.mentions.append((k, inst, part))
    return tag


def _encode(mask: np.ndarray, polygons: list[list[float]], kind: str) -> dict | list:
  if kind == "polygon":
    return [list(p) for p in polygons]
  fortran = np.asfortranarray(mask.astype(np.uint8))
  if kind == "compressed_rle":
    rle = mask_utils.encode(fortran)
    return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}
  flat = fortran.reshape(-1, order="F")
  change = np.flatnonzero(np.diff(flat)) + 1
  bounds = np.concatenate([[0], change, [flat.size]])
  counts = np.diff(bounds).tolist()
  if flat[0]:
    counts = [0] + counts
  return {"size": [int(mask.shape[0]), int(mask.shape[1])], "counts": [int(c) for c in counts]}


def _groundings(ans: _Answer, n_images: int, encodings: list[str]) -> dict:
  out: dict[str, list] = {f"img_{k + 1}": [] for k in range(n_images)}
  for (k, inst, part), kind in zip(ans.mentions, encodings, strict=True):
    if part is None:
      out[f"img_{k + 1}"].append({"segmentation": _encode(inst.mask, inst.polygons, kind), "name": inst.cls})
    else:
      out[f"img_{k + 1}"].append({"segmentation": _encode(part.mask, part.polygons, kind), "name": part.name,
                                  "obj_ann_id": inst.ann_id})
  return out


# ----------------------------------------------------------------------------------------------------
# Question templates. Each takes (scene, rng, answer) and returns (question, answer text, evidence image
# indices) or None when it does not apply. The evidence set is what one must look at to answer.


Scene = list[SceneImage]
Result = tuple[str, str, frozenset[int]] | None


def _ref(k: int, rng: np.random.Generator | None = None) -> str:
  if rng is not None and rng.random() < 0.4:
    return f"the {ORDINALS[k]} image"
  return f"Image {k + 1}"


def _cap(text: str) -> str:
  return text[:1].upper() + text[1:]


def _join(items: list[str]) -> str:
  if len(items) <= 2:
    return " and ".join(items)
  return ", ".join(items[:-1]) + ", and " + items[-1]


def _article(word: str) -> str:
  return "an" if word[0] in "aeiou" else "a"


def _pick(rng: np.random.Generator, seq):
  return seq[int(rng.integers(len(seq)))]


def _with_prop(scene: Scene, prop: str) -> list[list[Instance]]:
  classes = PROPERTIES[prop][2]
  return [[i for i in img.instances if i.cls in classes] for img in scene]


def _unique_desc(img: SceneImage, inst: Instance) -> bool:
  return sum(i.cls == inst.cls and i.color_name == inst.color_name for i in img.instances) == 1


def _objs(ans: _Answer, k: int, insts: list[Instance], color: bool = True) -> str:
  return _join([f"the {i.color_name} {ans.obj(k, i)}" if color else f"the {ans.obj(k, i)}" for i in insts])


def _t_f_all(scene: Scene, rng, ans: _Answer) -> Result:
  props = [p for p in PROPERTIES if any(_with_prop(scene, p))]
  if not props:
    return None
  prop = _pick(rng, props)
  qp, ap, _ = PROPERTIES[prop]
  per = _with_prop(scene, prop)
  groups = [f"in {_ref(k)}, {_objs(ans, k, insts)}" for k, insts in enumerate(per) if insts]
  text = TEXT["f_all_a"][0].format(ans=ap, groups="; ".join(groups))
  for k, insts in enumerate(per):
    if not insts:
      text += TEXT["f_all_a"][1].format(ref=_ref(k), ans=ap)
  q = _pick(rng, TEXT["f_all_q"]).format(prop=qp)
  return q, text, frozenset(range(len(scene)))


def _pair(scene: Scene, rng) -> tuple[int, int]:
  a, b = sorted(int(v) for v in rng.choice(len(scene), size=2, replace=False))
  return a, b


def _t_f_cmp(scene: Scene, rng, ans: _Answer) -> Result:
  a, b = _pair(scene, rng)
  props = [p for p in PROPERTIES if _with_prop(scene, p)[a] or _with_prop(scene, p)[b]]
  if not props:
    return None
  prop = _pick(rng, props)
  ap = PROPERTIES[prop][1]
  per = _with_prop(scene, prop)
  q = TEXT["f_cmp_q"][0].format(ans=ap, ref_a=_ref(a, rng), ref_b=_ref(b, rng))
  if per[a] and per[b]:
    text = TEXT["f_cmp_a"][0].format(objs_a=_objs(ans, a, per[a]), ref_a=_ref(a),
                                     objs_b=_objs(ans, b, per[b]), ref_b=_ref(b), ans=ap)
  else:
    k, other = (a, b) if per[a] else (b, a)
    text = TEXT["f_cmp_a"][1].format(ref=_ref(k), objs=_objs(ans, k, per[k]), ans=ap, ref_other=_ref(other))
  return q, text, frozenset({a, b})


def _t_f_one(scene: Scene, rng, ans: _Answer) -> Result:
  options = [(k, p) for p in PROPERTIES for k, insts in enumerate(_with_prop(scene, p)) if insts]
  if not options:
    return None
  k, prop = _pick(rng, options)
  qp, ap, _ = PROPERTIES[prop]
  q = TEXT["f_one_q"][0].format(ref=_ref(k, rng), prop=qp)
  text = TEXT["f_one_a"][0].format(objs=_cap(_objs(ans, k, _with_prop(scene, prop)[k])), ans=ap)
  return q, text, frozenset({k})


def _t_f_part(scene: Scene, rng, ans: _Answer) -> Result:
  options = [(k, i) for k, img in enumerate(scene) for i in img.instances if i.parts and _unique_desc(img, i)]
  if not options:
    return None
  k, inst = _pick(rng, options)
  part = inst.parts[0]
  use, template = PART_USES[part.name]
  q = TEXT["f_part_q"][0].format(ref=_ref(k, rng), use=use, color=inst.color_name,
                                 display=CLASSES[inst.cls][0])
  part_text = ans.part(k, inst, part)
  text = template.format(part=part_text, color=inst.color_name, obj=ans.obj(k, inst), obj2=ans.obj(k, inst))
  return q, text, frozenset({k})


def _t_s_ext(scene: Scene, rng, ans: _Answer) -> Result:
  options = []
  for k, img in enumerate(scene):
    if len(img.instances) < 2:
      continue
    for side in EXTREMES:
      axis = 0 if side in ("left", "right") else 1
      sign = -1 if side in ("left", "top") else 1
      keyed = sorted(img.instances, key=lambda i, a=axis, s=sign: -s * i.center[a])
      if abs(keyed[0].center[axis] - keyed[1].center[axis]) >= 3:
        options.append((k, side, keyed[0]))
  if not options:
    return None
  k, side, inst = _pick(rng, options)
  q = _pick(rng, TEXT["s_ext_q"]).format(extreme=EXTREMES[side], side=side, ref=_ref(k, rng))
  text = TEXT["s_ext_a"][0].format(color=inst.color_name, obj=ans.obj(k, inst), extreme=EXTREMES[side],
                                   ref=_ref(k))
  return q, text, frozenset({k})


def _t_s_next(scene: Scene, rng, ans: _Answer) -> Result:
  options = []
  for k, img in enumerate(scene):
    for ref in img.instances:
      if not _unique_desc(img, ref):
        continue
      for side, sign in (("right", 1), ("left", -1)):
        beyond = [i for i in img.instances if sign * (i.center[0] - ref.center[0]) >= 3]
        if not beyond:
          continue
        dist = sorted(abs(i.center[0] - ref.center[0]) for i in beyond)
        if len(dist) > 1 and dist[1] - dist[0] < 2:
          continue
        nearest = min(beyond, key=lambda i, r=ref: abs(i.center[0] - r.center[0]))
        options.append((k, ref, side, nearest))
  if not options:
    return None
  k, ref, side, other = _pick(rng, options)
  q = TEXT["s_next_q"][0].format(side=side, color=ref.color_name, display=CLASSES[ref.cls][0],
                                 ref=_ref(k, rng))
  obj2 = ans.obj(k, other)
  obj = ans.obj(k, ref)
  text = TEXT["s_next_a"][0].format(color2=other.color_name, obj2=obj2, side=side, color=ref.color_name,
                                    obj=obj, obj_again=ans.obj(k, ref),
                                    other_side="left" if side == "right" else "right")
  return q, text, frozenset({k})


def _single_of(scene: Scene, cls: str) -> dict[int, Instance]:
  """Images in which ``cls`` appears exactly once -> that instance."""
  out = {}
  for k, img in enumerate(scene):
    found = [i for i in img.instances if i.cls == cls]
    if len(found) == 1:
      out[k] = found[0]
  return out


def _t_s_side(scene: Scene, rng, ans: _Answer) -> Result:
  def side(img: SceneImage, inst: Instance) -> str | None:
    d = inst.center[0] - img.width / 2
    return None if abs(d) < 4 else ("left" if d < 0 else "right")

  options = []
  for cls in CLASSES:
    single = _single_of(scene, cls)
    ks = [k for k, i in single.items() if side(scene[k], i)]
    options += [(cls, a, b, single) for a in ks for b in ks if a < b]
  if not options:
    return None
  cls, a, b, single = _pick(rng, options)
  sa, sb = side(scene[a], single[a]), side(scene[b], single[b])
  q = TEXT["s_side_q"][0].format(display=CLASSES[cls][0], ref_a=_ref(a, rng), ref_b=_ref(b, rng))
  text = TEXT["s_side_a"][0].format(yes_no="Yes" if sa == sb else "No", obj_a=ans.obj(a, single[a]),
                                    side_a=sa, ref_a=_ref(a), obj_b=ans.obj(b, single[b]), side_b=sb,
                                    ref_b=_ref(b))
  return q, text, frozenset({a, b})


def _t_s_high(scene: Scene, rng, ans: _Answer) -> Result:
  options = []
  for cls in CLASSES:
    # Only when every image showing the class shows exactly one, so "the {class}" is unambiguous per image.
    shown = [k for k, img in enumerate(scene) if any(i.cls == cls for i in img.instances)]
    single = _single_of(scene, cls)
    if len(shown) < 2 or len(single) != len(shown):
      continue
    rel = sorted((single[k].center[1] / scene[k].height, k) for k in shown)
    if rel[1][0] - rel[0][0] >= 0.06:
      options.append((cls, rel[0][1], [k for _, k in rel[1:]], single))
  if not options:
    return None
  cls, top, rest, single = _pick(rng, options)
  q = TEXT["s_high_q"][0].format(display=CLASSES[cls][0])
  obj = ans.obj(top, single[top])
  others = _join([TEXT["s_high_a"][1].format(obj=ans.obj(k, single[k]), ref=_ref(k)) for k in sorted(rest)])
  text = TEXT["s_high_a"][0].format(ref=_ref(top), obj=obj, others=others)
  return q, text, frozenset([top, *rest])


def _t_n_more(scene: Scene, rng, ans: _Answer) -> Result:
  a, b = _pair(scene, rng)
  colors = [c for c in COLORS if sum(i.color_name == c for i in scene[a].instances)
            != sum(i.color_name == c for i in scene[b].instances)]
  if not colors:
    return None
  color = _pick(rng, colors)
  have = {k: [i for i in scene[k].instances if i.color_name == color] for k in (a, b)}
  more, less = (a, b) if len(have[a]) > len(have[b]) else (b, a)
  q = TEXT["n_more_q"][0].format(color=color, ref_a=_ref(a, rng), ref_b=_ref(b, rng))
  objs = _objs(ans, more, have[more], color=False)
  if have[less]:
    text = TEXT["n_more_a"][0].format(ref=_ref(more), color=color, n=len(have[more]), objs=objs,
                                      ref_other=_ref(less), m=len(have[less]),
                                      objs_other=_objs(ans, less, have[less], color=False))
  else:
    text = TEXT["n_more_a"][1].format(ref=_ref(more), color=color, n=len(have[more]), objs=objs,
                                      ref_other=_ref(less))
  return q, text, frozenset({a, b})


def _t_n_total(scene: Scene, rng, ans: _Answer) -> Result:
  present = [c for c in CLASSES if any(i.cls == c for img in scene for i in img.instances)]
  cls = _pick(rng, present)
  display, plural, _ = CLASSES[cls]
  per = [[i for i in img.instances if i.cls == cls] for img in scene]
  n = sum(map(len, per))
  groups = _join([TEXT["n_total_a"][2].format(objs=_objs(ans, k, insts, color=False), ref=_ref(k))
                  for k, insts in enumerate(per) if insts])
  q = TEXT["n_total_q"][0].format(plural=plural)
  if n == 1:
    text = TEXT["n_total_a"][1].format(display=display, groups=groups)
  else:
    text = TEXT["n_total_a"][0].format(n=n, plural=plural, groups=groups)
  return q, text, frozenset(range(len(scene)))


def _t_n_count(scene: Scene, rng, ans: _Answer) -> Result:
  k = int(rng.integers(len(scene)))
  insts = scene[k].instances
  i = 0 if len(insts) > 1 else 1
  q = TEXT["n_count_q"][0].format(ref=_ref(k, rng))
  text = TEXT["n_count_a"][i].format(n=len(insts), ref=_ref(k), objs=_objs(ans, k, insts))
  return q, text, frozenset({k})


def _t_n_most(scene: Scene, rng, ans: _Answer) -> Result:
  counts = sorted(((len(img.instances), k) for k, img in enumerate(scene)), reverse=True)
  if counts[0][0] == counts[1][0]:
    return None
  n, k = counts[0]
  q = TEXT["n_most_q"][0]
  text = TEXT["n_most_a"][0].format(ref=_ref(k), n=n, objs=_objs(ans, k, scene[k].instances))
  return q, text, frozenset(range(len(scene)))


def _t_o_every(scene: Scene, rng, ans: _Answer) -> Result:
  common = [c for c in CLASSES if all(any(i.cls == c for i in img.instances) for img in scene)]
  if not common:
    return None
  groups = []
  for k, img in enumerate(scene):
    insts = [i for c in common for i in img.instances if i.cls == c]
    groups.append(TEXT["n_total_a"][2].format(objs=_objs(ans, k, insts), ref=_ref(k)))
  displays = _join([CLASSES[c][0] for c in common])
  verb = TEXT["o_every_a"][1] if len(common) == 1 else TEXT["o_every_a"][2]
  text = TEXT["o_every_a"][0].format(displays=displays, verb=verb, groups="; ".join(groups))
  return TEXT["o_every_q"][0], text, frozenset(range(len(scene)))


def _t_o_diff(scene: Scene, rng, ans: _Answer) -> Result:
  a, b = _pair(scene, rng)
  if rng.random() < 0.5:
    a, b = b, a
  missing = [c for c in CLASSES if any(i.cls == c for i in scene[a].instances)
             and not any(i.cls == c for i in scene[b].instances)]
  if not missing:
    return None
  insts = [i for i in scene[a].instances if i.cls in missing]
  q = TEXT["o_diff_q"][0].format(ref_a=_ref(a, rng), ref_b=_ref(b, rng))
  displays = " and no ".join(CLASSES[c][0] for c in missing)
  text = TEXT["o_diff_a"][0].format(ref_a=_ref(a), objs=_objs(ans, a, insts), ref_b=_ref(b),
                                    displays=displays)
  return q, text, frozenset({a, b})


def _t_o_desc(scene: Scene, rng, ans: _Answer) -> Result:
  k = int(rng.integers(len(scene)))
  img = scene[k]
  items = []
  for inst in img.instances:
    cx, cy = inst.center
    item = TEXT["o_desc_a"][1].format(article=_article(inst.color_name), color=inst.color_name,
                                      obj=ans.obj(k, inst), vert="top" if cy < img.height / 2 else "bottom",
                                      horiz="left" if cx < img.width / 2 else "right")
    for part in inst.parts:
      item += TEXT["o_desc_a"][2].format(part=ans.part(k, inst, part))
    items.append(item)
  q = _pick(rng, TEXT["o_desc_q"]).format(ref=_ref(k, rng))
  return q, TEXT["o_desc_a"][0].format(ref=_ref(k), items=_join(items)), frozenset({k})


def _t_o_images(scene: Scene, rng, ans: _Answer) -> Result:
  """Every object (colour and name) of the scene's images, or of a random subset of them in order when
  they show more than ``DESCRIBE_MAX_GROUNDINGS`` objects together."""
  chosen, total = [], 0
  for k in rng.permutation(len(scene)):
    n = len(scene[int(k)].instances)
    if total + n <= DESCRIBE_MAX_GROUNDINGS:
      chosen.append(int(k))
      total += n
  chosen.sort()
  if len(chosen) == len(scene):
    q = TEXT["o_images_q"][0]
  else:
    q = TEXT["o_images_q"][1].format(refs=_join([_ref(k) for k in chosen]))
  groups = [TEXT["o_images_a"][0].format(ref=_ref(k), objs=_objs(ans, k, scene[k].instances)) for k in chosen]
  return q, _cap("; ".join(groups)) + ".", frozenset(chosen)


def _t_o_parts(scene: Scene, rng, ans: _Answer) -> Result:
  present = sorted({p.name for img in scene for i in img.instances for p in i.parts})
  if not present:
    return None
  name = _pick(rng, present)
  items = [TEXT["o_parts_a"][0].format(obj=ans.obj(k, i), ref=_ref(k), part=ans.part(k, i, p))
           for k, img in enumerate(scene) for i in img.instances for p in i.parts if p.name == name]
  q = TEXT["o_parts_q"][0].format(part=name)
  return q, _cap(_join(items)) + ".", frozenset(range(len(scene)))


# name -> (category, function, is a multi-image template)
TEMPLATES: dict[str, tuple[str, Callable[..., Result], bool]] = {
  "functional/all_images": ("functional", _t_f_all, True),
  "functional/compare": ("functional", _t_f_cmp, True),
  "functional/one_image": ("functional", _t_f_one, False),
  "functional/part_use": ("functional", _t_f_part, False),
  "spatial/extreme": ("spatial", _t_s_ext, False),
  "spatial/nearest": ("spatial", _t_s_next, False),
  "spatial/same_side": ("spatial", _t_s_side, True),
  "spatial/highest": ("spatial", _t_s_high, True),
  "numerical/more_of_colour": ("numerical", _t_n_more, True),
  "numerical/total": ("numerical", _t_n_total, True),
  "numerical/count": ("numerical", _t_n_count, False),
  "numerical/most": ("numerical", _t_n_most, True),
  "open-ended/in_every_image": ("open-ended", _t_o_every, True),
  "open-ended/difference": ("open-ended", _t_o_diff, True),
  "open-ended/describe": ("open-ended", _t_o_desc, False),
  "open-ended/parts": ("open-ended", _t_o_parts, True),
}
P_MULTI = 0.7  # probability of trying a multi-image template first
# Not asked by :func:`_ask`: the train split's extra "Describe these images." records (``describe_train``),
# which teach a model to read every image's objects (colour, class, left-to-right number) by image.
DESCRIBE_TEMPLATE = "open-ended/describe_images"
DESCRIBE_TEMPLATES = {DESCRIBE_TEMPLATE: ("open-ended", _t_o_images, True)}
DESCRIBE_MAX_GROUNDINGS = 8   # objects named per extra record (the demo's model.prima.max_masks)
DESCRIBE_STREAM = 1           # its random stream's key: the other records keep their bytes


@dataclasses.dataclass(frozen=True)
class QuestionMeta:
  """Generator-side facts about one record (not written to the record)."""
  template: str
  category: str
  evidence: frozenset[int]  # 0-based images one must look at to answer
  repeated_mentions: int
  encodings: tuple[str, ...]  # segmentation encoding of each grounding, in mention order

  @property
  def needs_multi(self) -> bool:
    return len(self.evidence) > 1


def _ask(scene: Scene, rng: np.random.Generator, avoid: set[str]):
  """Picks a category, then a template in it (multi-image first with P_MULTI); falls back over categories."""
  cats = list(CATEGORIES)
  first = _pick(rng, cats)
  order = [first] + [c for c in cats if c != first]
  multi_first = rng.random() < P_MULTI
  for cat in order:
    names = [n for n, (c, _, _) in TEMPLATES.items() if c == cat and n not in avoid]
    multi = [n for n in names if TEMPLATES[n][2]]
    single = [n for n in names if not TEMPLATES[n][2]]
    rng.shuffle(multi)
    rng.shuffle(single)
    for name in (multi + single) if multi_first else (single + multi):
      ans = _Answer()
      result = TEMPLATES[name][1](scene, rng, ans)
      if result is not None:
        return name, result, ans
  raise AssertionError("no template applies")  # numerical/count always applies


# ----------------------------------------------------------------------------------------------------
# The many-image variant: 8-64 sparse images per question, questions that search all of them


def _random_objects(rng: np.random.Generator, count: int, allowed: Callable[[str, str], bool]
                    ) -> list[tuple[str, str]]:
  """``count`` random (class, colour) pairs for which ``allowed(class, colour)`` holds."""
  out = []
  while len(out) < count:
    cls, color = str(_pick(rng, list(CLASSES))), str(_pick(rng, list(COLORS)))
    if allowed(cls, color):
      out.append((cls, color))
  return out


def _extras(rng: np.random.Generator, forced: int) -> int:
  """Random objects to add to an image holding ``forced`` planted ones: 0-2 objects in all."""
  total = int(rng.choice(3, p=MANY_OBJECTS_P))
  return max(0, total - forced) if forced < 2 else 0


def _far_pair(rng: np.random.Generator, n: int) -> tuple[int, int]:
  """Two 0-based images at least half the scene apart, a < b."""
  gap = max(1, n // 2)
  a = int(rng.integers(0, n - gap))
  return a, int(rng.integers(a + gap, n))


def _plan(rng: np.random.Generator, kind: str, n: int) -> tuple[object, list[list[tuple[str, str]]]]:
  """(focus, objects per image) of a scene drawn for a question of ``kind`` about ``focus``: the focus
  is planted where the question needs it and kept out of every other image."""
  specs: list[list[tuple[str, str]]] = [[] for _ in range(n)]
  if kind in ("open-ended/find", "spatial/same_side_far"):
    cls, color = str(_pick(rng, list(CLASSES))), str(_pick(rng, list(COLORS)))
    focus = (cls, color)
    other = lambda c, col: (c, col) != focus
    if kind == "open-ended/find":
      k = int(rng.integers(MANY_FIND_IMAGES[0], min(MANY_FIND_IMAGES[1], n) + 1))
      targets = {int(t) for t in rng.choice(n, size=k, replace=False)}
    else:
      targets = set(_far_pair(rng, n))
      focus = (cls, color, *sorted(targets))
    for i in range(n):
      specs[i] = [(cls, color)] if i in targets else []
      specs[i] += _random_objects(rng, _extras(rng, len(specs[i])), other)
    return focus, specs
  if kind == "functional/find":
    prop = str(_pick(rng, list(PROPERTIES)))
    having = sorted(PROPERTIES[prop][2])
    k = int(rng.integers(MANY_FIND_IMAGES[0], min(MANY_FIND_IMAGES[1], n) + 1))
    targets = {int(t) for t in rng.choice(n, size=k, replace=False)}
    for i in range(n):
      specs[i] = [(str(_pick(rng, having)), str(_pick(rng, list(COLORS))))] if i in targets else []
      specs[i] += _random_objects(rng, _extras(rng, len(specs[i])), lambda c, col: c not in having)
    return prop, specs
  if kind == "numerical/count_all":
    cls = str(_pick(rng, list(CLASSES)))
    per = [0] * n
    for _ in range(int(rng.integers(1, min(MANY_MAX_GROUNDINGS, 2 * n) + 1))):
      free = [i for i in range(n) if per[i] < 2]
      per[int(_pick(rng, free))] += 1
    for i in range(n):
      specs[i] = [(cls, str(_pick(rng, list(COLORS)))) for _ in range(per[i])]
      specs[i] += _random_objects(rng, _extras(rng, per[i]), lambda c, col: c != cls)
    return cls, specs
  if kind == "numerical/compare_far":
    cls = str(_pick(rng, list(CLASSES)))
    a, b = _far_pair(rng, n)
    counts = [int(c) for c in rng.choice(3, size=2, replace=False)]
    for i in range(n):
      if i in (a, b):
        c = counts[0] if i == a else counts[1]
        specs[i] = [(cls, str(_pick(rng, list(COLORS)))) for _ in range(c)]
        specs[i] += _random_objects(rng, _extras(rng, c), lambda c_, col: c_ != cls)
      else:
        specs[i] = _random_objects(rng, _extras(rng, 0), lambda c_, col: True)
    return (cls, a, b), specs
  raise ValueError(f"unknown many-image question kind {kind!r}")


def _draw_sparse_image(rng: np.random.Generator, image_id: int, image_size: int,
                       objects: list[tuple[str, str]]) -> SceneImage:
  """One image holding ``objects`` ((class, colour) pairs; possibly none), non-overlapping."""
  pixels = _canvas(rng, image_size)
  boxes: list[tuple[float, float, float, float]] = []
  instances = [inst for cls, color in objects
               if (inst := _place(rng, image_id, cls, pixels, boxes, color)) is not None]
  return _finish(image_id, pixels, instances)


def _groups(ans: _Answer, per: list[list[Instance]], color: bool = False) -> str:
  """``the cone_301 in Image 3 and the cone_4101 in Image 41`` over the images holding instances."""
  return _join([TEXT["n_total_a"][2].format(objs=_objs(ans, k, insts, color=color), ref=_ref(k))
                for k, insts in enumerate(per) if insts])


def _few(per: list[list[Instance]]) -> bool:
  """Instances in 1..MANY_FIND_IMAGES[1] images and at most MANY_MAX_GROUNDINGS in all."""
  images = sum(bool(p) for p in per)
  return 1 <= images <= MANY_FIND_IMAGES[1] and sum(map(len, per)) <= MANY_MAX_GROUNDINGS


def _m_find(scene: Scene, rng, ans: _Answer, focus) -> Result:
  """open-ended: the few images that show a (class, colour), each instance grounded."""
  def per_of(cls, color):
    return [[i for i in img.instances if (i.cls, i.color_name) == (cls, color)] for img in scene]

  options = [f for f in ([focus] if focus else [(c, col) for c in CLASSES for col in COLORS])
             if _few(per_of(*f))]
  if not options:
    return None
  cls, color = _pick(rng, options)
  per = per_of(cls, color)
  display = CLASSES[cls][0]
  shown = [k for k, insts in enumerate(per) if insts]
  q = _pick(rng, TEXT["m_find_q"]).format(article=_article(color), color=color, display=display)
  if len(shown) == 1:
    text = TEXT["m_find_a"][1].format(ref=_ref(shown[0]), article=_article(color), color=color,
                                      display=display, objs=_objs(ans, shown[0], per[shown[0]], color=False))
  else:
    text = TEXT["m_find_a"][0].format(refs=_join([_ref(k) for k in shown]), article=_article(color),
                                      color=color, display=display, groups=_groups(ans, per))
  return q, text, frozenset(range(len(scene)))


def _m_use(scene: Scene, rng, ans: _Answer, focus) -> Result:
  """functional: the few images that show something with a property, each such object grounded."""
  options = [p for p in ([focus] if focus else PROPERTIES) if _few(_with_prop(scene, p))]
  if not options:
    return None
  prop = _pick(rng, options)
  ap = PROPERTIES[prop][1]
  per = _with_prop(scene, prop)
  shown = [k for k, insts in enumerate(per) if insts]
  if len(shown) == 1:
    text = TEXT["m_use_a"][1].format(ref=_ref(shown[0]), ans=ap, objs=_objs(ans, shown[0], per[shown[0]]))
  else:
    text = TEXT["m_use_a"][0].format(refs=_join([_ref(k) for k in shown]), ans=ap,
                                     groups=_groups(ans, per, color=True))
  return TEXT["m_use_q"][0].format(ans=ap), text, frozenset(range(len(scene)))


def _m_count(scene: Scene, rng, ans: _Answer, focus) -> Result:
  """numerical: how many of a rare class across all images, each instance grounded."""
  def per_of(cls):
    return [[i for i in img.instances if i.cls == cls] for img in scene]

  options = [c for c in ([focus] if focus else CLASSES)
             if 1 <= sum(map(len, per_of(c))) <= MANY_MAX_GROUNDINGS]
  if not options:
    return None
  cls = _pick(rng, options)
  display, plural, _ = CLASSES[cls]
  per = per_of(cls)
  n = sum(map(len, per))
  q = _pick(rng, TEXT["m_count_q"]).format(plural=plural)
  if n == 1:
    text = TEXT["n_total_a"][1].format(display=display, groups=_groups(ans, per))
  else:
    text = TEXT["n_total_a"][0].format(n=n, plural=plural, groups=_groups(ans, per))
  return q, text, frozenset(range(len(scene)))


def _m_more(scene: Scene, rng, ans: _Answer, focus) -> Result:
  """numerical: which of two far-apart images holds more of a class; both images' instances grounded."""
  def have(k, cls):
    return [i for i in scene[k].instances if i.cls == cls]

  n = len(scene)
  candidates = [focus] if focus else [(c, a, b) for a in range(n) for b in range(a + max(1, n // 2), n)
                                      for c in CLASSES]
  options = [(c, a, b) for c, a, b in candidates if len(have(a, c)) != len(have(b, c))]
  if not options:
    return None
  cls, a, b = _pick(rng, options)
  plural = CLASSES[cls][1]
  more, less = (a, b) if len(have(a, cls)) > len(have(b, cls)) else (b, a)
  first, second = (a, b) if rng.random() < 0.5 else (b, a)
  q = TEXT["m_more_q"][0].format(plural=plural, ref_a=_ref(first), ref_b=_ref(second))
  objs = _objs(ans, more, have(more, cls), color=False)
  if have(less, cls):
    text = TEXT["m_more_a"][0].format(ref=_ref(more), plural=plural, n=len(have(more, cls)), objs=objs,
                                      ref_other=_ref(less), m=len(have(less, cls)),
                                      objs_other=_objs(ans, less, have(less, cls), color=False))
  else:
    text = TEXT["m_more_a"][1].format(ref=_ref(more), plural=plural, n=len(have(more, cls)), objs=objs,
                                      ref_other=_ref(less))
  return q, text, frozenset({a, b})


def _m_side(scene: Scene, rng, ans: _Answer, focus) -> Result:
  """spatial: is a (class, colour), once in each of two far-apart images, on the same side in both."""
  def single(k, cls, color):
    found = [i for i in scene[k].instances if (i.cls, i.color_name) == (cls, color)]
    return found[0] if len(found) == 1 else None

  def side(k, inst):
    d = inst.center[0] - scene[k].width / 2
    return None if abs(d) < 4 else ("left" if d < 0 else "right")

  def ok(cls, color, a, b):
    return all((i := single(k, cls, color)) is not None and side(k, i) for k in (a, b))

  n = len(scene)
  candidates = [focus] if focus else [(c, col, a, b) for a in range(n) for b in range(a + max(1, n // 2), n)
                                      for c in CLASSES for col in COLORS]
  options = [f for f in candidates if ok(*f)]
  if not options:
    return None
  cls, color, a, b = _pick(rng, options)
  ia, ib = single(a, cls, color), single(b, cls, color)
  sa, sb = side(a, ia), side(b, ib)
  q = TEXT["m_side_q"][0].format(color=color, display=CLASSES[cls][0], ref_a=_ref(a), ref_b=_ref(b))
  text = TEXT["s_side_a"][0].format(yes_no="Yes" if sa == sb else "No", obj_a=ans.obj(a, ia), side_a=sa,
                                    ref_a=_ref(a), obj_b=ans.obj(b, ib), side_b=sb, ref_b=_ref(b))
  return q, text, frozenset({a, b})


# name -> (category, function(scene, rng, answer, focus or None)); the scene of a record's first question
# is planned for it (_plan), a second question searches the same scene for what it needs.
MANY_TEMPLATES: dict[str, tuple[str, Callable[..., Result]]] = {
  "open-ended/find": ("open-ended", _m_find),
  "functional/find": ("functional", _m_use),
  "numerical/count_all": ("numerical", _m_count),
  "numerical/compare_far": ("numerical", _m_more),
  "spatial/same_side_far": ("spatial", _m_side),
}


def _many_scene(rng: np.random.Generator, next_image_id: int, image_size: int, images: tuple[int, int]):
  """(scene, first question's template name, (question, answer, evidence), answer mentions)."""
  n = int(rng.integers(images[0], images[1] + 1))
  category = _pick(rng, list(CATEGORIES))
  name = _pick(rng, [t for t, (c, _) in MANY_TEMPLATES.items() if c == category])
  while True:  # a planted object that could not be placed, or a side too close to call: draw again
    focus, specs = _plan(rng, name, n)
    scene = [_draw_sparse_image(rng, next_image_id + k, image_size, objs) for k, objs in enumerate(specs)]
    ans = _Answer()
    result = MANY_TEMPLATES[name][1](scene, rng, ans, focus)
    if result is not None:
      return scene, name, result, ans


def _many_ask(scene: Scene, rng: np.random.Generator, avoid: set[str]):
  """A further question on a drawn scene: the first of the other templates (random order) that applies."""
  names = [t for t in MANY_TEMPLATES if t not in avoid]
  rng.shuffle(names)
  for name in names:
    ans = _Answer()
    result = MANY_TEMPLATES[name][1](scene, rng, ans, None)
    if result is not None:
      return name, result, ans
  return None


# ----------------------------------------------------------------------------------------------------
# Splits and files


@dataclasses.dataclass
class SplitData:
  """One generated split in memory: records (M⁴Seg format), their metas, images, COCO annotation dict."""
  split: str
  records: list[dict]
  metas: list[QuestionMeta]
  images: list[SceneImage]
  coco: dict


def _categories() -> list[dict]:
  cats = [{"id": k + 1, "name": c, "supercategory": "object"} for k, c in enumerate(CLASSES)]
  for part, owner in PART_OWNER.items():
    cats.append({"id": len(cats) + 1, "name": f"{owner}:{part}", "supercategory": "part"})
  return cats


def check_variant(variant: str, images: Sequence[int] | None = None) -> tuple[int, int]:
  """The (min, max) images per question of ``variant``; ValueError naming the bad argument.

  ``images`` is the many variant's range (default ``MANY_IMAGES``); the standard benchmark's is fixed.
  """
  if variant not in VARIANTS:
    raise ValueError(f"variant must be one of {', '.join(VARIANTS)}, got {variant!r}")
  if variant == "standard":
    if images is not None and tuple(images) != (MIN_IMAGES, MAX_IMAGES):
      raise ValueError(f"images={tuple(images)}: the standard variant always shows {MIN_IMAGES}-{MAX_IMAGES} "
                       "images; an image range needs variant='many'")
    return MIN_IMAGES, MAX_IMAGES
  bounds = MANY_IMAGES if images is None else tuple(images)
  if not (len(bounds) == 2 and all(isinstance(v, (int, np.integer)) for v in bounds)
          and 2 <= bounds[0] <= bounds[1] <= 99):
    raise ValueError(f"images={bounds}: expected (min, max) with 2 <= min <= max <= 99 "
                     "(tags name images 1..99)")
  return int(bounds[0]), int(bounds[1])


def _records_of(scene: Scene, asked: list[tuple[str, Result, _Answer]], rng: np.random.Generator,
                templates: Mapping[str, tuple]) -> tuple[list[dict], list[QuestionMeta]]:
  records, metas = [], []
  for name, (q, a, evidence), ans in asked:
    category = templates[name][0]
    encodings = [ENCODINGS[int(rng.integers(len(ENCODINGS)))] for _ in ans.mentions]
    records.append({"dataset_name": DATASET_NAME, "img_ids": [img.image_id for img in scene], "q": q,
                    "a": a, "groundings": _groundings(ans, len(scene), encodings), "category": category})
    metas.append(QuestionMeta(name, category, evidence, ans.repeated, tuple(encodings)))
  return records, metas


def iter_split(seed: int, split: str, n_examples: int, image_size: int = 96, *, variant: str = "standard",
               images: Sequence[int] | None = None, describe: float = 0.0):
  """Yields ``(scene images, annotations, records, metas)`` scene by scene; ``n_examples`` records in all
  (plus the ``describe`` extras).

  Deterministic for ``(seed, split, n_examples, image_size, variant, images, describe)``; a scene carries
  1-2 questions. Image and annotation ids of a split start at ``SPLITS.index(split) * ID_STRIDE + 1``.
  ``variant="many"`` draws scenes of ``images`` = (min, max) sparse images (default ``MANY_IMAGES``) with
  the questions of ``MANY_TEMPLATES``; the standard variant's output does not depend on this option.
  ``describe``: the probability that a (standard) scene also gets a "Describe these images." record
  (:data:`DESCRIBE_TEMPLATE`), drawn from its own stream: the other records, images and annotations are
  the same with or without.
  """
  if split not in SPLITS:
    raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
  if n_examples < 0:
    raise ValueError(f"n_examples must be >= 0, got {n_examples}")
  if not 0.0 <= describe <= 1.0 or (describe and variant != "standard"):
    raise ValueError(f"describe must be a probability in [0, 1] (standard variant only), got {describe} "
                     f"({variant})")
  lo, hi = check_variant(variant, images)
  s = SPLITS.index(split)
  entropy = [int(seed), s, int(image_size)]
  if variant == "many":  # its own stream; the standard one's seeding is what its bytes depend on
    entropy += [VARIANTS.index(variant), lo, hi]
  rng = np.random.default_rng(np.random.SeedSequence(entropy))
  describe_rng = np.random.default_rng(np.random.SeedSequence(entropy + [DESCRIBE_STREAM]))
  cat_ids = {c["name"]: c["id"] for c in _categories()}
  next_image = s * ID_STRIDE + 1
  next_ann = s * ID_STRIDE + 1
  done = 0
  while done < n_examples:
    if variant == "many":
      scene, name, result, ans = _many_scene(rng, next_image, image_size, (lo, hi))
    else:
      scene = _draw_scene(rng, next_image, image_size)
    next_image += len(scene)
    annotations = []
    for img in scene:
      for inst in img.instances:
        inst.ann_id = next_ann
        next_ann += 1
        annotations.append(_annotation(inst.ann_id, img.image_id, cat_ids[inst.cls], inst.polygons, inst.mask,
                                       inst.ann_id, inst.color))
        for part in inst.parts:
          part.ann_id = next_ann
          next_ann += 1
          annotations.append(_annotation(part.ann_id, img.image_id, cat_ids[f"{inst.cls}:{part.name}"],
                                         part.polygons, part.mask, inst.ann_id, part.color))
    if variant == "many":
      asked = [(name, result, ans)]
      if done + 1 < n_examples and rng.random() < 0.5 and (more := _many_ask(scene, rng, {name})):
        asked.append(more)
      records, metas = _records_of(scene, asked, rng, MANY_TEMPLATES)
      done += len(records)
      yield scene, annotations, records, metas
      continue
    asked_names: set[str] = set()
    records, metas = [], []
    for _ in range(1 + int(rng.random() < 0.5)):
      if done >= n_examples:
        break
      name, result, ans = _ask(scene, rng, asked_names)
      asked_names.add(name)
      recs, ms = _records_of(scene, [(name, result, ans)], rng, TEMPLATES)
      records += recs
      metas += ms
      done += 1
    if describe and describe_rng.random() < describe:
      ans = _Answer()
      result = _t_o_images(scene, describe_rng, ans)
      recs, ms = _records_of(scene, [(DESCRIBE_TEMPLATE, result, ans)], describe_rng, DESCRIBE_TEMPLATES)
      records += recs
      metas += ms
    yield scene, annotations, records, metas


def _coco(seed: int, split: str, images: list[dict], annotations: list[dict], variant: str = "standard",
          image_range: tuple[int, int] | None = None) -> dict:
  description = f"prima_jax synthetic M4Seg-format benchmark, seed {seed}, split {split}"
  if variant != "standard":  # the standard files keep their bytes
    description += f", variant {variant}, {image_range[0]}-{image_range[1]} images per question"
  return {"info": {"description": description},
          "images": images, "annotations": annotations, "categories": _categories()}


def _image_entry(img: SceneImage) -> dict:
  return {"id": img.image_id, "file_name": f"{img.image_id}.png", "height": img.height, "width": img.width}


def make_split(seed: int, split: str, n_examples: int, image_size: int = 96, *, variant: str = "standard",
               images: Sequence[int] | None = None, describe: float = 0.0) -> SplitData:
  """Generates one split in memory (holds every image: keep it small); same content as :func:`generate`."""
  image_range = check_variant(variant, images)
  records, metas, scene_images, annotations = [], [], [], []
  for scene, anns, recs, ms in iter_split(seed, split, n_examples, image_size, variant=variant,
                                          images=images, describe=describe):
    scene_images += scene
    annotations += anns
    records += recs
    metas += ms
  coco = _coco(seed, split, [_image_entry(img) for img in scene_images], annotations, variant, image_range)
  return SplitData(split, records, metas, scene_images, coco)


def _annotation(ann_id, image_id, category_id, polygons, mask, obj_ann_id, color) -> dict:
  return {"id": ann_id, "image_id": image_id, "category_id": category_id,
          "segmentation": [list(p) for p in polygons], "area": int(np.count_nonzero(mask)),
          "bbox": list(_bbox(mask)), "iscrowd": 0,
          "obj_ann_id": obj_ann_id, "color": list(color)}


def split_summary(records: list[dict], metas: list[QuestionMeta]) -> dict:
  """Counts of one split: examples, multi_image, repeated_mentions, part_groundings, categories, encodings."""
  encodings: dict[str, int] = {}
  for m in metas:
    for e in m.encodings:
      encodings[e] = encodings.get(e, 0) + 1
  return {
    "examples": len(records),
    "multi_image": sum(m.needs_multi for m in metas),
    "repeated_mentions": sum(m.repeated_mentions > 0 for m in metas),
    "part_groundings": sum("obj_ann_id" in g for r in records for gs in r["groundings"].values() for g in gs),
    "categories": {c: sum(m.category == c for m in metas) for c in CATEGORIES},
    "describe_records": sum(m.template == DESCRIBE_TEMPLATE for m in metas),
    "encodings": dict(sorted(encodings.items())),
  }


def _write_json(path: epath.Path, obj) -> None:
  text = json.dumps(obj, separators=(",", ":"), ensure_ascii=False)  # the C encoder; json.dump is pure Python
  paths.write_text_atomic(path, text)


def _png(pixels: np.ndarray) -> bytes:
  buffer = io.BytesIO()
  Image.fromarray(pixels).save(buffer, format="PNG", compress_level=1)
  return buffer.getvalue()


def generate(out_dir: str | os.PathLike, seed: int = 0, sizes: Mapping[str, int] | None = None,
             image_size: int = 96, *, variant: str = "standard", images: Sequence[int] | None = None,
             describe_train: float = 0.0, progress: bool = False) -> dict:
  """Writes the benchmark under ``out_dir`` (layout in the module docstring); returns a summary dict.

  Args:
    out_dir: root directory (``DIR``), local or an object-store URL; created if missing. Existing files of
      the same names are overwritten.
    seed: the output is byte-identical for the same ``(seed, sizes, image_size, variant, images)``.
    sizes: examples per split, e.g. ``{"train": 2400, "val": 300, "test": 300}``; a split left out is not
      written. Default ``DEFAULT_SIZES`` (``MANY_DEFAULT_SIZES`` for the many variant).
    image_size: nominal image side in pixels; each image's height and width vary in [0.8, 1.2] of it.
    variant: ``"standard"`` (2-5 images per question) or ``"many"`` (module docstring).
    images: the many variant's (min, max) images per question, within 2..99; default ``MANY_IMAGES``.
    describe_train: the probability that a train scene also gets a "Describe these images." record
      (:func:`iter_split`'s ``describe``; standard variant); the other splits never do.
    progress: show a bar (or a periodic line off a terminal) over the examples.

  Returns:
    ``{"out_dir", "seed", "image_size", "variant", "images" (min, max), "seconds", "examples_per_second",
    "splits": {split: {"examples",
    "images", "annotations", "multi_image", "repeated_mentions", "part_groundings", "categories",
    "describe_records", "encodings", "records_file", "annotation_file"}}}``.
  """
  image_range = check_variant(variant, images)
  default = MANY_DEFAULT_SIZES if variant == "many" else DEFAULT_SIZES
  sizes = dict(default if sizes is None else sizes)
  unknown = set(sizes) - set(SPLITS)
  if unknown:
    raise ValueError(f"unknown split(s) {sorted(unknown)}; expected a subset of {SPLITS}")
  if image_size < 48:
    raise ValueError(f"image_size must be >= 48, got {image_size}")
  t0 = time.perf_counter()
  out = paths.resolve(out_dir, what="out_dir")
  image_dir = out / DATASET_NAME / "images"
  ann_dir = out / DATASET_NAME / "annotations"
  rec_dir = out / "Part_Segm"
  for d in (image_dir, ann_dir, rec_dir):
    d.mkdir(parents=True, exist_ok=True)
  summary = {"out_dir": str(out), "seed": seed, "image_size": image_size, "variant": variant,
             "images": image_range, "splits": {}}
  total = 0
  bar = Progress(sum(int(sizes[s]) for s in SPLITS if s in sizes), "examples", desc="synthetic benchmark",
                 enabled=progress)
  for split in SPLITS:
    if split not in sizes:
      continue
    entries, annotations, records, metas = [], [], [], []
    for scene, anns, recs, ms in iter_split(seed, split, int(sizes[split]), image_size, variant=variant,
                                            images=images,
                                            describe=describe_train if split == "train" else 0.0):
      for img in scene:
        (image_dir / f"{img.image_id}.png").write_bytes(_png(img.pixels))
        entries.append(_image_entry(img))
      annotations += anns
      records += recs
      metas += ms
      bar.update(len(recs))
    ann_file = ann_dir / f"{DATASET_NAME}_{split}.json"
    rec_file = rec_dir / f"{DATASET_NAME}_{split}.json"
    _write_json(ann_file, _coco(seed, split, entries, annotations, variant, image_range))
    _write_json(rec_file, records)
    total += len(records)
    summary["splits"][split] = split_summary(records, metas)
    summary["splits"][split].update(images=len(entries), annotations=len(annotations),
                                    records_file=str(rec_file), annotation_file=str(ann_file))
  bar.close()
  seconds = time.perf_counter() - t0
  summary["seconds"] = round(seconds, 3)
  summary["examples_per_second"] = round(total / seconds, 1) if seconds > 0 else None
  return summary


# ----------------------------------------------------------------------------------------------------
# Vocabulary

WORD_PATTERN = re.compile(r"[A-Za-z]+|\d|[^\sA-Za-z\d]")


def vocabulary() -> list[str]:
  """Every word piece that can occur in a question or answer, sorted.

  Pieces follow ``WORD_PATTERN``: maximal letter runs (both as written and capitalised), single digits and
  single punctuation characters (``_`` included, so tags split as ``ball``, ``_``, ``1``, ``0``, ``1``).
  The converted answer (``<p> ball_1 </p> [SEG] (IMAGE1)``) and the prompt need only these pieces plus
  ``IMAGE``, ``SEG``, ``p`` and ``<>/[]()``, which are included.
  """
  texts: list[str] = []
  for group in TEXT.values():
    texts += [re.sub(r"\{\w+\}", " ", t) for t in group]
  for display, plural, parts in CLASSES.values():
    texts += [display, plural, *parts]
  texts += list(CLASSES) + list(COLORS) + list(ORDINALS) + list(EXTREMES) + list(EXTREMES.values())
  texts += [t for qp, ap, _ in PROPERTIES.values() for t in (qp, ap)]
  texts += [t for use, tmpl in PART_USES.values() for t in (use, re.sub(r"\{\w+\}", " ", tmpl))]
  texts += ["top bottom left right", "0123456789", "_ ' ( ) < > / [ ] IMAGE SEG p"]
  words = set()
  for t in texts:
    for w in WORD_PATTERN.findall(t):
      words.add(w)
      if w.isalpha():
        words.add(w.capitalize())
        words.add(w.lower())
  return sorted(words)


# ----------------------------------------------------------------------------------------------------
# CLI


def define_flags(fv: flags.FlagValues = flags.FLAGS) -> None:
  """The command's flags, on ``fv`` (see ``prima_jax.cli.call``)."""
  flags.DEFINE_string("out", None, "Output root DIR (local or an object-store URL; required).",
                      flag_values=fv)
  flags.DEFINE_integer("seed", 0, "Random seed.", flag_values=fv)
  for split in SPLITS:
    flags.DEFINE_integer(split, DEFAULT_SIZES[split], f"{split} examples (many variant: default "
                         f"{MANY_DEFAULT_SIZES[split]}).", flag_values=fv)
  flags.DEFINE_integer("image_size", 96, "Nominal image side (varies by +-20%).", flag_values=fv)
  flags.DEFINE_enum("variant", "standard", list(VARIANTS),
                    "standard: 2-5 images per question; many: --images sparse images per question.",
                    flag_values=fv)
  flags.DEFINE_string("images", f"{MANY_IMAGES[0]},{MANY_IMAGES[1]}",
                      "MIN,MAX images per question of the many variant (2..99).", flag_values=fv)
  flags.DEFINE_float("describe_train", 0.0, "Probability that a train scene also gets a 'Describe these "
                     "images.' record (standard variant).", flag_values=fv)


def main(argv: Sequence[str], fv: flags.FlagValues = flags.FLAGS) -> int:
  """The command on parsed flags ``fv``: 0, or 2 with one ``error:`` line for bad input."""
  def error(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2

  if len(argv) > 1:
    return error(f"unexpected argument(s): {' '.join(argv[1:])}")
  args = fv
  if not args.out:
    return error("--out is required")
  many = args.variant == "many"
  sizes = {s: getattr(args, s) if fv[s].present or not many else MANY_DEFAULT_SIZES[s] for s in SPLITS}
  for split, n in sizes.items():
    if n < 0:
      return error(f"--{split} must be >= 0")
  images = None
  if many:
    try:
      images = tuple(int(v) for v in args.images.split(","))
      if len(images) != 2:
        raise ValueError
      check_variant("many", images)
    except ValueError:
      return error(f"--images={args.images}: expected MIN,MAX with 2 <= MIN <= MAX <= 99")
  elif fv["images"].present:
    return error("--images applies to --variant=many only")
  if not 0.0 <= args.describe_train <= 1.0 or (args.describe_train and many):
    return error(f"--describe_train={args.describe_train}: expected a probability in [0, 1], standard "
                 "variant only")
  try:
    out = paths.resolve(args.out, what="--out")
  except paths.PathError as e:
    return error(str(e))
  summary = generate(out, args.seed, sizes, args.image_size, variant=args.variant, images=images,
                     describe_train=args.describe_train, progress=True)
  for split, s in summary["splits"].items():
    extra = f" ({s['describe_records']} of them 'Describe these images.')" if s["describe_records"] else ""
    print(f"{split}: {s['examples']} examples{extra} ({s['multi_image']} multi-image), {s['images']} images, "
          f"{s['annotations']} annotations, categories {s['categories']}, encodings {s['encodings']}")
  print(f"wrote {args.out} in {summary['seconds']:.2f} s ({summary['examples_per_second']} examples/s)")
  return 0


if __name__ == "__main__":
  define_flags()
  cli.run(main)
