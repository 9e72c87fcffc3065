"""The M⁴Seg record format (docs/data.md): loading, validation, answer conversion, masks and images.

A record (one element of ``Part_Segm/{prefix}_{split}.json``, or one parquet row with the same
fields; a file whose columns are named otherwise is read through a field table, see
:func:`field_table` and docs/data.md) is::

  {"dataset_name": "paco_lvis" | "ade20k_part234" | "pascal_part" | "synthetic",
   "img_ids": [id, ...],                      # IMAGE1, IMAGE2, ... (ids of the source's annotation file)
   "q": "question (tags allowed)",
   "a": "answer with inline instance tags",
   "groundings": {"img_1": [{"segmentation": ..., "name": str, "obj_ann_id": int (parts)}, ...], ...},
   "category": "functional" | "spatial" | "numerical" | "open-ended"}   # optional

Tag grammar and conversion follow the original loader (kanguyen-vn/LISA,
``dataset/multi_image_datasets/MultiImage_8Q_single_turn_ds.py``):

* A tag is a word ``name_XYY`` (object: X = image 1..9, YY = instance) or ``name_XYYZZ`` (part ZZ of
  object YY), matched by ``\\b(\\w+)_\\d{3}\\b|\\b(\\w+)_\\d{5}\\b``; ``name`` may itself contain ``_``.
* Our extension for records of 10 or more images (the original forms cannot name IMAGE10..): there,
  ``name_XXYY`` (4 digits: object YY of image XX) and ``name_XXYYZZ`` (6 digits: part ZZ of it) are
  tags too (:data:`WIDE_TAG_PATTERN`). The digit count decides the reading (3: X YY, 4: XX YY,
  5: X YY ZZ, 6: XX YY ZZ), and an instance is its (name, image, instance, part), so ``cup_0102`` and
  ``cup_102`` are one instance. In a record of at most 9 images a 4- or 6-digit word is plain text
  (``year_2020``), exactly as in the original; :func:`find_tags` applies the rule.
* In the question every tag is replaced by its bare ``name``.
* In the answer the first mention of an instance becomes ``<p> phrase </p> [SEG] (IMAGE{X})`` and takes
  the next unused grounding of ``groundings["img_X"]`` (objects and parts share that per-image list, in
  order of first mention); a repeated mention becomes ``<p> phrase </p> (IMAGE{X})`` (no ``[SEG]``, no
  mask), as in the original.
* Object phrase: ``f"{grounding['name']}_{int(YY)}"`` (``chair_101`` -> ``chair_1``). Part phrase:
  ``f"{object_name}_{int(YY)}'s {grounding['name']}_{int(ZZ)}"`` (``desk_1's drawer_1``), where the
  object name is the category of annotation ``obj_ann_id`` in the source's annotation file (original);
  if that file has no such annotation, the grounding's ``obj_name`` field, else the grounding name of
  the object tag ``*_XYY`` mentioned in the same answer (our fallbacks, for annotation files without
  ``annotations``/``categories``).

Deliberate differences from the original loader: its ``f"... {img_tokens})"`` appends a stray ``)``
after every mention (a bug, not reproduced); a repeated mention there reuses the phrase of whatever
grounding was loaded last (a bug), here it reuses its own instance's phrase.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import posixpath
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
from etils import epath
from pycocotools import mask as mask_utils

from prima_jax import paths
from prima_jax.data import images
from prima_jax.data.example import GroundedExample

# The original loader's tag pattern (objects: 3 digits, parts: 5 digits; one-digit image index).
TAG_PATTERN = re.compile(r"\b(\w+)_\d{3}\b|\b(\w+)_\d{5}\b")
# Records of WIDE_TAGS_FROM or more images also take two-digit image indices: objects name_XXYY (4 digits),
# parts name_XXYYZZ (6 digits). Only there: in the original's records (at most 9 images) a 4- or 6-digit
# word stays text, as the original reads it.
WIDE_TAG_PATTERN = re.compile(r"\b(\w+)_(\d{3}|\d{4}|\d{5}|\d{6})\b")
WIDE_TAGS_FROM = 10
REQUIRED_FIELDS = ("dataset_name", "img_ids", "q", "a", "groundings")
DEFAULT_MAX_IMAGES = 5

# Skip reasons (SkipExample.reason); the builder counts skipped records by these.
INVALID_RECORD = "invalid_record"
TOO_MANY_IMAGES = "too_many_images"
TAG_WITHOUT_GROUNDING = "tag_without_grounding"
TAG_IMAGE_OUT_OF_RANGE = "tag_image_out_of_range"
MALFORMED_SEGMENTATION = "malformed_segmentation"
UNKNOWN_IMAGE_ID = "unknown_image_id"
MISSING_IMAGE = "missing_image"
CORRUPT_IMAGE = "corrupt_image"
IMAGE_TOO_LARGE = "image_too_large"
IMAGE_SIZE_MISMATCH = "image_size_mismatch"
PART_OBJECT_UNKNOWN = "part_object_unknown"
UNKNOWN_SOURCE = "unknown_source"


class SkipExample(Exception):  # noqa: N818 -- a signal, not an error: the record is skipped and counted.
  """A record that cannot become an example; ``reason`` is one of the constants above."""

  def __init__(self, reason: str, detail: str):
    super().__init__(f"{reason}: {detail}")
    self.reason = reason
    self.detail = detail

  def __reduce__(self):  # Picklable across worker processes (the default would pass only the message).
    return SkipExample, (self.reason, self.detail)


# --------------------------------------------------------------------------------------------------
# Loading


class SetupError(ValueError):
  """Inputs that cannot be used as given: a missing record or annotation file or image directory, a
  record file without the expected columns. Each line of the message is one problem naming the file
  or directory, and the flag that sets it; the CLI prints them without a traceback."""

  def __init__(self, problems: str | Sequence[str]):
    self.problems = [problems] if isinstance(problems, str) else list(problems)
    super().__init__("\n".join(self.problems))

  def __reduce__(self):
    return SetupError, (self.problems,)


# Our field names -> the record file's column names. The defaults are the pre-release JSON fields;
# ``--field q=question`` (``fields={"q": "question"}``) reads the question from a column ``question``.
DEFAULT_FIELDS: dict[str, str] = {f: f for f in (*REQUIRED_FIELDS, "category")}
OPTIONAL_FIELDS = ("category",)


def field_table(overrides: Mapping[str, str] | None = None) -> dict[str, str]:
  """The default field table with ``overrides`` (our field -> the file's column) applied.

  Raises:
    SetupError: an unknown field name, or two fields read from one column.
  """
  table = dict(DEFAULT_FIELDS)
  for field, column in (overrides or {}).items():
    if field not in table:
      raise SetupError(f"--field {field}={column}: unknown field {field!r}; the form is --field FIELD=COLUMN "
                       f"with FIELD one of {', '.join(DEFAULT_FIELDS)}")
    table[field] = column
  by_column: dict[str, list[str]] = {}
  for field, column in table.items():
    by_column.setdefault(column, []).append(field)
  shared = {c: f for c, f in by_column.items() if len(f) > 1}
  if shared:
    column, fields = next(iter(shared.items()))
    raise SetupError(f"--field: fields {', '.join(fields)} would all read column {column!r}; map each to its "
                     "own column")
  return table


def _check_columns(path: Any, found: Sequence[str], table: Mapping[str, str]) -> None:
  """SetupError listing the expected and found columns when a required field has no column."""
  missing = [f for f in REQUIRED_FIELDS if table[f] not in found]
  if not missing:
    return
  expected = ", ".join(table[f] for f in REQUIRED_FIELDS)
  optional = ", ".join(table[f] for f in OPTIONAL_FIELDS)
  wanted = ", ".join(f"{f} (column {table[f]!r})" for f in missing)
  raise SetupError(f"records file {path}: no column for field(s) {wanted}; expected columns: {expected} "
                   f"(optional: {optional}); found columns: {', '.join(found) or 'none'}; map a field to a "
                   f"column with --field FIELD=COLUMN (e.g. --field {missing[0]}=COLUMN)")


def _maybe_json(value: Any) -> Any:
  if isinstance(value, str) and value[:1] in ("[", "{"):
    try:
      return json.loads(value)
    except json.JSONDecodeError:
      return value
  return value


def _drop_nulls(value: Any) -> Any:
  """Parquet structs fill absent keys with None (e.g. ``obj_ann_id`` of objects): drop them."""
  if isinstance(value, dict):
    return {k: _drop_nulls(v) for k, v in value.items() if v is not None}
  if isinstance(value, list):
    return [_drop_nulls(v) for v in value]
  return value


def _normalise_parquet_row(row: dict[str, Any]) -> dict[str, Any]:
  """One parquet row (maps already dicts) -> a record as the JSON files hold it.

  ``img_ids`` and ``groundings`` may be JSON strings; ``groundings`` a struct (absent images and
  keys are None: dropped) or a map; each ``segmentation`` a JSON string or nested lists/structs.
  """
  row = {k: v for k, v in row.items() if v is not None}
  for key in ("img_ids", "groundings"):
    if key in row:
      row[key] = _maybe_json(row[key])
  groundings = row.get("groundings")
  if isinstance(groundings, dict):
    groundings = _drop_nulls(groundings)
    for entries in groundings.values():
      for entry in entries if isinstance(entries, list) else ():
        if isinstance(entry, dict) and "segmentation" in entry:
          entry["segmentation"] = _maybe_json(entry["segmentation"])
    row["groundings"] = groundings
  return row


def _load_parquet(path: epath.Path, table: Mapping[str, str]) -> list[dict[str, Any]]:
  import pyarrow as pa  # Imported lazily: only parquet inputs need it.
  import pyarrow.parquet as pq

  try:
    with path.open("rb") as f:
      data = pq.read_table(f)
  except (pa.ArrowException, OSError) as e:
    raise SetupError(f"records file {path}: cannot be read as parquet ({type(e).__name__}: {e})") from None
  _check_columns(path, data.column_names, table)
  fields = [f for f, column in table.items() if column in data.column_names]
  data = data.select([table[f] for f in fields]).rename_columns(fields)
  try:
    rows = data.to_pylist(maps_as_pydicts="strict")
  except (pa.ArrowException, KeyError, ValueError) as e:  # a map with a repeated key
    raise SetupError(f"records file {path}: {type(e).__name__}: {e}") from None
  return [_normalise_parquet_row(row) for row in rows]


def _load_json(path: epath.Path, table: Mapping[str, str]) -> list[Any]:
  try:
    data = json.loads(path.read_bytes())
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise SetupError(f"records file {path}: not valid JSON ({e})") from None
  if not isinstance(data, list):
    raise SetupError(f"records file {path}: expected a JSON list of records, got {type(data).__name__}")
  if table == DEFAULT_FIELDS:
    return data
  found = list(dict.fromkeys(k for r in data if isinstance(r, dict) for k in r))
  if data:
    _check_columns(path, found, table)
  return [{f: r[c] for f, c in table.items() if c in r} if isinstance(r, dict) else r for r in data]


def load_records(path: str | os.PathLike, *, fields: Mapping[str, str] | None = None) -> list[dict[str, Any]]:
  """Reads M⁴Seg records from a JSON file (a list of records) or a parquet file (same fields).

  ``path`` may be local or an object-store URL (read through ``etils.epath``). ``fields`` maps our
  field names (``dataset_name``, ``img_ids``, ``q``, ``a``, ``groundings``, ``category``) to the
  file's column names where they differ (see :func:`field_table`). Parquet columns may hold
  ``img_ids`` as a list or a JSON string, ``groundings`` as a struct, a map or a JSON string, each
  ``segmentation`` as nested lists/structs or a JSON string.

  Raises:
    SetupError: the file is missing, unreadable, or lacks a column of a required field.
  """
  table = field_table(fields)
  path = paths.resolve(path, what="--records")
  if path.is_dir():
    raise SetupError(f"records file {path} is a directory; --records names JSON or parquet files "
                     "(a wildcard such as DIR/*.parquet reads every match)")
  if not path.is_file():
    raise SetupError(f"records file {path} does not exist (--records)")
  if path.suffix == ".parquet":
    return _load_parquet(path, table)
  return _load_json(path, table)


_GLOB = re.compile(r"[*?\[]")


def record_files(pattern: str | os.PathLike) -> list[epath.Path]:
  """The record files ``pattern`` names: itself, or the sorted matches of a wildcard in its last
  component (``data/train-*.parquet``, local or a URL).

  Raises:
    SetupError: no file matches, or a wildcard outside the last component.
  """
  path = paths.resolve(pattern, what="--records")
  if _GLOB.search(str(path.parent)):
    raise SetupError(f"--records {pattern}: wildcards are allowed in the file name only")
  if not _GLOB.search(path.name):
    return [path]
  matches = sorted(path.parent.glob(path.name), key=str) if path.parent.is_dir() else []
  if not matches:
    raise SetupError(f"--records {pattern}: no file matches {path}")
  return matches


# --------------------------------------------------------------------------------------------------
# Segmentations


def _rle_string_counts(counts: bytes) -> list[int]:
  """Decodes COCO's compressed RLE string (the LEB128-like scheme of ``rleFrString``); ValueError if bad."""
  out: list[int] = []
  pos = 0
  while pos < len(counts):
    value, shift, more = 0, 0, True
    while more:
      if pos >= len(counts):
        raise ValueError("compressed RLE counts end in the middle of a number")
      c = counts[pos] - 48
      if not 0 <= c < 64:
        raise ValueError(f"compressed RLE counts hold an invalid character {chr(counts[pos])!r}")
      value |= (c & 0x1F) << (5 * shift)
      more = bool(c & 0x20)
      pos += 1
      shift += 1
      if not more and c & 0x10:
        value |= -1 << (5 * shift)
    if len(out) > 2:
      value += out[-2]
    out.append(value)
  return out


def _is_number(x: Any) -> bool:
  return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _is_int(x: Any) -> bool:
  return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def segmentation_problem(seg: Any, height: int | None = None, width: int | None = None) -> str | None:
  """Returns why ``seg`` is not a valid COCO polygon list / RLE (of size height x width), or None."""
  if isinstance(seg, list):
    if not seg:
      return "empty polygon list"
    for i, poly in enumerate(seg):
      if not isinstance(poly, list) or not all(_is_number(v) for v in poly):
        return f"polygon {i} is not a list of finite numbers"
      if len(poly) < 6 or len(poly) % 2:
        return f"polygon {i} has {len(poly)} coordinates (need an even number >= 6)"
    return None
  if not isinstance(seg, dict):
    return f"expected a polygon list or an RLE dict, got {type(seg).__name__}"
  if "counts" not in seg or "size" not in seg:
    return f"RLE needs 'counts' and 'size', got keys {sorted(seg)}"
  size = seg["size"]
  if not (isinstance(size, (list, tuple)) and len(size) == 2 and all(_is_int(v) and v >= 0 for v in size)):
    return f"RLE size {size!r} is not [height, width]"
  h, w = int(size[0]), int(size[1])
  if height is not None and (h, w) != (height, width):
    return f"RLE size {[h, w]} differs from the image size {[height, width]}"
  counts = seg["counts"]
  if isinstance(counts, list):
    if not all(_is_int(c) and c >= 0 for c in counts):
      return "uncompressed RLE counts must be non-negative integers"
  elif isinstance(counts, (str, bytes)):
    try:
      counts = _rle_string_counts(counts.encode() if isinstance(counts, str) else counts)
    except ValueError as e:
      return str(e)
    if any(c < 0 for c in counts):
      return "compressed RLE decodes to a negative run length"
  else:
    return f"RLE counts must be a list, str or bytes, got {type(counts).__name__}"
  if sum(counts) != h * w:
    return f"RLE runs cover {sum(counts)} pixels, size {[h, w]} has {h * w}"
  return None


def decode_segmentation(seg: Any, height: int, width: int) -> np.ndarray:
  """Decodes a COCO polygon list, uncompressed RLE or compressed RLE to a bool [height, width] mask.

  Raises:
    ValueError: ``seg`` is malformed (bad polygon, RLE of another size, runs not covering the image).
  """
  problem = segmentation_problem(seg, height, width)
  if problem is not None:
    raise ValueError(f"malformed segmentation: {problem}")
  if isinstance(seg, list):
    rle = mask_utils.merge(mask_utils.frPyObjects([[float(v) for v in p] for p in seg], height, width))
  elif isinstance(seg["counts"], list):
    rle = mask_utils.frPyObjects({"counts": [int(c) for c in seg["counts"]], "size": [height, width]},
                                 height, width)
  else:
    counts = seg["counts"]
    rle = {"counts": counts.encode() if isinstance(counts, str) else counts, "size": [height, width]}
  return mask_utils.decode(rle).astype(bool)


def encode_mask(mask: np.ndarray) -> bytes:
  """bool [height, width] -> COCO compressed RLE counts (bytes)."""
  return mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))["counts"]


