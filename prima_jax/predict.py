r"""Answer a question about 1..max_images images with grounded masks.

  python -m prima_jax.predict --checkpoint=/tmp/prima_demo \
      --image=a.png --image=b.png --question="Which shapes are red?" --out=/tmp/pred
  python -m prima_jax.predict --checkpoint=/tmp/prima_demo --image=frames/ --image='more/*.jpg' \
      --question="In which frames is the dog?" --out=/tmp/pred

``--checkpoint`` is a training workdir (or its ``checkpoints`` dir, or one step dir): the model config
comes from the run's record. ``--config`` alone runs the config's seeded (random) initialisation.

``--image`` (repeatable) is an image file, a directory (every image file directly in it, see
IMAGE_SUFFIXES, in natural order of the file names: ``frame2`` before ``frame10``) or a glob pattern
(``frames/*.jpg``, ``gs://bucket/x/*.png``: the files it matches, in natural order of their paths).
The flags expand in the order given into IMAGE1, IMAGE2, ...; a file listed twice is two images.

Prints the answer and the masks; writes to ``--out``: ``image{k}_overlay.png`` for each image k
(1-based, the ``(IMAGEk)`` of the answer) that has at least one mask, with every mask drawn in its
own colour and labelled with its phrase; ``contact_sheet.png``, every image as a labelled thumbnail
with its masks; ``index.html``, the question, the answer with its grounded phrases in their masks'
colours and every image linking to its overlay; ``prediction.json``. Each file is written whole
(atomically), ``prediction.json`` last: a directory without it holds no complete result. An ``--out``
holding a previous prediction is refused unless ``--overwrite``; then the previous run's files that
this one does not write (e.g. the overlay of an image that has no mask now) are removed, so no stale
file is left beside the new result. Other files in ``--out`` are left alone.

``--checkpoint``, ``--image`` and ``--out`` may be local paths or object-store URLs (``gs://...``);
they are checked before the model is built: a bad one (an empty directory, a pattern matching nothing,
too many images) exits with status 2 and one ``error:`` line.
"""

from __future__ import annotations

import base64
import concurrent.futures
import dataclasses
import html
import io
import json
import os
import posixpath
import re
import sys
import time
from collections.abc import Sequence

import numpy as np
from absl import flags
from PIL import Image, ImageDraw, ImageFont

from prima_jax import cli, paths

# Distinct overlay colours (RGB), cycled.
PALETTE = np.asarray([(230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180),
                      (70, 240, 240), (240, 50, 230), (210, 245, 60), (0, 128, 128), (170, 110, 40)],
                     np.float32)

# The files a directory given as --image contributes (suffix compared case-insensitively).
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
_GLOB_MAGIC = re.compile(r"[*?[]")
_DIGITS = re.compile(r"([0-9]+)")


def natural_key(name: str) -> tuple:
  """Sort key ordering the digit runs of ``name`` by value (``frame2`` < ``frame10``), letters without
  regard to case; ties (``f01`` / ``f1``, ``A`` / ``a``) by the name itself."""
  parts = _DIGITS.split(name)  # text, digits, text, ...: the same type at each position
  return tuple(int(p) if i % 2 else p.casefold() for i, p in enumerate(parts)), name


@dataclasses.dataclass(frozen=True)
class ImageArg:
  """One ``--image`` value and the image files it stands for.

  Attributes:
    arg: the value as given.
    kind: "file", "directory" or "glob".
    files: the files, in order (local paths absolute, URLs as given).
  """
  arg: str
  kind: str
  files: tuple[str, ...]


def _glob(pattern: str, resolved: str) -> list[str]:
  """The files matching ``resolved`` (the absolute pattern or URL), naturally sorted by path."""
  from prima_jax.inference.engine import InputError  # noqa: PLC0415
  parts = resolved.split("/")
  first = next(i for i, part in enumerate(parts) if _GLOB_MAGIC.search(part))
  base, rest = "/".join(parts[:first]) or "/", "/".join(parts[first:])
  try:
    matches = list(paths.resolve(base, what="--image").glob(rest))
  except NotImplementedError:  # epath refuses "**" (a recursive walk costs a request per directory)
    raise InputError(f"--image={pattern}: recursive ** patterns are not supported; use * per "
                     "directory level") from None
  return sorted((str(m) for m in matches if m.is_file()), key=natural_key)