def decode_mask(counts: bytes, height: int, width: int) -> np.ndarray:
  """COCO compressed RLE counts -> bool [height, width]."""
  return mask_utils.decode({"counts": counts, "size": [height, width]}).astype(bool)


# --------------------------------------------------------------------------------------------------
# Tags


@dataclasses.dataclass(frozen=True)
class Tag:
  """One instance tag in a text: ``image`` 1-based as written (may be out of range), ``part`` None for
  an object; ``start`` / ``end`` its character span."""
  text: str
  name: str
  image: int
  instance: int
  part: int | None
  start: int
  end: int

  @property
  def key(self) -> tuple[str, int, int, int | None]:
    """What the tag names: two spellings of one instance (``cup_102``, ``cup_0102``) share it."""
    return self.name, self.image, self.instance, self.part

  @property
  def object_key(self) -> tuple[int, int]:
    """(image, instance): a part and the object tag it belongs to share it."""
    return self.image, self.instance


def tag_pattern(num_images: int | None) -> re.Pattern:
  """The tag pattern of a record of ``num_images`` images (None: unknown, the original's)."""
  return WIDE_TAG_PATTERN if num_images is not None and num_images >= WIDE_TAGS_FROM else TAG_PATTERN


def parse_tag(match: re.Match) -> Tag:
  """A :class:`Tag` from a match of :data:`TAG_PATTERN` or :data:`WIDE_TAG_PATTERN`."""
  name, code = match.group().rsplit("_", 1)
  wide = len(code) in (4, 6)  # two-digit image index
  image, rest = (int(code[:2]), code[2:]) if wide else (int(code[:1]), code[1:])
  return Tag(match.group(), name, image, int(rest[:2]), int(rest[2:]) if len(rest) == 4 else None,
             match.start(), match.end())