def expand_image_args(args: Sequence[str]) -> list[ImageArg]:
  """Each ``--image`` value with the files it names: itself (a file, or a path that does not exist:
  reading it fails later with its name), every image file directly in a directory (IMAGE_SUFFIXES; no
  hidden files; natural order of the names) or the files a glob pattern matches (natural order).

  A value that exists is never read as a pattern, so a file named ``a[1].png`` is that file.

  Raises:
    InputError: a directory without image files, a pattern that matches no file.
    paths.PathError: an unusable URL.
  """
  from prima_jax.inference.engine import InputError  # noqa: PLC0415
  expanded = []
  for arg in args:
    resolved = paths.resolve(arg, what="--image")
    if resolved.is_dir():
      files = [p for p in resolved.iterdir()
               if p.name.lower().endswith(IMAGE_SUFFIXES) and not p.name.startswith(".") and p.is_file()]
      if not files:
        raise InputError(f"--image={arg}: the directory holds no image file ({' '.join(IMAGE_SUFFIXES)})")
      files.sort(key=lambda p: natural_key(p.name))
      expanded.append(ImageArg(arg, "directory", tuple(str(p) for p in files)))
    elif _GLOB_MAGIC.search(arg) and not resolved.exists():
      files = _glob(arg, str(resolved))
      if not files:
        raise InputError(f"--image={arg}: the pattern matches no file")
      expanded.append(ImageArg(arg, "glob", tuple(files)))
    else:
      expanded.append(ImageArg(arg, "file", (str(resolved),)))
  return expanded


def describe_image_args(expanded: Sequence[ImageArg]) -> str:
  """Where the images came from, for an error message: ``2 files, 70 from --image=frames/``."""
  parts, files = [], 0
  for e in expanded:
    if e.kind == "file":
      files += 1
      continue
    if files:
      parts.append(f"{files} file{'s' if files > 1 else ''}")
      files = 0
    parts.append(f"{len(e.files)} from --image={e.arg}")
  if files:
    parts.append(f"{files} file{'s' if files > 1 else ''}")
  return ", ".join(parts)


# Plain text and markup of an answer: <p>, </p>, and a [SEG] with the (IMAGEk) tag that follows it.
_MARKUP = re.compile(r"(<p>|</p>|\[SEG\](?:\s*\(IMAGE\d+\))?)")
DROPPED_COLOUR = "#9e9e9e"


def hex_colour(rgb) -> str:
  return "#" + "".join(f"{int(c):02x}" for c in rgb)


def seg_colour(j: int) -> str:
  """The colour of the answer's j-th routed [SEG] (0-based), as its mask is drawn in the overlays."""
  return hex_colour(PALETTE[j % len(PALETTE)])


def answer_spans(prediction) -> tuple[list[tuple[str, str | None]], dict[str, str]]:
  """The answer as (text, label) spans for a highlighted-text view, and each label's colour.

  A phrase grounded by a routed ``[SEG]`` becomes one span labelled ``"j: IMAGEk"`` (j = 1-based
  number of the mask, as the overlays label it) in that mask's colour; a phrase whose ``[SEG]`` got no
  mask is labelled ``"no mask: <reason>"`` in grey; the markup itself (``<p>``, ``</p>``, ``[SEG]``,
  the image tag) is not shown. Other text has label None.

  Args:
    prediction: a :class:`prima_jax.inference.grounding.Prediction`.
  """
  # The answer's [SEG]s in order, routed and dropped alike (both kept in generation order).
  tokens = sorted([(s.token_index, j, None) for j, s in enumerate(prediction.segs)]
                  + [(d.token_index, None, d.reason) for d in prediction.dropped])
  spans: list[tuple[str, str | None]] = []
  colours: dict[str, str] = {}
  phrase: str | None = None      # text after <p>, or a closed phrase waiting for its [SEG]
  inside = False
  seg = 0

  def plain(text: str) -> None:
    if text:
      spans.append((text, None))

  for part in _MARKUP.split(prediction.answer):
    if part == "<p>":
      if phrase is not None:
        plain(phrase)
      phrase, inside = "", True
    elif part == "</p>":
      inside = False
    elif part.startswith("[SEG]"):
      text = (phrase or "").strip() or "[SEG]"
      if seg < len(tokens) and tokens[seg][1] is not None:
        label = f"{tokens[seg][1] + 1}: IMAGE{prediction.segs[tokens[seg][1]].image_index + 1}"
        colours[label] = seg_colour(tokens[seg][1])
      else:
        reason = tokens[seg][2] if seg < len(tokens) else "no mask"
        label = f"no mask: {reason}"
        colours[label] = DROPPED_COLOUR
      spans.append((text, label))
      phrase, inside, seg = None, False, seg + 1
    elif inside:
      phrase = (phrase or "") + part
    elif phrase is not None and not part.strip():
      continue                  # between </p> and its [SEG]
    else:
      if phrase is not None:    # a closed phrase without a [SEG]: shown as text
        plain(phrase)
        phrase = None
      plain(part)
  if phrase is not None:
    plain(phrase)
  return spans, colours