def find_tags(text: str, num_images: int | None = None) -> list[Tag]:
  """The instance tags of ``text`` in a record of ``num_images`` images, in order (module docstring)."""
  return [parse_tag(m) for m in tag_pattern(num_images).finditer(text)]


# --------------------------------------------------------------------------------------------------
# Validation


def _problems(record: Any, max_images: int) -> list[tuple[str, str, str]]:
  """(reason, field, message) for every structural problem of ``record`` (no files are read)."""
  out: list[tuple[str, str, str]] = []
  if not isinstance(record, dict):
    return [(INVALID_RECORD, "", f"expected an object, got {type(record).__name__}")]
  for field in REQUIRED_FIELDS:
    if field not in record:
      out.append((INVALID_RECORD, field, "missing"))
  for field in ("dataset_name", "q", "a"):
    if field in record and not isinstance(record[field], str):
      out.append((INVALID_RECORD, field, f"expected a string, got {type(record[field]).__name__}"))
  if "category" in record and not isinstance(record["category"], str):
    out.append((INVALID_RECORD, "category", f"expected a string, got {type(record['category']).__name__}"))
  ids = record.get("img_ids")
  n = 0
  if "img_ids" in record:
    if not isinstance(ids, list) or not ids:
      out.append((INVALID_RECORD, "img_ids", "expected a non-empty list of image ids"))
    elif not all(_is_int(i) or isinstance(i, str) for i in ids):
      out.append((INVALID_RECORD, "img_ids", "image ids must be integers or strings"))
    else:
      n = len(ids)
      if n > max_images:
        out.append((TOO_MANY_IMAGES, "img_ids", f"{n} images, more than max_images={max_images}"))
  groundings = record.get("groundings")
  if "groundings" in record:
    if not isinstance(groundings, dict):
      out.append((INVALID_RECORD, "groundings", f"expected an object, got {type(groundings).__name__}"))
      groundings = None
    else:
      for key, entries in groundings.items():
        where = f"groundings.{key}"
        m = re.fullmatch(r"img_(\d+)", str(key))
        if m is None or (n and not 1 <= int(m.group(1)) <= n):
          out.append((INVALID_RECORD, where, f"key must be img_1 .. img_{n or 'N'}"))
        if not isinstance(entries, list):
          out.append((INVALID_RECORD, where, "expected a list of groundings"))
          continue
        for j, entry in enumerate(entries):
          field = f"{where}[{j}]"
          if not isinstance(entry, dict):
            out.append((INVALID_RECORD, field, "expected an object"))
            continue
          if not isinstance(entry.get("name"), str):
            out.append((INVALID_RECORD, f"{field}.name", "missing or not a string"))
          if "obj_ann_id" in entry and not (_is_int(entry["obj_ann_id"])
                                            or str(entry["obj_ann_id"]).isdigit()):
            out.append((INVALID_RECORD, f"{field}.obj_ann_id", "not an integer"))
          if "segmentation" not in entry:
            out.append((INVALID_RECORD, f"{field}.segmentation", "missing"))
          else:
            problem = segmentation_problem(entry["segmentation"])
            if problem is not None:
              out.append((MALFORMED_SEGMENTATION, f"{field}.segmentation", problem))
  if isinstance(record.get("a"), str) and n and groundings is not None:
    used = [0] * (n + 1)
    seen: set[tuple] = set()
    for tag in find_tags(record["a"], n):
      if tag.key in seen:
        continue
      seen.add(tag.key)
      image = tag.image
      if not 1 <= image <= n:
        out.append((TAG_IMAGE_OUT_OF_RANGE, "a", f"tag {tag.text!r} names IMAGE{image} of {n}"))
        continue
      used[image] += 1
      available = groundings.get(f"img_{image}")
      if not isinstance(available, list) or used[image] > len(available):
        out.append((TAG_WITHOUT_GROUNDING, "a",
                    f"tag {tag.text!r} is mention {used[image]} in IMAGE{image}, "
                    f"groundings.img_{image} has {len(available) if isinstance(available, list) else 0}"))
  return out


def validate_record(record: Any, index: int, *, max_images: int = DEFAULT_MAX_IMAGES) -> list[str]:
  """Every structural problem of ``record`` as ``"record {index}: field '{field}': {message}"``.

  Checks fields and types, the image count against ``max_images``, grounding entries and their
  segmentation structure, and that every answer tag names an image of the record and has a grounding.
  Images and annotation files are not read (``record_to_example`` does that).
  """
  return [f"record {index}: field {field!r}: {message}" if field else f"record {index}: {message}"
          for _, field, message in _problems(record, max_images)]


# --------------------------------------------------------------------------------------------------
# Answer conversion


@dataclasses.dataclass
class Mention:
  """One ``[SEG]`` of a converted answer: its phrase, 0-based image and grounding segmentation."""
  phrase: str
  image: int
  segmentation: Any


def convert_question(question: str, num_images: int | None = None) -> str:
  """Replaces every instance tag by its bare name, as the original loader does (``num_images``: the
  record's, which decides whether two-digit image indices are tags; None reads the original forms)."""
  return tag_pattern(num_images).sub(lambda m: parse_tag(m).name, question)


def convert_answer(answer: str, groundings: Mapping[str, Sequence[Mapping[str, Any]]], num_images: int,
                   object_name: Callable[[int], str | None] | None = None) -> tuple[str, list[Mention]]:
  """Turns inline tags into ``<p> phrase </p> [SEG] (IMAGE{X})`` and collects one mention per ``[SEG]``.

  Args:
    answer: the record's ``a``.
    groundings: the record's ``groundings``.
    num_images: number of images of the record.
    object_name: maps a part's ``obj_ann_id`` to its object's category name (None if unknown).

  Returns:
    The converted answer and the mentions in ``[SEG]`` order.

  Raises:
    SkipExample: a tag names an image outside 1..num_images, has no grounding left, or is a part whose
      object name cannot be found.
  """
  tags = find_tags(answer, num_images)
  used = [0] * (num_images + 1)
  grounding_of: dict[tuple, Mapping[str, Any]] = {}
  first: dict[tuple, Tag] = {}  # an instance's first mention, whose phrase later mentions repeat
  for tag in tags:  # First pass: assign groundings in order of first mention.
    if tag.key in grounding_of:
      continue
    image = tag.image
    if not 1 <= image <= num_images:
      raise SkipExample(TAG_IMAGE_OUT_OF_RANGE, f"tag {tag.text!r} names IMAGE{image} of {num_images}")
    entries = groundings.get(f"img_{image}") or []
    if used[image] >= len(entries):
      raise SkipExample(TAG_WITHOUT_GROUNDING, f"tag {tag.text!r} has no grounding left in "
                                               f"groundings.img_{image} ({len(entries)} entries)")
    grounding_of[tag.key] = entries[used[image]]
    first[tag.key] = tag
    used[image] += 1

  def phrase_of(tag: Tag) -> str:
    grounding = grounding_of[tag.key]
    if tag.part is None:
      return f"{grounding.get('name', tag.name)}_{tag.instance}"
    obj = None
    if object_name is not None and "obj_ann_id" in grounding:
      obj = object_name(int(grounding["obj_ann_id"]))
    if obj is None:
      obj = grounding.get("obj_name")
    if obj is None:  # The object tag of the same image and instance, mentioned in this answer.
      parent = next((t for t in first.values() if t.part is None and t.object_key == tag.object_key), None)
      obj = grounding_of[parent.key].get("name") if parent is not None else None
    if obj is None:
      code = tag.text.rsplit("_", 1)[1]
      raise SkipExample(PART_OBJECT_UNKNOWN, f"part tag {tag.text!r}: no object name (obj_ann_id "
                                             f"{grounding.get('obj_ann_id')!r} not in the annotation file, "
                                             f"no obj_name, no object tag *_{code[:-2]} in the answer)")
    return f"{obj}_{tag.instance}'s {grounding.get('name', tag.name)}_{tag.part}"

  pieces, mentions, seen, last = [], [], set(), 0
  for tag in tags:
    phrase = phrase_of(first[tag.key])
    if tag.key in seen:
      pieces.append(f"{answer[last:tag.start]}<p> {phrase} </p> (IMAGE{tag.image})")
    else:
      seen.add(tag.key)
      pieces.append(f"{answer[last:tag.start]}<p> {phrase} </p> [SEG] (IMAGE{tag.image})")
      mentions.append(Mention(phrase, tag.image - 1, grounding_of[tag.key]["segmentation"]))
    last = tag.end
  pieces.append(answer[last:])
  return "".join(pieces), mentions