def image_caption(prediction, k: int, name: str) -> str:
  """Overlay caption: ``IMAGEk · name · masks 1, 3`` (the numbers of the masks drawn on it)."""
  numbers = [str(j + 1) for j, s in enumerate(prediction.segs) if s.image_index == k]
  return f"IMAGE{k + 1} · {name} · " + (f"masks {', '.join(numbers)}" if numbers else "no mask")


def read_image(path: str | os.PathLike) -> np.ndarray:
  """uint8 [H, W, 3] RGB of a local or object-store image, decoded as the dataset builder does
  (``prima_jax.data.images``: EXIF orientation, every mode to 8-bit RGB, the pixel limit);
  InputError naming the path when it cannot be read or decoded (paths.PathError for an unusable URL)."""
  from prima_jax.data import images  # noqa: PLC0415
  from prima_jax.inference.engine import InputError  # noqa: PLC0415

  resolved = paths.resolve(path, what="--image")
  try:
    data = resolved.read_bytes()
  except OSError as e:
    raise InputError(f"cannot read image {path}: {e.strerror or e}") from None
  try:
    return images.decode(data, str(path))
  except images.ImageError as e:
    raise InputError(f"cannot read image {e}") from None


def read_images(image_paths: Sequence[str]) -> list[np.ndarray]:
  """:func:`read_image` of each path, a few at a time (object-store reads wait on the network); the
  error of the first unreadable one in order."""
  if len(image_paths) <= 1:
    return [read_image(p) for p in image_paths]
  with concurrent.futures.ThreadPoolExecutor(min(8, len(image_paths))) as pool:
    return list(pool.map(read_image, image_paths))


# Overlays of smaller images are enlarged (nearest neighbour, integer factor) so their labels stay legible.
MIN_OVERLAY_SIDE = 256