# --------------------------------------------------------------------------------------------------
# Text-side lengths (what a training budget would drop)

# Example quantities the data can tell without a tokenizer; ``budget`` thresholds count the examples
# above them. Defaults: the full model's ``prima.max_images`` / ``prima.max_masks``, the Q-Former's
# 32 question tokens, half the LLM's 512 tokens for the answer (words are not tokens: a word is one
# or more tokens, so an example over a word budget is surely over the same token budget).
LENGTHS = {"images": "images per example", "segs": "[SEG] per example", "question_words": "question words",
           "answer_words": "answer words"}
DEFAULT_BUDGET = {"images": 5, "segs": 16, "question_words": 32, "answer_words": 256}
QUANTILES = (50, 90, 99)


def nearest_rank(sorted_values: Sequence[int], q: float) -> int:
  """The ``q``-th percentile by nearest rank: the smallest value with at least q % of values <= it."""
  return sorted_values[max(0, math.ceil(q / 100 * len(sorted_values)) - 1)]


def budget_table(overrides: Mapping[str, int] | None = None) -> dict[str, int]:
  """``DEFAULT_BUDGET`` with ``overrides``; SetupError for an unknown name or a negative value."""
  table = dict(DEFAULT_BUDGET)
  for name, value in (overrides or {}).items():
    if name not in table or not _is_int(value) or value < 0:
      raise SetupError(f"--budget {name}={value}: expected NAME=N with N >= 0 and NAME one of "
                       f"{', '.join(LENGTHS)}")
    table[name] = int(value)
  return table