def overlay_scale(height: int, width: int) -> int:
  """Integer enlargement factor of an overlay: the shorter side reaches at least MIN_OVERLAY_SIDE."""
  return max(1, -(-MIN_OVERLAY_SIDE // min(height, width)))


def draw_overlay(image: np.ndarray, masks: Sequence[np.ndarray], labels: Sequence[str],
                 colours: Sequence[np.ndarray]) -> Image.Image:
  """The image with each mask blended in its colour and its label written at the mask's centre.

  Images with a side under MIN_OVERLAY_SIDE pixels are drawn enlarged by :func:`overlay_scale`.
  """
  from prima_jax.training.visualize import overlay  # noqa: PLC0415
  scale = overlay_scale(*image.shape[:2])
  enlarge = lambda x: np.repeat(np.repeat(x, scale, axis=0), scale, axis=1)  # noqa: E731
  image, masks = enlarge(image), [enlarge(m) for m in masks]
  out = image
  for mask, colour in zip(masks, colours):
    out = overlay(out, mask, colour)
  pil = Image.fromarray(out)
  draw = ImageDraw.Draw(pil)
  for mask, label, colour in zip(masks, labels, colours):
    ys, xs = np.nonzero(mask)
    if len(ys):
      draw.text((float(xs.mean()), float(ys.mean())), label, fill=tuple(int(c) for c in colour),
                stroke_width=1, stroke_fill=(0, 0, 0))
  return pil


PREDICTION_FILE = "prediction.json"
CONTACT_SHEET_FILE = "contact_sheet.png"
INDEX_FILE = "index.html"


def overlay_name(k: int) -> str:
  """The overlay file of image k (0-based)."""
  return f"image{k + 1}_overlay.png"


_OUTPUT_FILE = re.compile(r"^(?:prediction\.json|contact_sheet\.png|index\.html|image[0-9]+_overlay\.png)$")


def previous_outputs(out_dir: str | os.PathLike) -> list[str]:
  """The names of the files in ``out_dir`` that a prediction writes (sorted; empty when none).

  Raises:
    paths.PathError: ``out_dir`` is a file.
  """
  out = paths.resolve(out_dir, what="--out")
  if not out.exists():
    return []
  if not out.is_dir():
    raise paths.PathError(f"--out={out_dir} is a file, not a directory")
  return sorted(p.name for p in out.iterdir() if _OUTPUT_FILE.match(p.name))


def check_out(out_dir: str | os.PathLike, *, overwrite: bool) -> None:
  """FileExistsError when ``out_dir`` holds a previous prediction and ``overwrite`` is False."""
  found = previous_outputs(out_dir)
  if found and not overwrite:
    shown = found if len(found) <= 6 else [*found[:5], f"... {len(found)} files"]
    raise FileExistsError(f"--out={out_dir} holds a previous prediction ({', '.join(shown)}); pass "
                          "--overwrite to replace it")


# Contact sheet: each image scaled to fit a THUMB_SIDE square, its label below, up to
# SHEET_COLUMNS cells a row, IMAGE1 top left, row by row.
THUMB_SIDE = 160
SHEET_PAD = 8
SHEET_LABEL_HEIGHT = 32
SHEET_COLUMNS = 8
CELL_WIDTH = THUMB_SIDE + 2 * SHEET_PAD
CELL_HEIGHT = THUMB_SIDE + 2 * SHEET_PAD + SHEET_LABEL_HEIGHT


def sheet_columns(num_images: int) -> int:
  return max(1, min(SHEET_COLUMNS, num_images))


def sheet_thumb_box(k: int, num_images: int) -> tuple[int, int, int, int]:
  """(left, top, right, bottom) of the THUMB_SIDE square that holds image k's (0-based) thumbnail."""
  row, col = divmod(k, sheet_columns(num_images))
  left, top = col * CELL_WIDTH + SHEET_PAD, row * CELL_HEIGHT + SHEET_PAD
  return left, top, left + THUMB_SIDE, top + THUMB_SIDE


def _interior(mask: np.ndarray) -> np.ndarray:
  """bool [h, w]: the pixels of ``mask`` whose 4 neighbours are all in it (outside counts as out)."""
  inner = np.pad(mask, 1)
  return inner[1:-1, 1:-1] & inner[:-2, 1:-1] & inner[2:, 1:-1] & inner[1:-1, :-2] & inner[1:-1, 2:]


def draw_thumbnail(image: np.ndarray, masks: Sequence[np.ndarray], colours: Sequence[np.ndarray],
                   side: int = THUMB_SIDE) -> np.ndarray:
  """uint8 [h, w, 3], the longer side ``side``: the image scaled (nearest neighbour when enlarged),
  each mask blended in its colour and outlined in it exactly (the outline keeps small masks visible)."""
  from prima_jax.training.visualize import overlay  # noqa: PLC0415
  h, w = image.shape[:2]
  scale = side / max(h, w)
  size = (max(1, round(w * scale)), max(1, round(h * scale)))
  pil = Image.fromarray(image)
  # reducing_gap: a large photo is first reduced by an integer factor (fast), then resampled.
  out = np.asarray(pil.resize(size, Image.Resampling.NEAREST) if scale >= 1 else
                   pil.resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0))
  for mask, colour in zip(masks, colours):
    cover = np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize(size, Image.Resampling.BOX),
                       np.float32) / 255
    small = cover >= 0.5
    if not small.any() and cover.max() > 0:  # a mask smaller than a thumbnail pixel: its best pixel(s)
      small = cover >= cover.max()
    out = overlay(out, small, colour)
    out[small & ~_interior(small)] = np.asarray(colour, np.uint8)
  return out