class LengthStats:
  """Collects per-example images, [SEG] count and question / answer words (whitespace-separated
  words of the text the model sees: the converted question and answer)."""

  def __init__(self):
    self.values: dict[str, list[int]] = {k: [] for k in LENGTHS}

  def add(self, images: int, segs: int, question: str, answer: str) -> None:
    for key, value in zip(LENGTHS, (images, segs, len(question.split()), len(answer.split()))):
      self.values[key].append(int(value))

  def add_example(self, example: GroundedExample) -> None:
    self.add(len(example.images), len(example.masks), example.question, example.answer)

  def add_record(self, record: Mapping[str, Any]) -> None:
    """A structurally valid record, converted without its annotation file: a part whose object name
    only that file knows is named ``object`` (the word count is the same unless the name has spaces)."""
    n = len(record["img_ids"])
    try:
      answer, mentions = convert_answer(record["a"], record["groundings"], n)
    except SkipExample:
      answer, mentions = convert_answer(record["a"], record["groundings"], n, lambda ann_id: "object")
    self.add(n, len(mentions), convert_question(record["q"], n), answer)

  def summary(self, budget: Mapping[str, int] | None = None) -> dict[str, Any]:
    """``{"examples": n, key: {"min", "p50", "p90", "p99", "max", "budget", "over"}}`` (no quantiles when
    n is 0)."""
    budget = budget_table(budget)
    out: dict[str, Any] = {"examples": len(self.values["images"])}
    for key, values in self.values.items():
      v = sorted(values)
      row: dict[str, Any] = {"budget": budget[key], "over": sum(x > budget[key] for x in v)}
      if v:
        row.update(min=v[0], **{f"p{q}": nearest_rank(v, q) for q in QUANTILES}, max=v[-1])
      out[key] = row
    return out


def format_lengths(split: str, summary: Mapping[str, Any], prefix: str = "[m4seg] ") -> str:
  """The ``summary()`` of a split as lines: min / median / p90 / p99 / max and the count over budget."""
  n = summary["examples"]
  lines = [f"{prefix}{split}: text-side lengths of {n} example(s) (words split on whitespace, "
           "question and answer as converted):"]
  for key, label in LENGTHS.items():
    row = summary[key]
    share = f" ({100 * row['over'] / n:.1f}%)" if n else ""
    spread = ("  ".join(f"{name} {row[k]:>4}" for name, k in (("min", "min"), ("median", "p50"),
                                                              ("p90", "p90"), ("p99", "p99"), ("max", "max")))
              if n else "no examples")
    lines.append(f"{prefix}  {label:<19} {spread}   > {row['budget']}: {row['over']}{share}")
  return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# Image index and source layouts


@dataclasses.dataclass(frozen=True)
class ImageInfo:
  file_name: str
  height: int
  width: int


class ImageIndex:
  """Image ids of a COCO-style annotation JSON -> file name and size, plus annotation -> object name.

  Ids are matched as strings, so a record's ``"123"`` and an annotation file's ``123`` agree.
  """

  def __init__(self, images: Mapping[str, ImageInfo], object_names: Mapping[int, str] | None = None,
               path: str = "<memory>"):
    self.images = dict(images)
    self.object_names = dict(object_names or {})
    self.path = path

  @classmethod
  def from_file(cls, path: str | os.PathLike) -> ImageIndex:
    """Reads ``images[]`` (id, file_name, height, width) and, if present, annotations + categories.

    ``path`` may be local or an object-store URL.

    Raises:
      SetupError: the file is missing, not JSON, or not COCO-style.
    """
    path = paths.resolve(path, what="annotation file")
    if not path.is_file():
      raise SetupError(f"annotation file {path} does not exist")
    try:
      data = json.loads(path.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
      raise SetupError(f"annotation file {path}: not valid JSON ({e})") from None
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
      raise SetupError(f"annotation file {path}: expected a COCO-style object with an 'images' list")
    images = {}
    for i, img in enumerate(data["images"]):
      try:
        images[str(img["id"])] = ImageInfo(str(img["file_name"]), int(img["height"]), int(img["width"]))
      except (KeyError, TypeError, ValueError) as e:
        raise SetupError(f"annotation file {path}: images[{i}] needs id, file_name, height, width "
                         f"({e!r})") from None
    def entries(key: str) -> list[dict]:
      value = data.get(key, [])
      return [e for e in value if isinstance(e, dict)] if isinstance(value, list) else []

    categories = {c["id"]: c["name"] for c in entries("categories")
                  if "id" in c and "name" in c and isinstance(c["id"], (int, str))}
    object_names = {int(a["id"]): categories[a["category_id"]] for a in entries("annotations")
                    if _is_int(a.get("id")) and isinstance(a.get("category_id"), (int, str))
                    and a["category_id"] in categories}
    return cls(images, object_names, str(path))

  def __contains__(self, image_id: Any) -> bool:
    return str(image_id) in self.images

  def info(self, image_id: Any) -> ImageInfo:
    """Raises SkipExample(unknown_image_id) for an id the annotation file does not list."""
    try:
      return self.images[str(image_id)]
    except KeyError:
      raise SkipExample(UNKNOWN_IMAGE_ID, f"image id {image_id!r} is not in {self.path}") from None

  def resolve(self, image_id: Any, image_root: str | os.PathLike) -> epath.Path:
    """The image file of ``image_id`` under ``image_root`` (a local directory or a URL)."""
    return under(image_root, self.info(image_id).file_name, what="image directory")

  def object_name(self, ann_id: int) -> str | None:
    return self.object_names.get(int(ann_id))


@dataclasses.dataclass(frozen=True)
class SourceLayout:
  """Where a source's annotation file and images live, relative to its root directory.

  ``annotations`` and ``images`` are templates with ``{split}`` (after ``split_alias``) and
  ``{image_split}`` (``image_split[split]``, default the split itself).
  """
  annotations: str
  images: str
  split_alias: Mapping[str, str] = dataclasses.field(default_factory=dict)
  image_split: Mapping[str, str] = dataclasses.field(default_factory=dict)

  def paths(self, root: str | os.PathLike, split: str, *,
            what: str = "--image_root") -> tuple[epath.Path, epath.Path]:
    """(annotation file, image directory) of ``split`` under ``root`` (local or a URL), normalised;
    absolute templates and URLs stay as they are."""
    names = {"split": self.split_alias.get(split, split), "image_split": self.image_split.get(split, split)}
    return under(root, self.annotations.format(**names), what=what), under(root, self.images.format(**names),
                                                                           what=what)


def under(root: str | os.PathLike, relative: str, *, what: str = "path") -> epath.Path:
  """``root / relative`` with ``..`` resolved, for local paths and URLs alike; an absolute path or a
  URL ``relative`` is returned as it is (``what`` names the flag of ``root`` in errors)."""
  if paths.url_scheme(relative) is not None or relative.startswith("/"):
    return paths.resolve(relative, what=what)
  joined = f"{paths.resolve(root, what=what)}/{relative}"
  scheme = paths.url_scheme(joined)
  if scheme is None:
    return epath.Path(os.path.normpath(joined))
  return epath.Path(f"{scheme}://{posixpath.normpath(joined[len(scheme) + 3:])}")


# Roots are the source folders of the original layout: Part_Segm/paco_lvis (COCO images in
# ../../coco_2017), Part_Segm/ADE20KPart234, Part_Segm/PASCAL-Part, and DIR/synthetic for the
# synthetic benchmark.
SOURCES: dict[str, SourceLayout] = {
    "paco_lvis": SourceLayout("annotations/paco_lvis_v1_{split}.json", "../../coco_2017"),
    "ade20k_part234": SourceLayout(
        "ade20k_instance_{split}_mixed_parts.json", "images/{image_split}", split_alias={"test": "val"},
        image_split={"train": "training", "val": "validation", "test": "validation"}),
    "pascal_part": SourceLayout("{split}.json", "VOCdevkit/VOC2010/JPEGImages"),
    "synthetic": SourceLayout("annotations/synthetic_{split}.json", "images"),
}


# --------------------------------------------------------------------------------------------------
# Record -> example


def read_image(path: epath.Path, info: ImageInfo) -> tuple[np.ndarray, bytes]:
  """Reads and decodes an image file -> (uint8 [height, width, 3] RGB, the file's bytes).

  Raises:
    SkipExample: missing_image, corrupt_image, image_too_large, or image_size_mismatch (size, after
      the EXIF orientation, differs from the annotation file's, so masks would not align).
  """
  try:
    data = path.read_bytes()
  except OSError as e:
    raise SkipExample(MISSING_IMAGE, f"{path}: {e.strerror or e}") from None
  array = decode_image(data, str(path))
  if array.shape[:2] != (info.height, info.width):
    detail = (f"{path} is {array.shape[1]}x{array.shape[0]}, the annotation file says "
              f"{info.width}x{info.height}")
    orientation = images.exif_orientation(data)
    if orientation != 1:
      detail += f" (after its EXIF orientation {orientation}, applied as the reference OpenCV loader does)"
    raise SkipExample(IMAGE_SIZE_MISMATCH, detail)
  return array, data


def decode_image(data: bytes, name: str = "image") -> np.ndarray:
  """Encoded image bytes -> uint8 [height, width, 3] RGB (``images.decode``: EXIF orientation
  applied, every mode to 8-bit RGB); SkipExample(corrupt_image / image_too_large) otherwise."""
  try:
    return images.decode(data, name)
  except images.ImageTooLarge as e:
    raise SkipExample(IMAGE_TOO_LARGE, str(e)) from None
  except images.ImageError as e:
    raise SkipExample(CORRUPT_IMAGE, str(e)) from None


def convert_record(record: Any, index: int, *, image_index: ImageIndex, image_root: str | os.PathLike,
                   max_images: int = DEFAULT_MAX_IMAGES,
                   split: str = "") -> tuple[GroundedExample, list[bytes]]:
  """``record_to_example`` that also returns each image file's original bytes (for the builder)."""
  problems = _problems(record, max_images)
  if problems:
    reason, field, message = problems[0]
    raise SkipExample(reason, f"field {field!r}: {message}" if field else message)
  source = record["dataset_name"]
  ids = record["img_ids"]
  infos = [image_index.info(i) for i in ids]
  images, encoded = [], []
  for image_id, info in zip(ids, infos):
    array, data = read_image(image_index.resolve(image_id, image_root), info)
    images.append(array)
    encoded.append(data)
  answer, mentions = convert_answer(record["a"], record["groundings"], len(ids), image_index.object_name)
  masks = []
  for i, mention in enumerate(mentions):
    info = infos[mention.image]
    try:
      masks.append(decode_segmentation(mention.segmentation, info.height, info.width))
    except ValueError as e:
      raise SkipExample(MALFORMED_SEGMENTATION, f"[SEG] {i} ({mention.phrase!r}, "
                                                f"IMAGE{mention.image + 1}): {e}") from None
  example = GroundedExample(
      example_id="/".join(p for p in (source, split, str(index)) if p),
      source=source,
      category=record.get("category", ""),
      images=images,
      image_ids=[str(i) for i in ids],
      question=convert_question(record["q"], len(ids)),
      answer=answer,
      phrases=[m.phrase for m in mentions],
      mask_image=[m.image for m in mentions],
      masks=masks)
  example.check()
  return example, encoded


def record_to_example(record: Any, index: int, *, image_index: ImageIndex, image_root: str | os.PathLike,
                      max_images: int = DEFAULT_MAX_IMAGES, split: str = "") -> GroundedExample:
  """Decodes one record into a ``GroundedExample`` (images uint8 [H_k, W_k, 3], masks bool [H_k, W_k]).

  Args:
    record: one M⁴Seg record.
    index: its position in its split (used in the example id ``source/split/index`` and messages).
    image_index: the annotation index of the record's source and split.
    image_root: the directory that the annotation file's ``file_name`` entries are relative to.
    max_images: records with more images are skipped.
    split: the split name, part of the example id.

  Raises:
    SkipExample: with reason invalid_record, too_many_images, malformed_segmentation,
      tag_without_grounding, tag_image_out_of_range, unknown_image_id, missing_image, corrupt_image,
      image_too_large, image_size_mismatch or part_object_unknown.
  """
  return convert_record(record, index, image_index=image_index, image_root=image_root,
                        max_images=max_images, split=split)[0]