def _font(size: int):
  try:
    return ImageFont.load_default(size=size)
  except (ImportError, OSError):  # Pillow without FreeType: the fixed bitmap font
    return ImageFont.load_default()


def _fit(draw: ImageDraw.ImageDraw, text: str, font, width: float) -> str:
  """``text``, shortened in the middle with an ellipsis until it is at most ``width`` pixels wide (the
  start and the end, e.g. a frame number and the suffix, stay)."""
  if draw.textlength(text, font=font) <= width:
    return text
  head, tail = text[:len(text) // 2], text[len(text) // 2:]
  while head or tail:
    if len(head) >= len(tail):
      head = head[:-1]
    else:
      tail = tail[1:]
    if draw.textlength(head + "…" + tail, font=font) <= width:
      return head + "…" + tail
  return "…"


def image_name(path: str) -> str:
  """The file name of a local path or URL."""
  return posixpath.basename(str(path).rstrip("/")) or str(path)


def _masks_of(prediction, k: int) -> list[int]:
  """The 0-based answer positions of image k's masks."""
  return [j for j, s in enumerate(prediction.segs) if s.image_index == k]


def _thumbnails(prediction, images: Sequence[np.ndarray]) -> list[np.ndarray]:
  return [draw_thumbnail(image, [prediction.segs[j].mask for j in _masks_of(prediction, k)],
                         [PALETTE[j % len(PALETTE)] for j in _masks_of(prediction, k)])
          for k, image in enumerate(images)]


def draw_contact_sheet(prediction, thumbnails: Sequence[np.ndarray], names: Sequence[str]) -> Image.Image:
  """Every image's thumbnail in a grid of up to SHEET_COLUMNS columns (white), labelled ``IMAGEk``
  (with the numbers of its masks) and its file name: RGB [rows * CELL_HEIGHT, columns * CELL_WIDTH]."""
  n = len(thumbnails)
  columns = sheet_columns(n)
  rows = -(-n // columns)
  sheet = Image.new("RGB", (columns * CELL_WIDTH, rows * CELL_HEIGHT), (255, 255, 255))
  draw = ImageDraw.Draw(sheet)
  font = _font(12)
  for k, (thumb, name) in enumerate(zip(thumbnails, names)):
    left, top, right, bottom = sheet_thumb_box(k, n)
    th, tw = thumb.shape[:2]
    # Centred across, at the bottom of its square: right above the label.
    sheet.paste(Image.fromarray(thumb), (left + (THUMB_SIDE - tw) // 2, bottom - th))
    numbers = [str(j + 1) for j in _masks_of(prediction, k)]
    title = f"IMAGE{k + 1}" + (f"  masks {', '.join(numbers)}" if numbers else "")
    draw.text((left, bottom + 2), _fit(draw, title, font, THUMB_SIDE), fill=(0, 0, 0), font=font)
    draw.text((left, bottom + 17), _fit(draw, name, font, THUMB_SIDE), fill=(90, 90, 90), font=font)
  return sheet


def _text_colour(hex_colour: str) -> str:
  """Black or white, whichever reads better on the background ``#rrggbb``."""
  r, g, b = (int(hex_colour[i:i + 2], 16) for i in (1, 3, 5))
  return "#000" if 0.299 * r + 0.587 * g + 0.114 * b > 140 else "#fff"


_PAGE_STYLE = """body{font-family:system-ui,sans-serif;margin:1.5em;color:#222}
.answer{font-size:1.15em;line-height:1.9}
.answer mark{padding:.1em .3em;border-radius:4px}
.tag{font-size:.7em;margin-left:.2em;vertical-align:super;color:#555}
.grid{display:flex;flex-wrap:wrap;gap:12px}
figure{margin:0;width:THUMBpx}
figure img{display:block;max-width:100%;border:1px solid #ccc}
figcaption{font-size:.8em;overflow-wrap:anywhere}
a.masked img{border:2px solid #333}""".replace("THUMB", str(THUMB_SIDE))


# answer_spans' label of a phrase with a mask: "j: IMAGEk".
_ROUTED_LABEL = re.compile(r"^[0-9]+: IMAGE([0-9]+)$")


def render_index(prediction, question: str, names: Sequence[str], thumbnails: Sequence[np.ndarray],
                 overlays: Sequence[str | None]) -> str:
  """index.html: the question, the answer with each grounded phrase in its mask's colour (the web
  demo's spans, linking to the image it lies in), and every image as a thumbnail (embedded, so the
  page needs no other file) linking to its overlay where it has one. Links are relative."""

  spans, colours = answer_spans(prediction)
  answer = []
  for text, label in spans:
    if label is None:
      answer.append(html.escape(text))
      continue
    colour = colours[label]
    tag = html.escape(label)
    routed = _ROUTED_LABEL.match(label)
    if routed:
      tag = f'<a href="#image{routed.group(1)}">{tag}</a>'
    answer.append(f'<mark style="background:{colour};color:{_text_colour(colour)}">{html.escape(text)}'
                  f'</mark><span class="tag">{tag}</span>')
  figures = []
  for k, (thumb, name, overlay) in enumerate(zip(thumbnails, names, overlays)):
    buf = io.BytesIO()
    Image.fromarray(thumb).save(buf, format="JPEG", quality=88)
    img = (f'<img src="data:image/jpeg;base64,{base64.b64encode(buf.getvalue()).decode()}" '
           f'alt="IMAGE{k + 1}" width="{thumb.shape[1]}" height="{thumb.shape[0]}">')
    if overlay is not None:
      img = f'<a class="masked" href="{html.escape(overlay)}">{img}</a>'
    caption = html.escape(image_caption(prediction, k, name))
    figures.append(f'<figure id="image{k + 1}">{img}<figcaption>{caption}</figcaption></figure>')
  masked = len({s.image_index for s in prediction.segs})
  summary = (f"{len(prediction.segs)} mask(s) in {masked} of {len(names)} image(s); "
             f"{len(prediction.dropped)} [SEG] without mask"
             + ("" if prediction.finished else "; stopped at the token budget"))
  return f"""<!DOCTYPE html>
<html lang="en">
<head><meta charset="utf-8"><title>{html.escape(question)}</title><style>{_PAGE_STYLE}</style></head>
<body>
<h2>Question</h2>
<p>{html.escape(question)}</p>
<h2>Answer</h2>
<p class="answer">{"".join(answer)}</p>
<p>{html.escape(summary)}. <a href="{PREDICTION_FILE}">{PREDICTION_FILE}</a> ·
<a href="{CONTACT_SHEET_FILE}">{CONTACT_SHEET_FILE}</a></p>
<h2>Images</h2>
<div class="grid">
{chr(10).join(figures)}
</div>
</body>
</html>
"""


def _png(image: Image.Image) -> bytes:
  buf = io.BytesIO()
  image.save(buf, format="PNG")
  return buf.getvalue()


def write_outputs(out_dir: str | os.PathLike, prediction, images: Sequence[np.ndarray],
                  image_paths: Sequence[str], question: str, meta: dict, *,
                  all_overlays: bool = True) -> dict:
  """Writes the overlays, ``contact_sheet.png`` and ``index.html``, removes a previous run's files that
  this one does not write, then writes ``prediction.json`` (each file atomically, local or object
  store); returns the JSON dict.

  Args:
    images: uint8 [H, W, 3] each, IMAGE1 first; ``image_paths``: where each came from (the record's
      ``images``; the file names label the contact sheet and the page).
    all_overlays: an overlay for every image (the web demo shows one per image); False: only for the
      images with at least one mask (the command line, for which an unmasked image is in the contact
      sheet and the page).
  """
  out = paths.resolve(out_dir, what="--out")
  names = [image_name(p) for p in image_paths]
  overlays = [overlay_name(k) if all_overlays or _masks_of(prediction, k) else None
              for k in range(len(images))]
  record = dict(question=question, images=list(image_paths), image_index_base=1, **prediction.to_json(),
                overlays=overlays, **meta)
  files = {}
  for k, image in enumerate(images):
    if overlays[k] is not None:
      segs = _masks_of(prediction, k)
      files[overlays[k]] = _png(draw_overlay(
          image, [prediction.segs[j].mask for j in segs],
          [f"{j + 1}: {prediction.segs[j].phrase}" for j in segs], [PALETTE[j % len(PALETTE)] for j in segs]))
  thumbnails = _thumbnails(prediction, images)
  files[CONTACT_SHEET_FILE] = _png(draw_contact_sheet(prediction, thumbnails, names))
  files[INDEX_FILE] = render_index(prediction, question, names, thumbnails, overlays).encode("utf-8")
  stale = [name for name in previous_outputs(out) if name not in files]
  # The previous prediction.json goes first: while the overlays change, none describes them.
  for name in sorted(stale, key=lambda n: n != PREDICTION_FILE):
    (out / name).unlink()
  for name, data in files.items():
    paths.write_bytes_atomic(out / name, data)
  paths.write_text_atomic(out / PREDICTION_FILE, json.dumps(record, indent=1))
  return record


def check_request(question: str, num_images: int, max_images: int, *, sources: str = "") -> None:
  """InputError for an empty question, no image, or more images than the model takes (``sources``:
  where the images came from, added to that message)."""
  from prima_jax.inference.engine import InputError  # noqa: PLC0415
  if not question or not question.strip():
    raise InputError("the question is empty (--question)")
  if not num_images:
    raise InputError("no image given (--image FILE, DIRECTORY or PATTERN, repeatable)")
  if num_images > max_images:
    raise InputError(f"{num_images} images given{f' ({sources})' if sources else ''}; the model takes at "
                     f"most {max_images}")


class Session:
  """A loaded model that answers questions: weights, tokenisers and the compiled predictor, kept
  between questions (the command line asks one; the web demo, :mod:`prima_jax.demo`, many).

  Args:
    opened: ``prima_jax.inference.loading.open_run(config, checkpoint)``.
    data_dir: directory holding ``tokenizers/`` (default: the run's data).
    max_new_tokens: generation budget in tokens.
  """

  def __init__(self, opened, *, data_dir: str | None = None, max_new_tokens: int = 128):
    from prima_jax.inference.engine import Predictor  # noqa: PLC0415
    from prima_jax.inference.loading import load  # noqa: PLC0415
    self.opened = opened
    self.loaded = load(opened, data_dir=data_dir, build_missing_tokenizers=True)
    self.max_new_tokens = max_new_tokens
    self.predictor = Predictor(self.loaded.model, self.loaded.tokenizers, max_new_tokens=max_new_tokens,
                               max_question_length=self.loaded.config.data.max_question_length)

  @property
  def max_images(self) -> int:
    return int(self.loaded.config.model.prima.max_images)

  def answer(self, images: Sequence[np.ndarray], question: str, *, temperature: float = 0.0,
             top_p: float = 1.0, seed: int = 0, answer_prefix: str | None = None):
    """The grounded answer to ``question`` about ``images`` (uint8 [H, W, 3] each, IMAGE1 first).

    Returns (prediction, meta): the :class:`prima_jax.inference.grounding.Prediction` and the record's
    run fields (checkpoint, step, seconds, sampling, max_new_tokens). Raises InputError (see
    :func:`check_request`, and a prompt too long for the model).
    """
    from prima_jax.inference.generate import SamplingConfig  # noqa: PLC0415
    check_request(question, len(images), self.max_images)
    sampling = SamplingConfig(temperature=temperature, top_p=top_p, seed=seed)
    example = self.predictor.prepare(list(images), question, forced_answer=answer_prefix, forced_eos=False,
                                     seed=seed)
    t0 = time.time()
    prediction = self.predictor.predict([example], sampling)[0]
    meta = dict(checkpoint=self.opened.checkpoint, step=self.loaded.step, seconds=round(time.time() - t0, 3),
                sampling=dict(temperature=temperature, top_p=top_p, seed=seed),
                max_new_tokens=self.max_new_tokens)
    return prediction, meta


def run(*, config=None, checkpoint: str | None = None, image_paths: Sequence[str], question: str,
        out_dir: str, data_dir: str | None = None, max_new_tokens: int = 128, temperature: float = 0.0,
        top_p: float = 1.0, seed: int = 0, answer_prefix: str | None = None, overwrite: bool = False) -> dict:
  """Reads the images, predicts, writes ``out_dir``; returns the prediction record.

  ``image_paths``: the ``--image`` values, each a file, a directory or a glob pattern
  (:func:`expand_image_args`); the files they expand to are IMAGE1, IMAGE2, ... in order.

  Raises, before the model is built: paths.PathError (an unusable --out, --checkpoint or --image
  URL, an --out that is a file), FileExistsError (``out_dir`` holds a previous prediction and not
  ``overwrite``), workdir.NotAWorkdir (no checkpoint there), InputError (bad image path or content, a
  directory without images, a pattern matching nothing, image count, empty question).
  """
  from prima_jax.inference.loading import open_run  # noqa: PLC0415

  expanded = expand_image_args(image_paths)
  files = [f for e in expanded for f in e.files]
  check_out(out_dir, overwrite=overwrite)
  opened = open_run(config, checkpoint)
  check_request(question, len(files), opened.config.model.prima.max_images,
                sources=describe_image_args(expanded))
  images = read_images(files)
  session = Session(opened, data_dir=data_dir, max_new_tokens=max_new_tokens)
  prediction, meta = session.answer(images, question, temperature=temperature, top_p=top_p, seed=seed,
                                    answer_prefix=answer_prefix)
  return write_outputs(out_dir, prediction, images, files, question, meta, all_overlays=False)


def format_record(record: dict) -> str:
  lines = [f"answer: {record['answer']}"]
  for j, s in enumerate(record["segs"]):
    lines.append(f"  [SEG] {j + 1}: {s['phrase']!r} -> IMAGE{s['image']}  area {s['area']} px  "
                 f"score {s['score']:.3f}")
  for d in record["dropped"]:
    lines.append(f"  [SEG] without mask ({d['reason']}): {d['phrase']!r}")
  return "\n".join(lines)


def main(argv) -> int:
  del argv
  from prima_jax.inference.engine import InputError  # noqa: PLC0415
  from prima_jax.workdir import IncompatibleCheckpoint, NotAWorkdir  # noqa: PLC0415
  if _OUT.value is None:
    print("error: --out is required", file=sys.stderr)
    return 2
  try:
    record = run(config=_CONFIG.value, checkpoint=_CHECKPOINT.value, image_paths=_IMAGES.value,
                 question=_QUESTION.value, out_dir=_OUT.value, data_dir=_DATA_DIR.value,
                 max_new_tokens=_MAX_NEW_TOKENS.value, temperature=_TEMPERATURE.value, top_p=_TOP_P.value,
                 seed=_SEED.value, answer_prefix=_ANSWER_PREFIX.value, overwrite=_OVERWRITE.value)
  except (paths.PathError, NotAWorkdir, IncompatibleCheckpoint, InputError, OSError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr, flush=True)
    return 2
  print(format_record(record))
  out = paths.resolve(_OUT.value)
  overlays = sum(o is not None for o in record["overlays"])
  print(f"wrote {out / INDEX_FILE} (open it in a browser), {CONTACT_SHEET_FILE}, {overlays} overlay PNG(s) "
        f"(the images with masks, of {len(record['images'])}) and {PREDICTION_FILE} "
        f"({record['seconds']:.2f} s including compilation)", flush=True)
  return 0


if __name__ == "__main__":
  # Flags are defined only when run as a program, so that importing the module defines none.
  _CONFIG, _CHECKPOINT = cli.define_run_flags()
  _IMAGES = flags.DEFINE_multi_string("image", [], "Image file, directory (its image files, natural "
                                      "order) or glob pattern ('frames/*.jpg'), local or a URL; repeat: the "
                                      "files are IMAGE1, IMAGE2, ... in flag order.")
  _QUESTION = flags.DEFINE_string("question", "", "The question.")
  _OUT = flags.DEFINE_string("out", None, "Output directory (local or a URL such as gs://bucket/pred).")
  _DATA_DIR = flags.DEFINE_string("data_dir", None, "Directory holding tokenizers/ (default: the run data).")
  _MAX_NEW_TOKENS = flags.DEFINE_integer("max_new_tokens", 128, "Generation budget in tokens.")
  _TEMPERATURE = flags.DEFINE_float("temperature", 0.0, "0 = greedy; > 0 samples.")
  _TOP_P = flags.DEFINE_float("top_p", 1.0, "Nucleus sampling mass.")
  _SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")
  _ANSWER_PREFIX = flags.DEFINE_string("answer_prefix", None, "Force the answer to start with this text.")
  _OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace a previous prediction in --out.")
  cli.run(main)
